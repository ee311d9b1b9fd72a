"""The ship rule of the few-step students, applied to their held-out suites (4 clips x noise seeds 0-3, GPU draws).

Bounds (issue 25): the 4-step student from pure noise: mouth error <= 0.0296 (1.05x the teacher's 0.0282); the
2-step: <= 0.0325 (1.15x); both: sync offset 0 on >= 15 of 16 clip draws, identity NN >= 95%, head motion >= 2.4
degrees, no flagged (black / blank / frozen) clip. Per step count the settings (Self-Forcing or LiveTalk) with the
lower mean mouth error among those with identity >= 95% and no flagged clip stand for it (a variant, e.g.
dmd_lt4e, competes with the others of its step count).
Ship: of the students that meet their bounds, the one with the lower mouth error (a tie: fewer steps). If neither
does, of those no worse than the shipped default on every count (c6 at 8 steps from sigma 0.9: mouth error
0.0346, head motion 1.39 degrees, offset 0 on >= 15/16, identity >= 95%, no flagged clip) the one with the lower
mouth error ships, being 3-5x cheaper; if none is, c6 stays. Writes DIR/ship.json (and which student to hand back).

    python3 tools/device/distill_rule.py runs/distill
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

BOUNDS = {4: 0.0296, 2: 0.0325}
C6 = dict(mouth_error=0.0346, head_motion=1.39)  # suites_s17_captions_h200.json, the shipped default
RUN = re.compile(r"dmd_(sf|lt)([24])\w*$")  # settings, steps, an optional tag (a variant: dmd_lt4e)


def runs_by_steps(names) -> dict[int, list[str]]:
    """The DMD runs among ``names`` by their step count."""
    out: dict[int, list[str]] = {}
    for n in sorted(names):
        m = RUN.match(n)
        if m:
            out.setdefault(int(m.group(2)), []).append(n)
    return out


def summarise(d: Path) -> dict:
    out: dict = {}
    for f in sorted(d.glob("suite_*_s*.json")):
        m = re.match(r"suite_(.+)_s(\d+)\.json", f.name)
        suite = json.loads(f.read_text())
        s = suite["summary"]
        r = out.setdefault(m.group(1), dict(seeds=[], mouth=[], ident=[], head=[], zero=0, measured=0, flagged=0))
        r["seeds"].append(int(m.group(2)))
        r["mouth"].append(s["mouth_error"])
        r["ident"].append(s["identity_nn_accuracy"])
        r["head"].append(s["head_motion"])
        r["zero"] += round((s["offset_zero_fraction"] or 0) * s["offset_measured_clips"])
        r["measured"] += len(suite.get("rows", ())) or 4  # clip draws (4 clips a suite)
        r["flagged"] += s["flagged_clips"]
    return {
        k: dict(
            seeds=r["seeds"],
            mouth_error=sum(r["mouth"]) / len(r["mouth"]),
            mouth_error_per_seed=r["mouth"],
            identity_nn=min(r["ident"]),
            head_motion=sum(r["head"]) / len(r["head"]),
            offset_zero=f"{r['zero']}/{r['measured']}",
            offset_zero_ok=r["zero"] >= r["measured"] - r["measured"] // 16,
            flagged_clips=r["flagged"],
        )
        for k, r in out.items()
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("dir", type=Path, help="the pipeline's folder of suite_NAME_sSEED.json files")
    ap.add_argument("--seeds", type=int, default=4, help="noise seeds a run needs to be judged (a rehearsal: 1)")
    a = ap.parse_args()
    d = a.dir
    rows = summarise(d)
    for k, r in rows.items():
        print(
            f"{k:10s} mouth {r['mouth_error']:.4f} {r['mouth_error_per_seed']} offset0 {r['offset_zero']} "
            f"identity {r['identity_nn']:.2f} head {r['head_motion']:.2f} flagged {r['flagged_clips']}"
        )
    chosen = {}
    for steps, names in runs_by_steps(rows).items():
        have = [n for n in names if n in rows and len(rows[n]["seeds"]) == a.seeds]
        sound = [n for n in have if rows[n]["identity_nn"] >= 0.95 and rows[n]["flagged_clips"] == 0]
        pool = sound or have
        if pool:
            chosen[steps] = min(pool, key=lambda n: rows[n]["mouth_error"])

    def meets(steps: int) -> bool:
        r = rows[chosen[steps]]
        return (
            r["mouth_error"] <= BOUNDS[steps]
            and r["offset_zero_ok"]
            and r["identity_nn"] >= 0.95
            and r["head_motion"] >= 2.4
            and r["flagged_clips"] == 0
        )

    met = [s for s in chosen if meets(s)]
    best = min(chosen, key=lambda s: (rows[chosen[s]]["mouth_error"], s)) if chosen else None
    if met:
        ship_steps = min(met, key=lambda s: (rows[chosen[s]]["mouth_error"], s))
        why = f"the {ship_steps}-step student meets its bounds"
    elif best is not None:

        def no_worse(steps: int) -> bool:
            r = rows[chosen[steps]]
            return (
                r["mouth_error"] <= C6["mouth_error"]
                and r["head_motion"] >= C6["head_motion"]
                and r["offset_zero_ok"]
                and r["identity_nn"] >= 0.95
                and r["flagged_clips"] == 0
            )

        fit = [s for s in chosen if no_worse(s)]
        ship_steps = min(fit, key=lambda s: (rows[chosen[s]]["mouth_error"], s)) if fit else None
        why = "no student meets its bounds; " + (
            f"the {ship_steps}-step student is no worse than c6 on every count: it ships"
            if fit
            else "each is worse than c6 on some count: c6 stays"
        )
    else:
        ship_steps, why = None, "no suites"
    res = dict(
        rows=rows,
        chosen={str(k): v for k, v in chosen.items()},
        bounds_met={str(s): meets(s) for s in chosen},
        ship=None if ship_steps is None else chosen[ship_steps],
        ship_steps=ship_steps,
        why=why,
        hand_back=chosen[ship_steps] if ship_steps is not None else (chosen[best] if best is not None else None),
    )
    (d / "ship.json").write_text(json.dumps(res, indent=2))
    print(json.dumps({k: v for k, v in res.items() if k != "rows"}, indent=2))


if __name__ == "__main__":
    main()
