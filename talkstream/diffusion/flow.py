"""Rectified flow (flow matching) as Wan2.1 uses it. Pure functions.

Noise level sigma in [0, 1]; timestep t = 1000 * sigma. ``x_sigma = (1 - sigma) x0 + sigma * noise`` and the
model predicts the velocity ``v = noise - x0`` (so ``dx/dsigma = v``).
"""

from __future__ import annotations

import torch

NUM_TRAIN_TIMESTEPS = 1000


def shift_sigma(sigma: torch.Tensor | float, shift: float) -> torch.Tensor:
    """Timestep shift (SD3 / Wan): sigma' = shift * sigma / (1 + (shift - 1) * sigma). shift > 1 favours noise."""
    sigma = torch.as_tensor(sigma, dtype=torch.float64)
    return shift * sigma / (1 + (shift - 1) * sigma)


def add_noise(x0: torch.Tensor, noise: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """sigma broadcast from the left: [B] or [B, F] for x0 [B, C, F, H, W]."""
    s = _expand(sigma, x0)
    return (1 - s) * x0 + s * noise


def velocity_target(x0: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    return noise - x0


def x0_from_velocity(x_t: torch.Tensor, v: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    return x_t - _expand(sigma, x_t) * v


def _expand(sigma: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    sigma = torch.as_tensor(sigma, device=x.device, dtype=x.dtype)
    if sigma.ndim == 2:  # [B, F] per-frame levels -> [B, 1, F, 1, 1]
        return sigma[:, None, :, None, None]
    return sigma.reshape(-1, *([1] * (x.ndim - 1))) if sigma.ndim else sigma


def sample_training_sigmas(
    n: int, generator: torch.Generator | None = None, shift: float = 1.0, logit_normal: bool = True, device=None
) -> torch.Tensor:
    """Training noise levels: logit-normal (as in SD3) or uniform, then shifted."""
    u = torch.randn(n, generator=generator, device=device) if logit_normal else None
    s = torch.sigmoid(u) if logit_normal else torch.rand(n, generator=generator, device=device)
    return shift_sigma(s, shift).float().to(device)


def sigmas_from_timesteps(timesteps: list[float] | torch.Tensor, shift: float = 1.0) -> torch.Tensor:
    """A timestep list like [1000, 750, 500, 250] -> sigmas (shifted), with a final 0 appended."""
    t = torch.as_tensor(timesteps, dtype=torch.float64)
    if t.ndim != 1 or len(t) == 0 or (t <= 0).any() or (t > NUM_TRAIN_TIMESTEPS).any() or (t[1:] >= t[:-1]).any():
        raise ValueError(f"timesteps must be a decreasing list in (0, {NUM_TRAIN_TIMESTEPS}], got {t.tolist()}")
    return torch.cat([shift_sigma(t / NUM_TRAIN_TIMESTEPS, shift), torch.zeros(1, dtype=torch.float64)]).float()


def euler_sigmas(steps: int, shift: float = 1.0) -> torch.Tensor:
    """``steps`` evenly spaced noise levels from 1 to 0 (shifted), steps + 1 values."""
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    return shift_sigma(torch.linspace(1, 0, steps + 1, dtype=torch.float64), shift).float()


def reference_sigmas(sigmas: torch.Tensor, start: float) -> torch.Tensor:
    """A decreasing schedule (1 ... 0) cut to start at ``start`` in (0, 1]: ``start``, then the sigmas below it (the
    schedule itself for ``start`` = 1). Sampling from a noised reference starts there (SDEdit)."""
    if not 0 < start <= 1:
        raise ValueError(f"the start sigma must lie in (0, 1], got {start}")
    if start == 1:
        return sigmas
    return torch.cat([sigmas.new_tensor([start]), sigmas[sigmas < start]])


# -- few-step students (Self-Forcing / DMD): the step list, one definition for training and inference ----------------
FEW_STEP_TIMESTEPS: dict[int, tuple[float, ...]] = {4: (1000.0, 750.0, 500.0, 250.0), 2: (1000.0, 500.0)}
STUDENT_SHIFT = 3.0  # the shift that warps a student's step list (the teacher's own sampling shift)


def few_step_timesteps(steps: int) -> tuple[float, ...]:
    """The unwarped step list of a ``steps``-step student: [1000, 750, 500, 250] or [1000, 500]."""
    if steps not in FEW_STEP_TIMESTEPS:
        raise ValueError(f"a few-step student has {sorted(FEW_STEP_TIMESTEPS)} steps, got {steps}")
    return FEW_STEP_TIMESTEPS[steps]


def student_sigmas(timesteps, shift: float = STUDENT_SHIFT) -> torch.Tensor:
    """A student's noise levels, warped by ``shift``, with the final 0: what training (ODE pairs, rollouts) and the
    stream engine's ``few_step`` sampler both use (``sigmas_from_timesteps``)."""
    return sigmas_from_timesteps(list(timesteps), shift)


def trajectory_schedule(timesteps, shift: float = STUDENT_SHIFT, substeps: int = 8) -> tuple[torch.Tensor, list[int]]:
    """An Euler schedule for the teacher that passes through every level of the student's step list exactly:
    ``substeps`` steps between consecutive student timesteps (and from the last one to 0), evenly spaced in
    unwarped time, then warped by ``shift``. Returns the sigmas (ending at 0) and the index of each student level in
    them: the ODE pairs keep the teacher's trajectory at exactly those points."""
    if substeps < 1:
        raise ValueError(f"substeps must be >= 1, got {substeps}")
    t = sigmas_from_timesteps(list(timesteps), 1.0).double()  # unwarped student levels + 0 (validates the list)
    u = torch.cat(
        [torch.linspace(float(a), float(b), substeps + 1, dtype=torch.float64)[:-1] for a, b in zip(t, t[1:])]
    )
    u = torch.cat([u, torch.zeros(1, dtype=torch.float64)])
    sig = shift_sigma(u, shift).float()
    idx = [k * substeps for k in range(len(t) - 1)]
    return sig, idx
