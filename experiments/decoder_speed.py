"""The VAE decoder and the tiny decoder on the held-out pack clips, timed alone on the machine (training
runs that share the GPU make their own timings unreliable): PSNR, lips PSNR, mouth read error, frames/s.

    python experiments/decoder_speed.py --vae talkstream/weights/vae.safetensors \
        --tiny talkstream/weights/tiny_decoder.safetensors --pack data/dit_pack.npz --out results.json
"""

import argparse

import torch

from talkstream.machine import describe, report
from talkstream.models.checkpoint import load_checkpoint
from talkstream.train.data import load_pack, mouth_pixels, render_pack
from talkstream.train.stages import EVAL_FRAMES, _split, evaluate_vae


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--vae", required=True)
    ap.add_argument("--tiny", required=True)
    ap.add_argument("--pack", default="data/dit_pack.npz")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--workers", type=int, default=8)
    ap.add_argument("--clips", type=int, default=0, help="only the first N held-out clips (0: all)")
    ap.add_argument("--batch", type=int, default=8, help="clips per decoder call (1 on a CPU: memory)")
    ap.add_argument("--out")
    a = ap.parse_args()
    pack = load_pack(a.pack)
    _, ho = _split(pack.n_clips)
    if a.clips:
        ho = slice(ho.start, min(ho.stop, ho.start + a.clips))
    held = render_pack(pack, 256, a.workers, ho)
    vae = load_checkpoint(a.vae, dtype=torch.float32)
    tiny = load_checkpoint(a.tiny, dtype=torch.float32)
    res = evaluate_vae(
        vae, held, EVAL_FRAMES, a.device, decoder=tiny, batch=a.batch, mouths=mouth_pixels(pack, ho, 256)
    )
    res["machine"] = describe()
    res["precision"] = "fp32 weights"
    report(res, a.out)


if __name__ == "__main__":
    main()
