"""The leaf every other package builds on: what crosses actor boundaries, and nothing of the project.

`records` (the rollout `Group`, the scored `Batch`, a `WeightUpdate`, a `SyncAck`), the config base
class, the weight checksum, the learner-to-engine weight-name map, and the facts several layers share:
the named seed derivations (`seeds`), the one even split (`partition`) and where the shipped configs
and assets live (`shipped`). Imports flow one way: this package <- rollout/, learner/, rewards/ <-
cluster/ (the orchestration). Nothing here imports any of them (tests/unit/test_import_layers.py).
"""
