"""The warm pool: a run's actors started before the run, so `grpo-ray train` starts in seconds.

`grpo-ray warm up CONFIG` starts a background process (daemon.py) that owns a local Ray and, in it,
one spare of every actor a run of CONFIG starts: each rollout worker with its engine built, and the
learner with its 4-bit model loaded (registry.py). Each spare is created from the very `ActorSpec`
the run would use (cluster/placement.py), so it is the same actor, only started earlier. A run with
no Ray address finds the pool (client.py), and when every key matches (keys.py: class, constructor
arguments, Ray options, the project's code and packages, the model's files) it adopts the spares
whole, then syncs them from the learner exactly as fresh ones. A spare serves one run; the pool
starts new ones when that run's driver is gone. Anything that does not match starts cold, as before.
"""
