"""Silhouette IoU (``metrics.silhouette_iou``: the person's outline in generated frames against the true render's)
of saved suite samples — the GIFs ``talkstream eval suite --sample`` writes, or mp4s made from them — with no model
run; optionally the VAE's round trip of the true frames as the ceiling any DiT decoded by it can reach.

    python experiments/silhouette_samples.py --sample t3=sample_teacher.gif c5=docs/samples/causal_suite_900000.mp4 \
        --vae talkstream/weights/vae.safetensors --out benchmarks/results/silhouette_samples_cpu.json
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from talkstream.eval.evaluate import load_suite_inputs, vae_roundtrip
from talkstream.eval.metrics import silhouette_iou
from talkstream.machine import describe, report
from talkstream.media import read_video
from talkstream.world.render import Renderer, render_states


def summary(frames: np.ndarray, truth: np.ndarray, background: np.ndarray) -> dict:
    per = silhouette_iou(frames, truth, background)["silhouette_iou_per_frame"]
    return dict(
        silhouette_iou=float(per.mean()),
        first_second=float(per[:25].mean()),
        last_second=float(per[-25:].mean()),
        frames=len(per),
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sample", nargs="+", required=True, help="NAME=PATH (a .gif or any video)")
    ap.add_argument("--inputs", type=Path, default=Path("data/suite_inputs.pkl"), help="from eval suite --save-inputs")
    ap.add_argument("--seed", type=int, default=900_000, help="the suite clip the samples show (the suite's first)")
    ap.add_argument("--vae", help="also the VAE's round trip of the true frames")
    ap.add_argument("--out")
    a = ap.parse_args()
    clip = load_suite_inputs(a.inputs)["clips"][a.seed]["clip"]
    if not all("=" in s for s in a.sample):
        ap.error(f"--sample takes NAME=PATH, got {[s for s in a.sample if '=' not in s]}")
    named = dict(s.split("=", 1) for s in a.sample)
    samples = {k: read_video(v).frames for k, v in named.items()}
    n = max(len(f) for f in samples.values())
    size = next(iter(samples.values())).shape[1]
    truth = np.stack(list(render_states(clip.identity, clip.states[:n], size)))
    background = Renderer(clip.identity, size).background()
    rows = {k: summary(f, truth, background) for k, f in samples.items()}
    rows["truth"] = summary(truth, truth, background)
    if a.vae:
        import torch

        from talkstream.models.checkpoint import load_checkpoint

        vae = load_checkpoint(a.vae).eval()
        with torch.no_grad():
            rows["vae_roundtrip"] = summary(vae_roundtrip(vae, truth[: 1 + 4 * ((n - 1) // 4)]), truth, background)
    report(dict(seed=a.seed, samples=named, vae=a.vae, rows=rows, machine=describe()), a.out)


if __name__ == "__main__":
    main()
