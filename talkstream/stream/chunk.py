"""One streaming step: denoise a chunk of latent frames against the KV cache, then commit it.

Two samplers over a decreasing sigma list ending at 0:
- ``euler``: the probability-flow ODE (x += (s' - s) v), for models that were not distilled (teacher-free
  diffusion-forcing causal models, 10-30 steps);
- ``few_step``: Self-Forcing / CausVid style, each step predicts the clean chunk and re-noises it to the next
  level with fresh noise (3-4 steps, for distilled models).
Classifier-free guidance on the audio costs a second forward pass per step. The final clean chunk is run
once more at timestep 0 with ``commit=True`` so its keys/values enter the cache for the chunks after it.
"""

from __future__ import annotations

import torch

from ..diffusion.flow import NUM_TRAIN_TIMESTEPS, add_noise, x0_from_velocity
from ..diffusion.samplers import guided_velocity
from ..models.dit import WanDiT
from ..models.kv_cache import KVCache

SAMPLERS = ("euler", "few_step")


def chunk_velocity(
    model: WanDiT,
    cache: KVCache,
    x: torch.Tensor,
    sigma: torch.Tensor,
    context,
    audio,
    context_mask,
    audio_guidance: float = 1.0,
) -> torch.Tensor:
    t = sigma * NUM_TRAIN_TIMESTEPS
    v = model.forward_chunk(x, t, cache, context, audio, context_mask=context_mask)
    if audio_guidance != 1.0 and audio is not None:
        v_none = model.forward_chunk(x, t, cache, context, torch.zeros_like(audio), context_mask=context_mask)
        v = guided_velocity([v_none, v], [audio_guidance])
    return v


@torch.no_grad()
def denoise_chunk(
    model: WanDiT,
    cache: KVCache,
    noise: torch.Tensor,
    sigmas: torch.Tensor,
    context: torch.Tensor | None = None,
    audio: torch.Tensor | None = None,
    context_mask: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
    commit: bool = True,
    sampler: str = "few_step",
    audio_guidance: float = 1.0,
) -> torch.Tensor:
    """noise [B, C, k, h, w] at sigmas[0] -> clean chunk (``sigmas`` ends with 0)."""
    if sampler not in SAMPLERS:
        raise ValueError(f"unknown sampler {sampler!r}; choose one of {SAMPLERS}")
    x = x0 = noise
    for i in range(len(sigmas) - 1):
        v = chunk_velocity(model, cache, x, sigmas[i], context, audio, context_mask, audio_guidance)
        if sampler == "euler":
            x = x0 = x + (sigmas[i + 1] - sigmas[i]) * v
            continue
        x0 = x0_from_velocity(x, v, sigmas[i])
        if sigmas[i + 1] > 0:
            fresh = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
            x = add_noise(x0, fresh, sigmas[i + 1])
    if commit:
        model.forward_chunk(x0, 0.0, cache, context, audio, commit=True, context_mask=context_mask)
    return x0
