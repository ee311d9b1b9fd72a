# ruff: noqa: E501
"""Carry a trained tiny decoder over to a fine-tuned VAE whose encoder moved (the latent space changed):

1. fit the affine map from the new VAE's raw latents to the old VAE's (least squares over every latent pixel of
   training-clip windows encoded by both), fold it into the tiny decoder's first convolution and give the decoder
   the new VAE's latent statistics; the decoder then reads the new latents as it read the old ones;
2. optionally fine-tune it on the new VAE's latents of fixed training windows, encoded once (``--steps``), with the
   decoder stage's loss; it runs on 2 CPU cores. On a GPU, `train decoder` with ``init=`` the fit-only output
   (fresh windows every step) does better: 190 s on an H100 -> 1.18 dB under the new VAE, where
   2,900 CPU steps stopped at 1.9 dB.

    python experiments/tiny_decoder_adapt.py --old-vae OLD --new-vae NEW --decoder talkstream/weights/tiny_decoder.safetensors \
        --out runs/tiny_adapted/tiny_decoder.safetensors [--steps 600]

Then measure it with `experiments/vae_eval.py --vae NEW --decoder OUT`.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from talkstream.models.checkpoint import load_checkpoint, save_checkpoint
from talkstream.train.data import load_pack, mouth_pixels, render_pack
from talkstream.train.latent_map import fit_latent_map, fold_latent_map
from talkstream.train.stages import FrameBank, _split, tiny_decoder_loss


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--old-vae", type=Path, required=True, help="the VAE the decoder was trained on")
    ap.add_argument("--new-vae", type=Path, required=True)
    ap.add_argument("--decoder", type=Path, required=True)
    ap.add_argument("--data", type=Path, default=Path("data/dit_pack.npz"))
    ap.add_argument("--fit-windows", type=int, default=8, help="13-frame training windows for the fit")
    ap.add_argument("--steps", type=int, default=0, help="fine-tuning steps after the fit (0: fit only)")
    ap.add_argument("--windows", type=int, default=96, help="fine-tuning: fixed training windows, encoded once")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--crop", type=int, default=128)
    ap.add_argument("--lr", type=float, default=2e-4, help="peak learning rate (cosine decay to 0)")
    ap.add_argument("--mouth-weight", type=float, default=3.0)
    ap.add_argument("--l2-weight", type=float, default=20.0)
    ap.add_argument("--clips", type=int, default=120, help="training clips rendered for windows")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--out", type=Path, required=True)
    a = ap.parse_args()

    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    old, new = (load_checkpoint(p, dtype=torch.float32).eval() for p in (a.old_vae, a.new_vae))
    dec = load_checkpoint(a.decoder, dtype=torch.float32)
    pack = load_pack(a.data)
    tr = _split(pack.n_clips)[0]
    tr = slice(tr.start, min(tr.stop, tr.start + a.clips))
    t0 = time.perf_counter()
    frames = render_pack(pack, 256, a.workers, clips=tr)
    bank = FrameBank(frames, 13, "cpu", mouth_pixels(pack, tr, 256))
    print(f"rendered {frames.shape[0]} clips in {time.perf_counter() - t0:.0f} s", flush=True)

    with torch.no_grad():  # 1. the affine map, on whole frames
        olds, news = [], []
        for _ in tqdm(range(a.fit_windows), desc="fit windows"):
            x = bank.sample(g, 1, 0)
            olds.append(old.encode(x, normalize=False))
            news.append(new.encode(x, normalize=False))
        o, n = torch.cat(olds), torch.cat(news)
        A, b = fit_latent_map(o, n)
        fitted = torch.einsum("ij,bj...->bi...", A, n) + b.view(1, -1, 1, 1, 1)
        var = o.var(dim=(0, 2, 3, 4)).mean()  # the old latents' per-channel variance, averaged over channels
        info = dict(
            fit_windows=a.fit_windows,
            fit_r2=float(1 - (fitted - o).pow(2).mean() / var),
            identity_r2=float(1 - (n - o).pow(2).mean() / var),  # how far the raw latents moved at all
            std_ratio=float((n.std(dim=(0, 2, 3, 4)) / o.std(dim=(0, 2, 3, 4))).mean()),
        )  # new / old scale
        print(
            f"affine map new -> old latents: R^2 {info['fit_r2']:.4f} (identity map: {info['identity_r2']:.4f}; "
            f"new / old latent std {info['std_ratio']:.3f})",
            flush=True,
        )
    fold_latent_map(dec, A, b, new.latent_mean, new.latent_std)

    if a.steps:  # 2. fine-tune on fixed windows of the new latents (crops encoded as the decoder stage does)
        with torch.no_grad():
            data = []
            for _ in tqdm(range(a.windows), desc="encode windows"):
                x, m = bank.sample(g, 1, a.crop, with_mouth=True)
                data.append((new.encode(x), x, m))
        opt = torch.optim.AdamW(dec.parameters(), lr=a.lr, weight_decay=0.0)
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, a.steps)
        losses = []
        bar = tqdm(range(a.steps), desc="fine-tune")
        for _ in bar:
            idx = torch.randint(len(data), (a.batch,), generator=g)
            z, x, m = (torch.cat([data[i][k] for i in idx]) for k in range(3))
            loss, _ = tiny_decoder_loss(dec(z), x, m, l2=a.l2_weight, ms_ssim_weight=0.1, mouth_weight=a.mouth_weight)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            losses.append(float(loss))
            bar.set_postfix(loss=f"{np.mean(losses[-20:]):.4f}")
        info.update(
            steps=a.steps,
            windows=a.windows,
            batch=a.batch,
            crop=a.crop,
            lr=a.lr,
            first_loss=float(np.mean(losses[:20])),
            last_loss=float(np.mean(losses[-20:])),
        )
    save_checkpoint(
        a.out,
        dec.cpu(),
        "tiny_decoder",
        dec.cfg,
        extra=dict(adapted=dict(old_vae=str(a.old_vae), new_vae=str(a.new_vae), **info)),
        dtype=torch.bfloat16,
    )
    print(json.dumps(info, indent=2))


if __name__ == "__main__":
    main()
