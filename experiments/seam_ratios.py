"""Chunk seams of the embedded causal model (what tests/test_stream_seams.py asserts), as numbers: per clip and the
mean over clips, jaw open / yaw / pitch, each as a fraction of its limit (<= 1 passes).

    python experiments/seam_ratios.py --out benchmarks/results/seams_causal_cpu.json
"""

import argparse

import numpy as np

from talkstream.eval.evaluate import seam_ratio
from talkstream.eval.probes import load_frame_probe
from talkstream.machine import describe, report
from talkstream.stream.avatar import Avatar


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[900_005, 900_006, 900_007], help="world clips (held out)")
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--decoder", default="tiny")
    ap.add_argument("--reference-init", type=float, help="StreamConfig.reference_init (default: the engine's own)")
    ap.add_argument("--out")
    a = ap.parse_args()
    opts = {} if a.reference_init is None else dict(reference_init=a.reference_init)
    av = Avatar.from_pretrained(steps=a.steps, decoder=a.decoder, **opts)
    probe = load_frame_probe()
    r = np.stack([seam_ratio(av, probe, s) for s in a.seeds])
    report(
        dict(
            columns=["jaw_open", "yaw", "pitch"],
            seeds=a.seeds,
            steps=a.steps,
            decoder=a.decoder,
            reference_init=av.cfg.reference_init,
            per_clip=r.tolist(),
            mean=r.mean(0).tolist(),
            machine=describe(),
        ),
        a.out,
    )


if __name__ == "__main__":
    main()
