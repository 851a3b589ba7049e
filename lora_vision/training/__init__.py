"""Pieces shared by the training recipes: config loading, losses, optimizers, checkpoints, caching, the step."""
