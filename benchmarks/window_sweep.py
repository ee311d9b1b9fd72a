"""The KV-cache window (latent frames of context each chunk attends to besides its sinks) against speed and quality.

Attention over [sinks | window | chunk] keys is 61% of a live chunk's denoising on 2 CPU cores (docs/speed.md), so a
shorter window is the lever left for margin; it changes what the model sees, so the suite decides.

    python benchmarks/window_sweep.py speed --windows 9 6 3          # CPU s a chunk, the live 2-step path
    python benchmarks/window_sweep.py quality --windows 9 6 3 --noise-seeds 0 1 --seeds 900000
    python benchmarks/window_sweep.py combine A.json B.json --out window_quality_summary.json

``speed``: ``talkstream.eval.speed.engine_bench`` per window (embedded model, bf16, 256x256, 2 few-step steps,
timestep forcing, tiny decoder, one-latent first chunk; audio features precomputed): the process's CPU seconds a
chunk over the stream's second half (both cores' work) and the FPS it would give on 2 free cores.
``quality``: the suite (mouth error, identity distance, head motion) on the clips ``--seeds`` with the shipped
sampling (the checkpoint's: Euler 8-step schedule from sigma 0.9 + commit pass), the VAE decoder, bf16, per window
and per noise seed (``StreamConfig.seed``), so a window's change can be read against the noise draws' spread.
Both write ``benchmarks/results/window_<what>_<...>_cpu.json`` (load averages before/after).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from talkstream.eval.speed import EngineCase, engine_bench, loadavg  # noqa: E402
from talkstream.machine import describe  # noqa: E402

RESULTS = Path(__file__).parent / "results"
KEYS = ("mouth_error", "mouth_error_fast", "mouth_corr", "identity_distance", "head_motion", "flicker")


def speed(a: argparse.Namespace) -> None:
    res = dict(what="CPU time a chunk against the KV window", machine=describe(), loadavg_before=loadavg(), rows=[])
    out = a.out or RESULTS / f"window_speed_{'_'.join(map(str, a.windows))}_cpu.json"
    base = EngineCase(
        sampler="few_step", steps=2, cache_mode="timestep_forcing", first_chunk=1, decoder="tiny", size=a.size
    )
    for w in a.windows:
        r = engine_bench(replace(base, window=w), chunks=a.chunks)
        r["window"] = w
        res["rows"].append(r)
        print(w, r["cpu_s_per_chunk"], r["fps_if_cpus_fully_used"], r["denoise_ms_per_chunk"], flush=True)
        res["loadavg_after"] = loadavg()
        out.write_text(json.dumps(res, indent=1))
    print("wrote", out)


def quality(a: argparse.Namespace) -> None:
    from talkstream.eval.evaluate import inputs_generator, load_suite_inputs, run_suite
    from talkstream.models.checkpoint import load_checkpoint
    from talkstream.stream.accel import stream_dtype
    from talkstream.stream.avatar import WEIGHTS, Avatar, stream_config

    dtype = stream_dtype("cpu", "auto")
    dit = load_checkpoint(WEIGHTS / "causal.safetensors", dtype=dtype)
    vae = load_checkpoint(WEIGHTS / "vae.safetensors", dtype=torch.float32)
    dec = vae if a.decoder == "vae" else load_checkpoint(WEIGHTS / "tiny_decoder.safetensors", dtype=dtype)
    inputs = load_suite_inputs(a.inputs)
    name = f"{'_'.join(map(str, a.windows))}_{'_'.join(map(str, a.seeds))}_n{'_'.join(map(str, a.noise_seeds))}"
    out = a.out or RESULTS / f"window_quality_{name}_{a.decoder}_cpu.json"
    res = dict(
        what="the suite against the KV window (shipped sampling)",
        machine=describe(),
        dtype=str(dtype),
        decoder=a.decoder,
        seeds=a.seeds,
        noise_seeds=a.noise_seeds,
        loadavg_before=loadavg(),
        rows=[],
    )
    for w in a.windows:
        for n in a.noise_seeds:
            cfg = stream_config(dit, sampler="euler", steps=a.steps, cache_mode="commit", window=w, seed=n)
            avatar = Avatar(dit, vae, dec, cfg)

            t = time.perf_counter()
            suite = run_suite(inputs_generator(avatar, inputs), seeds=tuple(a.seeds), inputs=inputs)
            row = dict(window=w, noise_seed=n, summary={k: suite["summary"][k] for k in KEYS}, rows=suite["rows"])
            row["sigmas"] = [round(float(x), 4) for x in cfg.sigmas()]
            row["seconds"] = round(time.perf_counter() - t, 1)
            res["rows"].append(row)
            print(w, n, row["summary"], row["seconds"], flush=True)
            res["loadavg_after"] = loadavg()
            out.write_text(json.dumps(res, indent=1))
    print("wrote", out)


def combine(a: argparse.Namespace) -> None:
    """Rows of several ``quality`` JSONs (and a ``cache_mode_quality.py`` JSON of the same sampling: window 9, noise
    seed 0, its commit row) -> per-window means and each window's change against the largest, paired by noise seed."""
    rows, sources = [], []
    for path in a.files:
        r = json.loads(path.read_text())
        sources.append(dict(file=path.name, loadavg_before=r.get("loadavg_before") or r.get("loadavg_start")))
        if "modes" in r:  # cache_mode_quality.py: the default window (9) and noise seed (0)
            rows.append(dict(window=9, noise_seed=0, summary=r["modes"]["commit"]["summary"], file=path.name))
        else:
            rows += [
                dict(window=x["window"], noise_seed=x["noise_seed"], summary=x["summary"], file=path.name)
                for x in r["rows"]
            ]
    windows = sorted({x["window"] for x in rows}, reverse=True)
    base = windows[0]
    per = {}
    for w in windows:
        mine = {x["noise_seed"]: x["summary"] for x in rows if x["window"] == w}
        ref = {x["noise_seed"]: x["summary"] for x in rows if x["window"] == base}
        both = sorted(set(mine) & set(ref))
        entry = dict(noise_seeds=sorted(mine), mean={k: float(np.mean([m[k] for m in mine.values()])) for k in KEYS})
        if w != base and both:
            entry[f"paired_change_vs_window_{base}"] = {
                k: float(np.mean([mine[n][k] / ref[n][k] - 1 for n in both])) for k in KEYS
            }
        per[str(w)] = entry
    res = dict(what="the suite against the KV window (shipped sampling), combined", sources=sources, rows=rows)
    res["windows"] = per
    a.out.write_text(json.dumps(res, indent=1))
    print(json.dumps(per, indent=1))
    print("wrote", a.out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="what", required=True)
    s = sub.add_parser("speed")
    s.add_argument("--windows", type=int, nargs="+", default=[9, 6, 3])
    s.add_argument("--chunks", type=int, default=8)
    s.add_argument("--size", type=int, default=256)
    s.add_argument("--out", type=Path)
    q = sub.add_parser("quality")
    q.add_argument("--windows", type=int, nargs="+", default=[9, 6, 3])
    q.add_argument("--seeds", type=int, nargs="+", default=[900000])
    q.add_argument("--noise-seeds", type=int, nargs="+", default=[0, 1])
    q.add_argument("--steps", type=int, default=8, help="the Euler schedule's steps (shipped: 8, started at 0.9)")
    q.add_argument("--decoder", default="vae", choices=["vae", "tiny"])
    q.add_argument("--inputs", type=Path, default=Path("data/suite_inputs.pkl"))
    q.add_argument("--out", type=Path)
    c = sub.add_parser("combine")
    c.add_argument("files", type=Path, nargs="+")
    c.add_argument("--out", type=Path, required=True)
    a = ap.parse_args()
    dict(speed=speed, quality=quality, combine=combine)[a.what](a)


if __name__ == "__main__":
    main()
