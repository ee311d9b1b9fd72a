"""Models: the Wan2.1-style DiT with audio/reference conditioning, the causal VAE, tiny decoder, encoders, checkpoints."""
