"""A suite sample as an mp4 with its audio: the GIF that ``talkstream eval suite --sample x.gif`` writes on the GPU
machine (the first clip's first 4 s; GIF colours are quantized to 256) muxed with that clip's speech.

    python experiments/sample_mp4.py --gif sample_teacher.gif --out docs/samples/teacher_suite_900000.mp4
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from sample_strip import gif_frames

from talkstream.eval.evaluate import load_suite_inputs
from talkstream.media import write_video


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--gif", type=Path, required=True)
    ap.add_argument("--inputs", type=Path, default=Path("data/suite_inputs.pkl"), help="from eval suite --save-inputs")
    ap.add_argument("--seed", type=int, default=900000, help="the suite clip the GIF shows (the suite's first)")
    ap.add_argument("--out", type=Path, required=True)
    a = ap.parse_args()
    clip = load_suite_inputs(a.inputs)["clips"][a.seed]["clip"]
    frames = np.stack(gif_frames(a.gif))
    audio = clip.audio[: round(len(frames) / clip.fps * clip.sample_rate)]
    write_video(a.out, frames, fps=clip.fps, audio=audio, sample_rate=clip.sample_rate)
    print(f"wrote {a.out}: {len(frames)} frames, {len(audio) / clip.sample_rate:.2f} s of audio")


if __name__ == "__main__":
    main()
