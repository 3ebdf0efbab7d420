"""Verifiable chat tasks (verifiable.py: the generator and its checkers) and how a model does on them
(evaluation.py). SFT's demo trains on them; the reward-model and PPO demos build on them."""
