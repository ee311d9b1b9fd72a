"""What the timestep-forcing cache costs in quality: the suite's figures for the same model, clips and noise with the
cache written by a clean commit pass (the default) and by the last denoising step (``cache_mode=timestep_forcing``,
one pass fewer per chunk).

    python benchmarks/cache_mode_quality.py --seeds 900000 --sampler euler --steps 8        # the shipped sampling
    python benchmarks/cache_mode_quality.py --seeds 900000 --sampler few_step --steps 2     # a 2-step schedule

Inputs: the suite's precomputed clips (``talkstream eval suite --save-inputs data/suite_inputs.pkl``); each chunk
gets its segment's caption (the suite's default). Writes ``benchmarks/results/cache_mode_quality_<...>_cpu.json``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from talkstream.eval.evaluate import inputs_generator, load_suite_inputs, run_suite  # noqa: E402
from talkstream.eval.speed import loadavg  # noqa: E402
from talkstream.machine import describe  # noqa: E402
from talkstream.models.checkpoint import load_checkpoint  # noqa: E402
from talkstream.stream.accel import stream_dtype  # noqa: E402
from talkstream.stream.avatar import WEIGHTS, Avatar, stream_config  # noqa: E402

KEYS = ("mouth_error", "mouth_error_fast", "mouth_corr", "identity_distance", "head_motion", "flicker")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--weights", type=Path, default=WEIGHTS)
    ap.add_argument("--inputs", type=Path, default=Path("data/suite_inputs.pkl"))
    ap.add_argument("--seeds", type=int, nargs="+", default=[900000])
    ap.add_argument("--sampler", default="euler", choices=["euler", "few_step"])
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--dtype", default="auto", choices=["auto", "bf16", "fp32"])
    ap.add_argument("--modes", nargs="+", default=["commit", "timestep_forcing"])
    ap.add_argument("--decoder", default="tiny", choices=["tiny", "vae"])
    ap.add_argument("--decoder-dtype", choices=["bf16", "fp32"], help="the tiny decoder's dtype (default: --dtype's)")
    ap.add_argument("--first-chunk", type=int, default=0, help="StreamConfig.first_chunk (1: a one-latent first chunk)")
    ap.add_argument("--out", type=Path)
    a = ap.parse_args()
    dtype = stream_dtype("cpu", a.dtype)
    dit = load_checkpoint(a.weights / "causal.safetensors", dtype=dtype)
    vae = load_checkpoint(a.weights / "vae.safetensors", dtype=torch.float32)
    dec_dtype = stream_dtype("cpu", a.decoder_dtype) if a.decoder_dtype else dtype
    dec = load_checkpoint(a.weights / "tiny_decoder.safetensors", dtype=dec_dtype) if a.decoder == "tiny" else vae
    inputs = load_suite_inputs(a.inputs)
    sampling = dict(steps=a.steps) if a.sampler == "euler" else dict(timesteps=(1000, 750, 500, 250)[: a.steps])
    name = f"{a.sampler}{a.steps}_{'_'.join(map(str, a.seeds))}_{str(dtype).replace('torch.', '')}_{a.decoder}"
    name += f"_first{a.first_chunk}" if a.first_chunk else ""
    name += f"_decoder_{a.decoder_dtype}" if a.decoder_dtype else ""
    out = a.out or Path(__file__).parent / "results" / f"cache_mode_quality_{name}_cpu.json"
    res = dict(machine=describe(), sampler=a.sampler, steps=a.steps, seeds=a.seeds, dtype=str(dtype), modes={})
    res["decoder"], res["first_chunk"] = a.decoder, a.first_chunk
    res["decoder_dtype"] = str(dec_dtype) if a.decoder == "tiny" else "torch.float32"
    res["loadavg_start"] = loadavg()
    for mode in a.modes:
        cfg = stream_config(dit, sampler=a.sampler, cache_mode=mode, first_chunk=a.first_chunk, **sampling)
        avatar = Avatar(dit, vae, dec, cfg)

        t = time.perf_counter()
        suite = run_suite(inputs_generator(avatar, inputs), seeds=tuple(a.seeds), inputs=inputs)
        res["modes"][mode] = dict(
            summary={k: suite["summary"][k] for k in KEYS},
            rows=suite["rows"],
            seconds=round(time.perf_counter() - t, 1),
            config=dict(sigmas=[round(float(s), 4) for s in cfg.sigmas()], reference_init=cfg.reference_init),
        )
        print(mode, json.dumps(res["modes"][mode]["summary"]), flush=True)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(res, indent=2, default=str))
    if {"commit", "timestep_forcing"} <= set(res["modes"]):
        c, f = (res["modes"][m]["summary"] for m in ("commit", "timestep_forcing"))
        res["timestep_forcing_vs_commit"] = {k: round(f[k] / c[k] - 1, 4) if c[k] else None for k in KEYS}
        print("forcing / commit - 1:", json.dumps(res["timestep_forcing_vs_commit"]))
    res["loadavg_end"] = loadavg()
    out.write_text(json.dumps(res, indent=2, default=str))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
