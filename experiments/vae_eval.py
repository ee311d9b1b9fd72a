# ruff: noqa: E501
"""Held-out metrics of a VAE (and the tiny decoder on its latents), as the `vae` / `decoder` stages report them at
the end of a run: PSNR of whole 256x256 frames, lips PSNR, the frame probe's mouth reading vs the truth's, decode
throughput, on the pack's held-out clips (the same split the stages use: its last 5%).

    python experiments/vae_eval.py --vae talkstream/weights/vae.safetensors --decoder talkstream/weights/tiny_decoder.safetensors \
        --data data/dit_pack.npz --out benchmarks/results/vae_eval_cpu.json

`--decoder-stats vae` gives the tiny decoder the VAE's latent statistics (as the decoder stage does when it trains on
a VAE) instead of its own: which of the two a stream should use once the VAE under a shipped tiny decoder changes.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from talkstream.machine import describe
from talkstream.models.checkpoint import load_checkpoint
from talkstream.train.data import load_pack, mouth_pixels, render_pack
from talkstream.train.stages import EVAL_FRAMES, _split, evaluate_vae


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--vae", type=Path, required=True)
    ap.add_argument("--decoder", type=Path, help="a tiny decoder to measure on the VAE's latents")
    ap.add_argument(
        "--decoder-stats",
        choices=["own", "vae"],
        default="own",
        help="the tiny decoder's latent statistics: its own (as shipped) or the VAE's",
    )
    ap.add_argument("--data", type=Path, default=Path("data/dit_pack.npz"))
    ap.add_argument("--clips", type=int, help="at most this many held-out clips (default: all of the split)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--batch", type=int, help="clips per encode / decode (default: 8 on a GPU, 1 on the CPU)")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--out", type=Path)
    a = ap.parse_args()

    torch.manual_seed(0)
    pack = load_pack(a.data)
    ho = _split(pack.n_clips)[1]
    if a.clips:
        ho = slice(ho.start, min(ho.stop, ho.start + a.clips))
    held = render_pack(pack, 256, a.workers, clips=ho)
    vae = load_checkpoint(a.vae, dtype=torch.float32)
    dec = load_checkpoint(a.decoder, dtype=torch.float32) if a.decoder else None
    if dec is not None and a.decoder_stats == "vae":
        dec.latent_mean.copy_(vae.latent_mean)
        dec.latent_std.copy_(vae.latent_std)
    t0 = time.perf_counter()
    m = evaluate_vae(
        vae,
        held,
        EVAL_FRAMES,
        a.device,
        decoder=dec,
        mouths=mouth_pixels(pack, ho, 256),
        batch=a.batch or (1 if a.device == "cpu" else 8),
    )
    res = dict(
        vae=str(a.vae),
        decoder=str(a.decoder) if a.decoder else None,
        decoder_stats=a.decoder_stats,
        data=str(a.data),
        clips=[ho.start, ho.stop],
        **m,
        seconds=round(time.perf_counter() - t0, 1),
        device=a.device,
        machine=describe(),
    )
    print(json.dumps(res, indent=2))
    if a.out:
        a.out.parent.mkdir(parents=True, exist_ok=True)
        a.out.write_text(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()
