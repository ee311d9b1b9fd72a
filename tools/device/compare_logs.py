"""Training logs side by side: one panel per logged quantity, one line per run (smoothed over `--smooth` logs).

python tools/device/compare_logs.py runs/e*/log.jsonl --keys mse lip_read --out docs/findings/teacher_recipes_loss.png
"""

import argparse
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("logs", nargs="+", type=Path)
    ap.add_argument("--keys", nargs="+", default=["loss"])
    ap.add_argument("--labels", nargs="+", help="one per log (default: the file names)")
    ap.add_argument("--smooth", type=int, default=10)
    ap.add_argument("--out", type=Path, required=True)
    a = ap.parse_args()
    labels = a.labels or [p.stem.removesuffix("_log") for p in a.logs]
    if len(labels) != len(a.logs):
        raise SystemExit("give one label per log")
    fig, axes = plt.subplots(1, len(a.keys), figsize=(5 * len(a.keys), 3.6), squeeze=False)
    for path, label in zip(a.logs, labels):
        rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        for ax, key in zip(axes[0], a.keys):
            pts = [(r["step"], r[key]) for r in rows if key in r]
            if not pts:
                continue
            steps, vals = map(np.asarray, zip(*pts))
            k = max(1, min(a.smooth, len(vals)))
            ax.plot(steps[k - 1 :], np.convolve(vals, np.ones(k) / k, mode="valid"), label=label)
    for ax, key in zip(axes[0], a.keys):
        ax.set_title(key)
        ax.set_xlabel("step")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(a.out, dpi=90)
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
