"""The LiveTalk student streamed live: FPS and time to first frame, decode included, with the Wan2.1 VAE decoder and
with the tiny Wan decoder (TAEHV), and the Wan VAE's decode cost per frame beside them.

The model is the LiveTalk student's layout (``omniavatar1.3b``: OmniAvatar-1.3B, 33 input channels, packed wav2vec2
audio) with random weights of the real shapes; LiveTalk's inference settings: 512x512, chunks of 3 latent frames, 4
steps [1000, 936, 832, 624] (few-step sampler, fresh noise between steps), Anchor-Heavy Identity Sinks (the stream's
first 9 latent frames) + 3 window frames + the chunk = 15 attended latent frames, the clean chunk committed to the
cache by one more pass at t = 0, umT5 text of 512 tokens, bf16. The stream runs through ``StreamEngine`` (decode on
its own thread and CUDA stream, overlapping the chunk's commit pass and the next chunk's denoising; the engine's
default on CUDA decodes the first chunk before its commit pass and commits every later chunk first,
``StreamConfig(defer_commit="auto")``; the variants "every chunk decoded before its commit pass" and "commit pass
before the decode" measure ``"all"`` and ``"off"``). TTFF: from
``start()`` to the first decoded frame; FPS: video frames per second over the second half of the stream (the
model's own rate is 16 fps).

    python benchmarks/livetalk_speed.py --device cuda --out benchmarks/results/livetalk_speed_512_h100.json
    python benchmarks/livetalk_speed.py --device cpu --config omniavatar-tiny --size 64 --chunks 4   # a smoke run

Results are written after every case, so a run stopped early keeps what it measured.
"""

from __future__ import annotations

import argparse
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
from talkstream.models.config import dit_config  # noqa: E402
from talkstream.models.dit import WanDiT  # noqa: E402
from talkstream.models.taehv import TAEHV  # noqa: E402
from talkstream.models.wan_vae import WanVAE, bench_decoders  # noqa: E402
from talkstream.stream.engine import StreamConfig, StreamEngine, StreamStats  # noqa: E402

LIVETALK = dict(
    chunk=3,
    window=3,  # 15 attended latent frames = 9 sinks + 3 window + the chunk of 3
    sampler="few_step",
    timesteps=(1000, 936, 832, 624),
    timestep_shift=1.0,  # the list is already shift-5 warped (as bf16 rounds it)
    anchor="anchor_heavy",
    anchor_copies=9,
)
PAPER = dict(fps=24.82, ttff_s=0.33)  # LiveTalk's reported figures (its own, non-streaming script)


def random_model(config: str, device: str, dtype: torch.dtype) -> WanDiT:
    torch.manual_seed(0)
    with torch.device(device):
        model = WanDiT(dit_config(config))
    return randomize_zeros(model).to(dtype).eval()


def stream_once(model, decoder, cfg: StreamConfig, device: str, size: int, chunks: int, text_len: int, seed: int = 0):
    dtype = next(model.parameters()).dtype
    c = model.cfg
    g = torch.Generator(device=device).manual_seed(seed)
    h = size // 8
    ref = torch.randn(1, c.in_dim, 1, h, h, generator=g, device=device).to(dtype)
    text = torch.randn(1, text_len, c.text_dim, generator=g, device=device).to(dtype)
    audio = torch.randn(cfg.chunk, c.audio_tokens_per_frame, c.audio_dim, generator=g, device=device).to(dtype)
    eng = StreamEngine(model, decoder, cfg, device)
    stamps: list[float] = []
    with torch.no_grad():
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        stats = StreamStats()
        eng.start(ref, text)
        for _ in eng.frames(lambda first, k: audio[:k], n_chunks=chunks, stats=stats):
            stamps.append(time.perf_counter())
    return stats, stamps


def case(
    model, decoder, name: str, cfg: StreamConfig, device: str, size: int, chunks: int, text_len: int, repeats: int = 0
) -> dict:
    stream_once(model, decoder, cfg, device, size, 6, text_len)  # warm-up: kernels, every cache fill level
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    stats, stamps = stream_once(model, decoder, cfg, device, size, chunks, text_len)
    ttffs = [stats.ttff] + [  # one stream is one TTFF: more short streams give its spread
        stream_once(model, decoder, cfg, device, size, 2, text_len, seed=1 + i)[0].ttff for i in range(repeats)
    ]
    per_chunk = 4 * cfg.chunk
    half = max(1, (chunks - 1) // 2)
    t0, t1 = stamps[-1 - per_chunk * half], stamps[-1]
    fps = per_chunk * half / (t1 - t0)
    out = dict(
        decoder=name,
        chunks=chunks,
        frames=stats.frames,
        ttff_s=round(statistics.median(ttffs), 4),
        ttff_samples_s=[round(t, 4) for t in ttffs],
        steady_fps_decode_included=round(fps, 2),
        real_time_factor=round(fps / model.fps, 3),
        denoise_ms_per_chunk=round(1000 * stats.denoise_s / stats.chunks, 1),
        video_seconds=round(stats.frames / model.fps, 2),
    )
    if device.startswith("cuda"):
        out["peak_memory_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--config", default="omniavatar1.3b")
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--chunks", type=int, default=12, help="chunks in the measured stream (after a warm-up stream)")
    ap.add_argument("--text-len", type=int, default=512)
    ap.add_argument("--compile", choices=["no", "yes", "both"], default="no", help="torch.compile the dense parts")
    ap.add_argument(
        "--ttff-repeats",
        type=int,
        default=0,
        help="short streams per case beyond the measured one: TTFF = the median of all",
    )
    ap.add_argument("--out", type=Path)
    a = ap.parse_args()
    if a.device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit("livetalk_speed: --device cuda, but CUDA is not available here")
    dtype = torch.bfloat16 if a.device.startswith("cuda") else torch.float32
    cfg = StreamConfig(**LIVETALK)
    model = random_model(a.config, a.device, dtype)
    decoders = {
        "wan_vae": WanVAE().to(a.device, dtype).eval(),
        "taehv": TAEHV().to(a.device, dtype).eval(),
    }
    res = dict(
        what="LiveTalk student layout streamed live, decode included",
        dit=a.config,
        weights="random (real shapes)",
        height=a.size,
        width=a.size,
        model_fps=model.fps,
        dtype=str(dtype).removeprefix("torch."),
        settings=dict(
            LIVETALK, sinks=9, attended_latent_frames=9 + LIVETALK["window"] + LIVETALK["chunk"], text_tokens=a.text_len
        ),
        goal=dict(fps=40, ttff_s=0.2, decoder="taehv"),
        paper=PAPER,
        results=[],
        machine=describe(),
    )

    def write() -> None:
        print(json.dumps(res["results"][-1] if res["results"] else res, indent=1), flush=True)
        if a.out:
            a.out.parent.mkdir(parents=True, exist_ok=True)
            a.out.write_text(json.dumps(res, indent=2))

    res["decode_cost"] = bench_decoders(a.device, size=a.size, latents=3, dtype=dtype)
    write()
    for compiled in {"no": [False], "yes": [True], "both": [False, True]}[a.compile]:
        if compiled:
            from talkstream.stream.accel import compile_dit

            t = time.perf_counter()
            compile_dit(model)
            stream_once(model, decoders["taehv"], cfg, a.device, a.size, 2, a.text_len)
            res["compile_s"] = round(time.perf_counter() - t, 1)
        for name in ("taehv", "wan_vae"):
            r = case(model, decoders[name], name, cfg, a.device, a.size, a.chunks, a.text_len, a.ttff_repeats)
            res["results"].append(dict(r, compiled=compiled))
            write()
    variants = {  # the engine's options beside LiveTalk's own chunking (the tiny decoder)
        # the order before the deferred commit pass (a chunk's commit pass runs before it is handed to the decoder),
        # each beside its counterpart with the deferred pass, so the two share the machine's state
        "every chunk decoded before its commit pass": dict(defer_commit="all"),
        "commit pass before the decode": dict(defer_commit="off"),
        "first chunk of 1 latent frame": dict(first_chunk=1),
        "prepared context": dict(runner="prepared"),
        "CUDA graphs": dict(runner="graphs"),
        "CUDA graphs + first chunk of 1 latent frame": dict(runner="graphs", first_chunk=1),
        "CUDA graphs + first chunk of 1 latent frame, every chunk decoded before its commit pass": dict(
            runner="graphs", first_chunk=1, defer_commit="all"
        ),
        "CUDA graphs + first chunk of 1 latent frame, commit pass before the decode": dict(
            runner="graphs", first_chunk=1, defer_commit="off"
        ),
    }
    for variant, options in variants.items():
        if options.get("runner") == "graphs" and not a.device.startswith("cuda"):
            continue
        r = case(
            model,
            decoders["taehv"],
            "taehv",
            replace(cfg, **options),
            a.device,
            a.size,
            a.chunks,
            a.text_len,
            a.ttff_repeats,
        )
        res["results"].append(dict(r, compiled=a.compile != "no", variant=variant))
        write()


if __name__ == "__main__":
    main()
