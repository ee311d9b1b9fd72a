"""How far drawn mouths follow the truth on a suite clip: read each video's jaw opening with the frame probe and
compare it, frame by frame at offset 0, with the world's truth (gain: least-squares slope, 1 = full amplitude;
correlation; mean error), e.g. on the samples of two model versions:

    python experiments/mouth_amplitude.py docs/samples/teacher_suite_900000.mp4 OLD.mp4 --seed 900000 \
        --inputs data/suite_inputs.pkl --out benchmarks/results/mouth_amplitude_900000_cpu.json
"""

import argparse

import numpy as np

from talkstream.eval import metrics
from talkstream.eval.evaluate import clip_mouth_truth, load_suite_inputs, mouth_scores
from talkstream.eval.probes import load_frame_probe
from talkstream.machine import describe, report
from talkstream.media import read_video


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("videos", nargs="+", help="videos of the suite clip, generated from its first frame and audio")
    ap.add_argument("--seed", type=int, default=900_000, help="the suite clip (world seed)")
    ap.add_argument("--inputs", required=True, help="suite inputs (talkstream eval suite --save-inputs)")
    ap.add_argument("--out")
    a = ap.parse_args()
    clip = load_suite_inputs(a.inputs)["clips"][a.seed]["clip"]
    truth = clip_mouth_truth(clip)
    probe, rows = load_frame_probe(), {}
    for path in a.videos:
        read = probe.read(np.asarray(read_video(path).frames))["states"][:, metrics.F["jaw_open"]]
        rows[path] = dict(frames=min(len(read), len(truth)), **mouth_scores(read, truth))
    report(dict(seed=a.seed, rows=rows, machine=describe()), a.out)


if __name__ == "__main__":
    main()
