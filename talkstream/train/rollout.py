"""Self-Forcing rollouts: the causal student generates a clip chunk after chunk from pure noise with its KV cache,
as the stream engine does, and keeps the gradient of one step per chunk.

Per chunk (``chunk`` latent frames): the student's few-step sampler (``diffusion.flow.student_sigmas``: predict the
clean chunk, re-noise it with fresh noise to the next level) runs up to the rollout's **exit step** ``s``; the steps
before it run without gradient, the exit step's prediction is the chunk's output and keeps its gradient. Then a
pass without gradient over the clean chunk at timestep 0 writes its keys / values into the cache (Self-Forcing's
context pass; the stream engine's commit), so no gradient crosses chunks through the cache: a chunk's output
depends with gradient only on its own exit-step forward. The cache is the engine's: ``anchor`` sinks (the
reference, or ``anchor_copies`` copies of it: LiveTalk's Anchor-Heavy Identity Sinks) and a rolling window of
``cache_window`` latents, so the student trains on exactly the context it streams with.
"""

from __future__ import annotations

import torch

from ..diffusion.flow import NUM_TRAIN_TIMESTEPS, add_noise, x0_from_velocity
from ..models.dit import WanDiT
from ..models.kv_cache import KVCache

ROLLOUT_ANCHORS = ("reference", "anchor_heavy")  # the sink layouts a rollout builds (the engine's first two modes)


def rollout_cache(
    student: WanDiT,
    ref: torch.Tensor,
    text: torch.Tensor | None,
    text_mask: torch.Tensor | None,
    cache_window: int,
    anchor: str = "anchor_heavy",
    anchor_copies: int = 3,
) -> KVCache:
    """A fresh KV cache with the sinks the stream engine starts with (``StreamEngine.start``)."""
    if anchor not in ROLLOUT_ANCHORS:
        raise ValueError(f"rollouts build the anchors {ROLLOUT_ANCHORS}, not {anchor!r}")
    cache = student.new_cache(window=cache_window)
    sinks = ref.repeat(1, 1, anchor_copies, 1, 1) if anchor == "anchor_heavy" else ref
    student.prefill_sinks(sinks, cache, text, text_mask, reference=ref)
    return cache


def rollout(
    student: WanDiT,
    noise: torch.Tensor,
    sigmas: torch.Tensor,
    exit_step: int,
    audio: torch.Tensor | None,
    ref: torch.Tensor,
    text: torch.Tensor | None = None,
    text_mask: torch.Tensor | None = None,
    *,
    chunk: int = 3,
    cache_window: int = 9,
    anchor: str = "anchor_heavy",
    anchor_copies: int = 3,
    context_noise: float = 0.0,
    generator: torch.Generator | None = None,
    grad_latents: tuple[int, int] | None = None,
) -> torch.Tensor:
    """Roll the student out over ``noise`` [B, C, L, h, w] (pure noise: the student's first level is 1) and return
    its clean latents [B, C, L, h, w]. ``sigmas``: the student's levels ending at 0; ``exit_step`` in [0, steps):
    the step whose prediction is each chunk's output (the only forward with gradient, when gradients are enabled).
    ``audio`` [B, L, Na, A] windows; ``ref`` [B, C, 1, h, w] the reference latent; ``context_noise`` > 0 noises
    each clean chunk to that sigma before its cache pass (history corruption). ``grad_latents`` (start, end): only
    the chunks that overlap these latents keep the exit step's gradient (the ones the loss will score: the activations
    of the others are not kept, which bounds the rollout's memory by the scored window, not the rollout's length)."""
    steps = len(sigmas) - 1
    if not 0 <= exit_step < steps:
        raise ValueError(f"exit_step must be in [0, {steps}), got {exit_step}")
    grad = torch.is_grad_enabled()
    with torch.no_grad():
        cache = rollout_cache(student, ref, text, text_mask, cache_window, anchor, anchor_copies)
    L = noise.shape[2]
    outs = []
    for c0 in range(0, L, chunk):
        x = noise[:, :, c0 : c0 + chunk]
        a = None if audio is None else audio[:, c0 : c0 + chunk]
        x0 = x
        scored = grad_latents is None or (c0 < grad_latents[1] and c0 + chunk > grad_latents[0])
        for k in range(exit_step + 1):
            t = sigmas[k] * NUM_TRAIN_TIMESTEPS
            with torch.set_grad_enabled(grad and scored and k == exit_step):
                v = student.forward_chunk(x, t, cache, text, a, context_mask=text_mask)
                x0 = x0_from_velocity(x, v, sigmas[k])
            if k < exit_step:
                fresh = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
                x = add_noise(x0, fresh, sigmas[k + 1])
        outs.append(x0)
        ctx = x0.detach()
        if context_noise > 0:
            fresh = torch.randn(ctx.shape, generator=generator, device=ctx.device, dtype=ctx.dtype)
            ctx = add_noise(ctx, fresh, torch.tensor(context_noise))
        with torch.no_grad():
            student.forward_chunk(ctx, 0.0, cache, text, a, commit=True, context_mask=text_mask)
    return torch.cat(outs, dim=2)
