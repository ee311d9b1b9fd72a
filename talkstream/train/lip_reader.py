"""A latent lip reader and the lip-read loss: lip-sync supervision in latent space, with the world's exact labels.

The flow-matching loss spends its gradient on every latent value alike (the lips' weight map only scales it);
what lip-sync needs is a handful of numbers at the mouth. The reader — a small conv net trained first on the
run's clean latents, then frozen — reads the mouth state of the video frames a latent covers (jaw opening, lip
width and rounding, teeth, for each of its 4 frames). ``lip_read_loss`` applies it to the DiT's clean-latent
estimate ``x0 = x_t - sigma * v`` and compares with the world's truth: the only way for the DiT to lower it is
to draw the mouth the audio says. (LatentSync supervises with a SyncNet on decoded frames; our world knows the
mouth state itself, so a regression on latents does the same job at a fraction of the cost.)
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

LIP_FIELDS = slice(0, 4)  # FrameState: jaw_open, lip_width, lip_round, teeth


def lip_targets(states: np.ndarray, n_latent: int, temporal_factor: int = 4) -> np.ndarray:
    """Per-frame world states [N, T, S] -> the lip fields of the frames each latent covers, [N, L, 4 * tf]
    float32 (latent 0 covers frame 0 alone, repeated; latent l > 0 frames tf*l - tf + 1 .. tf*l)."""
    lips = np.asarray(states, np.float32)[..., LIP_FIELDS]
    tf = temporal_factor
    idx = np.array([[0] * tf if l == 0 else list(range(tf * l - tf + 1, tf * l + 1)) for l in range(n_latent)])
    if idx.max() >= lips.shape[1]:
        raise ValueError(f"{n_latent} latents need {idx.max() + 1} frames, the clips have {lips.shape[1]}")
    return lips[:, idx].reshape(lips.shape[0], n_latent, -1)


class LatentLipReader(nn.Module):
    """Latent [B, C, F, h, w] + the lips' map [B, F, h, w] -> the lip fields of each latent's frames [B, F, out].

    Each latent frame is read together with the one before it (the causal VAE decodes a latent's 4 frames with
    its predecessor in view; latent 0 is paired with itself): four 3x3 convolutions at the latent's resolution,
    a pooling weighted by the lips' map (so the head's position does not matter), and a two-layer head."""

    def __init__(self, latent_dim: int = 16, width: int = 128, outputs: int = 16) -> None:
        super().__init__()
        layers, c = [], 2 * latent_dim + 1
        for _ in range(4):
            layers += [nn.Conv2d(c, width, 3, padding=1), nn.SiLU()]
            c = width
        self.convs = nn.Sequential(*layers)
        self.head = nn.Sequential(nn.Linear(width, width), nn.SiLU(), nn.Linear(width, outputs))

    def forward(self, z: torch.Tensor, mouth: torch.Tensor) -> torch.Tensor:
        B, C, Fr, h, w = z.shape
        if mouth.shape != (B, Fr, h, w):
            raise ValueError(f"mouth map must be [{B}, {Fr}, {h}, {w}], got {tuple(mouth.shape)}")
        prev = torch.cat([z[:, :, :1], z[:, :, :-1]], dim=2)
        m = mouth.reshape(B * Fr, 1, h, w).to(z.dtype)
        frames = torch.cat([z, prev], dim=1).transpose(1, 2).reshape(B * Fr, 2 * C, h, w)
        x = self.convs(torch.cat([frames, m], dim=1))
        pooled = (x.float() * m.float()).sum((2, 3)) / m.float().sum((2, 3)).clamp_min(1e-6)
        return self.head(pooled.to(x.dtype)).float().view(B, Fr, -1)


def train_lip_reader(
    sample,
    latent_dim: int,
    outputs: int,
    steps: int,
    device: str,
    gen: torch.Generator,
    held: dict | None = None,
    noise_max: float = 0.2,
    lr: float = 2e-3,
) -> tuple[LatentLipReader, dict]:
    """Fit a reader on clean latents (plus a little Gaussian noise, up to ``noise_max``, so it reads estimates that
    are not quite clean); ``sample(gen)`` gives dict(x0, mouth, lips). Returns the frozen reader and its mean
    absolute error on ``held`` (same keys) for the jaw (the suite's quantity) and for all fields. bf16 on CUDA."""
    reader = LatentLipReader(latent_dim, outputs=outputs).to(device)
    opt = torch.optim.AdamW(reader.parameters(), lr=lr, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=max(steps, 1), pct_start=0.1)
    noise_gen = torch.Generator(device=device).manual_seed(int(torch.randint(2**31, (1,), generator=gen)))
    for _ in range(steps):
        b = sample(gen)
        x0 = b["x0"].float()
        s = torch.rand(x0.shape[0], 1, 1, 1, 1, generator=noise_gen, device=device) * noise_max
        # the noise is drawn on the device: drawn on the CPU, it was the bottleneck
        z = x0 + s * torch.randn(x0.shape, generator=noise_gen, device=device)
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.startswith("cuda")):
            pred = reader(z, b["mouth"].float())
        loss = F.smooth_l1_loss(pred, b["lips"].float(), beta=0.05)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
    reader.eval().requires_grad_(False)
    metrics = dict(steps=steps, final_loss=float(loss.detach()) if steps else float("nan"))
    if held is not None:
        metrics.update(lip_reader_error(reader, held))
    return reader, metrics


@torch.no_grad()
def lip_reader_error(reader: LatentLipReader, b: dict, chunk: int = 64) -> dict:
    preds = torch.cat(
        [
            reader(b["x0"][i : i + chunk].float(), b["mouth"][i : i + chunk].float())
            for i in range(0, len(b["x0"]), chunk)
        ]
    )
    err = (preds - b["lips"].float()).abs()  # [B, F, 4 * tf]: the 4 lip fields of each frame in turn, jaw first
    return dict(held_jaw_error=float(err[..., 0::4].mean()), held_lips_error=float(err.mean()))


def lip_read_loss(
    reader: LatentLipReader,
    xt: torch.Tensor,
    v: torch.Tensor,
    sigma: torch.Tensor,
    mouth: torch.Tensor,
    lips: torch.Tensor,
    weight: torch.Tensor,
) -> torch.Tensor:
    """L1 between the reader's view of the DiT's clean estimate ``xt - sigma * v`` and the true lip fields,
    per latent frame, averaged with ``weight`` [B, F] (0 on clean context frames). ``sigma`` [B, F] in 0..1."""
    x0 = xt.float() - sigma[:, None, :, None, None].float() * v.float()
    err = (reader(x0, mouth.float()) - lips.float()).abs().mean(-1)  # [B, F]
    return (err * weight).sum() / weight.sum().clamp_min(1)
