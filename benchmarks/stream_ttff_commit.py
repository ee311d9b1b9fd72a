"""Time to the first frame with the commit pass deferred (``StreamConfig.defer_commit``): a chunk goes to the decoder
before the pass that writes its keys/values (only the next chunk reads them), against the order before (the pass
first). Same frames either way (tests/test_stream_speed.py); this measures what the viewer gains.

    python benchmarks/stream_ttff_commit.py                      # the embedded model, CPU, the live 2-step path
    python benchmarks/stream_ttff_commit.py --runs 8 --first-chunk 0

Per run, alternating the two orders: a fresh stream of the bundled face (reference latent cached, sinks prefilled),
audio features ready, ``chunks`` chunks; wall time and the process's CPU time from the stream's start to its first
frame, and per chunk the start of its denoising -> its first frame out (``StreamStats.chunk_latency_s``). Both emit
modes. On a loaded machine prefer the CPU-time columns (the load averages are recorded). Writes
``benchmarks/results/stream_ttff_commit_<case>_cpu.json``.
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
from talkstream.eval.speed import loadavg  # noqa: E402
from talkstream.machine import describe  # noqa: E402
from talkstream.stream.accel import stream_dtype  # noqa: E402
from talkstream.stream.avatar import BUNDLED_REFERENCE, Avatar, stream_config  # noqa: E402
from talkstream.stream.engine import AudioFeed, StreamStats  # noqa: E402
from talkstream.stream.offline import audio_span  # noqa: E402


def one_run(avatar: Avatar, feats, chunks: int) -> dict:
    lb, la = audio_span(avatar.dit)
    stats = StreamStats()
    c0 = time.process_time()
    engine = avatar.start_engine(BUNDLED_REFERENCE)
    feed = AudioFeed(lb, la)
    feed.push(feats)
    feed.close()
    cpu_first = None
    for _ in engine.frames(lambda first, k: feed.windows(first, k), n_chunks=chunks, stats=stats):
        if cpu_first is None:
            cpu_first = time.process_time() - c0
    return dict(
        ttff_s=stats.ttff,
        ttff_cpu_s=cpu_first,
        chunk_latency_s=stats.chunk_latency_s,
        wall_s=time.perf_counter() - stats.started,
        cpu_s=time.process_time() - c0,
    )


def summary(runs: list[dict]) -> dict:
    def med(key):
        return round(statistics.median(r[key] for r in runs), 4)

    later = [x for r in runs for x in r["chunk_latency_s"][1:]]
    return dict(
        runs=len(runs),
        ttff_s_median=med("ttff_s"),
        ttff_s_min=round(min(r["ttff_s"] for r in runs), 4),
        ttff_cpu_s_median=med("ttff_cpu_s"),
        ttff_cpu_s_min=round(min(r["ttff_cpu_s"] for r in runs), 4),
        later_chunk_latency_s_median=round(statistics.median(later), 4) if later else None,
        stream_cpu_s_median=med("cpu_s"),
        ttff_s=[round(r["ttff_s"], 4) for r in runs],
        ttff_cpu_s=[round(r["ttff_cpu_s"], 4) for r in runs],
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--weights", type=Path, help="a weights folder (default: the embedded model)")
    ap.add_argument("--runs", type=int, default=6, help="runs per order and emit mode")
    ap.add_argument("--chunks", type=int, default=3)
    ap.add_argument("--discard", type=int, default=1, help="rounds of all cases run first and not recorded")
    ap.add_argument("--steps", type=int, default=2, help="few-step schedule length (1000, 750, ...)[:steps]")
    ap.add_argument("--first-chunk", type=int, default=1)
    ap.add_argument("--decoder", default="tiny", choices=["tiny", "vae"])
    ap.add_argument("--emit", nargs="+", default=["overlapped", "latency"])
    ap.add_argument("--out", type=Path)
    a = ap.parse_args()
    load_before = loadavg()
    avatar = Avatar.from_pretrained(a.weights, decoder=a.decoder)
    base = stream_config(
        avatar.dit,
        sampler="few_step",
        timesteps=(1000, 750, 500, 250)[: a.steps],
        cache_mode="commit",
        first_chunk=a.first_chunk,
        audio_guidance=1.0,
    )
    avatar.cfg = base
    avatar.warm_up()
    g = torch.Generator().manual_seed(0)
    feats = torch.randn(2 * (1 + 4 * base.chunk * a.chunks) + 64, avatar.dit.cfg.audio_dim, generator=g).numpy()
    runs: dict[str, list[dict]] = {}
    for i in range(-a.discard, a.runs):
        for emit in a.emit:
            for defer in (False, True) if i % 2 == 0 else (True, False):
                avatar.cfg = replace(base, emit=emit, defer_commit="all" if defer else "off")
                r = one_run(avatar, feats, a.chunks)
                if i >= 0:
                    runs.setdefault(f"{emit}_{'deferred' if defer else 'before'}", []).append(r)
    res = dict(
        what="time to first frame, commit pass after the hand-off to the decoder vs before it",
        machine=describe(),
        device="cpu",
        threads=torch.get_num_threads(),
        dtype=str(stream_dtype("cpu", "auto")).replace("torch.", ""),
        weights=str(a.weights or "embedded causal model"),
        config=dict(
            sampler="few_step",
            steps=a.steps,
            cache_mode="commit",
            first_chunk=a.first_chunk,
            chunk=base.chunk,
            window=base.window,
            decoder=a.decoder,
            chunks=a.chunks,
            size=avatar.size,
        ),
        discarded_rounds=a.discard,
        cases={k: summary(v) for k, v in runs.items()},
        loadavg_before=load_before,
        loadavg_after=loadavg(),
    )
    for emit in a.emit:
        b, d = res["cases"][f"{emit}_before"], res["cases"][f"{emit}_deferred"]
        res[f"{emit}_ttff_gain_s"] = dict(
            wall_median=round(b["ttff_s_median"] - d["ttff_s_median"], 4),
            cpu_median=round(b["ttff_cpu_s_median"] - d["ttff_cpu_s_median"], 4),
        )
    name = f"few{a.steps}_first{a.first_chunk or base.chunk}_{a.decoder}"
    out = a.out or Path(__file__).parent / "results" / f"stream_ttff_commit_{name}_cpu.json"
    out.write_text(json.dumps(res, indent=1))
    print(json.dumps({k: v for k, v in res.items() if k not in ("machine",)}, indent=1))
    print("wrote", out)


if __name__ == "__main__":
    main()
