"""One streaming step: denoise a chunk of latent frames against the KV cache, then commit it.

Two samplers over a decreasing sigma list ending at 0:
- ``euler``: the probability-flow ODE (x += (s' - s) v), for models that were not distilled (teacher-free
  diffusion-forcing causal models, 10-30 steps);
- ``few_step``: Self-Forcing / CausVid style, each step predicts the clean chunk and re-noises it to the next
  level with fresh noise (3-4 steps, for distilled models).
Classifier-free guidance on the audio costs a second forward pass per step.

What enters the KV cache for the chunks after this one (``cache_mode``):
- ``commit`` (Self-Forcing / CausVid): the final clean chunk is run once more at timestep 0 with ``commit=True``,
  so the cache holds clean keys/values; one extra forward pass per chunk;
- ``timestep_forcing`` (Live Avatar): the last denoising step writes the keys/values of its own (noisy) input at
  its own timestep while it predicts; no extra pass (2 passes instead of 3 for a 2-step student).
"""

from __future__ import annotations

import torch

from ..diffusion.flow import NUM_TRAIN_TIMESTEPS, add_noise, x0_from_velocity
from ..diffusion.samplers import guided_velocity
from ..models.dit import WanDiT
from ..models.kv_cache import KVCache
from .runner import ChunkRunner

SAMPLERS = ("euler", "few_step")
CACHE_MODES = ("commit", "timestep_forcing")


def chunk_velocity(
    model: WanDiT,
    cache: KVCache,
    x: torch.Tensor,
    sigma: torch.Tensor,
    context,
    audio,
    context_mask,
    audio_guidance: float = 1.0,
    commit: bool = False,
) -> torch.Tensor:
    """The (audio-guided) velocity of chunk ``x`` at ``sigma``; ``commit``: the conditional pass also writes its
    keys/values into the cache (timestep forcing)."""
    t = sigma * NUM_TRAIN_TIMESTEPS
    guided = audio_guidance != 1.0 and audio is not None
    # the unconditional pass reads the cache before the conditional one may write the chunk's keys into it
    v_none = (
        model.forward_chunk(x, t, cache, context, torch.zeros_like(audio), context_mask=context_mask)
        if guided
        else None
    )
    v = model.forward_chunk(x, t, cache, context, audio, context_mask=context_mask, commit=commit)
    if guided:
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
    generator: torch.Generator | list[torch.Generator] | None = None,
    commit: bool = True,
    sampler: str = "few_step",
    audio_guidance: float = 1.0,
    cache_mode: str = "commit",
    runner: ChunkRunner | None = None,
) -> torch.Tensor:
    """noise [B, C, k, h, w] at sigmas[0] -> clean chunk (``sigmas`` ends with 0). With ``commit`` the chunk enters
    the cache as ``cache_mode`` says (module docstring). ``runner`` (``stream.runner``): the passes run against a
    context prepared once for the chunk (and replayed as a CUDA graph); without audio guidance only. ``generator``:
    the few-step sampler's fresh noise, one generator, or one per batch row (streams batched together)."""
    if sampler not in SAMPLERS:
        raise ValueError(f"unknown sampler {sampler!r}; choose one of {SAMPLERS}")
    if cache_mode not in CACHE_MODES:
        raise ValueError(f"unknown cache_mode {cache_mode!r}; choose one of {CACHE_MODES}")
    forcing = commit and cache_mode == "timestep_forcing"
    n = len(sigmas) - 1
    prepared = uses_runner(runner, audio, audio_guidance)
    if prepared:
        runner.begin(cache, noise.shape, context, context_mask, audio)

        def velocity(x, sigma, commit):
            return runner.forward(x, sigma * NUM_TRAIN_TIMESTEPS, cache, commit=commit)
    else:

        def velocity(x, sigma, commit):
            return chunk_velocity(model, cache, x, sigma, context, audio, context_mask, audio_guidance, commit=commit)

    x = x0 = noise
    for i in range(n):
        last = forcing and i == n - 1
        v = velocity(x, sigmas[i], last)
        if sampler == "euler":
            x = x0 = x + (sigmas[i + 1] - sigmas[i]) * v
            continue
        x0 = x0_from_velocity(x, v, sigmas[i])
        if sigmas[i + 1] > 0:
            x = add_noise(x0, fresh_noise(x, generator), sigmas[i + 1])
    if commit and not forcing:
        commit_chunk(model, cache, x0, context, audio, context_mask, runner if prepared else None)
    return x0


def fresh_noise(x: torch.Tensor, generator: torch.Generator | list[torch.Generator] | None) -> torch.Tensor:
    """Standard noise shaped as ``x``: from one generator, or row by row from one generator per batch row (each row
    the draw its stream would make alone)."""
    if not isinstance(generator, list):
        return torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
    if len(generator) != x.shape[0]:
        raise ValueError(f"{len(generator)} generators for a batch of {x.shape[0]}")
    return torch.cat([torch.randn((1, *x.shape[1:]), generator=g, device=x.device, dtype=x.dtype) for g in generator])


def uses_runner(runner: ChunkRunner | None, audio: torch.Tensor | None, audio_guidance: float) -> bool:
    """Whether ``denoise_chunk`` runs its passes through ``runner`` (not with audio guidance)."""
    return runner is not None and (audio_guidance == 1.0 or audio is None)


@torch.no_grad()
def commit_chunk(
    model: WanDiT,
    cache: KVCache,
    x0: torch.Tensor,
    context: torch.Tensor | None = None,
    audio: torch.Tensor | None = None,
    context_mask: torch.Tensor | None = None,
    runner: ChunkRunner | None = None,
) -> None:
    """The commit pass of ``cache_mode="commit"``: the clean chunk ``x0`` at timestep 0 writes its keys/values into
    the cache (the window moves on). Only the next chunk's denoising reads them, so a stream may hand ``x0`` to its
    decoder first (``denoise_chunk(commit=False)`` then this). ``runner``: the one whose ``begin`` prepared this
    chunk's denoising (``uses_runner``), else None."""
    if runner is not None:
        runner.forward(x0, 0.0, cache, commit=True)
    else:
        model.forward_chunk(x0, 0.0, cache, context, audio, commit=True, context_mask=context_mask)
