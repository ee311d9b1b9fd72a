"""A side-by-side sample of the shipped autoencoders on a held-out suite clip: the true render | the VAE's
reconstruction | the tiny decoder's (same latents), as an mp4 with the clip's audio.

    python experiments/vae_sample.py --seconds 4 --out docs/samples/vae_tiny_roundtrip.mp4
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch

from talkstream.eval.evaluate import load_suite_inputs
from talkstream.media import write_video
from talkstream.models.checkpoint import load_checkpoint
from talkstream.stream.avatar import WEIGHTS
from talkstream.stream.offline import video_to_frames
from talkstream.train.stages import to_video
from talkstream.world.render import render_states


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--inputs", type=Path, default=Path("data/suite_inputs.pkl"), help="from eval suite --save-inputs")
    ap.add_argument("--seed", type=int, default=900000)
    ap.add_argument("--seconds", type=float, default=4.0)
    ap.add_argument("--out", type=Path, required=True)
    a = ap.parse_args()
    clip = load_suite_inputs(a.inputs)["clips"][a.seed]["clip"]
    vae = load_checkpoint(WEIGHTS / "vae.safetensors", dtype=torch.float32).eval()
    tiny = load_checkpoint(WEIGHTS / "tiny_decoder.safetensors", dtype=torch.float32).eval()
    n = int(a.seconds * clip.fps)
    n = 1 + 4 * ((n - 1) // 4)  # whole latents
    truth = np.stack(list(render_states(clip.identity, clip.states[:n], 256)))
    with torch.no_grad():
        z = vae.encode(to_video(torch.from_numpy(truth)[None]))
        rows = [truth, video_to_frames(vae.decode(z)), video_to_frames(tiny(z))]
    frames = np.concatenate(rows, axis=2)  # side by side
    audio = np.asarray(clip.audio)[: n * clip.sample_rate // clip.fps]
    write_video(a.out, frames, clip.fps, audio=audio, sample_rate=clip.sample_rate)
    print(f"wrote {a.out}: {n} frames, truth | VAE | tiny decoder")


if __name__ == "__main__":
    main()
