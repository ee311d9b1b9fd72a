"""Streaming speed of causal checkpoints as the product runs them (the engine, the VAE decoder, async decode): one
8-second suite clip per model after a 1-second warm-up; a distilled student at its own sampling settings, any other
causal model at the engine's defaults with ``--steps`` Euler steps (the demo's 8). Writes measured FPS and time to
the first frame with the machine, and the network passes per second of video (NFE/s).

    python3 tools/device/stream_fps.py --device cuda --out runs/distill/stream_fps_gpu.json MODEL [MODEL ...]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from talkstream.eval.evaluate import load_suite_inputs  # noqa: E402
from talkstream.machine import describe  # noqa: E402
from talkstream.models.checkpoint import load_checkpoint, sampling_of  # noqa: E402
from talkstream.stream.avatar import Avatar, stream_config  # noqa: E402
from talkstream.stream.engine import StreamStats  # noqa: E402
from talkstream.train.distill import nfe_per_second  # noqa: E402
from talkstream.world.render import render_states  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("models", nargs="+")
    ap.add_argument("--vae", default="data/keep/vae.safetensors")
    ap.add_argument("--inputs", default="data/suite_inputs.pkl")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--steps", type=int, default=8, help="Euler steps per chunk of a model without sampling settings")
    ap.add_argument("--seconds", type=float, default=8.0)
    ap.add_argument("--out", required=True)
    a = ap.parse_args()
    torch.set_grad_enabled(False)
    inputs = load_suite_inputs(a.inputs)
    seed = sorted(inputs["clips"])[0]
    c = inputs["clips"][seed]
    clip = c["clip"]
    ref = next(iter(render_states(clip.identity, clip.states[:1], 256)))
    feats = c["audio_features"].astype(np.float32)
    vae = load_checkpoint(a.vae, device=a.device, dtype=torch.float32)
    rows = []
    for path in a.models:
        dit = load_checkpoint(path, device=a.device, dtype=torch.float32)
        s = sampling_of(dit)
        cfg = stream_config(dit) if s else stream_config(dit, steps=a.steps)
        avatar = Avatar(dit, vae, cfg=cfg, device=a.device)
        n = int(a.seconds * 25)
        for _ in avatar.from_features(ref, feats, 25, c["text"].float(), c["text_mask"]):  # warm-up
            pass
        if a.device.startswith("cuda"):
            torch.cuda.synchronize()
        stats = StreamStats()
        t0 = time.perf_counter()
        frames = sum(1 for _ in avatar.from_features(ref, feats, n, c["text"].float(), c["text_mask"], stats=stats))
        wall = time.perf_counter() - t0
        steps = len(cfg.sigmas()) - 1
        rows.append(
            dict(
                model=path,
                sampler=cfg.sampler,
                steps_per_chunk=steps,
                reference_init=cfg.reference_init,
                audio_guidance=cfg.audio_guidance,
                anchor=cfg.anchor,
                nfe_per_second_of_video=round(nfe_per_second(steps, cfg.audio_guidance, cfg.chunk), 2),
                frames=frames,
                fps=round(frames / wall, 2),
                ttff_s=round(stats.ttff or 0.0, 3),
            )
        )
        print(json.dumps(rows[-1]), flush=True)
    out = dict(machine=describe(), device=a.device, decoder="vae", clip_seed=int(seed), rows=rows)
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
