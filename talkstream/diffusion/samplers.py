"""Samplers for a velocity model ``v = model(x, t)`` and multi-condition classifier-free guidance."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from .flow import NUM_TRAIN_TIMESTEPS, add_noise, x0_from_velocity

Velocity = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (x, timesteps [B]) -> v


def _t(sigma: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return torch.full((x.shape[0],), float(sigma) * NUM_TRAIN_TIMESTEPS, device=x.device)


@torch.no_grad()
def sample_euler(model: Velocity, noise: torch.Tensor, sigmas: torch.Tensor, progress=None) -> torch.Tensor:
    """Deterministic ODE integration from sigmas[0] (usually 1) to sigmas[-1] (0)."""
    x = noise
    for i in range(len(sigmas) - 1):
        v = model(x, _t(sigmas[i], x))
        x = x + (sigmas[i + 1] - sigmas[i]) * v
        if progress is not None:
            progress(i)
    return x


@torch.no_grad()
def sample_few_step(
    model: Velocity, noise: torch.Tensor, sigmas: torch.Tensor, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Few-step sampling as distilled students use it (Self-Forcing / DMD): predict x0 at each level,
    then re-noise it with fresh noise to the next level. ``sigmas`` from ``sigmas_from_timesteps``."""
    x = noise
    x0 = noise
    for i in range(len(sigmas) - 1):
        v = model(x, _t(sigmas[i], x))
        x0 = x0_from_velocity(x, v, sigmas[i])
        if sigmas[i + 1] > 0:
            fresh = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
            x = add_noise(x0, fresh, sigmas[i + 1])
    return x0


def guided_velocity(predictions: Sequence[torch.Tensor], scales: Sequence[float]) -> torch.Tensor:
    """Multi-condition CFG over progressively conditioned predictions.

    ``predictions = [v_none, v_c1, v_c1c2, ...]`` (each adds one condition to the previous) and
    ``scales = [s1, s2, ...]``: v = v_none + sum_i s_i (v_{..ci} - v_{..c(i-1)}). With one condition this
    is ordinary CFG; scales of 1 give the fully conditioned prediction.
    """
    if len(predictions) != len(scales) + 1:
        raise ValueError(f"need one more prediction than scales, got {len(predictions)} and {len(scales)}")
    v = predictions[0]
    for prev, cur, s in zip(predictions[:-1], predictions[1:], scales):
        v = v + s * (cur - prev)
    return v


def drop_conditions(
    generator: torch.Generator | None,
    batch: int,
    p_audio: float = 0.1,
    p_text: float = 0.1,
    p_ref: float = 0.05,
    p_all: float = 0.05,
    device=None,
) -> dict[str, torch.Tensor]:
    """Per-sample classifier-free-guidance dropout: which samples lose their audio / text / reference.

    Each condition drops independently with its own probability, and all drop together with ``p_all``
    (so the fully unconditional prediction is learned too). Returns boolean masks [batch] (True: drop).
    """
    u = torch.rand(4, batch, generator=generator, device=device)
    everything = u[3] < p_all
    return dict(audio=(u[0] < p_audio) | everything, text=(u[1] < p_text) | everything, ref=(u[2] < p_ref) | everything)


def apply_dropout(drop: torch.Tensor, cond: torch.Tensor | None) -> torch.Tensor | None:
    """Replace the dropped samples' condition by the null condition (zeros)."""
    if cond is None:
        return None
    keep = (~drop).to(cond.dtype).view(-1, *([1] * (cond.ndim - 1)))
    return cond * keep
