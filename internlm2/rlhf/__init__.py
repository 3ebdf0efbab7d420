"""COOL RLHF: the conditional reward model (losses, training, scoring) and online PPO (rollouts,
advantages, losses, fast-path rounds), as task logic over the shared training engine."""
