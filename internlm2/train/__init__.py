"""Training: the trainer loop, stages, checkpoints, metrics (FLOPs, MFU, logging, timers), plots."""
