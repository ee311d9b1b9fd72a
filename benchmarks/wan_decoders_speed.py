"""Per-frame decode cost of the Wan2.1 VAE and the TAEHV tiny decoder (random weights of the real shapes).

Streams one first latent, then times ``--latents`` more (4 frames each) through each decoder's feature cache.
Usage: python benchmarks/wan_decoders_speed.py --device cpu --size 512 --out benchmarks/results/NAME.json
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from talkstream.machine import check_device, describe, report  # noqa: E402
from talkstream.models.wan_vae import bench_decoders  # noqa: E402


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--latents", type=int, default=3, help="latents timed per call (3 = one LiveTalk chunk)")
    ap.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default=None)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--no-warmup", action="store_true", help="count the first round too (slow CPUs)")
    ap.add_argument("--tiny-only", action="store_true")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--out", default=None)
    a = ap.parse_args(argv)
    check_device(a.device)
    if a.size % 8:
        raise SystemExit(f"--size must be a multiple of 8, got {a.size}")
    if a.threads:
        torch.set_num_threads(a.threads)
    dtype = getattr(torch, a.dtype) if a.dtype else None
    res = bench_decoders(
        a.device, a.size, a.latents, dtype, a.repeats, include_vae=not a.tiny_only, warmup=not a.no_warmup
    )
    res["machine"] = describe()
    res["omp_num_threads"] = os.environ.get("OMP_NUM_THREADS")
    return report(res, a.out)


if __name__ == "__main__":
    main()
