"""Timestep-forcing pipeline (TPP) speed: FPS and time to first frame against the number of GPUs (JSON + plot).

Per case (a DiT shape, a resolution, a GPU count; random weights of the real shapes): 1 GPU runs the single-process
engine (``engine_commit``: 4 steps + the clean commit pass a chunk, async decode; the product's one-GPU path) and,
where its memory allows, the single-process timestep-forcing stream (``timestep_forcing``: one cache per step, no
commit pass, decode after each chunk); 2 .. steps + 1 GPUs run the pipeline (``stream.parallel``: the steps split
over the first G - 1 GPUs, the last GPU decodes). Each pipeline run streams a warm-up stream, then the measured one
in the same processes. FPS: decoded frames a second over the second half of the measured stream's chunks (the
pipeline full); TTFF: from rank 0 starting the stream to the first decoded frame. Per rank: its own compute a chunk
(CUDA events), so the slowest stage shows.

    # a machine of >= 5 GPUs (wan14b's 4 steps: 5 = one a step + decode)
    python benchmarks/tpp_speed.py --device cuda --models wan14b wan1.3b --sizes 832x480 640x416 --gpus 1 2 3 5
    # CPU processes (gloo) and a tiny model: the script runs end to end (timings of shared CPU cores, no speed claim)
    python benchmarks/tpp_speed.py --device cpu --models tiny --sizes 64x64 --gpus 1 2 3 --chunks 6 --warmup 2
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from talkstream.eval.speed import randomize_zeros  # noqa: E402
from talkstream.machine import describe  # noqa: E402
from talkstream.stream.parallel import (  # noqa: E402
    TPPConfig,
    TPPStats,
    init_pipeline,
    launch_local,
    stop_on_failure,
    timestep_forcing_stream,
)

TIMESTEPS = (1000, 750, 500, 250)


def stream_config(spec: dict):
    from talkstream.stream.engine import StreamConfig

    kw = dict(
        chunk=spec["chunk"],
        window=spec["window"],
        sampler="few_step",
        timesteps=TIMESTEPS[: spec["steps"]],
        anchor=spec["anchor"],
    )
    return StreamConfig(**kw)


def build(spec: dict, part: str, device: str) -> torch.nn.Module:
    """The DiT or the decoder of a case, random weights of the real shapes, in the case's dtype on ``device``."""
    from talkstream.models.config import dit_config, vae_config

    dtype = getattr(torch, spec["dtype"])
    torch.manual_seed(0)
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # built in its dtype: a 14B model never exists in fp32
    try:
        with torch.device(device):
            if part == "dit":
                from talkstream.models.dit import WanDiT

                m = randomize_zeros(WanDiT(dit_config(spec["model"]))).eval()
                if spec.get("fp8"):
                    from talkstream.stream.fp8 import to_fp8

                    to_fp8(m)
                if spec.get("compile"):
                    torch._dynamo.config.cache_size_limit = 64
                    for b in m.blocks:
                        b.compile_parts(dynamic=False)
                return m
            if spec["decoder"] == "wan_vae":
                from talkstream.models.wan_vae import WanVAE

                return randomize_zeros(WanVAE()).eval()
            if spec["decoder"] == "taehv":
                from talkstream.models.taehv import TAEHV

                return randomize_zeros(TAEHV()).eval()
            from talkstream.models.vae import CausalVAE

            return randomize_zeros(CausalVAE(vae_config(spec["decoder"]))).eval()
    finally:
        torch.set_default_dtype(old)


def inputs(spec: dict, device: str):
    from talkstream.models.config import dit_config

    cfg = dit_config(spec["model"])
    g = torch.Generator().manual_seed(0)
    dtype = getattr(torch, spec["dtype"])
    ref = torch.randn(1, cfg.in_dim, 1, spec["height"] // 8, spec["width"] // 8, generator=g)
    text = torch.randn(1, spec["text_len"], cfg.text_dim, generator=g)
    audio = torch.randn(spec["chunk"], cfg.audio_tokens_per_frame, cfg.audio_dim, generator=g)
    return ref.to(device, dtype), text.to(device, dtype), audio.to(device, dtype)


def _device(spec: dict) -> str:
    if spec["device"] == "cuda":
        local = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local)
        return f"cuda:{local}"
    torch.set_num_threads(1)  # processes share the cores: one thread each, no oversubscription
    return "cpu"


def _peak_gib(device: str) -> float | None:
    return round(torch.cuda.max_memory_allocated() / 2**30, 2) if device.startswith("cuda") else None


def _steady_fps(stamps: list[float], frames_per_chunk: int) -> float | None:
    if len(stamps) < 3:
        return None
    half = len(stamps) // 2
    return frames_per_chunk * half / max(stamps[-1] - stamps[-1 - half], 1e-9)


# -- one GPU ---------------------------------------------------------------------------------------------------------
def single_worker(spec: dict, out: str) -> None:
    """One process: the engine (commit pass), then the single-process timestep-forcing stream."""
    from talkstream.stream.engine import ChunkDecoder, StreamEngine, StreamStats

    dev = _device(spec)
    dit, dec = build(spec, "dit", dev), build(spec, "decoder", dev)
    ref, text, audio = inputs(spec, dev)
    res = []
    per_chunk = 4 * spec["chunk"]

    def engine(n: int) -> dict:
        eng = StreamEngine(dit, dec, stream_config(spec), dev)
        stats, stamps = StreamStats(), []
        with torch.no_grad():
            eng.start(ref, text)
            for _ in eng.frames(lambda f, k: audio[:k], n_chunks=n, stats=stats):
                stamps.append(time.perf_counter())
        ends = [stamps[per_chunk * (c + 1) - 4] for c in range(n) if per_chunk * (c + 1) - 4 < len(stamps)]
        return dict(ttff_s=stats.ttff, fps=_steady_fps(ends, per_chunk), frames=stats.frames)

    def forcing(n: int) -> dict:
        cfg = TPPConfig(stream_config(spec))
        decode = ChunkDecoder(dec)
        t0 = time.monotonic()
        first, ends, frames = None, [], 0
        with torch.no_grad():
            for z in timestep_forcing_stream(dit, cfg, ref, lambda f, k: audio[:k], text, n_chunks=n):
                frames += len(decode(z))
                now = time.monotonic()
                first = first or now
                ends.append(now)
        return dict(ttff_s=first - t0, fps=_steady_fps(ends, per_chunk), frames=frames)

    for mode, fn in (("engine_commit", engine), ("timestep_forcing", forcing)):
        try:
            fn(spec["warmup"])
            if dev.startswith("cuda"):
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
            r = fn(spec["chunks"])
            res.append(dict(mode=mode, **{k: _round(v) for k, v in r.items()}, peak_memory_gib=_peak_gib(dev)))
        except torch.OutOfMemoryError as e:
            res.append(dict(mode=mode, skipped=f"out of GPU memory: {str(e).splitlines()[0]}"))
        if dev.startswith("cuda"):
            torch.cuda.empty_cache()
    Path(out).write_text(json.dumps(res))


# -- the pipeline ----------------------------------------------------------------------------------------------------
def pipeline_worker(spec: dict, outdir: str) -> None:
    """One rank of the pipeline: a warm-up stream, then the measured one; writes its own numbers."""
    dev = _device(spec)
    cfg = TPPConfig(stream_config(spec), heartbeat_s=1.0, peer_timeout_s=600.0)
    proc = init_pipeline(cfg, dev)

    def work() -> None:
        rank, world = proc.rank, proc.world
        model = build(spec, "dit" if rank < world - 1 else "decoder", proc.device)
        ref, text, audio = inputs(spec, proc.device)
        mine = {}
        for sid, n in ((0, spec["warmup"]), (1, spec["chunks"])):
            if sid == 1 and dev.startswith("cuda"):
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
            st = proc.stream(cfg, sid)
            stats = TPPStats()
            if rank == 0:
                st.run_input(model, ref, lambda f, k: audio[:k], text, n_chunks=n)
            elif rank < world - 1:
                st.run_steps(model)
            else:
                for _ in st.frames(model, stats):
                    pass
            mine = dict(rank=rank, role=st.role, compute_ms=st.compute_ms(), peak_memory_gib=_peak_gib(dev))
            if rank == world - 1:
                mine.update(
                    ttff_s=stats.ttff,
                    fps=stats.steady_fps(4 * spec["chunk"]),
                    frames=stats.frames,
                    chunk_times=stats.chunk_times,
                )
        Path(outdir, f"rank{rank}.json").write_text(json.dumps(mine))
        proc.close()

    stop_on_failure(work, prefix="tpp_speed")


def _round(v):
    return round(v, 3) if isinstance(v, float) else v


def run_case(spec: dict, gpus: int, timeout_s: float) -> list[dict]:
    base = dict(
        model=spec["model"],
        height=spec["height"],
        width=spec["width"],
        gpus=gpus,
        steps=spec["steps"],
        chunk=spec["chunk"],
        window=spec["window"],
        dtype=spec["dtype"],
        decoder=spec["decoder"],
        fp8=spec["fp8"],
        compiled=spec["compile"],
        chunks_measured=spec["chunks"],
    )
    if spec["device"] == "cuda" and gpus > torch.cuda.device_count():
        return [dict(base, mode="pipeline" if gpus > 1 else "single", skipped=f"{torch.cuda.device_count()} GPUs")]
    if gpus > spec["steps"] + 1:
        return [dict(base, mode="pipeline", skipped=f"{spec['steps']} steps run on at most {spec['steps'] + 1} GPUs")]
    preload = ("talkstream.models.dit", "talkstream.stream.engine")
    with tempfile.TemporaryDirectory() as d:
        if gpus == 1:
            out = Path(d) / "single.json"
            codes = launch_local(single_worker, 1, (spec, str(out)), timeout_s=timeout_s, preload=preload)
            if codes != [0] or not out.exists():
                return [dict(base, mode="single", failed=f"exit codes {codes}")]
            return [dict(base, **r) for r in json.loads(out.read_text())]
        codes = launch_local(pipeline_worker, gpus, (spec, d), timeout_s=timeout_s, preload=preload)
        ranks = [json.loads(p.read_text()) for p in sorted(Path(d).glob("rank*.json"), key=lambda p: p.stem)]
        if codes != [0] * gpus or len(ranks) != gpus:
            return [dict(base, mode="pipeline", failed=f"exit codes {codes}")]
    last = ranks[-1]
    per_rank = [
        dict(
            rank=r["rank"],
            role=r["role"],
            compute_ms_median=_round(statistics.median(r["compute_ms"])) if r["compute_ms"] else None,
            peak_memory_gib=r["peak_memory_gib"],
        )
        for r in ranks
    ]
    slowest = max((r for r in per_rank if r["compute_ms_median"] is not None), key=lambda r: r["compute_ms_median"])
    return [
        dict(
            base,
            mode="pipeline",
            ttff_s=_round(last["ttff_s"]),
            fps=_round(last["fps"]),
            frames=last["frames"],
            slowest_stage=slowest["role"],
            ranks=per_rank,
        )
    ]


def plot(results: list[dict], path: Path, unit: str = "GPUs") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    keys = sorted({(r["model"], r["width"], r["height"]) for r in results})
    for model, w, h in keys:
        rows = [r for r in results if (r["model"], r["width"], r["height"]) == (model, w, h) and r.get("fps")]
        pipe = sorted((r["gpus"], r["fps"]) for r in rows if r["mode"] in ("pipeline", "engine_commit"))
        if pipe:
            ax.plot(*zip(*pipe), marker="o", label=f"{model} {w}x{h}")
        tf = [(r["gpus"], r["fps"]) for r in rows if r["mode"] == "timestep_forcing"]
        if tf:
            ax.scatter(*zip(*tf), marker="x", color=ax.lines[-1].get_color() if ax.lines else None)
    ax.set_xticks(sorted({r["gpus"] for r in results}))
    ax.set_xlabel(f"{unit} (1: single-process engine, x: timestep forcing in one process; >1: TPP pipeline)")
    ax.set_ylabel("frames per second (decoded)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _where(device: str) -> str:
    if device == "cpu":
        return "cpu"
    name = torch.cuda.get_device_name(0).lower()
    kind = next((k for k in ("h200", "h100", "h800", "a100", "b200") if k in name), name.split()[-1])
    return f"{kind}x{torch.cuda.device_count()}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    ap.add_argument("--models", nargs="+", default=["wan14b", "wan1.3b"])
    ap.add_argument("--sizes", nargs="+", default=["832x480", "640x416"], help="WIDTHxHEIGHT")
    ap.add_argument("--gpus", nargs="+", type=int, default=[1, 2, 3, 5], help="process counts (CPU: processes)")
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--chunk", type=int, default=3)
    ap.add_argument("--window", type=int, default=9)
    ap.add_argument("--chunks", type=int, default=16, help="chunks of the measured stream")
    ap.add_argument("--warmup", type=int, default=6, help="chunks of the warm-up stream")
    ap.add_argument("--decoder", default="auto", help="wan_vae | taehv | a CausalVAE size (auto: wan_vae; tiny: tiny)")
    ap.add_argument("--anchor", default="rolling_sink", choices=["reference", "anchor_heavy", "rolling_sink"])
    ap.add_argument("--text-len", type=int, default=512)
    ap.add_argument("--fp8", action="store_true", help="FP8 linear layers (talkstream.stream.fp8; Hopper)")
    ap.add_argument("--compile", action="store_true", help="torch.compile the blocks' dense parts")
    ap.add_argument("--timeout", type=float, default=1800.0, help="seconds a case may take")
    ap.add_argument("--out", type=Path)
    ap.add_argument("--note", help="a line about the run kept in the JSON (e.g. what else shared the machine)")
    a = ap.parse_args()
    if a.device == "cuda" and not torch.cuda.is_available():
        sys.exit("tpp_speed: --device cuda but this machine has no CUDA GPU (use --device cpu)")
    results: list[dict] = []
    out = a.out or Path(__file__).parent / "results" / f"tpp_speed_{'_'.join(a.models)}_{_where(a.device)}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    dtype = "bfloat16" if a.device == "cuda" else "float32"
    for model in a.models:
        for size in a.sizes:
            w, h = (int(v) for v in size.lower().split("x"))
            decoder = a.decoder if a.decoder != "auto" else ("tiny" if model == "tiny" else "wan_vae")
            spec = dict(
                model=model,
                width=w,
                height=h,
                steps=a.steps,
                chunk=a.chunk,
                window=a.window,
                chunks=a.chunks,
                warmup=a.warmup,
                decoder=decoder,
                anchor=a.anchor,
                text_len=a.text_len if model != "tiny" else 8,
                dtype=dtype,
                fp8=a.fp8,
                compile=a.compile,
                device=a.device,
            )
            for g in a.gpus:
                t = time.perf_counter()
                for r in run_case(spec, g, a.timeout):
                    r["case_seconds"] = round(time.perf_counter() - t, 1)
                    print(json.dumps({k: v for k, v in r.items() if k != "ranks"}), flush=True)
                    results.append(r)
                doc = dict(
                    what="TPP pipeline speed: random weights of the real shapes; FPS = decoded frames a second over "
                    "the second half of the measured stream; TTFF from the stream's start to its first decoded frame",
                    machine=describe(),
                    load_average=list(os.getloadavg()),
                    note=a.note,
                    results=results,
                )
                out.write_text(json.dumps(doc, indent=2))  # after every case
    plot(results, out.with_suffix(".png"), "GPUs" if a.device == "cuda" else "CPU processes")
    print(f"wrote {out} and {out.with_suffix('.png')}")


if __name__ == "__main__":
    main()
