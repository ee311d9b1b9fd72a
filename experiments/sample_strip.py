"""A picture of generated frames under the true ones: row 1 the world's render of a suite clip, then one row per
GIF written by ``talkstream eval suite --sample x.gif`` (the clip's first 4 s), one column every ``--every`` frames.

    python experiments/sample_strip.py --gifs teacher.gif causal.gif --out docs/samples/truth_teacher_causal.png
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from PIL import Image

from talkstream.eval.evaluate import load_suite_inputs
from talkstream.world.render import render_states


def gif_frames(path: Path) -> list[np.ndarray]:
    im = Image.open(path)
    frames = []
    for i in range(im.n_frames):
        im.seek(i)
        frames.append(np.array(im.convert("RGB")))
    return frames


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--gifs", type=Path, nargs="+", required=True)
    ap.add_argument("--inputs", type=Path, default=Path("data/suite_inputs.pkl"), help="from eval suite --save-inputs")
    ap.add_argument("--seed", type=int, default=900000, help="the suite clip the GIFs show (the suite's first)")
    ap.add_argument("--every", type=int, default=16, help="frames between columns (16 = 0.64 s)")
    ap.add_argument("--out", type=Path, required=True)
    a = ap.parse_args()
    clip = load_suite_inputs(a.inputs)["clips"][a.seed]["clip"]
    rows = [gif_frames(g) for g in a.gifs]
    n = min(len(r) for r in rows)
    size = rows[0][0].shape[0]
    cols = list(range(0, n, a.every))
    truth = list(render_states(clip.identity, clip.states[cols], size))
    grid = [np.concatenate(truth, 1)] + [np.concatenate([r[i] for i in cols], 1) for r in rows]
    a.out.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.concatenate(grid, 0)).save(a.out)
    print(f"wrote {a.out}: {len(grid)} rows x {len(cols)} columns")


if __name__ == "__main__":
    main()
