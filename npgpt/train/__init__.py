"""Training: data (text -> token windows -> batches), the one training loop, run checkpoints, metrics."""
