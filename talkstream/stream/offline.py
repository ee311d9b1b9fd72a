"""Offline generation with the bidirectional teacher: a reference frame + audio (+ a caption) -> frames.

The teacher samples the whole latent sequence at once (Euler, classifier-free guidance on the audio).
Causal models stream through ``stream.engine`` / ``stream.avatar`` instead. Also home of the small frame
conversions the stream package shares.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from ..diffusion.flow import add_noise, euler_sigmas, reference_sigmas
from ..diffusion.samplers import guided_velocity
from ..models.dit import WanDiT
from ..models.encoders import audio_windows
from ..models.vae import CausalVAE
from .engine import ChunkDecoder
from .prompts import PromptTrack

FPS = 25


def frames_to_video(frames: np.ndarray, size: int) -> torch.Tensor:
    """uint8 [T, H, W, 3] -> [1, 3, T, size, size] in [-1, 1] (resized)."""
    x = torch.from_numpy(np.array(frames, dtype=np.uint8)).permute(3, 0, 1, 2).float() / 127.5 - 1
    if x.shape[-2:] != (size, size):
        x = F.interpolate(x, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
    return x[None]


def video_to_frames(x: torch.Tensor) -> np.ndarray:
    """[1, 3, T, H, W] in [-1, 1] -> uint8 [T, H, W, 3]."""
    return ((x[0].permute(1, 2, 3, 0).float().clamp(-1, 1) + 1) * 127.5).round().byte().cpu().numpy()


def audio_span(dit: WanDiT) -> tuple[int, int]:
    """Look-back / look-ahead (video frames) implied by the model's audio tokens per latent frame."""
    info = getattr(dit, "checkpoint_info", {}) or {}
    if "look_back" in info and "look_ahead" in info:
        return int(info["look_back"]), int(info["look_ahead"])
    extra = dit.cfg.audio_tokens_per_frame // 2 - 4
    return extra // 2, extra - extra // 2


def teacher_window(dit: WanDiT) -> tuple[int, int]:
    """(latents per window, motion latents carried into the next window) the teacher was trained with."""
    info = getattr(dit, "checkpoint_info", {}) or {}
    return int(info.get("window_latents", 9)), int(info.get("motion_latents", 0))


TEACHER_REFERENCE_INIT = 0.8  # a trained teacher samples each window from the reference noised to this sigma
# (4 clips x 4 GPU draws: t3 0.0344 from pure noise, 0.0292 / 0.0281 / 0.0301 from 0.9 / 0.8 / 0.7)


@dataclass
class OfflineGenerator:
    """The teacher samples a video window by window, each as long as its training windows (so RoPE positions
    stay in range): a window's first ``motion`` latents are the previous window's last ones, given clean at
    timestep 0 (the teacher is trained with such motion latents); the rest is sampled (Euler, audio CFG)."""

    dit: WanDiT
    vae: CausalVAE
    size: int = 256
    steps: int = 30
    audio_guidance: float = 2.0
    timestep_shift: float = 3.0
    device: str = "cpu"
    seed: int = 0
    decode_latents: int = 8  # latents per VAE decode call (causal feature cache): memory stays bounded by this
    reference_init: float = 1.0  # < 1: new latents start at this sigma from the reference latent noised to it
    # (SDEdit from the reference: the layout comes from the reference frame), 1: from pure noise

    @torch.no_grad()
    def generate(
        self,
        reference: np.ndarray,
        audio_features: np.ndarray,
        n_frames: int,
        text: torch.Tensor | PromptTrack | None = None,
        text_mask: torch.Tensor | None = None,
        forced_motion: torch.Tensor | None = None,
    ) -> np.ndarray:
        """reference uint8 [H, W, 3]; 50 Hz Whisper features [>= 2 n_frames, 384] -> uint8 frames [n_frames, ...].
        ``text``: one encoded caption [1, L, 384] (with ``text_mask``) for the whole clip, or a ``PromptTrack``:
        each window then gets the caption of its middle latent frame, as the teacher's training windows did.
        ``forced_motion`` (analysis; normalised latents [1, C, L, h, w], e.g. the true clip's): each window's motion
        latents are taken from it instead of from the windows generated before (teacher forcing), which shows
        what the window-by-window drift costs (`experiments/motion_drift.py`)."""
        dev, dit = self.device, self.dit
        g = torch.Generator(device=dev).manual_seed(self.seed)
        n_latent = 1 + -(-(n_frames - 1) // self.vae.cfg.temporal_factor)
        ref = self.vae.encode(frames_to_video(reference[None], self.size).to(dev))
        lb, la = audio_span(dit)
        audio = audio_windows(
            torch.as_tensor(audio_features, dtype=torch.float32), n_latent, look_back=lb, look_ahead=la
        )[None].to(dev)
        track = text.to(dev, torch.float32) if isinstance(text, PromptTrack) else None
        if text is not None and track is None:
            text, text_mask = text.to(dev, torch.float32), None if text_mask is None else text_mask.to(dev)
        h = self.size // self.vae.cfg.spatial_factor
        window, motion = teacher_window(dit)
        sig = reference_sigmas(euler_sigmas(self.steps, self.timestep_shift), self.reference_init).to(dev)
        done = torch.zeros(1, dit.cfg.in_dim, 0, h, h, device=dev)
        while done.shape[2] < n_latent:
            k = min(motion, done.shape[2])
            start = done.shape[2] - k
            n_new = min(window - k, n_latent - done.shape[2])
            a = audio[:, start : start + k + n_new]
            z = torch.randn(1, dit.cfg.in_dim, n_new, h, h, generator=g, device=dev)
            if self.reference_init < 1:
                z = add_noise(ref.expand_as(z), z, self.reference_init)
            ctx = done[:, :, start:]
            if track is not None:
                text, text_mask = track.for_latents(start, k + n_new)
            if forced_motion is not None:
                ctx = forced_motion[:, :, start : start + k].to(dev)
                if ctx.shape[2] != k:
                    raise ValueError(
                        f"forced_motion has {forced_motion.shape[2]} latents, the windows need {start + k}"
                    )
            for i in range(len(sig) - 1):
                t = torch.cat(
                    [torch.zeros(1, k, device=dev), torch.full((1, n_new), float(sig[i]) * 1000, device=dev)], 1
                )
                x = torch.cat([ctx, z], 2)
                v = dit(x, t, text, a, ref, context_mask=text_mask)
                if self.audio_guidance != 1.0:
                    v_none = dit(x, t, text, torch.zeros_like(a), ref, context_mask=text_mask)
                    v = guided_velocity([v_none, v], [self.audio_guidance])
                z = z + (sig[i + 1] - sig[i]) * v[:, :, k:]
            done = torch.cat([done, z], 2)
        decode, n = ChunkDecoder(self.vae), max(1, self.decode_latents)  # chunked == whole (tests/test_vae.py)
        return np.concatenate([decode(done[:, :, i : i + n]) for i in range(0, done.shape[2], n)])[:n_frames]
