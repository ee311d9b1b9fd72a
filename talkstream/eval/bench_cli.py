"""``talkstream bench``: streaming speed, written as JSON (with the machine and its load) and a plot.

talkstream bench                                  # the ladder of speed-ups on the embedded model (this device)
talkstream bench --case --steps 2 --pace          # one configuration, paced at 25 FPS wall-clock
talkstream bench soak --minutes 60                # a paced live stream: memory, identity, frame health, jitter
talkstream bench --source world|dit               # the generic harness (world renderer / random-weight DiT)
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

RESULTS = Path(__file__).resolve().parents[2] / "benchmarks" / "results"


def ladder() -> list:
    """Each speed-up added to the one before, from the shipped settings (fp32, 8 Euler steps + a clean commit pass,
    the VAE decoder, a full first chunk) to the fastest (bf16, 2 few-step steps with timestep forcing, tiny decoder,
    a one-latent first chunk): each step's share of the speed is the difference to the row above."""
    from .speed import EngineCase

    base = EngineCase(
        sampler="euler", steps=8, cache_mode="commit", first_chunk=0, decoder="vae", dtype="fp32", prompt=True
    )
    rows = [base]
    for change in (
        dict(sampler="few_step", steps=4),
        dict(dtype="auto"),
        dict(decoder="tiny"),
        dict(cache_mode="timestep_forcing"),
        dict(first_chunk=1),
        dict(steps=2),
    ):
        rows.append(replace(rows[-1], **change))
    rows.append(replace(rows[-1], cache_mode="commit"))  # 2 steps with the commit pass, for the forcing's share
    return rows


def sweep(base) -> list:
    """The fastest configuration at three resolutions x three windows (FPS against resolution and window)."""
    return [replace(base, size=size, window=window) for size in (128, 256, 384) for window in (3, 6, 9)]


def plot_sweep(results: list[dict], out: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for size in sorted({r["config"]["size"] for r in results}):
        rows = sorted((r for r in results if r["config"]["size"] == size), key=lambda r: r["config"]["window"])
        ax.plot([r["config"]["window"] for r in rows], [r["steady_fps"] for r in rows], "o-", label=f"{size}x{size}")
    ax.axhline(25, color="k", ls="--", lw=1)
    ax.set_xlabel("window (latent frames in the KV cache)")
    ax.set_ylabel("steady FPS, decode included")
    ax.legend(fontsize=8)
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)


def plot(results: list[dict], out: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [r["case"] for r in results]
    fig, ax = plt.subplots(1, 2, figsize=(12, 0.45 * len(names) + 1.6), sharey=True)
    ax[0].barh(names, [r["steady_fps"] for r in results], color="tab:blue")
    ax[0].axvline(25, color="k", ls="--", lw=1)
    ax[0].set_xlabel("steady FPS, decode included (dashed: real time)")
    ax[1].barh(names, [r["ttff_s"] for r in results], color="tab:orange")
    ax[1].axvline(0.5, color="k", ls="--", lw=1)
    ax[1].set_xlabel("time to first frame, s (dashed: 0.5 s)")
    ax[0].invert_yaxis()
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)


def _bench(args) -> None:
    from ..machine import check_device, describe

    check_device(args.device)
    if args.source is not None:
        return _legacy(args)
    import torch

    from ..stream.accel import set_threads
    from .speed import EngineCase, engine_bench, loadavg

    set_threads(args.threads)
    one = None
    if args.case or args.what == "sweep":
        one = EngineCase(
            sampler=args.sampler,
            steps=args.steps,
            cache_mode=args.cache_mode,
            first_chunk=args.first_chunk,
            decoder=args.decoder,
            dtype=args.dtype,
            compile=args.compile,
            runner=args.runner,
            async_decode=not args.sync_decode,
            chunk=args.chunk,
            window=args.window,
            size=args.size,
        )
    if args.what == "sweep":
        cases = sweep(one)
    elif args.case:
        cases = [one]
    else:
        cases = ladder()
        if args.compile:
            cases.append(replace(cases[-2], compile=True))
    kind = "cuda" if args.device.startswith("cuda") else "cpu"
    what = "sweep" if args.what == "sweep" else "case" if args.case else "ladder"
    out = args.out or RESULTS / f"stream_engine_{what}_{kind}.json"
    res = dict(machine=describe(), loadavg_start=loadavg(), results=[])
    for case in cases:
        r = engine_bench(case, args.weights, args.device, args.chunks, pace=args.pace)
        print(json.dumps({k: r[k] for k in ("case", "steady_fps", "ttff_s", "denoise_ms_per_chunk", "loadavg_after")}))
        res["results"].append(r)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(res, indent=2))  # after every case
        if args.device.startswith("cuda"):
            torch.cuda.empty_cache()
    res["loadavg_end"] = loadavg()
    out.write_text(json.dumps(res, indent=2))
    if not args.no_plot:
        cpu = res["machine"].get("cpu_model") or kind
        title = f"{cpu}, {res['machine'].get('torch_threads')} threads"
        (plot_sweep if what == "sweep" else plot)(res["results"], out.with_suffix(".png"), title)
    print(f"wrote {out}")


def _legacy(args) -> None:
    import torch

    from .speed import dit_source, measure_stream, world_source

    if args.source == "world":
        src = world_source(args.seconds, args.size)
    else:
        dtype = torch.bfloat16 if args.device.startswith("cuda") else torch.float32
        src = dit_source(args.config, args.size, args.size, chunks=args.chunks, device=args.device, dtype=dtype)
    res = measure_stream(src, device=args.device)
    res["source"] = dict(
        kind=args.source,
        config=args.config if args.source == "dit" else None,
        size=args.size,
        weights="random (real shapes)" if args.source == "dit" else None,
    )
    print(json.dumps(res, indent=2))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(res, indent=2))


def _soak(args) -> None:
    from ..machine import check_device
    from .soak import soak

    check_device(args.device)
    out = args.out or RESULTS / f"soak_{args.minutes:g}min_{'cuda' if args.device.startswith('cuda') else 'cpu'}.json"
    soak(
        args.minutes,
        out,
        weights=args.weights,
        device=args.device,
        steps=args.steps,
        cache_mode=args.cache_mode,
        pace_delay=args.pace_delay,
        emit=args.emit,
        decode_nice=args.decode_nice,
        size=args.size,
    )


def register(sub) -> None:
    b = sub.add_parser("bench", help="streaming speed: TTFF, FPS, pacing jitter, memory (JSON + plot)")
    b.add_argument(
        "what",
        nargs="?",
        choices=["stream", "sweep", "soak"],
        default="stream",
        help="stream: the ladder (or --case); sweep: the --case flags at 3 sizes x 3 windows; soak: a paced stream",
    )
    b.add_argument("--device", default="cpu")
    b.add_argument("--weights", help="a model folder (default: the embedded model)")
    b.add_argument("--threads", type=int, help="torch CPU threads (default: every CPU this process may use)")
    b.add_argument("--chunks", type=int, default=12, help="chunks per timed stream")
    b.add_argument("--pace", action="store_true", help="also stream paced at 25 FPS: inter-frame and A/V percentiles")
    b.add_argument("--compile", action="store_true", help="torch.compile the DiT's dense parts (ladder: one more row)")
    b.add_argument("--case", action="store_true", help="time one configuration (the flags below), not the ladder")
    b.add_argument("--sampler", default="few_step", choices=["few_step", "euler"])
    b.add_argument("--steps", type=int, default=2)
    b.add_argument("--cache-mode", default="timestep_forcing", choices=["commit", "timestep_forcing"])
    b.add_argument("--first-chunk", type=int, default=1, help="latents of the first chunk (0: a full chunk)")
    b.add_argument("--decoder", default="tiny", choices=["tiny", "vae"])
    b.add_argument("--dtype", default="auto", choices=["auto", "bf16", "fp32"])
    b.add_argument("--runner", default="plain", choices=["plain", "prepared", "graphs"], help="StreamConfig.runner")
    b.add_argument("--sync-decode", action="store_true", help="decode on the stream's thread (no overlap)")
    b.add_argument("--chunk", type=int, default=3)
    b.add_argument("--window", type=int, default=9)
    b.add_argument("--size", type=int, default=256)
    b.add_argument("--minutes", type=float, default=60.0, help="soak: stream length")
    b.add_argument("--pace-delay", type=float, default=1.0, help="soak: playout buffer, seconds (eval.soak.PACE_DELAY)")
    b.add_argument("--emit", default="latency", choices=["latency", "overlapped"], help="soak: StreamConfig.emit")
    b.add_argument("--decode-nice", type=int, help="soak: StreamConfig.decode_nice (default 0)")
    b.add_argument("--source", choices=["world", "dit"], help="the generic harness instead of the engine")
    b.add_argument("--config", default="small", help="--source dit: the DiT size (random weights)")
    b.add_argument("--seconds", type=float, default=10.0, help="--source world: clip length")
    b.add_argument("--no-plot", action="store_true")
    b.add_argument("--out", type=Path)
    b.set_defaults(func=lambda a: _soak(a) if a.what == "soak" else _bench(a))


__all__ = ["ladder", "plot", "register"]
