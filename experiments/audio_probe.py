"""Is the mouth in the audio features? An MLP reads one latent's Whisper window (the DiT's audio tokens, in
order) and predicts the world's jaw opening of the 4 video frames it covers; held-out windows are the last 10%.
A DiT can only lip-sync as well as its audio input allows: this is that bound, measured.

    python experiments/audio_probe.py --pack data/dit_pack.npz --out benchmarks/results/audio_probe_cpu.json
"""

import argparse
import time

import numpy as np
import torch

from talkstream.eval.metrics import F as STATE
from talkstream.machine import describe, report
from talkstream.models.encoders import audio_windows
from talkstream.train.data import load_pack


def windows(pack, look: int = 2):
    """Per latent l >= 1 of every clip: its audio window [16, 384] and the jaw opening of frames 4l-3..4l."""
    L = 1 + (pack.n_frames - 1) // 4
    xs, ys = [], []
    for i in range(pack.n_clips):
        w = audio_windows(
            torch.from_numpy(pack.audio_features[i].astype(np.float32)), L, look_back=look, look_ahead=look
        )
        jaw = torch.from_numpy(pack.states[i, :, STATE["jaw_open"]].astype(np.float32))
        xs += [w[j] for j in range(1, L)]
        ys += [jaw[4 * j - 3 : 4 * j + 1] for j in range(1, L)]
    return torch.stack(xs), torch.stack(ys)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--pack", default="data/dit_pack.npz")
    ap.add_argument("--epochs", type=int, default=30)
    ap.add_argument("--out")
    a = ap.parse_args()
    torch.manual_seed(0)
    t0 = time.perf_counter()
    x, y = windows(load_pack(a.pack))
    n = int(0.9 * len(x))  # clips in pack order: the held-out windows are the last clips'
    mu, sd = x[:n].mean((0, 1)), x[:n].std((0, 1)) + 1e-3
    x = (x - mu) / sd
    net = torch.nn.Sequential(
        torch.nn.Flatten(),
        torch.nn.Linear(x.shape[1] * x.shape[2], 256),
        torch.nn.GELU(),
        torch.nn.Linear(256, y.shape[1]),
    )
    opt = torch.optim.AdamW(net.parameters(), 1e-3, weight_decay=0.05)
    for _ in range(a.epochs):
        for b in torch.randperm(n).split(128):
            loss = (net(x[b]) - y[b]).abs().mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
    with torch.no_grad():
        res = dict(
            held_out_windows=len(x) - n,
            train_windows=n,
            held_out_jaw_mae=float((net(x[n:]) - y[n:]).abs().mean()),
            constant_jaw_mae=float((y[n:] - y[:n].mean()).abs().mean()),
            train_jaw_mae=float(loss),
            epochs=a.epochs,
            seconds=time.perf_counter() - t0,
            pack=a.pack,
            machine=describe(),
        )
    report(res, a.out)


if __name__ == "__main__":
    main()
