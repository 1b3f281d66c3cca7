"""The networks: the decomposer, the baselines, their shared pieces, losses and checkpoints."""
