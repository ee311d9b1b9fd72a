"""Training: data packs from the world, the training runner, and the stages (VAE, tiny decoder, teacher, causal)."""
