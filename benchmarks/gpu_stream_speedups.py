"""Each GPU speed-up of the streaming engine beside the plain path, on the real shapes with random weights.

One process measures everything (the model is built once; the FP8 swap comes last because it changes the model):
the SDPA backends on the chunk's attention shape, then the engine (decode included, tiny decoder on its own
thread and CUDA stream) with one speed-up added per row: timestep forcing (no commit pass), the prepared context
(keys rotated once per chunk), CUDA graphs over the per-pass loop, the fastest SDPA backend, FP8 linears, a
one-latent first chunk; then 2 steps, and 512x512. Also the numerical distance of the graphed and the FP8 passes
to the plain one.

    python benchmarks/gpu_stream_speedups.py --out $OUT/stream_gpu_speedups.json
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from talkstream.eval.speed import randomize_zeros  # noqa: E402
from talkstream.machine import describe  # noqa: E402
from talkstream.models.config import TinyDecoderConfig, dit_config  # noqa: E402
from talkstream.models.dit import WanDiT  # noqa: E402
from talkstream.models.vae import TinyDecoder  # noqa: E402
from talkstream.stream.engine import StreamConfig, StreamEngine, StreamStats  # noqa: E402
from talkstream.stream.fp8 import fp8_supported, to_fp8  # noqa: E402

DEV = "cuda"  # --device cpu: a smoke test of this script's code on a small config


def _sync() -> None:
    if DEV == "cuda":
        torch.cuda.synchronize()


def sdpa_backends(q_len: int, k_len: int, heads: int, head_dim: int) -> dict:
    from torch.nn.attention import SDPBackend, sdpa_kernel

    q = torch.randn(1, heads, q_len, head_dim, device=DEV, dtype=torch.bfloat16)
    k = torch.randn(1, heads, k_len, head_dim, device=DEV, dtype=torch.bfloat16)
    v = torch.randn_like(k)
    out = {}
    for name in ("FLASH_ATTENTION", "EFFICIENT_ATTENTION", "CUDNN_ATTENTION"):
        backend = getattr(SDPBackend, name, None)
        if backend is None:
            continue
        try:
            with sdpa_kernel(backend):
                for _ in range(3):
                    torch.nn.functional.scaled_dot_product_attention(q, k, v)
                torch.cuda.synchronize()
                t = time.perf_counter()
                for _ in range(20):
                    torch.nn.functional.scaled_dot_product_attention(q, k, v)
                torch.cuda.synchronize()
            out[name] = round(1000 * (time.perf_counter() - t) / 20, 3)
        except RuntimeError as e:
            out[name] = f"unavailable: {str(e).splitlines()[0][:120]}"
    return out


def stream(
    model, dec, cfg: StreamConfig, h: int, w: int, text_len: int, chunks: int, backend=None, repeats: int = 0
) -> dict:
    """One measured stream after a warm-up (steady FPS over its second half), then ``repeats`` two-chunk streams
    on the same engine (a restart keeps its runner and graphs): TTFF is the median of all of them."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    g = torch.Generator(device=DEV).manual_seed(0)
    ref = torch.randn(1, model.cfg.in_dim, 1, h, w, generator=g, device=DEV)
    text = torch.randn(1, text_len, model.cfg.text_dim, generator=g, device=DEV)
    audio = torch.randn(cfg.chunk, model.cfg.audio_tokens_per_frame, model.cfg.audio_dim, generator=g, device=DEV)
    ctx = sdpa_kernel(getattr(SDPBackend, backend)) if backend else contextlib.nullcontext()
    with ctx, torch.no_grad():
        eng = StreamEngine(model, dec, cfg, DEV)
        eng.start(ref, text)
        t = time.perf_counter()
        eng.warm_up()
        warm = time.perf_counter() - t
        _sync()
        if DEV == "cuda":
            torch.cuda.reset_peak_memory_stats()
        stats = StreamStats()
        eng.start(ref, text)
        stamps = []
        for _ in eng.frames(lambda first, k: audio[:k], n_chunks=chunks, stats=stats):
            stamps.append(time.perf_counter())
        ttffs = [stats.ttff]
        for _ in range(repeats):  # one stream is one TTFF: short streams give its spread
            again = StreamStats()
            eng.start(ref, text)
            for _ in eng.frames(lambda first, k: audio[:k], n_chunks=2, stats=again):
                pass
            ttffs.append(again.ttff)
    per_chunk = 4 * cfg.chunk
    half = per_chunk * (chunks // 2)
    fps = half / (stamps[-1] - stamps[-1 - half])
    runner = eng.runner
    return dict(
        steady_fps=round(fps, 2),
        ttff_s=round(statistics.median(ttffs), 4),
        ttff_samples_s=[round(x, 4) for x in ttffs],
        denoise_ms_per_chunk=round(1000 * stats.denoise_s / stats.chunks, 1),
        warm_up_s=round(warm, 2),
        peak_memory_gib=round(torch.cuda.max_memory_allocated() / 2**30, 2) if DEV == "cuda" else None,
        graph_replays=None if runner is None else runner.replays,
    )


def pass_distance(model, cfg_a: StreamConfig, cfg_b: StreamConfig, h: int, w: int, text_len: int) -> float:
    """Max |a - b| / max |a| of the latents of the 5th chunk streamed under two configurations (same seed)."""
    g = torch.Generator(device=DEV).manual_seed(1)
    ref = torch.randn(1, model.cfg.in_dim, 1, h, w, generator=g, device=DEV)
    text = torch.randn(1, text_len, model.cfg.text_dim, generator=g, device=DEV)
    audio = torch.randn(cfg_a.chunk, model.cfg.audio_tokens_per_frame, model.cfg.audio_dim, device=DEV)
    outs = []
    for cfg in (cfg_a, cfg_b):
        eng = StreamEngine(model, model, cfg, DEV)
        eng.start(ref, text)
        with torch.no_grad():
            for _ in range(5):
                z = eng.next_chunk(audio).latents
        outs.append(z.float())
    return round(float((outs[0] - outs[1]).abs().max() / outs[0].abs().max()), 5)


def compiled(a, model, base, fast, best, res, row, save) -> None:
    """torch.compile of the blocks' dense parts with the other speed-ups, most telling rows first (each new shape
    compiles: the 512x512 and FP8 rows come last)."""
    from talkstream.stream.accel import compile_dit

    res["model"] += ", blocks' dense parts torch.compile'd (inductor)"
    t = time.perf_counter()
    compile_dit(model)
    row("compiled + timestep forcing + CUDA graphs", fast, best)
    res["first_compiled_row_s"] = round(time.perf_counter() - t, 1)
    row("compiled + timestep forcing + CUDA graphs, 2 steps", replace(fast, timesteps=(1000, 500)), best)
    row("compiled only (commit pass, eager loop)", base, None)
    row("compiled + all, first chunk of one latent", replace(fast, first_chunk=1), best)
    row("compiled + all, first chunk of one latent, 2 steps", replace(fast, first_chunk=1, timesteps=(1000, 500)), best)
    row("compiled + all, 512x512", replace(fast, first_chunk=1), best, 64, 64)
    if fp8_supported(DEV):
        res["fp8_linears_swapped"] = to_fp8(model)
        compile_dit(model)
        row("compiled + all + FP8 linears", replace(fast, first_chunk=1), best, note="fp8")
    save()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--config", default="wan1.3b")
    ap.add_argument("--chunks", type=int, default=12)
    ap.add_argument("--text-len", type=int, default=512)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    ap.add_argument("--size", type=int, nargs=2, default=[480, 832], metavar=("H", "W"))
    ap.add_argument("--compile", action="store_true", help="the compiled ladder (torch.compile of the blocks' parts)")
    ap.add_argument("--ttff-repeats", type=int, default=4, help="short streams after each row's (TTFF: the median)")
    a = ap.parse_args()
    global DEV
    DEV = a.device
    torch.manual_seed(0)
    with torch.device(DEV):
        model = randomize_zeros(WanDiT(dit_config(a.config))).to(torch.bfloat16).eval()
        dec = randomize_zeros(TinyDecoder(TinyDecoderConfig(latent_dim=model.cfg.in_dim))).to(torch.bfloat16).eval()
    res = dict(
        machine=describe(),
        model=f"{a.config} (random weights, real shapes), bf16",
        decoder="tiny (random weights), own thread and CUDA stream",
        chunk=3,
        window=9,
        text_tokens=a.text_len,
        rows=[],
    )

    def save():
        a.out.parent.mkdir(parents=True, exist_ok=True)
        a.out.write_text(json.dumps(res, indent=2))

    H, W = a.size
    h, w = H // 8, W // 8
    S = (H // 16) * (W // 16)
    res["sdpa_ms"] = sdpa_backends(3 * S, 13 * S, model.cfg.num_heads, model.cfg.head_dim) if DEV == "cuda" else {}
    timed = {k: v for k, v in res["sdpa_ms"].items() if isinstance(v, float)}
    best = min(timed, key=timed.get) if timed else None
    res["sdpa_best"] = best
    save()
    base = StreamConfig(chunk=3, window=9, sampler="few_step", timesteps=(1000, 750, 500, 250))
    ladder = [
        ("plain (commit pass, eager)", base, None),
        ("+ timestep forcing", replace(base, cache_mode="timestep_forcing"), None),
        ("+ prepared context", replace(base, cache_mode="timestep_forcing", runner="prepared"), None),
        ("+ CUDA graphs", replace(base, cache_mode="timestep_forcing", runner="graphs"), None),
        ("+ best SDPA backend", replace(base, cache_mode="timestep_forcing", runner="graphs"), best),
    ]
    fast = replace(base, cache_mode="timestep_forcing", runner="graphs")

    def row(name, cfg, backend, h=h, w=w, note=None):
        t = time.perf_counter()
        try:
            r = stream(model, dec, cfg, h, w, a.text_len, a.chunks, backend, a.ttff_repeats)
        except Exception as e:  # one failing speed-up must not lose the others' figures
            r = dict(error=f"{type(e).__name__}: {str(e).splitlines()[0][:300]}")
        r = dict(
            name=name,
            size=f"{w * 8}x{h * 8}",
            steps=len(cfg.timesteps),
            cache_mode=cfg.cache_mode,
            runner=cfg.runner,
            first_chunk=cfg.first_chunk or cfg.chunk,
            sdpa=backend or "default",
            fp8=note == "fp8",
            seconds=round(time.perf_counter() - t, 1),
            **r,
        )
        print(json.dumps(r), flush=True)
        res["rows"].append(r)
        save()

    if a.compile:
        return compiled(a, model, base, fast, best, res, row, save)
    for name, cfg, backend in ladder:
        row(name, cfg, backend)
    res["graphs_vs_plain_rel_diff"] = pass_distance(model, replace(base, cache_mode="timestep_forcing"), fast, h, w, 64)
    row("plain, 512x512", base, None, 64, 64)
    row("all bf16 speed-ups, 512x512", fast, best, 64, 64)
    row("all bf16 speed-ups, 2 steps", replace(fast, timesteps=(1000, 500)), best)
    save()
    if fp8_supported(DEV):
        import copy

        plain_model = copy.deepcopy(model)
        res["fp8_linears_swapped"] = to_fp8(model)
        row("+ FP8 linears", fast, best, note="fp8")
        row("+ FP8 linears, first chunk of one latent", replace(fast, first_chunk=1), best, note="fp8")
        row("+ FP8 linears, 512x512", replace(fast, first_chunk=1), best, 64, 64, note="fp8")
        row("+ FP8 linears, 2 steps", replace(fast, first_chunk=1, timesteps=(1000, 500)), best, note="fp8")
        g = torch.Generator(device=DEV).manual_seed(2)
        x = torch.randn(1, 16, 3, h, w, generator=g, device=DEV, dtype=torch.bfloat16)
        ref = torch.randn(1, 16, 1, h, w, generator=g, device=DEV, dtype=torch.bfloat16)
        with torch.no_grad():
            outs = []
            for m in (plain_model, model):
                c = m.new_cache(9)
                m.prefill_sinks(ref, c)
                outs.append(m.forward_chunk(x, 500.0, c).float())
        res["fp8_vs_bf16_rel_diff_one_pass"] = round(float((outs[0] - outs[1]).abs().max() / outs[0].abs().max()), 5)
        del plain_model
    else:
        res["fp8"] = "not supported on this GPU"
    save()
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
