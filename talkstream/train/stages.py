"""The training stages: VAE -> tiny decoder (distilled from the VAE decoder) -> bidirectional teacher ->
causal model (diffusion forcing, block-causal, initialised from the teacher, with history corruption)."""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from ..diffusion.flow import add_noise, sample_training_sigmas, velocity_target
from ..diffusion.samplers import apply_dropout, drop_conditions
from ..media import atomic_path
from ..models.checkpoint import deepen_dit_state, load_checkpoint, load_dit_weights, save_checkpoint
from ..models.config import DiTConfig, TinyDecoderConfig, dit_config, vae_config
from ..models.dit import WanDiT
from ..models.encoders import audio_windows
from ..models.losses import kl_divergence, masked_l1, reconstruction_loss
from ..models.vae import CausalVAE, TinyDecoder
from .config import TrainConfig
from .data import WorldPack, load_pack, mouth_maps, mouth_pixels, render_pack
from .lip_reader import LatentLipReader, lip_read_loss, lip_targets, train_lip_reader
from .runner import Runner, train_device

HELD_OUT_FRACTION = 0.05
EVAL_FRAMES = 33  # VAE / decoder evaluation clip length: 9 latents, longer than any training window


def _split(n: int) -> tuple[slice, slice]:
    k = max(1, int(round(n * HELD_OUT_FRACTION)))
    return slice(0, n - k), slice(n - k, n)


class FrameBank:
    """Rendered pack frames kept in host memory; samples [B, 3, F, H, W] windows in [-1, 1] on the device.

    With ``mouths`` ([N, T, 2] pixel centres) a sample also gets a lip weight map [B, 1, F, h, w] (a Gaussian
    of ``MOUTH_SIGMA`` pixels at each frame's mouth), and half of its crops are placed so the mouth is inside.
    """

    MOUTH_SIGMA = 10.0

    def __init__(self, frames: np.ndarray, n_frames: int, device: str, mouths: np.ndarray | None = None) -> None:
        self.frames = torch.from_numpy(frames)  # [N, T, H, W, 3] uint8
        self.mouths = None if mouths is None else torch.from_numpy(mouths)
        self.n, self.T = frames.shape[:2]
        self.F, self.device = n_frames, device

    def sample(
        self, gen: torch.Generator, batch: int, crop: int = 0, with_mouth: bool = False
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """``crop`` > 0: a random crop x crop square of each window (the VAE is fully convolutional)."""
        i = torch.randint(self.n, (batch,), generator=gen)
        a = torch.randint(self.T - self.F + 1, (batch,), generator=gen)
        H, W = self.frames.shape[2:4]
        c = min(crop or H, H, W)
        ys, xs = torch.randint(H - c + 1, (batch,), generator=gen), torch.randint(W - c + 1, (batch,), generator=gen)
        if self.mouths is not None and c < H:  # half the crops around the window's mouth (its first frame's)
            m = self.mouths[i, a]  # [B, 2]
            jx, jy = torch.rand(batch, generator=gen) * (c - 48) + 24, torch.rand(batch, generator=gen) * (c - 48) + 24
            around = torch.rand(batch, generator=gen) < 0.5
            xs = torch.where(around, (m[:, 0] - jx).round().long().clamp(0, W - c), xs)
            ys = torch.where(around, (m[:, 1] - jy).round().long().clamp(0, H - c), ys)
        x = torch.stack(
            [
                self.frames[ii, aa : aa + self.F, y : y + c, x : x + c]
                for ii, aa, y, x in zip(i.tolist(), a.tolist(), ys.tolist(), xs.tolist())
            ]
        )
        x = to_video(x.to(self.device, non_blocking=True))
        if not with_mouth:
            return x
        if self.mouths is None:
            raise ValueError("this FrameBank has no mouth positions")
        m = torch.stack([self.mouths[ii, aa : aa + self.F] for ii, aa in zip(i.tolist(), a.tolist())])  # [B, F, 2]
        m = (m - torch.stack([xs, ys], 1)[:, None].float()).to(self.device)
        grid = torch.arange(c, device=self.device).float() + 0.5
        gx = (grid[None, None, :] - m[..., :1]) / self.MOUTH_SIGMA  # [B, F, c]
        gy = (grid[None, None, :] - m[..., 1:]) / self.MOUTH_SIGMA
        w = torch.exp(-0.5 * (gy[..., :, None] ** 2 + gx[..., None, :] ** 2))  # [B, F, c, c]
        return x, w[:, None]


def to_video(frames_uint8: torch.Tensor) -> torch.Tensor:
    """[B, T, H, W, 3] uint8 -> [B, 3, T, H, W] float in [-1, 1]."""
    return frames_uint8.permute(0, 4, 1, 2, 3).float() / 127.5 - 1


# -- VAE -----------------------------------------------------------------------------------------------
def train_vae(cfg: TrainConfig, log=print, started: float | None = None) -> dict:
    device = train_device()
    pack = load_pack(cfg.data)
    tr, ho = _split(pack.n_clips)
    t0 = time.perf_counter()
    frames = render_pack(pack, cfg.size, cfg.workers)
    log(f"rendered {frames.shape[0] * frames.shape[1]} frames in {time.perf_counter() - t0:.1f}s")
    mouth_w = float(cfg.extra.get("mouth_weight", 0.0))  # extra L1 weight on the lips (world geometry)
    motion_w = float(cfg.extra.get("motion_weight", 0.0))  # extra L1 weight on the lips' temporal differences
    l2_w = float(cfg.extra.get("l2_weight", 0.0))  # squared error over the whole frame: what PSNR measures
    if motion_w and not mouth_w:
        raise ValueError("motion_weight needs mouth_weight > 0 (both use the lips' weight map)")
    bank = FrameBank(frames[tr], cfg.frames, device, mouth_pixels(pack, tr, cfg.size) if mouth_w else None)
    held, held_mouths = frames[ho], mouth_pixels(pack, ho, cfg.size)
    vae = CausalVAE(vae_config(cfg.model))
    if cfg.init:  # continue from an exported checkpoint (weights only: optimizer state starts fresh)
        vae.load_state_dict(load_checkpoint(cfg.init, dtype=torch.float32).state_dict())
    # decoder-only fine-tuning keeps the latent space (and its statistics) that DiTs were trained in
    freeze_encoder = bool(cfg.extra.get("freeze_encoder", False))
    if freeze_encoder:
        if not cfg.init:
            raise ValueError("freeze_encoder fine-tunes a trained VAE's decoder: set init to its checkpoint")
        vae.encoder.requires_grad_(False)

    def loss_fn(model, batch):
        x = batch["x"]
        mean, logvar = model.encode_moments(x)
        z = mean + torch.randn_like(mean) * (0.5 * logvar).exp()
        y = model.decode(z, normalized=False)
        rec = reconstruction_loss(y.float(), x, l2=l2_w, ms_ssim_weight=cfg.ms_ssim_weight)
        kl = kl_divergence(mean.float(), logvar.float())
        info = dict(rec=rec.detach(), kl=kl.detach())
        loss = rec + cfg.kl_weight * kl
        if mouth_w:
            lips = masked_l1(y, x, batch["mouth"])
            loss, info["lips"] = loss + mouth_w * lips, lips.detach()
        if motion_w:  # the lips' frame-to-frame change: what 4x temporal compression smooths away first
            dy, dx = y[:, :, 1:] - y[:, :, :-1], x[:, :, 1:] - x[:, :, :-1]
            lips_motion = masked_l1(dy, dx, batch["mouth"][:, :, 1:])
            loss, info["lips_motion"] = loss + motion_w * lips_motion, lips_motion.detach()
        return loss, info

    crop = int(cfg.extra.get("crop", 0))

    def sample(g):
        if not mouth_w:
            return dict(x=bank.sample(g, cfg.batch, crop))
        x, m = bank.sample(g, cfg.batch, crop, with_mouth=True)
        return dict(x=x, mouth=m)

    runner = Runner(cfg, vae, loss_fn, sample, device, started)
    last = runner.train()
    model = runner.final_model()
    if model is None:  # (torchrun: rank 0 evaluates and writes)
        return dict(train=last)
    if not freeze_encoder:
        with torch.no_grad():  # latent statistics, so the DiT sees ~unit-variance latents
            zs = torch.cat([model.encode(bank.sample(runner.gen, cfg.batch), normalize=False) for _ in range(8)])
            model.latent_mean.copy_(zs.mean((0, 2, 3, 4)))
            model.latent_std.copy_(zs.std((0, 2, 3, 4)))
    metrics = evaluate_vae(model, held, EVAL_FRAMES, device, mouths=held_mouths)
    metrics["train"] = last
    save_checkpoint(
        Path(cfg.out) / "vae.safetensors",
        model.cpu(),
        "vae",
        model.cfg,
        extra=dict(metrics=metrics, config=cfg.to_dict()),
        dtype=torch.bfloat16,
    )
    (Path(cfg.out) / "metrics.json").write_text(json.dumps(metrics, indent=2))
    return metrics


@torch.no_grad()
def evaluate_vae(
    vae: CausalVAE,
    held: np.ndarray,
    n_frames: int,
    device: str,
    decoder: TinyDecoder | None = None,
    batch: int = 8,
    mouths: np.ndarray | None = None,
) -> dict:
    """PSNR of reconstructions of held-out clips (first ``n_frames`` of each), decode throughput, and how well
    the lips survive: the frame probe's mouth-open reading of each reconstruction vs of the true frame
    (``mouth_read_error``, mean absolute difference) and, with ``mouths`` ([N, T, 2] pixel centres), the PSNR
    of a 48x48 window around the mouth (``lips_psnr_db``).

    Decoding is timed on batches of ``batch`` clips after one warm-up batch, so the figure is the
    decoders' compute, not kernel-launch latency.
    """
    from ..eval.metrics import F as STATE
    from ..eval.probes import load_frame_probe

    vae = vae.to(device).eval()
    decoder = decoder.to(device).eval() if decoder is not None else None
    n_frames = min(n_frames, 1 + 4 * ((held.shape[1] - 1) // 4))
    x = to_video(torch.from_numpy(held[:, :n_frames]).to(device))
    zs = [vae.encode(x[i : i + batch]) for i in range(0, len(x), batch)]
    names = ["vae"] + (["tiny"] if decoder is not None else [])
    fns = dict(vae=vae.decode, tiny=decoder)
    err = {n: [] for n in names}
    secs = {n: 0.0 for n in names}
    recon = {n: [] for n in names}
    for n in names:
        fns[n](zs[0])  # warm-up
        for i, z in enumerate(zs):
            _sync(device)
            t = time.perf_counter()
            y = fns[n](z)
            _sync(device)
            secs[n] += time.perf_counter() - t
            y = y.float().clamp(-1, 1)
            err[n].append((y - x[i * batch : (i + 1) * batch]).pow(2).mean((1, 2, 3, 4)))
            recon[n].append(((y + 1) * 127.5).round().byte().permute(0, 2, 3, 4, 1).cpu())  # [b, T, H, W, 3]
    db = {n: float((10 * torch.log10(4.0 / torch.cat(err[n]))).mean()) for n in names}
    frames = len(x) * n_frames
    out = dict(
        held_out_clips=len(x),
        frames=n_frames,
        size=int(x.shape[-1]),
        psnr_db=db["vae"],
        vae_decode_fps=frames / secs["vae"],
    )
    probe = load_frame_probe().to("cpu")
    truth = held[:, :n_frames].reshape(-1, *held.shape[2:])
    jaw_true = probe.read(truth)["states"][:, STATE["jaw_open"]]
    for n in names:
        r = torch.cat(recon[n]).flatten(0, 1).numpy()
        key = "" if n == "vae" else "tiny_"
        out[f"{key}mouth_read_error"] = float(np.abs(probe.read(r)["states"][:, STATE["jaw_open"]] - jaw_true).mean())
        if mouths is not None:
            out[f"{key}lips_psnr_db"] = _lips_psnr(r, truth, mouths[:, :n_frames].reshape(-1, 2))
    if decoder is not None:
        out.update(
            tiny_psnr_db=db["tiny"], tiny_decode_fps=frames / secs["tiny"], tiny_speedup=secs["vae"] / secs["tiny"]
        )
    return out


def _lips_psnr(recon: np.ndarray, truth: np.ndarray, centres: np.ndarray, half: int = 24) -> float:
    """Mean PSNR of the 2*half-pixel squares around each frame's mouth centre."""
    H, W = truth.shape[1:3]
    vals = []
    for r, t, (cx, cy) in zip(recon, truth, centres):
        x0, y0 = int(np.clip(round(cx) - half, 0, W - 2 * half)), int(np.clip(round(cy) - half, 0, H - 2 * half))
        a = r[y0 : y0 + 2 * half, x0 : x0 + 2 * half].astype(np.float64)
        b = t[y0 : y0 + 2 * half, x0 : x0 + 2 * half].astype(np.float64)
        vals.append(10 * np.log10(255.0**2 / max(((a - b) ** 2).mean(), 1e-10)))
    return float(np.mean(vals))


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


# -- tiny decoder ------------------------------------------------------------------------------------------
def tiny_decoder_loss(
    y: torch.Tensor,
    x: torch.Tensor,
    mouth: torch.Tensor | None = None,
    *,
    l2: float = 0.0,
    ms_ssim_weight: float = 0.1,
    mouth_weight: float = 0.0,
    target: torch.Tensor | None = None,
    distill_weight: float = 0.0,
    motion_weight: float = 0.0,
) -> tuple[torch.Tensor, dict]:
    """The tiny decoder's loss on its frames ``y`` against the true frames ``x`` ([B, 3, T, H, W]): reconstruction
    (L1 + ``l2`` L2 + MS-SSIM), + ``distill_weight`` x L1 against the VAE decoder's frames ``target``, +
    ``mouth_weight`` x L1 at the lips (``mouth``: [B, 1, T, H, W] weights), + ``motion_weight`` x L1 of the lips'
    frame-to-frame change (as the VAE decoder's fine-tuning). Returns the loss and its parts."""
    y = y.float()
    truth = reconstruction_loss(y, x, l2=l2, ms_ssim_weight=ms_ssim_weight)
    loss, info = truth, dict(truth=truth.detach())
    if distill_weight:
        distill = reconstruction_loss(y, target, ms_ssim_weight=0.0)
        loss, info["distill"] = loss + distill_weight * distill, distill.detach()
    if mouth_weight:
        lips = masked_l1(y, x, mouth)
        loss, info["lips"] = loss + mouth_weight * lips, lips.detach()
    if motion_weight:
        if mouth is None:
            raise ValueError("motion_weight needs the lips' weight map (mouth)")
        dy, dx = y[:, :, 1:] - y[:, :, :-1], x[:, :, 1:] - x[:, :, :-1]
        lips_motion = masked_l1(dy, dx, mouth[:, :, 1:])
        loss, info["lips_motion"] = loss + motion_weight * lips_motion, lips_motion.detach()
    return loss, info


def train_decoder(cfg: TrainConfig, log=print, started: float | None = None) -> dict:
    mouth_w = float(cfg.extra.get("mouth_weight", 0.0))
    # distill: weight of matching the VAE decoder's output (one extra VAE decode per step) beside the true frames
    distill_w, crop = float(cfg.extra.get("distill", 1.0)), int(cfg.extra.get("crop", 0))
    l2_w = float(cfg.extra.get("l2_weight", 0.0))  # squared error over the whole frame: what PSNR measures
    motion_w = float(cfg.extra.get("motion_weight", 0.0))  # the lips' frame-to-frame change (needs mouth_weight)
    if motion_w and not mouth_w:
        raise ValueError("motion_weight needs mouth_weight > 0 (both use the lips' weight map)")
    # latent_noise: half the samples' latents get Gaussian noise of a std drawn in [0, latent_noise] (normalised
    # units): latents off the encoder's manifold, as a DiT's are; the distillation target is the VAE decoder's
    # frames for those same latents
    noise = float(cfg.extra.get("latent_noise", 0.0))
    if noise and not distill_w:
        raise ValueError("latent_noise needs distill > 0 (the target for noised latents is the VAE decoder's output)")
    device = train_device()
    vae = load_checkpoint(cfg.vae, device=device, dtype=torch.float32).requires_grad_(False)
    pack = load_pack(cfg.data)
    tr, ho = _split(pack.n_clips)
    frames = render_pack(pack, cfg.size, cfg.workers)
    bank = FrameBank(frames[tr], cfg.frames, device, mouth_pixels(pack, tr, cfg.size) if mouth_w else None)
    held, held_mouths = frames[ho], mouth_pixels(pack, ho, cfg.size)
    channels = cfg.extra.get("channels", TinyDecoderConfig.channels)
    dec = TinyDecoder(
        TinyDecoderConfig(
            latent_dim=vae.cfg.latent_dim,
            spatial_factor=vae.cfg.spatial_factor,
            temporal_factor=vae.cfg.temporal_factor,
            channels=tuple(channels) if isinstance(channels, list) else channels,
        )
    )
    if cfg.init:
        dec.load_state_dict(load_checkpoint(cfg.init, dtype=torch.float32).state_dict())
    dec.latent_mean.copy_(vae.latent_mean.cpu())
    dec.latent_std.copy_(vae.latent_std.cpu())

    def sample(g):
        x, m = bank.sample(g, cfg.batch, crop, with_mouth=True) if mouth_w else (bank.sample(g, cfg.batch, crop), None)
        with torch.no_grad():
            z = vae.encode(x)
            if noise:
                s = torch.rand(len(z), generator=g) * noise * (torch.rand(len(z), generator=g) < 0.5)
                z = z + s.to(z).view(-1, 1, 1, 1, 1) * torch.randn(z.shape, generator=g).to(z)
            target = vae.decode(z).clamp(-1, 1) if distill_w else None
        return dict(x=x, z=z, target=target, mouth=m)

    def loss_fn(model, b):
        return tiny_decoder_loss(
            model(b["z"]),
            b["x"],
            b["mouth"],
            l2=l2_w,
            ms_ssim_weight=cfg.ms_ssim_weight,
            mouth_weight=mouth_w,
            target=b["target"],
            distill_weight=distill_w,
            motion_weight=motion_w,
        )

    runner = Runner(cfg, dec, loss_fn, sample, device, started)
    last = runner.train()
    model = runner.final_model()
    if model is None:  # (torchrun: rank 0 evaluates and writes)
        return dict(train=last)
    metrics = evaluate_vae(vae, held, EVAL_FRAMES, device, decoder=model, mouths=held_mouths)
    metrics["train"] = last
    save_checkpoint(
        Path(cfg.out) / "tiny_decoder.safetensors",
        model.cpu(),
        "tiny_decoder",
        model.cfg,
        extra=dict(metrics=metrics, config=cfg.to_dict()),
        dtype=torch.bfloat16,
    )
    (Path(cfg.out) / "metrics.json").write_text(json.dumps(metrics, indent=2))
    return metrics


# -- DiT: teacher and causal -------------------------------------------------------------------------------
def vae_fingerprint(vae: CausalVAE) -> str:
    """A short hash of the VAE's weights (latent caches are valid for one VAE only)."""
    h = hashlib.sha1()
    for k, v in sorted(vae.state_dict().items()):
        h.update(k.encode())
        h.update(v.detach().float().cpu().numpy().tobytes())
    return h.hexdigest()[:16]


def encode_clips_latents(
    cfg: TrainConfig,
    vae: CausalVAE,
    device: str,
    pack: WorldPack,
    idx: list[int],
    encode_clips: int = 8,
    cache: str | Path | None = None,
    group: int = 100,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Render and VAE-encode clips ``idx`` of the pack: latents [n, C, L, h, w] and 4 reference latents per clip
    (frames drawn by a generator seeded from ``cfg.seed`` and the clip's world seed) [n, 4, C, 1, h, w], bf16 on
    the device. Clips are rendered ``group`` at a time (host memory stays bounded for any pack size). With
    ``cache`` (a folder), each clip's result is kept there under a key of its world seed, the frame size, the seed
    and the VAE's weights, and read back by any later call that asks for that clip: whatever the split or the
    packs it comes with."""
    T = 1 + 4 * ((pack.n_frames - 1) // 4)
    out: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
    paths = {}
    if cache:
        fingerprint = vae_fingerprint(vae)
        for i in idx:
            key = hashlib.sha1(f"{int(pack.seeds[i])}/{T}/{cfg.size}/{cfg.seed}/{fingerprint}".encode()).hexdigest()
            paths[i] = Path(cache) / f"clip_{key[:20]}.pt"
            if paths[i].exists():
                saved = torch.load(paths[i], map_location=device)
                out[i] = saved["latents"], saved["refs"]
    todo = [i for i in idx if i not in out]
    for g0 in range(0, len(todo), group):
        some = todo[g0 : g0 + group]
        frames = render_pack(pack, cfg.size, cfg.workers, some)
        picks = torch.stack(
            [
                torch.randint(
                    T, (4,), generator=torch.Generator().manual_seed(cfg.seed * 1_000_003 + int(pack.seeds[i]))
                )
                for i in some
            ]
        )  # 4 reference frames per clip
        with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.startswith("cuda")):
            for k in range(0, len(some), encode_clips):
                x = to_video(torch.from_numpy(frames[k : k + encode_clips, :T]).to(device))
                lat = vae.encode(x).to(torch.bfloat16)
                singles = x[torch.arange(x.shape[0])[:, None], :, picks[k : k + encode_clips]]  # [b, 4, 3, H, W]
                refs = (
                    vae.encode(singles.reshape(-1, 3, 1, *x.shape[-2:]))
                    .view(x.shape[0], 4, -1, 1, *lat.shape[-2:])
                    .to(torch.bfloat16)
                )
                for j, i in enumerate(some[k : k + encode_clips]):
                    out[i] = lat[j], refs[j]
                    if cache:  # (a temporary name of its own: under torchrun every rank encodes)
                        with atomic_path(paths[i]) as tmp:
                            torch.save(dict(latents=lat[j].cpu().clone(), refs=refs[j].cpu().clone()), tmp)
    return torch.stack([out[i][0] for i in idx]), torch.stack([out[i][1] for i in idx])


class LatentBank:
    """VAE latents of every pack clip with their audio windows, captions, reference latents, the lips' maps and
    the lip fields of each latent's frames (``lip_targets``), on the device. ``encode_clips``: clips per VAE
    encoder call (8 x 73 frames at 256: ~7 GB of activations; fewer on a CPU). With ``cfg.latent_cache`` set,
    each clip's latents are kept there (``encode_clips_latents``)."""

    def __init__(
        self, cfg: TrainConfig, vae: CausalVAE, device: str, clips: slice, pack: WorldPack, encode_clips: int = 8
    ) -> None:
        if pack.audio_features is None or pack.caption_emb is None:
            raise ValueError(f"{cfg.data}: the DiT stages need a pack with audio features and caption embeddings")
        idx = list(range(pack.n_clips))[clips]
        T = 1 + 4 * ((pack.n_frames - 1) // 4)
        self.L = 1 + (T - 1) // 4
        self.latents, self.refs = encode_clips_latents(
            cfg, vae, device, pack, idx, encode_clips, cfg.latent_cache or None
        )  # [N, C, L, h, w], [N, 4, C, 1, h, w]
        self.audio = torch.stack(
            [
                audio_windows(
                    torch.from_numpy(pack.audio_features[i].astype(np.float32)),
                    self.L,
                    look_back=cfg.look_back,
                    look_ahead=cfg.look_ahead,
                )
                for i in idx
            ]
        ).to(device, torch.bfloat16)  # [N, L, Na, A]
        grid = self.latents.shape[-1]
        self.mouth = torch.from_numpy(mouth_maps(pack, clips, self.L, grid, vae.cfg.temporal_factor)).to(
            device, torch.bfloat16
        )  # [N, L, h, w]
        self.lips = torch.from_numpy(lip_targets(pack.states[idx], self.L, vae.cfg.temporal_factor)).to(device)
        self.caption_of_latent = torch.from_numpy(
            pack.caption_ids[idx][:, np.minimum(np.arange(self.L) * 4, pack.n_frames - 1)].astype(np.int64)
        )
        self.caption_emb = torch.from_numpy(pack.caption_emb.astype(np.float32)).to(device, torch.bfloat16)
        self.caption_mask = torch.from_numpy(pack.caption_mask).to(device)
        self.n = len(idx)
        self.device = device

    def sample(self, gen: torch.Generator, batch: int, n_latent: int) -> dict:
        i = torch.randint(self.n, (batch,), generator=gen)
        a = torch.randint(self.L - n_latent + 1, (batch,), generator=gen)
        r = torch.randint(4, (batch,), generator=gen)
        at = (i[:, None].to(self.device), (a[:, None] + torch.arange(n_latent)).to(self.device))

        def window(t: torch.Tensor, dim: int = 1) -> torch.Tensor:  # clip i's latents a .. a + n_latent along dim
            return t.movedim(dim, 1)[at].movedim(1, dim)

        cap = self.caption_of_latent[i, a + n_latent // 2].to(self.device)
        return dict(
            x0=window(self.latents, 2).float(),
            audio=window(self.audio),
            mouth=window(self.mouth).float(),
            lips=window(self.lips),
            ref=self.refs[at[0][:, 0], r.to(self.device)],
            text=self.caption_emb[cap],
            text_mask=self.caption_mask[cap],
        )


def velocity_error_map(v: torch.Tensor, x0: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """Squared flow-matching velocity error, averaged over channels: [B, F, h, w] (weighted by the lips' maps)."""
    return (v.float() - velocity_target(x0, noise)).pow(2).mean(dim=1)


def _dit_loss(cfg: TrainConfig, causal: bool, lip_reader=None):
    """Flow matching (the lips weighted ``1 + mouth_weight``), plus ``lip_read_weight`` x the lip-read loss when a
    frozen ``lip_reader`` is given."""

    def loss_fn(model, b):
        x0 = b["x0"]
        B, _, Fr = x0.shape[:3]
        drop = drop_conditions(
            None, B, cfg.p_drop_audio, cfg.p_drop_text, cfg.p_drop_ref, cfg.p_drop_all, device=x0.device
        )
        audio = apply_dropout(drop["audio"], b["audio"])
        text = apply_dropout(drop["text"], b["text"])
        ref = apply_dropout(drop["ref"], b["ref"])
        noise = torch.randn_like(x0)
        weight = torch.ones(B, Fr, device=x0.device)
        frame = torch.arange(Fr, device=x0.device)[None]
        if not causal:
            sigma = sample_training_sigmas(B, shift=cfg.timestep_shift, device=x0.device)[:, None].expand(B, Fr)
            # motion frames: some samples start with 1..motion_latents clean latents (timestep 0, no loss), so the
            # teacher can continue a video window by window (stream.offline)
            n_motion = torch.randint(1, cfg.motion_latents + 1, (B,), device=x0.device) * (
                torch.rand(B, device=x0.device) < cfg.p_motion
            )
            ctx = frame < n_motion[:, None]
            sigma = torch.where(ctx, torch.zeros_like(sigma), sigma)
            weight = (~ctx).float()
        else:  # diffusion forcing: an independent noise level per chunk
            n_chunks = -(-Fr // cfg.chunk)
            sig_c = sample_training_sigmas(B * n_chunks, shift=cfg.timestep_shift, device=x0.device)
            sigma = sig_c.view(B, n_chunks).repeat_interleave(cfg.chunk, dim=1)[:, :Fr].contiguous()
            # streaming-style samples: clean context chunks before a target chunk, as the KV cache holds them
            streaming = torch.rand(B, device=x0.device) < 0.5
            first = torch.randint(1, n_chunks, (B,), device=x0.device) * cfg.chunk
            ctx = (frame < first[:, None]) & streaming[:, None]
            sigma = torch.where(ctx, torch.zeros_like(sigma), sigma)
            weight = (~ctx).float()
        # history corruption: some clean contexts (the causal model's context chunks, the teacher's motion latents:
        # at inference both are the model's own output) get a little noise but keep the clean timestep label
        p_corrupt, x_ctx = (cfg.history_corruption if causal else cfg.motion_corruption), x0
        if p_corrupt > 0:
            corrupt = (torch.rand(B, device=x0.device) < p_corrupt)[:, None] & ctx
            hc = torch.rand(B, 1, device=x0.device) * cfg.history_max_sigma
            x_ctx = add_noise(x0, torch.randn_like(x0), torch.where(corrupt, hc.expand(B, Fr), 0.0))
        xt = torch.where(ctx[:, None, :, None, None], x_ctx, add_noise(x0, noise, sigma))
        v = model(
            xt,
            sigma * 1000,
            text,
            audio,
            ref,
            chunk=cfg.chunk if causal else None,
            window=cfg.window,
            context_mask=b["text_mask"],
        )
        err = velocity_error_map(v, x0, noise)
        mse = (err.mean((2, 3)) * weight).sum() / weight.sum().clamp_min(1)
        loss, info = mse, dict(mse=mse.detach())
        if cfg.mouth_weight:
            pix = 1 + cfg.mouth_weight * b["mouth"]
            err = (err * pix).sum((2, 3)) / pix.sum((2, 3))  # [B, F]: the lips count (1 + mouth_weight) times
            loss = (err * weight).sum() / weight.sum().clamp_min(1)
        if lip_reader is not None and cfg.lip_read_weight:
            lip = lip_read_loss(lip_reader, xt, v, sigma, b["mouth"], b["lips"], weight)
            loss, info["lip_read"] = loss + cfg.lip_read_weight * lip, lip.detach()
        return loss, info

    return loss_fn


@torch.no_grad()
def audio_reliance(
    model: WanDiT, bank: LatentBank, sigmas=(0.3, 0.5, 0.7, 0.9), batch: int = 16, n_latent: int = 9, seed: int = 0
) -> dict:
    """Does the model use the audio? Its error on the lips (the world's mouth maps) with each window's own audio,
    with another clip's audio and with none, at fixed noise levels; ``gain`` = shuffled / own - 1 (0: ignored).

    Bidirectional, all latents at one noise level, the same noise for the three; on ``bank``'s clips.
    """
    g = torch.Generator().manual_seed(seed)
    b = bank.sample(g, batch, min(n_latent, bank.L))
    x0, mouth = b["x0"], b["mouth"]
    noise = torch.randn(x0.shape, generator=g).to(x0.device)
    shuffled = b["audio"].roll(1, dims=0)  # another sample's audio (a different clip or window)
    dtype = next(model.parameters()).dtype
    out = {}
    for s in sigmas:
        xt = add_noise(x0, noise, torch.full((x0.shape[0],), s, device=x0.device))
        errs = {}
        for name, audio in (("own", b["audio"]), ("shuffled", shuffled), ("none", torch.zeros_like(shuffled))):
            v = model(
                xt.to(dtype),
                torch.full((x0.shape[0],), s * 1000, device=x0.device),
                b["text"].to(dtype),
                audio.to(dtype),
                b["ref"].to(dtype),
                context_mask=b["text_mask"],
            )
            err = velocity_error_map(v, x0, noise)
            errs[name] = float((err * mouth).sum() / mouth.sum())
        errs["gain"] = errs["shuffled"] / errs["own"] - 1
        out[f"sigma_{s}"] = errs
    out["mean_gain"] = float(np.mean([v["gain"] for v in out.values()]))
    return out


def fit_lip_reader(
    cfg: TrainConfig,
    bank: LatentBank,
    held: LatentBank,
    n_latent: int,
    device: str,
    log: Callable[[str], None] = print,
) -> tuple[LatentLipReader, dict]:
    """The lip-read loss's reader, fitted on ``bank`` and checked on ``held``'s clips; a fit whose held-out jaw error
    is above ``lip_reader_max_error`` is redone with the next seed (``lip_reader_tries`` fits at most; a reader
    that reads no better than its floor gives the DiT nothing to learn). Returns the best reader and its metrics."""
    held_batch = held.sample(torch.Generator().manual_seed(cfg.seed), 256, n_latent)
    best = None
    for attempt in range(max(1, cfg.lip_reader_tries)):
        torch.manual_seed(cfg.seed + attempt)  # the reader's initial weights
        t0 = time.perf_counter()
        reader, metrics = train_lip_reader(
            lambda gen: bank.sample(gen, 64, n_latent),
            bank.latents.shape[1],
            bank.lips.shape[-1],
            cfg.lip_reader_steps,
            device,
            torch.Generator().manual_seed(cfg.seed + 7 + attempt),
            held=held_batch,
        )
        metrics["fits"] = attempt + 1
        log(f"lip reader, fit {attempt + 1} in {time.perf_counter() - t0:.1f}s: {metrics}")
        if best is None or metrics["held_jaw_error"] < best[1]["held_jaw_error"]:
            best = (reader, metrics)
        if metrics["held_jaw_error"] <= cfg.lip_reader_max_error:
            break
    best[1]["fits"] = metrics["fits"]
    return best


def train_dit(cfg: TrainConfig, log=print, started: float | None = None) -> dict:
    if cfg.grow_depth and not cfg.init:
        raise ValueError("grow_depth grows the init checkpoint: set init")
    causal = cfg.stage == "causal"
    device = train_device()
    vae = load_checkpoint(cfg.vae, device=device, dtype=torch.float32).requires_grad_(False)
    pack = load_pack(cfg.data)
    t0 = time.perf_counter()
    tr, ho = _split(pack.n_clips)
    per_call = 8 if device.startswith("cuda") else 1  # clips per VAE encoder call: 8 x 73 frames at 256 px filled
    # a 24 GiB CPU machine (the run was killed)
    bank, held = (LatentBank(cfg, vae, device, clips, pack, encode_clips=per_call) for clips in (tr, ho))
    log(
        f"latents for {bank.n} + {held.n} held-out clips ({bank.L} latent frames each) "
        f"in {time.perf_counter() - t0:.1f}s"
    )
    n_latent = window_latents(cfg)
    reader, reader_metrics = (
        fit_lip_reader(cfg, bank, held, n_latent, device, log) if cfg.lip_read_weight else (None, None)
    )
    model = build_dit(cfg)
    if cfg.init:
        # additions the file lacks (e.g. ref_embedding with dit={ref_concat: true}) keep their zero init
        sd = load_checkpoint(cfg.init).state_dict()
        if cfg.grow_depth:
            sd = deepen_dit_state(sd, model.cfg.num_layers)
            log(
                f"grew {cfg.init} to {model.cfg.num_layers} blocks "
                f"({sum(p.numel() for p in model.parameters()) / 1e6:.1f} M)"
            )
        load_dit_weights(model, sd)
    model.gradient_checkpointing = cfg.grad_checkpointing
    runner = Runner(
        cfg, model, _dit_loss(cfg, causal, reader), lambda g: bank.sample(g, cfg.batch, n_latent), device, started
    )
    if cfg.compile:  # after the Runner made its EMA copy, so only the trained model's blocks are compiled
        for block in runner.model.blocks:
            block.compile_parts()
    last = runner.train()
    final = runner.final_model()
    if final is None:  # (torchrun: rank 0 evaluates and writes)
        return dict(train=last)
    reliance = audio_reliance(final, held, n_latent=n_latent, seed=cfg.seed)
    log(
        f"audio reliance on {held.n} held-out clips (lips error, shuffled / own audio - 1): {reliance['mean_gain']:.3f}"
    )
    seen = audio_reliance(final, bank, n_latent=n_latent, seed=cfg.seed)  # far above the held-out figure: memorised
    log(f"audio reliance on training clips: {seen['mean_gain']:.3f}")
    reliance["training_clips_mean_gain"] = seen["mean_gain"]
    metrics = dict(train=last, audio_reliance=reliance, lip_reader=reader_metrics)
    (Path(cfg.out) / "metrics.json").write_text(json.dumps(metrics, indent=2))
    save_dit(cfg, final, metrics)
    return metrics


def window_latents(cfg: TrainConfig) -> int:
    """The latents of a DiT run's training window: its ``frames`` through the VAE's 4x causal time compression."""
    return 1 + (cfg.frames - 1) // 4


def build_dit(cfg: TrainConfig) -> WanDiT:
    """The DiT a teacher / causal run trains: its size's config with the run's ``dit`` overrides."""
    return WanDiT(DiTConfig.from_dict({**dit_config(cfg.model).to_dict(), **cfg.dit}))


def save_dit(cfg: TrainConfig, model: WanDiT, metrics: dict) -> list[Path]:
    """Write a run's DiT (bf16) as ``OUT/teacher.safetensors`` or ``OUT/causal.safetensors`` with what sampling
    reads from its metadata (a causal model's chunk, the teacher's window and motion latents) and ``metrics``."""
    causal = cfg.stage == "causal"
    extra = dict(
        stage=cfg.stage,
        **metrics,
        config=cfg.to_dict(),
        look_back=cfg.look_back,
        look_ahead=cfg.look_ahead,
        chunk=cfg.chunk if causal else None,
        window_latents=window_latents(cfg),
        motion_latents=cfg.motion_latents if cfg.p_motion > 0 and not causal else 0,
    )
    name = "causal.safetensors" if causal else "teacher.safetensors"
    return save_checkpoint(Path(cfg.out) / name, model.cpu(), "dit", model.cfg, extra=extra, dtype=torch.bfloat16)


def export_run(run: str | Path) -> list[Path]:
    """A teacher / causal run's last saved state (``state.pt``: every ``ckpt_every`` steps and at its time budget's
    end) written as the checkpoint the run writes when it finishes: the EMA weights (the model's where it kept no
    EMA), the same metadata, and the step reached. For a run stopped before it could export (a machine or a device
    budget that ran out, a killed process); the held-out audio-reliance figures are not computed."""
    run = Path(run)
    if not (run / "config.json").exists() or not (run / "state.pt").exists():
        raise FileNotFoundError(f"{run}: not a training run (needs config.json and state.pt)")
    cfg = TrainConfig.load(run / "config.json", dict(out=str(run)))
    if cfg.stage not in ("teacher", "causal"):
        raise ValueError(f"{run}: export writes DiT runs (teacher, causal), not {cfg.stage!r}")
    state = torch.load(run / "state.pt", map_location="cpu", weights_only=False)
    model = build_dit(cfg)
    model.load_state_dict(state["ema"] if state.get("ema") is not None else state["model"])
    return save_dit(cfg, model, dict(train=dict(step=int(state["step"])), exported_from="state.pt"))


def _distill(name: str):
    """The distillation stages (``train.ode_pairs``, ``train.distill``), imported when they run."""

    def run(cfg: TrainConfig, log=print, started: float | None = None) -> dict:
        from . import distill, ode_pairs

        fn = dict(ode_pairs=ode_pairs.make_ode_pairs, ode_init=distill.train_ode_init, dmd=distill.train_dmd)[name]
        return fn(cfg, log, started)

    return run


STAGES = dict(
    vae=train_vae,
    decoder=train_decoder,
    teacher=train_dit,
    causal=train_dit,
    ode_pairs=_distill("ode_pairs"),
    ode_init=_distill("ode_init"),
    dmd=_distill("dmd"),
)


def run_stage(cfg: TrainConfig, log=print) -> dict:
    if cfg.stage not in STAGES:
        raise ValueError(f"unknown stage {cfg.stage!r}; choose one of {sorted(STAGES)}")
    started = time.perf_counter()  # cfg.time_budget counts from here: the whole stage, not only its training loop
    torch.manual_seed(cfg.seed)  # models trained from scratch start from the same weights, on every rank
    return STAGES[cfg.stage](cfg, log, started)
