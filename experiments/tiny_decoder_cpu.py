"""Train the tiny decoder on a CPU against the VAE decoder: a cache of (true frames, VAE latents, VAE-decoded frames)
made once, then fine-tuning with the lips terms the VAE decoder was trained with and distillation of its output.

    python experiments/tiny_decoder_cpu.py cache --samples 400 --noise-p 0.5   # -> data/tiny_decoder_cache
    python experiments/tiny_decoder_cpu.py train --out runs/tiny_lips --distill 1 --truth 1 --minutes 25

``cache``: world clips of a pack (its training split: the stage's held-out tail is left out), a window of
``--frames`` frames (1 + 4k: k + 1 latents) cropped to ``--crop`` px (around the mouth for ``--mouth-p`` of them), its
VAE latents (encoder mean, normalised), with probability ``--noise-p`` plus Gaussian noise of a standard deviation
drawn in [0, ``--noise-max``] (latents off the encoder's manifold, as a DiT's are), and the VAE decoder's frames
for those latents (the distillation target). The VAE runs in bf16 autocast (the cost of the cache: ~4 s a sample on
one core). ``train``: Adam from ``--init``, loss = ``--truth`` x (L1 + l2 L2 + lips + lips motion against the true
frames, clean samples only) + ``--distill`` x (the same terms against the VAE decoder's frames); an EMA of the
weights is saved as a ``tiny_decoder`` checkpoint, its log as JSON lines (held-out shard every ``--eval-every``).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from talkstream.models.checkpoint import load_checkpoint, save_checkpoint  # noqa: E402
from talkstream.models.losses import masked_l1  # noqa: E402
from talkstream.train.data import load_pack  # noqa: E402
from talkstream.train.stages import HELD_OUT_FRACTION, FrameBank, tiny_decoder_loss  # noqa: E402
from talkstream.world.render import UNITS, FrameState, Renderer, mouth_center  # noqa: E402

CACHE = Path("data/tiny_decoder_cache")


def lips_map(mouths: torch.Tensor, size: int, sigma: float = FrameBank.MOUTH_SIGMA) -> torch.Tensor:
    """Mouth centres [B, F, 2] (pixels of the crop) -> Gaussian lip weights [B, 1, F, size, size]."""
    grid = torch.arange(size).float() + 0.5
    gx = (grid[None, None, :] - mouths[..., :1]) / sigma
    gy = (grid[None, None, :] - mouths[..., 1:]) / sigma
    return torch.exp(-0.5 * (gy[..., :, None] ** 2 + gx[..., None, :] ** 2))[:, None]


def make_cache(a: argparse.Namespace) -> None:
    torch.set_num_threads(a.threads)
    pack = load_pack(a.pack)
    n_train = pack.n_clips - max(1, int(round(pack.n_clips * HELD_OUT_FRACTION)))
    vae = load_checkpoint(a.vae, dtype=torch.float32).eval().requires_grad_(False)
    rng = np.random.default_rng(a.seed)
    a.dir.mkdir(parents=True, exist_ok=True)
    F, c, size = a.frames, a.crop, 256
    if (F - 1) % 4 or c % 8:
        raise SystemExit(f"--frames must be 1 + 4k and --crop a multiple of 8 (got {F}, {c})")
    buf: dict[str, list] = {k: [] for k in ("x", "z", "target", "mouth", "sigma", "clip")}
    shard, t0 = a.first_shard, time.perf_counter()
    for n in range(a.samples):
        i = int(rng.integers(n_train))
        s = int(rng.integers(pack.n_frames - F + 1))
        ident, states = pack.identities[i], pack.states[i, s : s + F]
        renderer = Renderer(ident, size)
        frames = np.stack([renderer.render(FrameState.from_array(r)) for r in states])  # [F, H, W, 3]
        mouths = np.array([mouth_center(ident, FrameState.from_array(r)) for r in states], np.float32) * (size / UNITS)
        if rng.random() < a.mouth_p:  # the mouth somewhere inside the crop, 24 px from its sides at least
            x0 = int(np.clip(round(mouths[0, 0] - rng.uniform(24, c - 24)), 0, size - c))
            y0 = int(np.clip(round(mouths[0, 1] - rng.uniform(24, c - 24)), 0, size - c))
        else:
            x0, y0 = int(rng.integers(size - c + 1)), int(rng.integers(size - c + 1))
        crop = frames[:, y0 : y0 + c, x0 : x0 + c]
        x = torch.from_numpy(crop).permute(3, 0, 1, 2)[None].float() / 127.5 - 1
        sigma = float(rng.uniform(0, a.noise_max)) if rng.random() < a.noise_p else 0.0
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
            z = vae.encode(x).float()
            if sigma:
                z = z + sigma * torch.from_numpy(rng.standard_normal(z.shape).astype(np.float32))
            y = vae.decode(z).float().clamp(-1, 1)
        buf["x"].append(crop)
        buf["z"].append(z[0].half().numpy())
        buf["target"].append(((y[0].permute(1, 2, 3, 0) + 1) * 127.5).round().byte().numpy())
        buf["mouth"].append(mouths - np.array([x0, y0], np.float32))
        buf["sigma"].append(sigma)
        buf["clip"].append(i)
        if len(buf["x"]) == a.shard or n == a.samples - 1:
            path = a.dir / f"shard_{shard:04d}.npz"
            np.savez(path.with_suffix(".tmp.npz"), **{k: np.stack(v) for k, v in buf.items()})
            path.with_suffix(".tmp.npz").rename(path)
            print(f"{path.name}: {n + 1} samples, {time.perf_counter() - t0:.0f} s", flush=True)
            buf, shard = {k: [] for k in buf}, shard + 1


def load_shards(paths: list[Path]) -> dict[str, torch.Tensor]:
    parts = [dict(np.load(p)) for p in paths]
    out = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
    return dict(
        x=torch.from_numpy(out["x"]).permute(0, 4, 1, 2, 3),  # uint8 [N, 3, F, c, c]
        target=torch.from_numpy(out["target"]).permute(0, 4, 1, 2, 3),
        z=torch.from_numpy(out["z"]),
        mouth=torch.from_numpy(out["mouth"]),
        sigma=torch.from_numpy(out["sigma"]).float(),
    )


def crop_batch(b: dict[str, torch.Tensor], crop: int, gen: torch.Generator) -> dict[str, torch.Tensor]:
    """One ``crop`` x ``crop`` window (a multiple of 8, on the latent grid) of every cached sample, around the
    mouth where the sample's mouth lies inside it (all frames' centres 12 px from the sides at least)."""
    c = b["x"].shape[-1]
    if not crop or crop >= c:
        return b
    if crop % 8:
        raise SystemExit(f"--train-crop must be a multiple of 8, got {crop}")
    out: dict[str, list] = {k: [] for k in ("x", "target", "z", "mouth")}
    for j in range(len(b["z"])):
        m = b["mouth"][j]  # [F, 2] pixels of the cached crop
        lo = torch.clamp(torch.ceil((m.max(0).values - crop + 12) / 8), min=0).long()
        hi = torch.clamp(torch.floor((m.min(0).values - 12) / 8), max=(c - crop) // 8).long()
        cell = []
        for d in range(2):  # x, y: a latent cell keeping the mouth inside, else any
            a, z = int(lo[d]), int(hi[d])
            a, z = (a, z) if a <= z else (0, (c - crop) // 8)
            cell.append(int(torch.randint(a, z + 1, (1,), generator=gen)))
        (x0, y0), L = (8 * cell[0], 8 * cell[1]), crop // 8
        out["x"].append(b["x"][j, ..., y0 : y0 + crop, x0 : x0 + crop])
        out["target"].append(b["target"][j, ..., y0 : y0 + crop, x0 : x0 + crop])
        out["z"].append(b["z"][j, ..., cell[1] : cell[1] + L, cell[0] : cell[0] + L])
        out["mouth"].append(m - torch.tensor([x0, y0], dtype=m.dtype))
    res = {k: torch.stack(v) for k, v in out.items()}
    res["sigma"] = b["sigma"]
    return res


def _video(u8: torch.Tensor) -> torch.Tensor:
    return u8.float() / 127.5 - 1


def loss_on(model, b: dict, a: argparse.Namespace) -> tuple[torch.Tensor, dict]:
    """``--truth`` x the stage's loss against the true frames (clean latents only) + ``--distill`` x the same
    lips-weighted terms against the VAE decoder's frames."""
    y = model(b["z"].float())
    x, t = _video(b["x"]), _video(b["target"])
    m = lips_map(b["mouth"], x.shape[-1])
    terms = dict(mouth_weight=a.mouth_weight, motion_weight=a.motion_weight, l2=a.l2)
    loss, info = torch.zeros(()), {}
    clean = b["sigma"] == 0
    if a.truth and clean.any():
        lt, it = tiny_decoder_loss(y[clean], x[clean], m[clean], ms_ssim_weight=a.ms_ssim, **terms)
        loss = loss + a.truth * lt
        info.update({f"truth_{k}": float(v) for k, v in it.items()})
    if a.distill:
        ld, idd = tiny_decoder_loss(y, t, m, ms_ssim_weight=0.0, **terms)
        loss = loss + a.distill * ld
        info.update({f"vae_{k}": float(v) for k, v in idd.items()})
    info["vae_lips_l1"] = float(masked_l1(y.detach(), t, m))
    return loss, info


def train(a: argparse.Namespace) -> None:
    torch.set_num_threads(a.threads)
    torch.manual_seed(a.seed)
    shards = sorted(a.dir.glob("shard_*.npz"))
    if len(shards) < 2:
        raise SystemExit(f"{a.dir} holds {len(shards)} shards: make a cache first (one is held out)")
    held = load_shards(shards[:1])  # the first shard is held out
    model = load_checkpoint(a.init, dtype=torch.float32).train()
    ema = load_checkpoint(a.init, dtype=torch.float32).eval().requires_grad_(False)
    opt = torch.optim.Adam(model.parameters(), lr=a.lr)
    a.out.mkdir(parents=True, exist_ok=True)
    log = (a.out / "log.jsonl").open("w")
    gen = torch.Generator().manual_seed(a.seed)
    t0, data, n_loaded, step = time.perf_counter(), None, 0, 0
    budget = a.minutes * 60
    while step < a.steps and time.perf_counter() - t0 < budget:
        shards = sorted(a.dir.glob("shard_*.npz"))[1:]
        if data is None or (len(shards) > n_loaded and step % 50 == 0):  # the cache may still be growing
            data, n_loaded = load_shards(shards), len(shards)
            if not a.noisy:
                keep = data["sigma"] == 0
                data = {k: v[keep] for k, v in data.items()}
        idx = torch.randint(len(data["z"]), (a.batch,), generator=gen)
        b = crop_batch({k: v[idx] for k, v in data.items()}, a.train_crop, gen)
        lr = a.lr * min(1.0, (step + 1) / 50) * (0.1 + 0.9 * 0.5 * (1 + np.cos(np.pi * min(1.0, step / a.steps))))
        for g in opt.param_groups:
            g["lr"] = lr
        loss, info = loss_on(model, b, a)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        with torch.no_grad():
            for pe, pm in zip(ema.parameters(), model.parameters()):
                pe.lerp_(pm, 1 - a.ema)
        step += 1
        rec = dict(
            step=step,
            seconds=round(time.perf_counter() - t0, 1),
            lr=lr,
            loss=float(loss.detach()),
            samples=len(data["z"]),
        )
        rec.update(info)
        if step % a.eval_every == 0 or step == 1:
            with torch.no_grad():
                _, hi = loss_on(ema, held, a)
            rec["held_out"] = {k: round(v, 5) for k, v in hi.items()}
            print(json.dumps(rec), flush=True)
        log.write(json.dumps(rec) + "\n")
        log.flush()
    with torch.no_grad():
        _, hi = loss_on(ema, held, a)
    config = {k: str(v) if isinstance(v, Path) else v for k, v in vars(a).items()}
    summary = dict(steps=step, seconds=round(time.perf_counter() - t0, 1), held_out=hi, config=config)
    save_checkpoint(
        a.out / "tiny_decoder.safetensors", ema, "tiny_decoder", ema.cfg, extra=summary, dtype=torch.float32
    )
    (a.out / "summary.json").write_text(json.dumps(summary, indent=2))
    print(json.dumps(summary), flush=True)


def per_latent(v: torch.Tensor, T: int, tf: int) -> torch.Tensor:
    """A window's frames after its first latent's [B, C, 1 + tf (T - 1), H, W] -> [B (T - 1), tf C, H, W], the
    layout of the tiny decoder's last convolution (before its pixel shuffle)."""
    v = v[:, :, 1:].unflatten(2, (T - 1, tf))  # [B, C, T - 1, tf, H, W]
    return v.permute(0, 2, 3, 1, 4, 5).flatten(0, 1).flatten(1, 2)


def refit(a: argparse.Namespace) -> None:
    """The last convolution re-solved in closed form: weighted ridge regression of the VAE decoder's frames (the
    distillation target; ``--distill`` < 1 mixes in the true frames) on the frozen network's features, each
    half-resolution position weighted 1 + ``--mouth-weight`` x its lips weight. Latents after a window's first
    (whose frames are all emitted) only."""
    torch.set_num_threads(a.threads)
    shards = sorted(a.dir.glob("shard_*.npz"))
    if len(shards) < 2:
        raise SystemExit(f"{a.dir} holds {len(shards)} shards: make a cache first (one is held out)")
    held, data = load_shards(shards[:1]), load_shards(shards[1:])
    model = load_checkpoint(a.init, dtype=torch.float32).eval()
    conv = model.conv_out
    feats: list[torch.Tensor] = []
    hook = conv.register_forward_hook(lambda mod, inp, out: feats.append(inp[0]))
    k, tf = conv.in_channels * 9 + 1, model.cfg.temporal_factor
    gram, cross = torch.zeros(k, k, dtype=torch.float64), torch.zeros(k, conv.out_channels, dtype=torch.float64)
    t0 = time.perf_counter()
    for i in range(0, len(data["z"]), a.batch):
        b = {key: v[i : i + a.batch] for key, v in data.items()}
        feats.clear()
        with torch.no_grad():
            model(b["z"].float())
        h = feats[0]  # [B * T, c, H/2, W/2]
        B, T = b["z"].shape[0], b["z"].shape[2]
        h = h.unflatten(0, (B, T))[:, 1:].flatten(0, 1)
        cols = F.unfold(h, 3, padding=1).transpose(1, 2).flatten(0, 1)  # [rows, c * 9]
        cols = torch.cat([cols, torch.ones(len(cols), 1)], 1).double()
        target = a.distill * _video(b["target"]) + (1 - a.distill) * _video(b["x"])
        m = lips_map(b["mouth"], target.shape[-1])  # [B, 1, Fr, H, W]
        y = F.pixel_unshuffle(per_latent(target, T, tf), 2).permute(0, 2, 3, 1).flatten(0, 2).double()  # [rows, out]
        w = 1 + a.mouth_weight * F.avg_pool2d(per_latent(m, T, tf).mean(1, keepdim=True), 2)
        w = w.permute(0, 2, 3, 1).flatten(0, 2).double()  # [rows, 1]
        gram += cols.T @ (cols * w)
        cross += cols.T @ (y * w)
        print(f"{i + len(b['z'])}/{len(data['z'])} samples, {time.perf_counter() - t0:.0f} s", flush=True)
    hook.remove()
    old = torch.cat([conv.weight.flatten(1), conv.bias[:, None]], 1).T.double()  # [k, out]
    lam = a.ridge * gram.diagonal().mean()
    sol = torch.linalg.solve(gram + lam * torch.eye(k, dtype=torch.float64), cross + lam * old)  # ridge toward old
    with torch.no_grad():
        conv.weight.copy_(sol[:-1].T.reshape(conv.weight.shape).float())
        conv.bias.copy_(sol[-1].float())
    with torch.no_grad():
        _, before = loss_on(load_checkpoint(a.init, dtype=torch.float32).eval(), held, a)
        _, after = loss_on(model, held, a)
    config = {key: str(v) if isinstance(v, Path) else v for key, v in vars(a).items()}
    summary = dict(samples=len(data["z"]), seconds=round(time.perf_counter() - t0, 1), held_out_before=before)
    summary.update(held_out_after=after, config=config)
    a.out.mkdir(parents=True, exist_ok=True)
    save_checkpoint(a.out / "tiny_decoder.safetensors", model, "tiny_decoder", model.cfg, extra=summary)
    (a.out / "summary.json").write_text(json.dumps(summary, indent=2))
    print(json.dumps(summary), flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("what", choices=["cache", "train", "refit"])
    ap.add_argument("--dir", type=Path, default=CACHE)
    ap.add_argument("--vae", default="talkstream/weights/vae.safetensors")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0)
    c = ap.add_argument_group("cache")
    c.add_argument("--pack", default="data/distill_pack.npz")
    c.add_argument("--samples", type=int, default=400)
    c.add_argument("--first-shard", type=int, default=0, help="shard numbering (several cache writers)")
    c.add_argument("--shard", type=int, default=16)
    c.add_argument("--frames", type=int, default=9)
    c.add_argument("--crop", type=int, default=96)
    c.add_argument("--mouth-p", type=float, default=0.7)
    c.add_argument("--noise-p", type=float, default=0.5)
    c.add_argument("--noise-max", type=float, default=0.3)
    t = ap.add_argument_group("train")
    t.add_argument("--init", default="talkstream/weights/tiny_decoder.safetensors")
    t.add_argument("--out", type=Path, default=Path("runs/tiny_decoder_cpu"))
    t.add_argument("--steps", type=int, default=3000)
    t.add_argument("--minutes", type=float, default=25.0)
    t.add_argument("--batch", type=int, default=8)
    t.add_argument("--train-crop", type=int, default=0, help="train on windows of the cached crops (0: whole)")
    t.add_argument("--lr", type=float, default=3e-4)
    t.add_argument("--ema", type=float, default=0.99)
    t.add_argument("--truth", type=float, default=1.0)
    t.add_argument("--distill", type=float, default=0.0)
    t.add_argument("--noisy", action="store_true", help="train on the noised latents too (else clean ones only)")
    t.add_argument("--mouth-weight", type=float, default=12.0)
    t.add_argument("--motion-weight", type=float, default=12.0)
    t.add_argument("--l2", type=float, default=20.0)
    t.add_argument("--ms-ssim", type=float, default=0.1)
    t.add_argument("--eval-every", type=int, default=100)
    t.add_argument("--ridge", type=float, default=1e-3, help="refit: ridge toward the old weights (x mean diagonal)")
    a = ap.parse_args()
    dict(cache=make_cache, train=train, refit=refit)[a.what](a)


if __name__ == "__main__":
    main()
