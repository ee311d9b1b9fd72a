"""Streaming engine speed, decode included: time to first frame and steady FPS of ``StreamEngine.frames``.

Per case: a DiT (random weights of the real shapes, or a trained checkpoint), a decoder (the VAE or the tiny
decoder), chunk / window / sampler steps as given; decoding runs on its own thread (and CUDA stream) so it
overlaps the next chunk's denoising. TTFF = from ``start()`` (sink prefill) to the first decoded frame.

    python benchmarks/stream_speed.py --device cuda --cases gpu       # wan1.3b 832x480 + embedded small
    python benchmarks/stream_speed.py --device cpu --cases cpu        # embedded small on this CPU
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from talkstream.eval.speed import randomize_zeros  # noqa: E402
from talkstream.machine import describe  # noqa: E402
from talkstream.models.checkpoint import load_checkpoint  # noqa: E402
from talkstream.models.config import TinyDecoderConfig, dit_config, vae_config  # noqa: E402
from talkstream.models.dit import WanDiT  # noqa: E402
from talkstream.models.vae import CausalVAE, TinyDecoder  # noqa: E402
from talkstream.stream.avatar import WEIGHTS  # noqa: E402
from talkstream.stream.engine import StreamConfig, StreamEngine, StreamStats  # noqa: E402

CASES = {
    "gpu": [
        dict(dit="embedded", height=256, width=256, decoder="vae", text_len=16),
        dict(dit="embedded", height=256, width=256, decoder="tiny", text_len=16),
        dict(dit="wan1.3b", height=480, width=832, decoder="tiny", text_len=512, compile=True),
        dict(dit="wan1.3b", height=480, width=832, decoder="vae", text_len=512, compile=True),
    ],
    "cpu": [
        dict(dit="embedded", height=256, width=256, decoder="vae", text_len=16, chunks=6),
        dict(dit="embedded", height=256, width=256, decoder="tiny", text_len=16, chunks=6),
    ],
}


def build(dit: str, decoder: str, device: str, dtype: torch.dtype, compile: bool):
    if dit == "embedded":
        if not (WEIGHTS / "causal.safetensors.index.json").exists():
            raise FileNotFoundError("no embedded causal model")
        model = load_checkpoint(WEIGHTS / "causal.safetensors", device=device, dtype=dtype)
        vae = load_checkpoint(WEIGHTS / "vae.safetensors", device=device, dtype=dtype)
        dec = (
            load_checkpoint(WEIGHTS / "tiny_decoder.safetensors", device=device, dtype=dtype)
            if decoder == "tiny"
            else vae
        )
        weights = "trained (embedded)"
    else:
        with torch.device(device):
            model = randomize_zeros(WanDiT(dit_config(dit))).to(dtype).eval()
            vae = randomize_zeros(CausalVAE(vae_config("small"))).to(dtype).eval()
            dec = (
                randomize_zeros(TinyDecoder(TinyDecoderConfig(latent_dim=16))).to(dtype).eval()
                if decoder == "tiny"
                else vae
            )
        weights = "random (real shapes)"
    if compile:
        torch._dynamo.config.cache_size_limit = 64
        for b in model.blocks:
            b.compile_parts(dynamic=False)
    return model, vae, dec, weights


def bench(
    dit: str,
    height: int,
    width: int,
    decoder: str,
    text_len: int,
    device: str,
    dtype: torch.dtype,
    chunks: int = 16,
    chunk: int = 3,
    window: int = 9,
    steps: int = 4,
    compile: bool = False,
) -> dict:
    model, vae, dec, weights = build(dit, decoder, device, dtype, compile)
    h, w = height // 8, width // 8
    g = torch.Generator(device=device).manual_seed(0)
    cfg = StreamConfig(chunk=chunk, window=window, sampler="few_step", timesteps=(1000, 750, 500, 250)[:steps])
    ref = torch.randn(1, model.cfg.in_dim, 1, h, w, generator=g, device=device)
    text = torch.randn(1, text_len, model.cfg.text_dim, generator=g, device=device)
    audio = torch.randn(chunk, model.cfg.audio_tokens_per_frame, model.cfg.audio_dim, generator=g, device=device)

    def run(n):
        eng = StreamEngine(model, dec, cfg, device)
        stats = StreamStats()
        stamps = []

        def audio_for(first, k):
            return audio

        with torch.no_grad():
            eng.start(ref, text)
            for _idx, _ in eng.frames(audio_for, n_chunks=n, stats=stats):
                stamps.append(time.perf_counter())
        return stats, stamps

    run(window // chunk + 2)  # warm-up: compilation, autotuning, every cache fill level
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    stats, stamps = run(chunks)
    per_chunk = 4 * chunk
    steady = stamps[-1 - per_chunk * (chunks // 2)], stamps[-1]  # the second half of the stream
    fps = per_chunk * (chunks // 2) / (steady[1] - steady[0])
    res = dict(
        dit=dit,
        weights=weights,
        height=height,
        width=width,
        decoder=decoder,
        chunk=chunk,
        window=window,
        steps=steps,
        dtype=str(dtype).replace("torch.", ""),
        compiled=compile,
        chunks=chunks,
        frames=stats.frames,
        ttff_s=round(stats.ttff, 3),
        steady_fps_decode_included=round(fps, 2),
        denoise_ms_per_chunk=round(1000 * stats.denoise_s / stats.chunks, 1),
        async_decode=True,
    )
    if device.startswith("cuda"):
        res["peak_memory_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
    return res


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--cases", default="cpu", choices=sorted(CASES))
    ap.add_argument("--out", default=None)
    ap.add_argument("--dit", default=None, help="only the cases of this DiT (e.g. embedded, wan1.3b)")
    a = ap.parse_args()
    dtype = torch.bfloat16 if a.device.startswith("cuda") else torch.float32
    results = []
    out = Path(a.out or Path(__file__).parent / "results" / f"stream_speed_{a.device.split(':')[0]}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    for case in [c for c in CASES[a.cases] if a.dit in (None, c["dit"])]:
        try:
            r = bench(**case, device=a.device, dtype=dtype)
        except FileNotFoundError as e:
            r = dict(case, skipped=str(e))
        print(json.dumps(r), flush=True)
        results.append(r)
        out.write_text(json.dumps(dict(machine=describe(), results=results), indent=2))  # after every case
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
