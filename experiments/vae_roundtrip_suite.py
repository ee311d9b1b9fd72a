"""The held-out suite on VAE reconstructions of the true renders: the ceiling any DiT working in that
latent space can reach (mouth error, sync, identity), in 33-frame segments to bound memory on a CPU.

    python experiments/vae_roundtrip_suite.py --vae talkstream/weights/vae.safetensors --clips 4 --out x.json

(4 clips: 18 min on 2 CPU cores; `--device cuda` on a GPU; `--inputs data/suite_inputs.pkl` where espeak-ng is
missing.)
"""

import argparse
import time

import numpy as np
import torch

from talkstream.eval.evaluate import SUITE_SEEDS, load_suite_inputs, run_suite, vae_roundtrip
from talkstream.machine import describe, report
from talkstream.models.checkpoint import load_checkpoint
from talkstream.world.render import render_states


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--vae", required=True)
    ap.add_argument("--clips", type=int, default=3)
    ap.add_argument("--inputs", help="suite inputs (talkstream eval suite --save-inputs): no espeak-ng needed")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--out")
    a = ap.parse_args()
    vae = load_checkpoint(a.vae, device=a.device, dtype=torch.float32).eval()

    def roundtrip(reference, clip):
        return vae_roundtrip(vae, np.stack(list(render_states(clip.identity, clip.states, 256))))

    t = time.perf_counter()
    res = run_suite(roundtrip, seeds=SUITE_SEEDS[: a.clips], inputs=load_suite_inputs(a.inputs) if a.inputs else None)
    res.update(vae=a.vae, device=a.device, machine=describe(), seconds=time.perf_counter() - t)
    report(res, a.out, show=res["summary"])


if __name__ == "__main__":
    main()
