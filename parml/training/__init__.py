"""Training runs: building the levels and the V-cycle on the ranks, the loop with its per-cycle
hooks, the trainer, checkpoints, the cascade's stages and the run folder."""
