"""How far windowed (streamable) wav2vec2 features are from OmniAvatar's whole-clip features, and what a hop costs.

For each look-ahead, the relative L2 distance per video frame between ``Wav2VecFeatures.encode`` (windows of
look_back + hop + look_ahead) and ``clip_features`` over the whole clip. Without ``--model`` the model is a
randomly initialised wav2vec2-base-960h (its config), whose attention spreads evenly over the clip, so the
distances are an upper-range illustration, not the published model's.
Usage: python benchmarks/wav2vec_windows.py --out benchmarks/results/wav2vec_windows_random_cpu.json
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from talkstream.machine import describe, report  # noqa: E402
from talkstream.models.wav2vec import (  # noqa: E402
    BASE_960H_CONFIG,
    SAMPLE_RATE,
    Wav2VecFeatures,
    clip_features,
    load_wav2vec,
)


def speech_like(seconds: float, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * SAMPLE_RATE)) / SAMPLE_RATE
    env = 0.05 + 0.5 * np.abs(np.sin(2 * np.pi * 2.7 * t))
    return (rng.standard_normal(len(t)) * env).astype(np.float32)


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None, help="a local wav2vec2-base-960h folder (default: random weights)")
    ap.add_argument("--audio", default=None, help="a 16 kHz mono .npy (default: a speech-like noise signal)")
    ap.add_argument("--seconds", type=float, default=4.0)
    ap.add_argument("--fps", type=int, default=16)
    ap.add_argument("--look-back", type=float, default=2.0)
    ap.add_argument("--look-aheads", default="0,0.25,0.5,1.0")
    ap.add_argument("--out", default=None)
    a = ap.parse_args(argv)
    if a.model:
        model = load_wav2vec(a.model)
    else:
        from transformers import Wav2Vec2Config, Wav2Vec2Model

        torch.manual_seed(0)
        model = Wav2Vec2Model(Wav2Vec2Config(**BASE_960H_CONFIG)).eval()
    audio = np.load(a.audio).astype(np.float32) if a.audio else speech_like(a.seconds)
    enc = Wav2VecFeatures(model, fps=a.fps, look_back=a.look_back)
    n = enc.n_frames(len(audio))
    with torch.no_grad():
        whole = clip_features(model, audio[: (n - 1) * enc.samples_per_frame], n)
    res: dict = dict(
        model=a.model or "random init, wav2vec2-base-960h config",
        audio=a.audio or f"speech-like noise, {a.seconds} s",
        fps=a.fps,
        frames=n,
        look_back_s=a.look_back,
        hop_frames=enc.hop,
        runs=[],
    )
    for la in (float(x) for x in a.look_aheads.split(",")):
        e = Wav2VecFeatures(model, fps=a.fps, look_back=a.look_back, look_ahead=la)
        t0 = time.perf_counter()
        with torch.no_grad():
            win = e.encode(audio)
        secs = time.perf_counter() - t0
        rel = ((win - whole).norm(dim=1) / whole.norm(dim=1)).numpy()
        res["runs"].append(
            dict(
                look_ahead_s=la,
                rel_l2_mean=float(rel.mean()),
                rel_l2_median=float(np.median(rel)),
                rel_l2_max=float(rel.max()),
                rel_l2_first_hop=float(rel[0]),
                encode_s=secs,
                per_hop_ms=1000 * secs / len(e.hops(n)),
            )
        )
    res["machine"] = describe()
    return report(res, a.out)


if __name__ == "__main__":
    main()
