"""Collect a device call's suite JSONs (`device_round.sh suite` with SEEDS: suite_NAME.json for seed 0,
suite_NAME_sK.json for seed K) into one file: per NAME the seeds' summaries and rows, and their means.

    python tools/device/collect_suites.py DIR --out benchmarks/results/suites_X.json [--note TEXT]
"""

import argparse
import json
import re
import statistics
from pathlib import Path

KEYS = (
    "mouth_error",
    "mouth_error_fast",
    "mouth_error_slow",
    "mouth_gain",
    "mouth_corr",
    "identity_distance",
    "identity_nn_accuracy",
    "silhouette_iou",
    "head_motion",
    "flicker",
)


def collect(folder: Path) -> dict:
    runs: dict[str, dict[int, dict]] = {}
    for f in sorted(folder.glob("suite_*.json")):
        m = re.fullmatch(r"suite_(.+?)(?:_s(\d+))?\.json", f.name)
        runs.setdefault(m.group(1), {})[int(m.group(2) or 0)] = json.loads(f.read_text())
    if not runs:
        raise SystemExit(f"no suite_*.json in {folder}")
    out = {}
    for name, seeds in runs.items():
        summaries = [seeds[k]["summary"] for k in sorted(seeds)]
        offset_zero = sum(round(s["offset_zero_fraction"] * s["offset_measured_clips"]) for s in summaries)
        out[name] = dict(
            seeds=sorted(seeds),
            mean={k: statistics.mean(s[k] for s in summaries) for k in KEYS if all(k in s for s in summaries)},
            mouth_error_per_seed=[s["mouth_error"] for s in summaries],
            offset_zero=f"{offset_zero}/{sum(s['offset_measured_clips'] for s in summaries)}",
            per_seed={k: dict(summary=seeds[k]["summary"], rows=seeds[k]["rows"]) for k in sorted(seeds)},
        )
    machine = next(iter(next(iter(runs.values())).values())).get("machine")
    return dict(machine=machine, runs=out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("folder", type=Path)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--note", default="")
    a = ap.parse_args()
    res = collect(a.folder)
    res["note"] = a.note
    a.out.write_text(json.dumps(res, indent=1))
    for name, r in res["runs"].items():
        print(
            f"{name:24s} mouth {r['mean']['mouth_error']:.4f} {[round(x, 4) for x in r['mouth_error_per_seed']]} "
            f"offset 0 {r['offset_zero']}  NN {r['mean']['identity_nn_accuracy']:.2f}  "
            f"silhouette {r['mean']['silhouette_iou']:.3f}"
        )


if __name__ == "__main__":
    main()
