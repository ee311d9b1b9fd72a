"""Where in a suite clip the mouth error sits: the frame probe's error (offset 0, against the world's truth) of the
true renders, of their VAE round trips and of earlier model draws (a `experiments/draw_spread.py` JSON), split into
silence and speech (the clip's speaking segments), frames near the truth's one-frame jaw jumps (> 0.2 between
two frames: speech onsets and ends) and the rest, and by a frame's place inside its latent (the round trip's
latents start every 33 frames; a model draw's run over the whole clip), and into the frames where the truth's jaw is
shut (silence and pauses) or open, with the mean reading of the shut ones (how open a shut mouth looks).

    python experiments/mouth_parts.py --inputs data/suite_inputs.pkl --seeds 900001 900002 \
        --draws benchmarks/results/draw_spread_teacher_900001_cpu.json \
        --out benchmarks/results/vae_ceiling_mouth_parts_cpu.json
    python experiments/mouth_parts.py --inputs data/suite_inputs.pkl --seeds 900001 --frames 900001=F.npy \
        --out benchmarks/results/mouth_parts_900001_t3_cpu.json --strip docs/findings/strip_silence_900001_t3_cpu.png
(``--frames SEED=F.npy``: a model's frames of that clip, e.g. saved from ``run_suite(keep_frames=True)``;
``--strip``: truth above those frames below, at six shut frames.)

(about 3 min a clip on 2 CPU cores: the VAE round trip.)
"""

import argparse
import json
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from talkstream.eval import metrics
from talkstream.eval.evaluate import clip_mouth_truth, load_suite_inputs, vae_roundtrip
from talkstream.eval.probes import load_frame_probe
from talkstream.machine import describe, report
from talkstream.models.checkpoint import load_checkpoint
from talkstream.world.behaviour import FPS
from talkstream.world.render import render_states

SEGMENT = 33  # the round trip's clip length (as in vae_roundtrip_suite.py)
JUMP = 0.2  # a jaw change per frame above this is a one-frame jump


def parts(clip, truth: np.ndarray, segment: int | None) -> dict[str, np.ndarray]:
    """Frame masks; ``segment``: the clip was encoded in segments of that many frames (None: as one clip)."""
    n = len(truth)
    t = (np.arange(n) + 0.5) / FPS
    speech = np.zeros(n, bool)
    for s in clip.segments:
        if s.state == "speaking":
            speech |= (t >= s.start) & (t < s.end)
    near = np.zeros(n, bool)
    for j in np.flatnonzero(np.abs(np.diff(truth)) > JUMP):  # the jump is between frames j and j + 1
        near[max(0, j - 3) : j + 5] = True
    p = np.arange(n) % (segment or n)
    place = np.where(p == 0, -1, (p - 1) % 4)  # -1: a clip's first frame (a latent of its own)
    out = dict(
        all=np.ones(n, bool),
        silence=~speech,
        speech=speech,
        near_jumps=near,
        away_from_jumps=~near,
        shut=truth == 0,
        open=truth != 0,
    )
    out.update({f"latent_frame_{k}": place == k for k in range(4)})
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--inputs", required=True, help="suite inputs (talkstream eval suite --save-inputs)")
    ap.add_argument("--seeds", type=int, nargs="+", default=[900_001])
    ap.add_argument("--vae", default="talkstream/weights/vae.safetensors")
    ap.add_argument("--draws", nargs="*", default=[], help="draw_spread.py results to split the same way")
    ap.add_argument(
        "--frames",
        nargs="*",
        default=[],
        metavar="SEED=F.npy",
        help="a model's frames of a clip, read and split the same way",
    )
    ap.add_argument("--strip", help="a PNG of the truth above the first --frames below, at six shut frames")
    ap.add_argument("--out")
    a = ap.parse_args()
    inputs, probe, jaw = load_suite_inputs(a.inputs), load_frame_probe(), metrics.F["jaw_open"]
    vae = load_checkpoint(a.vae, dtype=torch.float32).eval()
    draws = {}
    for path in a.draws:
        with open(path) as f:
            d = json.load(f)
        for k, r in enumerate(d["readings"]):
            draws.setdefault(d["seed"], {})[f"{d['model'].split('/')[-1]} draw {k}"] = np.asarray(r)
    generated = {}
    for spec in a.frames:
        seed, path = spec.split("=", 1)
        generated.setdefault(int(seed), {})[f"frames {Path(path).stem}"] = np.load(path)
    rows = []
    for seed in a.seeds:
        clip = inputs["clips"][seed]["clip"]
        truth = clip_mouth_truth(clip)
        frames = np.stack(list(render_states(clip.identity, clip.states, 256)))
        reads = {
            "true render": probe.read(frames)["states"][:, jaw],
            "VAE round trip": probe.read(vae_roundtrip(vae, frames, SEGMENT))["states"][:, jaw],
            **draws.get(seed, {}),
            **{name: probe.read(x)["states"][:, jaw] for name, x in generated.get(seed, {}).items()},
        }
        row = dict(
            seed=seed,
            shut_read={name: float(r[: len(truth)][truth[: len(r)] == 0].mean()) for name, r in reads.items()},
        )
        for name, r in reads.items():
            masks = parts(clip, truth, SEGMENT if name == "VAE round trip" else None)
            row.setdefault("frames", {k: int(m.sum()) for k, m in masks.items()})
            err = np.abs(r[: len(truth)] - truth[: len(r)])
            row[name] = {k: float(err[m[: len(err)]].mean()) if m[: len(err)].any() else None for k, m in masks.items()}
        rows.append(row)
        for name in reads:
            print(
                seed, name.ljust(28), {k: None if v is None else round(v, 4) for k, v in row[name].items()}, flush=True
            )
        if a.strip and seed in generated:
            shut = np.flatnonzero(truth == 0)
            idx = shut[:: max(1, len(shut) // 6)][:6]
            model = next(iter(generated[seed].values()))
            Image.fromarray(np.concatenate([np.concatenate([x[i] for i in idx], 1) for x in (frames, model)])).save(
                a.strip
            )
    report(dict(rows=rows, vae=a.vae, draws=a.draws, frames=a.frames, machine=describe()), a.out)


if __name__ == "__main__":
    main()
