"""What the teacher's window-by-window drift costs: a suite clip generated as the suite does (each window's motion
latents are the previous window's generated ones) and with the true clip's latents as motion latents (teacher
forcing), from the same noise; per window: mouth error (probe jaw reading vs the world's truth, offset 0), PSNR
against the true render, probe identity distance to the true first frame.

    python experiments/motion_drift.py --model talkstream/weights/teacher.safetensors \
        --vae talkstream/weights/vae.safetensors --seeds 900000 --out benchmarks/results/motion_drift_cpu.json
(~17 min a clip on 2 CPU cores)
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from talkstream.eval import metrics
from talkstream.eval.evaluate import clip_mouth_truth, load_suite_inputs
from talkstream.eval.probes import load_frame_probe
from talkstream.machine import describe, report
from talkstream.models.checkpoint import load_checkpoint
from talkstream.models.vae import FeatureCache
from talkstream.stream.offline import OfflineGenerator, frames_to_video, teacher_window
from talkstream.world.render import render_states


def encode_chunked(vae, frames: np.ndarray, size: int, chunk: int = 32) -> torch.Tensor:
    """uint8 frames (1 + 4m of them) -> normalised latents, a chunk at a time through the causal feature cache."""
    cache, out = FeatureCache(), []
    with torch.no_grad():
        for s in range(0, len(frames), chunk):
            seg = frames[s : s + chunk + 1] if s == 0 else frames[s + 1 : s + chunk + 1]
            if len(seg):
                out.append(vae.encode(frames_to_video(seg, size), cache))
    return torch.cat(out, 2)


def per_window(values: np.ndarray, bounds: list[int]) -> list[float]:
    return [float(np.mean(values[a:b])) for a, b in zip(bounds[:-1], bounds[1:])]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--vae", required=True)
    ap.add_argument("--inputs", default="data/suite_inputs.pkl", help="eval suite --save-inputs")
    ap.add_argument("--seeds", type=int, nargs="+", default=[900_000])
    ap.add_argument("--noise-seed", type=int, default=0)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--audio-guidance", type=float, default=2.0)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--out")
    a = ap.parse_args()
    inputs = load_suite_inputs(a.inputs)
    dit = load_checkpoint(a.model, device=a.device, dtype=torch.float32)
    vae = load_checkpoint(a.vae, device=a.device, dtype=torch.float32)
    gen = OfflineGenerator(dit, vae, steps=a.steps, audio_guidance=a.audio_guidance, device=a.device, seed=a.noise_seed)
    window, motion = teacher_window(dit)
    probe, jaw = load_frame_probe(), metrics.F["jaw_open"]
    rows = []
    for seed in a.seeds:
        c = inputs["clips"][seed]
        clip = c["clip"]
        truth = np.stack(list(render_states(clip.identity, clip.states, gen.size)))
        n = 1 + 4 * ((len(truth) - 1) // 4)
        true_latents = encode_chunked(vae, truth[:n], gen.size)
        mouth_truth = clip_mouth_truth(clip)
        truth_read = probe.read(truth)
        bounds = [0, 1 + 4 * (window - 1)]  # frames of each window: the first holds `window` latents, later ones
        while bounds[-1] < len(truth):  # window - motion new latents
            bounds.append(min(len(truth), bounds[-1] + 4 * (window - motion)))
        row = dict(
            seed=seed,
            window_frames=bounds,
            truth_mouth_error=per_window(np.abs(truth_read["states"][:, jaw] - mouth_truth), bounds),
        )
        for name, forced in (("own", None), ("forced", true_latents)):
            t0 = time.perf_counter()
            frames = gen.generate(
                truth[0],
                c["audio_features"].astype(np.float32),
                len(truth),
                c["text"].float(),
                c["text_mask"],
                forced_motion=forced,
            )
            read = probe.read(frames)
            err = np.abs(read["states"][:, jaw] - mouth_truth[: len(frames)])
            mse = ((frames.astype(np.float64) - truth) ** 2).mean(axis=(1, 2, 3))
            psnr = 10 * np.log10(255.0**2 / np.maximum(mse, 1e-9))
            ident = np.linalg.norm(read["identity"] - truth_read["identity"][:1], axis=1)
            row[name] = dict(
                mouth_error=float(err.mean()),
                seconds=time.perf_counter() - t0,
                mouth_error_per_window=per_window(err, bounds),
                psnr_per_window=per_window(psnr, bounds),
                identity_distance_per_window=per_window(ident, bounds),
            )
            print(seed, name, f"mouth error {err.mean():.4f}", flush=True)
        rows.append(row)
    report(
        dict(
            model=a.model,
            vae=a.vae,
            steps=a.steps,
            audio_guidance=a.audio_guidance,
            noise_seed=a.noise_seed,
            window_latents=window,
            motion_latents=motion,
            rows=rows,
            mean=dict(
                own=float(np.mean([r["own"]["mouth_error"] for r in rows])),
                forced=float(np.mean([r["forced"]["mouth_error"] for r in rows])),
            ),
            machine=describe(),
        ),
        a.out,
    )


if __name__ == "__main__":
    main()
