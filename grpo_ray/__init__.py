"""The leaf every other package builds on: what crosses actor boundaries, and nothing of the project.

`records` (the rollout `Group`, the scored `Batch`, a `WeightUpdate`, a `SyncAck`), the config base
class, the weight checksum and the learner-to-engine weight-name map. Imports flow one way: this
package <- rollout/, learner/, rewards/ <- cluster/ (the orchestration). Nothing here imports any of them.
"""
