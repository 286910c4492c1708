"""Training diffusion models: data streams, checkpoints, metrics and the training loop."""
