"""One streaming step: denoise a chunk of latent frames in a few steps against the KV cache, then commit it.

Self-Forcing / CausVid style: each step predicts the clean chunk from the current noise level and
re-noises it to the next level with fresh noise; the final clean chunk is run once more at timestep 0
with ``commit=True`` so its keys/values enter the cache for the chunks after it.
"""

from __future__ import annotations

import torch

from ..diffusion.flow import NUM_TRAIN_TIMESTEPS, add_noise, x0_from_velocity
from ..models.dit import WanDiT
from ..models.kv_cache import KVCache


@torch.no_grad()
def denoise_chunk(model: WanDiT, cache: KVCache, noise: torch.Tensor, sigmas: torch.Tensor,
                  context: torch.Tensor | None = None, audio: torch.Tensor | None = None,
                  context_mask: torch.Tensor | None = None, generator: torch.Generator | None = None,
                  commit: bool = True) -> torch.Tensor:
    """noise [B, C, k, h, w] at sigmas[0] -> clean chunk; ``sigmas`` ends with 0 (``sigmas_from_timesteps``)."""
    x = noise
    x0 = noise
    for i in range(len(sigmas) - 1):
        v = model.forward_chunk(x, sigmas[i] * NUM_TRAIN_TIMESTEPS, cache, context, audio, context_mask=context_mask)
        x0 = x0_from_velocity(x, v, sigmas[i])
        if sigmas[i + 1] > 0:
            fresh = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
            x = add_noise(x0, fresh, sigmas[i + 1])
    if commit:
        model.forward_chunk(x0, 0.0, cache, context, audio, commit=True, context_mask=context_mask)
    return x0
