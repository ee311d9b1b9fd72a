"""Does a DiT checkpoint listen to new audio, or recall the clips it trained on? ``audio_reliance`` (lips error with
another clip's audio / with its own, - 1) on some of its training clips and on the held-out split, two draws each.
A figure far higher on training clips than on held-out ones means the mouths were memorised.

    python experiments/audio_reliance.py --model talkstream/weights/teacher.safetensors --pack data/dit_pack.npz \
        --train-clips 30 --out benchmarks/results/audio_reliance_cpu.json        # ~20 min on 2 CPU cores
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from talkstream.machine import describe, report  # noqa: E402
from talkstream.models.checkpoint import load_checkpoint  # noqa: E402
from talkstream.train.config import TrainConfig  # noqa: E402
from talkstream.train.data import load_pack  # noqa: E402
from talkstream.train.stages import LatentBank, _split, audio_reliance  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--pack", required=True, help="the pack(s) the model trained on (comma-separated)")
    ap.add_argument("--vae", default="talkstream/weights/vae.safetensors")
    ap.add_argument("--train-clips", type=int, default=30, help="the first N clips of the pack (training split)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--out")
    a = ap.parse_args()
    cfg = TrainConfig.load("configs/teacher.yaml", dict(data=a.pack, workers=2))
    vae = load_checkpoint(a.vae, device=a.device, dtype=torch.float32).requires_grad_(False)
    model = load_checkpoint(a.model, device=a.device, dtype=torch.float32).eval()
    pack = load_pack(cfg.data)
    _, held = _split(pack.n_clips)
    res = dict(model=a.model, pack=a.pack, machine=describe())
    with torch.no_grad():
        for name, clips in (("training_clips", slice(0, a.train_clips)), ("held_out_clips", held)):
            bank = LatentBank(cfg, vae, a.device, clips, pack, encode_clips=2 if a.device == "cpu" else 8)
            draws = [audio_reliance(model, bank, batch=16, seed=s)["mean_gain"] for s in (0, 1)]
            res[name] = dict(clips=bank.n, mean_gain=float(np.mean(draws)), draws=draws)
    report(res, a.out, show={k: v for k, v in res.items() if k != "machine"})


if __name__ == "__main__":
    main()
