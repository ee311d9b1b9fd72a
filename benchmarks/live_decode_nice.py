"""The decode worker's priority on a 2-core CPU (``StreamConfig.decode_nice``), measured in one process so that the
machine's drift (this CPU's speed moves by 10-30% within minutes) falls on both settings alike.

    python benchmarks/live_decode_nice.py                       # nice 0 vs 10, 5 rounds of 8 chunks each
    GOMP_SPINCOUNT=10000 python benchmarks/live_decode_nice.py --out X.json   # OpenMP's spin-wait shortened

One live stream of the soak's configuration (embedded model, bf16, one few-step pass a chunk, timestep forcing,
tiny decoder, ``emit="latency"``) fed real speech as it would arrive: each chunk's audio is pushed through Whisper's
live stream (``WhisperStream``, on the producer thread) just before it is needed, the audio is never late (the
generator is slower than real time on these cores, so a live stream never waits for it either). The stream is run in
blocks of ``--chunks`` chunks (``StreamEngine.frames(n_chunks=...)`` continues the same stream), the settings
alternating block by block; a block's first chunk (no decode overlapping it) is left out. Per setting: wall seconds a
chunk (from one chunk's frames to the next one's), its stages (``StreamStats.stages``) and the process's CPU seconds
a chunk. The rate of a long stream is ``producer_ms`` (audio + denoising, the critical path whenever the decode keeps
up); ``chunk_ms`` is flattered by a nicer decode at the end of each block (when the producer stops, the last decodes
get the cores). Writes ``benchmarks/results/live_decode_nice_cpu.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from talkstream.eval.soak import speech_loop  # noqa: E402
from talkstream.eval.speed import loadavg, machine_cpu_jiffies  # noqa: E402
from talkstream.machine import describe  # noqa: E402
from talkstream.stream.avatar import BUNDLED_REFERENCE, Avatar  # noqa: E402
from talkstream.stream.engine import StreamStats  # noqa: E402

RESULTS = Path(__file__).resolve().parents[1] / "benchmarks" / "results"
NOTE = (
    "producer_ms (audio + denoising) is a long stream's rate; chunk_ms is flattered by a nicer decode at the end of "
    "each block (when the producer stops, the last decodes get the cores)"
)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--nice", type=int, nargs="+", default=[0, 10], help="decode_nice values to alternate")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--chunks", type=int, default=8, help="chunks a block (the first is not timed)")
    ap.add_argument("--out", type=Path, default=RESULTS / "live_decode_nice_cpu.json")
    args = ap.parse_args()
    if args.chunks < 2 or args.rounds < 1:
        raise SystemExit("need --chunks >= 2 and --rounds >= 1")

    load_before = loadavg()
    avatar = Avatar.from_pretrained(
        sampler="few_step", timesteps=(1000, 750), cache_mode="timestep_forcing", first_chunk=1, decoder="tiny"
    )
    avatar.warm_up()
    speech = np.concatenate([speech_loop()] * 20)
    feed, ws = avatar.audio_feed(), avatar.whisper.stream()
    pos = [0]
    packet = 1600  # 0.1 s

    def audio_for(first: int, k: int):
        while not feed.ready(first, k):
            feed.push(ws.push(speech[pos[0] : pos[0] + packet]))
            pos[0] += packet
        return feed.windows(first, k)

    engine = avatar.start_engine(BUNDLED_REFERENCE)
    rows = {n: dict(chunk_s=[], audio_s=[], denoise_s=[], decode_s=[], cpu_s=[]) for n in args.nice}
    busy0 = machine_cpu_jiffies()
    for _ in range(args.rounds):
        for nice in args.nice:
            engine.cfg = replace(avatar.cfg, emit="latency", decode_nice=nice)
            stats = StreamStats()
            firsts, cpu = [], []
            for idx, _ in engine.frames(audio_for, n_chunks=args.chunks, stats=stats):
                if idx == 0 or (idx - 1) % 12 == 0:  # a chunk's first frame (chunk 0 is frame 0 alone)
                    firsts.append(time.perf_counter())
                    cpu.append(time.process_time())
            r = rows[nice]
            r["chunk_s"] += list(np.diff(firsts)[1:])  # chunk i's frames -> chunk i+1's, from the block's 2nd on
            r["cpu_s"] += list(np.diff(cpu)[1:])
            for stage in ("audio", "denoise", "decode"):
                r[f"{stage}_s"] += stats.stages[stage][1:]
    busy1 = machine_cpu_jiffies()

    def summary(r: dict) -> dict:
        ms = {k.replace("_s", "_ms"): round(1000 * statistics.mean(v), 1) for k, v in r.items()}
        ms["chunk_ms_median"] = round(1000 * statistics.median(r["chunk_s"]), 1)
        # the producer's cycle (audio + denoising): a long stream's pace whenever the decode keeps up
        ms["producer_ms"] = round(ms["audio_ms"] + ms["denoise_ms"], 1)
        ms["fps"] = round(12 / statistics.mean(r["chunk_s"]), 2)
        ms["chunks_timed"] = len(r["chunk_s"])
        return ms

    res = dict(
        what="decode worker nice value, alternated block by block in one live stream (benchmarks/live_decode_nice.py)",
        config=dict(
            steps=2,
            passes_a_chunk=1,
            cache_mode="timestep_forcing",
            decoder="tiny",
            emit="latency",
            rounds=args.rounds,
            chunks_a_block=args.chunks,
            gomp_spincount=os.environ.get("GOMP_SPINCOUNT"),
        ),
        results={f"decode_nice_{n}": summary(rows[n]) for n in args.nice},
        note=NOTE,
        machine_busy_fraction=round((busy1[0] - busy0[0]) / max(busy1[1] - busy0[1], 1), 3) if busy0 else None,
        machine=describe(),
        loadavg_before=load_before,
        loadavg_after=loadavg(),
    )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(res, indent=2))
    print(json.dumps(res["results"], indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
