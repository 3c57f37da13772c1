"""Data: prompt sets from files or the hub (`prompts`), and held-out evaluation on the rollout pool."""
