"""Models: the Wan2.1-style DiT with audio/reference conditioning, causal VAE, tiny decoder, encoders, checkpoints."""
