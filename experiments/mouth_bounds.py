# ruff: noqa: E501
"""What mouth error can a model working in the VAE's latent space reach at best? Per suite clip, the frame probe's
mouth error (offset 0, against the world's truth) on the true renders, on the same reading with each latent's
4 frames held at their mean (a latent that keeps no motion inside it: ``latent_group_mean``) and shifted by one
frame either way; beside them the suite on VAE round trips of the true renders (`experiments/vae_roundtrip_suite.py`)
and the teacher's bound (1.5x the truth's error).

    python experiments/mouth_bounds.py --inputs data/suite_inputs.pkl --clips 4 \
        --roundtrip benchmarks/results/vae_ceiling_roundtrip_previous_vae_cpu.json --out benchmarks/results/vae_ceiling_mouth_bounds_cpu.json
"""

import argparse
import json

import numpy as np

from talkstream.eval import metrics
from talkstream.eval.evaluate import SUITE_SEEDS, clip_mouth_truth, latent_group_mean, load_suite_inputs, mouth_scores
from talkstream.eval.probes import load_frame_probe
from talkstream.machine import describe, report
from talkstream.world.render import render_states


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--inputs", required=True, help="suite inputs (talkstream eval suite --save-inputs)")
    ap.add_argument("--clips", type=int, default=4)
    ap.add_argument("--roundtrip", help="a vae_roundtrip_suite JSON over the same clips, shown beside")
    ap.add_argument("--out")
    a = ap.parse_args()
    inputs, probe, jaw = load_suite_inputs(a.inputs), load_frame_probe(), metrics.F["jaw_open"]
    trip = {}
    if a.roundtrip:
        with open(a.roundtrip) as f:
            trip = {r["seed"]: r for r in json.load(f)["rows"]}
    rows = []
    for seed in SUITE_SEEDS[: a.clips]:
        clip = inputs["clips"][seed]["clip"]
        truth = clip_mouth_truth(clip)
        read = probe.read(np.stack(list(render_states(clip.identity, clip.states, 256))))["states"][:, jaw]
        row = dict(
            seed=seed,
            truth_render=mouth_scores(read, truth),
            latent_group_mean=mouth_scores(latent_group_mean(read), truth),
            shifted_later=mouth_scores(np.concatenate([read[:1], read[:-1]]), truth),
            shifted_earlier=mouth_scores(np.concatenate([read[1:], read[-1:]]), truth),
        )
        if seed in trip:
            row["vae_roundtrip"] = {k: trip[seed][k] for k in ("mouth_error", "mouth_error_fast", "mouth_error_slow")}
        rows.append(row)
        print(seed, {k: round(v["mouth_error"], 4) for k, v in row.items() if isinstance(v, dict)}, flush=True)
    summary = {k: float(np.mean([r[k]["mouth_error"] for r in rows])) for k in rows[0] if isinstance(rows[0][k], dict)}
    summary["teacher_bound"] = 1.5 * summary["truth_render"]
    report(dict(rows=rows, summary=summary, roundtrip=a.roundtrip, machine=describe()), a.out, show=summary)


if __name__ == "__main__":
    main()
