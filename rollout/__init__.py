"""Rollout: one vLLM engine per `RolloutWorker` actor; samples groups, reloads the policy in place."""
