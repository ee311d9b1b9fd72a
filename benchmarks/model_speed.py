"""DiT speed: streaming denoising with the KV cache, random weights of the real shapes.

For each case: a reference sink, a window of ``window`` cached latent frames, chunks of ``chunk``
latent frames, ``steps`` few-step denoising passes per chunk plus one commit pass on the clean chunk
(it writes the chunk's keys/values into the cache, as Self-Forcing does). Reported per chunk and per
step, with FPS = 4 * chunk video frames per chunk time (the VAE's 4x temporal factor); VAE decode is
not included here. Weights are random (stated in the JSON): speed and memory are real, quality is not.

    python benchmarks/model_speed.py --device cpu                 # tiny / small on CPU
    python benchmarks/model_speed.py --device cuda --cases gpu    # wan1.3b 832x480 (+ small) on a GPU
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from talkstream.diffusion.flow import sigmas_from_timesteps  # noqa: E402
from talkstream.machine import describe  # noqa: E402
from talkstream.models.config import dit_config  # noqa: E402
from talkstream.models.dit import WanDiT  # noqa: E402
from talkstream.stream.chunk import denoise_chunk  # noqa: E402

CASES = {
    "cpu": [
        dict(config="tiny", height=64, width=64, chunk=3, window=9, steps=4, text_len=16, chunks=4),
        dict(config="small", height=256, width=256, chunk=3, window=9, steps=4, text_len=16, chunks=3),
    ],
    "gpu": [
        dict(config="wan1.3b", height=480, width=832, chunk=3, window=9, steps=4, text_len=512, chunks=8),
        dict(config="wan1.3b", height=512, width=512, chunk=3, window=9, steps=4, text_len=512, chunks=8),
        dict(config="small", height=256, width=256, chunk=3, window=9, steps=4, text_len=16, chunks=8),
    ],
}


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def bench_case(
    config: str,
    height: int,
    width: int,
    chunk: int,
    window: int,
    steps: int,
    text_len: int,
    chunks: int,
    device: str,
    dtype: torch.dtype,
    compile: bool = False,
) -> dict:
    cfg = dit_config(config)
    torch.manual_seed(0)
    with torch.device(device):
        model = WanDiT(cfg).to(dtype).eval()
    with torch.no_grad():  # never time on zeros: randomise the zero-initialised outputs too
        for p in model.parameters():
            if p.abs().sum() == 0:
                p.normal_(0, 0.02)
    if compile:
        torch._dynamo.config.cache_size_limit = 64
        for b in model.blocks:
            b.compile_parts(dynamic=False)
    h, w = height // 8, width // 8
    g = torch.Generator(device=device).manual_seed(1)

    def rnd(*shape):
        return torch.randn(*shape, generator=g, device=device, dtype=dtype)

    ref, ctx = rnd(1, cfg.in_dim, 1, h, w), rnd(1, text_len, cfg.text_dim)
    audio = rnd(1, chunk, cfg.audio_tokens_per_frame, cfg.audio_dim)
    sigmas = sigmas_from_timesteps(
        [1000, 750, 500, 250][:steps] if steps <= 4 else torch.linspace(1000, 1000 / steps, steps).tolist()
    ).to(device)

    def generate_chunk(cache, step_times=None):
        if step_times is not None:  # time one denoising step on its own (read-only, no commit)
            _sync(device)
            t0 = time.perf_counter()
            model.forward_chunk(rnd(1, cfg.in_dim, chunk, h, w), 500.0, cache, ctx, audio)
            _sync(device)
            step_times.append(time.perf_counter() - t0)
        return denoise_chunk(model, cache, rnd(1, cfg.in_dim, chunk, h, w), sigmas, ctx, audio, generator=g)

    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    with torch.no_grad():
        # warm-up run (compilation, cuDNN/flash autotuning) on a throwaway cache
        warm = model.new_cache(window)
        model.prefill_sinks(ref, warm, ctx)
        for _ in range(window // chunk + 1):
            generate_chunk(warm)
        del warm
        _sync(device)
        t0 = time.perf_counter()
        cache = model.new_cache(window)
        model.prefill_sinks(ref, cache, ctx)
        generate_chunk(cache)
        _sync(device)
        ttff = time.perf_counter() - t0
        while cache.n_context < window:
            generate_chunk(cache)
        chunk_times, step_times = [], []
        for _ in range(chunks):
            generate_chunk(cache, step_times)
            _sync(device)
            t0 = time.perf_counter()
            generate_chunk(cache)
            _sync(device)
            chunk_times.append(time.perf_counter() - t0)
    chunk_s = statistics.median(chunk_times)
    res = dict(
        config=config,
        height=height,
        width=width,
        latent=(h, w),
        tokens_per_frame=(h // 2) * (w // 2),
        chunk=chunk,
        window=window,
        steps=steps,
        text_len=text_len,
        dtype=str(dtype).replace("torch.", ""),
        compiled=compile,
        weights="random (real shapes)",
        params=sum(p.numel() for p in model.parameters()),
        chunk_ms_median=round(1000 * chunk_s, 2),
        chunk_ms_all=[round(1000 * c, 2) for c in chunk_times],
        step_ms_median=round(1000 * statistics.median(step_times), 2),
        fps_decode_excluded=round(4 * chunk / chunk_s, 2),
        ttff_denoise_s=round(ttff, 3),
        cache_mib=round(cache.nbytes() / 2**20, 1),
    )
    if device.startswith("cuda"):
        res["peak_memory_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
    return res


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--cases", default=None, help="cpu or gpu (default: by device)")
    ap.add_argument("--compile", action="store_true", help="also run the first case with torch.compile")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    cases = CASES[args.cases or ("gpu" if args.device.startswith("cuda") else "cpu")]
    dtype = torch.bfloat16 if args.device.startswith("cuda") else torch.float32
    results = []
    for case in cases:
        for comp in [False, True] if args.compile and case is cases[0] else [False]:
            r = bench_case(**case, device=args.device, dtype=dtype, compile=comp)
            print(json.dumps(r), flush=True)
            results.append(r)
    out = (
        Path(args.out)
        if args.out
        else Path(__file__).parent / "results" / f"model_speed_{args.device.split(':')[0]}.json"
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(dict(machine=describe(), results=results), indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
