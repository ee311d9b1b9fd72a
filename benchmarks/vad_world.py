"""Voice activity on world speech: utterances of random espeak-ng voices separated by silence with light noise,
pushed in 20 ms pieces through ``agent.vad.TurnSegmenter``; onset / end errors against the phoneme timeline, missed
and split turns, false turns on noise alone, and the cost per second of audio. Both Silero files that ship in PyPI
packages are measured (pipecat-ai's v5, faster-whisper's v6).

    python benchmarks/vad_world.py --utterances 30 --out benchmarks/results/vad_world_cpu.json
"""

from __future__ import annotations

import argparse
import importlib.util
import time
from pathlib import Path

import numpy as np

from talkstream.agent.vad import SileroVAD, TurnSegmenter
from talkstream.machine import describe, report
from talkstream.world.speech import SentenceGenerator, Voice, synthesize


def model_files() -> dict[str, Path]:
    out = {}
    for name, pkg, rel in (
        ("silero_v5_pipecat", "pipecat", "audio/vad/data/silero_vad.onnx"),
        ("silero_v6_faster_whisper", "faster_whisper", "assets/silero_vad_v6.onnx"),
    ):
        spec = importlib.util.find_spec(pkg)
        if spec is not None and spec.submodule_search_locations:
            path = Path(next(iter(spec.submodule_search_locations))) / rel
            if path.is_file():
                out[name] = path
    return out


def make_signal(n: int, seed: int, noise: float):
    rng = np.random.default_rng(seed)
    gen = SentenceGenerator(seed=seed)
    parts, truth, t = [], [], 0.0
    for _ in range(n):
        gap = np.zeros(int(rng.uniform(0.8, 2.0) * 16000), np.float32)
        s = synthesize(gen.utterance(1), Voice.sample(rng))
        voiced = [p for p in s.phonemes if not p.is_pause]
        t += len(gap) / 16000
        truth.append((t + voiced[0].start, t + voiced[-1].end))
        parts += [gap, s.audio]
        t += s.duration
    parts.append(np.zeros(32000, np.float32))
    sig = np.concatenate(parts)
    return sig + rng.normal(0, noise, len(sig)).astype(np.float32), truth


def evaluate(path: Path, signal: np.ndarray, truth, noise_only: np.ndarray) -> dict:
    seg = TurnSegmenter(SileroVAD(path))
    t = time.perf_counter()
    events = [e for i in range(0, len(signal), 320) for e in seg.push(signal[i : i + 320])]
    cost = (time.perf_counter() - t) / (len(signal) / 16000)
    turns, start = [], None
    for e in events:
        if e.kind == "start":
            start = e.sample / 16000
        else:
            turns.append((start, e.sample / 16000))
    onset, end, missed, split = [], [], 0, 0
    for a, b in truth:
        inside = [(s, e) for s, e in turns if s < b + 0.3 and e > a - 0.3]
        if not inside:
            missed += 1
            continue
        split += len(inside) > 1
        onset.append(inside[0][0] - a)
        end.append(inside[-1][1] - b)
    quiet = TurnSegmenter(SileroVAD(path))
    false_turns = sum(
        e.kind == "start" for i in range(0, len(noise_only), 320) for e in quiet.push(noise_only[i : i + 320])
    )
    return dict(
        utterances=len(truth),
        turns=len(turns),
        missed=missed,
        split=split,
        onset_error_s=dict(
            median=round(float(np.median(onset)), 3),
            abs_p90=round(float(np.percentile(np.abs(onset), 90)), 3),
            max_abs=round(float(np.max(np.abs(onset))), 3),
        ),
        end_error_s=dict(
            median=round(float(np.median(end)), 3),
            abs_p90=round(float(np.percentile(np.abs(end), 90)), 3),
            max_abs=round(float(np.max(np.abs(end))), 3),
        ),
        false_turns_in_noise=false_turns,
        seconds_per_audio_second=round(cost, 4),
    )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--utterances", type=int, default=30)
    p.add_argument("--seed", type=int, default=7)
    p.add_argument("--noise", type=float, default=0.003, help="white noise std added everywhere (full scale 1)")
    p.add_argument("--out")
    args = p.parse_args()
    signal, truth = make_signal(args.utterances, args.seed, args.noise)
    rng = np.random.default_rng(args.seed + 1)
    noise_only = np.concatenate([rng.normal(0, s, 16000 * 20) for s in (0.003, 0.01, 0.03)]).astype(np.float32)
    res = dict(
        what="Silero VAD + TurnSegmenter (onset after 64 ms of speech, end after 0.5 s of silence) on world speech: "
        "espeak-ng utterances with random voices, 0.8-2 s gaps; onset/end errors vs the phoneme timeline "
        "(negative: early); false turns on 60 s of white noise at 0.003 / 0.01 / 0.03 std",
        signal_seconds=round(len(signal) / 16000, 1),
        noise_std=args.noise,
        models={name: evaluate(path, signal, truth, noise_only) for name, path in model_files().items()},
        machine=describe(),
    )
    report(res, args.out)


if __name__ == "__main__":
    main()
