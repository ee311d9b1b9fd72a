"""What a wider tiny decoder costs the CPU's live path: one streamed 3-latent chunk (12 frames at 256x256) decoded
with the causal feature cache, bf16, one thread (the decode worker's share on 2 cores), for the shipped widths and
wider last stages (random weights: the cost is the shape's). The lips gap to the VAE decoder is a capacity question
(docs/results.md); this says what capacity would cost.

    python experiments/tiny_decoder_widths_cpu.py --out benchmarks/results/tiny_decoder_widths_cpu.json
"""

import argparse
import time

import torch

from talkstream.machine import describe, report
from talkstream.models.config import TinyDecoderConfig
from talkstream.models.vae import TinyDecoder
from talkstream.stream.accel import stream_dtype
from talkstream.stream.engine import ChunkDecoder

WIDTHS = [None, (96, 64, 64), (96, 96, 64), (128, 96, 64)]  # None: the shipped widths


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=6, help="timed chunks per width (after 2 untimed)")
    ap.add_argument("--out")
    a = ap.parse_args()
    torch.set_num_threads(1)
    dtype = stream_dtype("cpu")
    rows = []
    for ch in WIDTHS:
        cfg = TinyDecoderConfig(latent_dim=16) if ch is None else TinyDecoderConfig(latent_dim=16, channels=ch)
        dec = TinyDecoder(cfg).eval().to(dtype)
        decode = ChunkDecoder(dec)
        z = torch.randn(1, 16, 3, a.size // 8, a.size // 8, dtype=dtype)
        with torch.no_grad():
            for _ in range(2):
                decode(z)
            times = []
            for _ in range(a.repeats):
                t = time.process_time()
                decode(z)
                times.append(time.process_time() - t)
        rows.append(
            dict(
                channels=list(cfg.channels),
                shipped=ch is None,
                parameters=sum(p.numel() for p in dec.parameters()),
                cpu_s_per_chunk_median=round(sorted(times)[len(times) // 2], 4),
                cpu_s_per_chunk=[round(t, 4) for t in times],
            )
        )
    base = rows[0]["cpu_s_per_chunk_median"]
    for r in rows:
        r["vs_shipped"] = round(r["cpu_s_per_chunk_median"] / base, 3)
    report(dict(what=__doc__.split("\n\n")[0], size=a.size, dtype=str(dtype), rows=rows, machine=describe()), a.out)


if __name__ == "__main__":
    main()
