"""Where a model's mouth error sits in one suite clip: its silent frames (the truth's jaw is shut) and its speech
frames, beside the true render and the VAE round trip of the truth (what any DiT in that latent space can reach);
plus a strip of truth above model at a few silent frames.

    python scripts/silence_bias.py --model talkstream/weights/teacher.safetensors --seed 900001 \
        --out benchmarks/results/silence_900001_t3_cpu.json --strip docs/train/strip_s17_silence_900001_cpu.png
(``--frames F.npy``: frames the model already made for this clip, e.g. by ``run_suite(keep_frames=True)``.)
"""

import argparse
import time

import numpy as np
import torch
from PIL import Image

from talkstream.eval.evaluate import checkpoint_generator, clip_mouth_truth, load_suite_inputs, vae_roundtrip
from talkstream.eval.metrics import F
from talkstream.eval.probes import load_frame_probe
from talkstream.machine import describe, report
from talkstream.models.checkpoint import load_checkpoint
from talkstream.world.render import render_states


def parts(read: np.ndarray, truth: np.ndarray) -> dict:
    silent = truth == 0
    err = np.abs(read - truth)
    return dict(silent_read=float(read[silent].mean()), silent_error=float(err[silent].mean()),
                speech_error=float(err[~silent].mean()), error=float(err.mean()))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--vae", default="talkstream/weights/vae.safetensors")
    ap.add_argument("--inputs", default="data/suite_inputs.pkl")
    ap.add_argument("--seed", type=int, default=900_001)
    ap.add_argument("--noise-seed", type=int, default=0)
    ap.add_argument("--frames", help="the model's frames for this clip (.npy) instead of sampling them")
    ap.add_argument("--out")
    ap.add_argument("--strip")
    a = ap.parse_args()
    inputs = load_suite_inputs(a.inputs)
    clip = inputs["clips"][a.seed]["clip"]
    truth_frames = np.stack(list(render_states(clip.identity, clip.states, 256)))
    t0 = time.perf_counter()
    if a.frames:
        frames = np.load(a.frames)
    else:
        frames = checkpoint_generator(a.model, a.vae, inputs=inputs, noise_seed=a.noise_seed)(truth_frames[0], clip)
    seconds = time.perf_counter() - t0
    roundtrip = vae_roundtrip(load_checkpoint(a.vae, dtype=torch.float32), truth_frames)
    probe, jaw, truth = load_frame_probe(), F["jaw_open"], clip_mouth_truth(clip)
    rows = {name: parts(probe.read(x)["states"][:, jaw], truth)
            for name, x in (("truth_render", truth_frames), ("vae_roundtrip", roundtrip), ("generated", frames))}
    res = dict(model=a.model, seed=a.seed, noise_seed=a.noise_seed, silent_frames=int((truth == 0).sum()),
               speech_frames=int((truth != 0).sum()), sampling_seconds=None if a.frames else seconds, **rows,
               machine=describe())
    report(res, a.out)
    if a.strip:
        idx = np.flatnonzero(truth == 0)[:: max(1, int((truth == 0).sum()) // 6)][:6]
        Image.fromarray(np.concatenate([np.concatenate([x[i] for i in idx], 1) for x in (truth_frames, frames)])
                        ).save(a.strip)


if __name__ == "__main__":
    main()
