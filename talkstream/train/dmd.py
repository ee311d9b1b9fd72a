"""Distribution Matching Distillation (DMD / DMD2, as Self-Forcing and LiveTalk use it): the losses, pure functions
of the networks' predictions.

* **real score**: the frozen bidirectional teacher's clean estimate with classifier-free guidance, text and audio
  scales kept apart (LiveTalk): ``u + s_txt (c_noaudio - u) + s_aud (c - c_noaudio)``, where ``u`` drops the text
  and the audio, ``c_noaudio`` drops the audio and ``c`` keeps both (the reference stays in all three);
* **fake score**: the ``critic``, a copy of the teacher trained with the flow-matching loss on the generator's own
  rollouts (``critic_loss``), conditioned like the teacher without guidance;
* the generator's gradient at its sample ``x``: ``(fake - real) / mean |x - real|`` (DMD's normaliser, per sample),
  applied through ``dmd_loss = 0.5 || x - sg(x - grad) ||^2`` (its gradient with respect to ``x`` is ``grad``,
  divided by the element count).
"""

from __future__ import annotations

import torch

from ..diffusion.flow import NUM_TRAIN_TIMESTEPS, add_noise, shift_sigma, velocity_target, x0_from_velocity
from ..diffusion.samplers import guided_velocity


def score_sigmas(
    n: int,
    shift: float,
    lo: float = 0.02,
    hi: float = 0.98,
    generator: torch.Generator | None = None,
    device=None,
) -> torch.Tensor:
    """The noise levels at which the scores are compared: uniform, warped by ``shift`` (towards noise for shift > 1),
    clamped to [lo, hi] (away from 0, where both scores agree, and 1, where neither sees the sample)."""
    if not 0 < lo < hi < 1:
        raise ValueError(f"need 0 < lo < hi < 1, got {lo}, {hi}")
    u = torch.rand(n, generator=generator)  # (a CPU generator: the draws are the same on every device)
    return shift_sigma(u, shift).float().clamp(lo, hi).to(device)


def guided_flow(
    model,
    xt: torch.Tensor,
    t: torch.Tensor,
    text: torch.Tensor | None,
    audio: torch.Tensor | None,
    ref: torch.Tensor | None,
    text_mask: torch.Tensor | None = None,
    text_scale: float = 1.0,
    audio_scale: float = 1.0,
) -> torch.Tensor:
    """A bidirectional model's velocity at ``xt`` [B, C, F, h, w] (timesteps ``t``) under guidance
    ``u + s_txt (c_noaudio - u) + s_aud (c - c_noaudio)`` (the null text and audio are zeros, as in training's
    condition dropout). Scales of 1 cost one pass; a text scale of 1 two; otherwise three."""

    def v(txt, aud):
        return model(xt, t, txt, aud, ref, context_mask=text_mask).float()

    c = v(text, audio)
    if (text_scale == 1.0 and audio_scale == 1.0) or audio is None:
        return c
    c_na = v(text, torch.zeros_like(audio))
    if text_scale == 1.0 or text is None:
        return guided_velocity([c_na, c], [audio_scale])
    u = v(torch.zeros_like(text), torch.zeros_like(audio))
    return guided_velocity([u, c_na, c], [text_scale, audio_scale])


def guided_x0(
    model,
    xt: torch.Tensor,
    sigma: torch.Tensor,
    text: torch.Tensor | None,
    audio: torch.Tensor | None,
    ref: torch.Tensor | None,
    text_mask: torch.Tensor | None = None,
    text_scale: float = 1.0,
    audio_scale: float = 1.0,
) -> torch.Tensor:
    """The clean estimate at ``xt`` (noise level ``sigma`` [B]) under ``guided_flow``'s guidance."""
    vel = guided_flow(model, xt, sigma * NUM_TRAIN_TIMESTEPS, text, audio, ref, text_mask, text_scale, audio_scale)
    return x0_from_velocity(xt, vel, sigma)


def dmd_gradient(x: torch.Tensor, fake_x0: torch.Tensor, real_x0: torch.Tensor) -> torch.Tensor:
    """DMD's gradient at the generator's samples ``x`` [B, ...]: (fake - real) / mean |x - real| per sample
    (no gradient flows through it; zero where the critic and the teacher agree)."""
    with torch.no_grad():
        x, fake_x0, real_x0 = x.double(), fake_x0.double(), real_x0.double()
        norm = (x - real_x0).abs().mean(dim=tuple(range(1, x.ndim)), keepdim=True).clamp_min(1e-8)
        return torch.nan_to_num((fake_x0 - real_x0) / norm)


def dmd_loss(x: torch.Tensor, fake_x0: torch.Tensor, real_x0: torch.Tensor) -> tuple[torch.Tensor, dict]:
    """The generator's DMD loss at its samples ``x`` (with gradient) given the two clean estimates of their noised
    copies: 0.5 ||x - sg(x - grad)||^2, averaged: its gradient is ``dmd_gradient`` / numel."""
    g = dmd_gradient(x, fake_x0, real_x0)
    loss = 0.5 * torch.nn.functional.mse_loss(x.double(), (x.double() - g).detach())
    return loss.float(), dict(dmd_grad=g.abs().mean().float())


def critic_loss(
    critic,
    x: torch.Tensor,
    sigma: torch.Tensor,
    text: torch.Tensor | None,
    audio: torch.Tensor | None,
    ref: torch.Tensor | None,
    text_mask: torch.Tensor | None = None,
    noise: torch.Tensor | None = None,
) -> torch.Tensor:
    """The critic's flow-matching loss on the generator's samples ``x`` (detached) noised to ``sigma`` [B]: it
    learns the score of the generator's distribution (the fake score)."""
    x = x.detach()
    noise = torch.randn_like(x) if noise is None else noise
    xt = add_noise(x, noise, sigma)
    v = critic(xt, sigma * NUM_TRAIN_TIMESTEPS, text, audio, ref, context_mask=text_mask)
    return (v.float() - velocity_target(x, noise).float()).pow(2).mean()


def score_windows(
    n_latent: int, window: int, batch: int, generator: torch.Generator | None = None, device=None
) -> torch.Tensor:
    """A random start per sample for a ``window``-latent piece of a rollout of ``n_latent`` (the teacher is
    bidirectional over windows of its training length only, so a long rollout is scored window by window)."""
    if window > n_latent:
        raise ValueError(f"score window {window} is longer than the rollout ({n_latent} latents)")
    return torch.randint(n_latent - window + 1, (batch,), generator=generator).to(device)


def take_window(t: torch.Tensor, starts: torch.Tensor, window: int, dim: int) -> torch.Tensor:
    """``t``'s ``window`` entries from ``starts`` [B] along ``dim`` (per sample)."""
    idx = starts[:, None].to(t.device) + torch.arange(window, device=t.device)  # [B, W]
    b = torch.arange(t.shape[0], device=t.device)[:, None]
    return t.movedim(dim, 1)[b, idx].movedim(1, dim)
