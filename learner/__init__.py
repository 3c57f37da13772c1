"""Learner: QLoRA model loading, the GRPO math as pure functions, the `Learner` actor and its export."""
