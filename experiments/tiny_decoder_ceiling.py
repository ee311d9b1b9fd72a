"""The tiny decoder's lip-sync gap without DiT noise: the *same* streamed DiT latents decoded by the VAE decoder and
by tiny decoders, each scored with the suite (mouth error, identity).

    python experiments/tiny_decoder_ceiling.py make --seeds 900000 900001 900002 900003     # DiT latents, cached
    python experiments/tiny_decoder_ceiling.py score --decoders vae tiny=talkstream/weights/tiny_decoder.safetensors

``make`` streams each suite clip with the shipped causal model and sampling (bf16 where the CPU has it, commit pass,
the suite's caption timeline) exactly as ``benchmarks/cache_mode_quality.py`` does, and records the latent chunks the
engine hands its decoder (``data/tiny_decoder_suite_latents.pt``; ~7 min a clip on 2 CPU cores). ``score`` decodes
those chunks as the stream does (chunk by chunk, causal cache, each decoder in its streaming dtype) and runs the suite
on the frames; the VAE decoder's frames are cached (``--frames-cache``) since they take ~4 min a clip on a CPU.
Writes ``benchmarks/results/tiny_decoder_ceiling_cpu.json`` (merged with what is there: one row per decoder).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from talkstream.eval.evaluate import load_suite_inputs, run_suite  # noqa: E402
from talkstream.eval.speed import loadavg  # noqa: E402
from talkstream.machine import describe  # noqa: E402
from talkstream.models.checkpoint import load_checkpoint  # noqa: E402
from talkstream.stream.accel import stream_dtype  # noqa: E402
from talkstream.stream.avatar import WEIGHTS, Avatar, stream_config  # noqa: E402
from talkstream.stream.engine import ChunkDecoder  # noqa: E402

KEYS = ("mouth_error", "mouth_error_fast", "mouth_corr", "identity_distance", "head_motion", "flicker")
LATENTS = Path("data/tiny_decoder_suite_latents.pt")
FRAMES = Path("data/tiny_decoder_suite_vae_frames.npz")
OUT = Path(__file__).resolve().parents[1] / "benchmarks" / "results" / "tiny_decoder_ceiling_cpu.json"


class _Recorder(nn.Module):
    """Passes latent chunks to ``decoder`` and keeps a float32 copy of each (what the engine decodes)."""

    def __init__(self, decoder: nn.Module) -> None:
        super().__init__()
        self.decoder, self.chunks = decoder, []

    def forward(self, z: torch.Tensor, cache=None) -> torch.Tensor:
        self.chunks.append(z.detach().float().cpu().clone())
        return self.decoder(z, cache)


def make(a: argparse.Namespace) -> None:
    inputs = load_suite_inputs(a.inputs)
    dtype = stream_dtype("cpu", a.dtype)
    dit = load_checkpoint(a.weights / "causal.safetensors", dtype=dtype)
    vae = load_checkpoint(a.weights / "vae.safetensors", dtype=torch.float32)
    tiny = load_checkpoint(a.weights / "tiny_decoder.safetensors", dtype=dtype)
    cfg = stream_config(dit, sampler="euler", cache_mode="commit", steps=a.steps)
    store = torch.load(a.latents) if a.latents.exists() else dict(clips={})
    store.update(dtype=str(dtype), steps=a.steps, sigmas=[round(float(s), 4) for s in cfg.sigmas()])
    for seed in a.seeds:
        if seed in store["clips"]:
            print(f"{seed}: cached", flush=True)
            continue
        rec = _Recorder(tiny)
        avatar = Avatar(dit, vae, rec, cfg)
        c = inputs["clips"][seed]
        clip = c["clip"]
        ref = _truth_first_frame(clip)
        t = time.perf_counter()
        frames = list(
            avatar.from_features(
                ref, c["audio_features"].astype(np.float32), clip.n_frames, c["track"].to(dtype=torch.float32)
            )
        )
        store["clips"][seed] = dict(chunks=rec.chunks, n_frames=len(frames), seconds=time.perf_counter() - t)
        print(f"{seed}: {len(rec.chunks)} chunks, {len(frames)} frames, {time.perf_counter() - t:.0f} s", flush=True)
        a.latents.parent.mkdir(parents=True, exist_ok=True)
        torch.save(store, a.latents)


def _truth_first_frame(clip) -> np.ndarray:
    from talkstream.world.render import render_states

    return next(iter(render_states(clip.identity, clip.states[:1], 256)))


def decode_chunks(decoder: nn.Module, chunks: list[torch.Tensor], n_frames: int) -> np.ndarray:
    """The stream's decode: chunk after chunk through one causal cache -> uint8 [n_frames, H, W, 3]."""
    dec = ChunkDecoder(decoder.eval())
    return np.concatenate([dec(z) for z in chunks])[:n_frames]


def score(a: argparse.Namespace) -> None:
    inputs = load_suite_inputs(a.inputs)
    store = torch.load(a.latents)
    seeds = tuple(s for s in a.seeds if s in store["clips"])
    if not seeds:
        raise SystemExit(f"{a.latents} holds none of the seeds {a.seeds}: run `make` first")
    dtype = stream_dtype("cpu", a.dtype)
    res = json.loads(a.out.read_text()) if a.out.exists() else {}
    res.update(machine=describe(), seeds=list(seeds), latents=dict(dtype=store["dtype"], sigmas=store["sigmas"]))
    res.setdefault("decoders", {})
    cached = dict(np.load(a.frames_cache)) if a.frames_cache.exists() else {}
    for spec in a.decoders:
        name, _, path = spec.partition("=")
        t = time.perf_counter()
        load0 = loadavg()
        if name == "vae":
            missing = [s for s in seeds if str(s) not in cached]
            if missing:
                vae = load_checkpoint(a.weights / "vae.safetensors", dtype=torch.float32)
                for s in missing:
                    c = store["clips"][s]
                    cached[str(s)] = decode_chunks(vae, c["chunks"], c["n_frames"])
                    np.savez(a.frames_cache, **cached)
                    print(f"vae decoded {s} ({time.perf_counter() - t:.0f} s)", flush=True)
            frames = {s: cached[str(s)] for s in seeds}
            dec_dtype = "torch.float32"
        else:
            dec = load_checkpoint(path, dtype=dtype)
            frames = {s: decode_chunks(dec, store["clips"][s]["chunks"], store["clips"][s]["n_frames"]) for s in seeds}
            dec_dtype = str(dtype)
        decode_s = time.perf_counter() - t
        suite = run_suite(lambda ref, clip, frames=frames: frames[clip.seed], seeds=seeds, inputs=inputs)
        res["decoders"][name] = dict(
            path=path or str(a.weights / "vae.safetensors"),
            dtype=dec_dtype,
            summary={k: suite["summary"][k] for k in KEYS},
            rows=[{k: r[k] for k in ("seed", "best_offset", *KEYS) if k in r} for r in suite["rows"]],
            decode_s=round(decode_s, 1),
            loadavg=[load0, loadavg()],
        )
        print(name, json.dumps(res["decoders"][name]["summary"]), flush=True)
    if a.out.exists():  # another run may have written rows meanwhile: keep theirs, ours replace same-named ones
        res["decoders"] = {**json.loads(a.out.read_text()).get("decoders", {}), **res["decoders"]}
    base = res["decoders"].get("vae")
    if base is None and a.baseline.exists():  # the VAE decoder's row from the ceiling file
        base = json.loads(a.baseline.read_text()).get("decoders", {}).get("vae")
        res["baseline"] = str(a.baseline)
    if base is not None:
        b = base["summary"]
        for d in res["decoders"].values():
            d["mouth_error_vs_vae"] = round(d["summary"]["mouth_error"] / b["mouth_error"] - 1, 4)
            d["identity_vs_vae"] = round(d["summary"]["identity_distance"] / b["identity_distance"] - 1, 4)
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(res, indent=2, default=str))
    print(f"wrote {a.out}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("what", choices=["make", "score"])
    ap.add_argument("--weights", type=Path, default=WEIGHTS)
    ap.add_argument("--inputs", type=Path, default=Path("data/suite_inputs.pkl"))
    ap.add_argument("--seeds", type=int, nargs="+", default=[900000, 900001, 900002, 900003])
    ap.add_argument("--steps", type=int, default=8, help="the Euler schedule's length (shipped: 8, started at 0.9)")
    ap.add_argument("--dtype", default="auto", choices=["auto", "bf16", "fp32"], help="DiT and tiny decoder dtype")
    ap.add_argument("--latents", type=Path, default=LATENTS)
    ap.add_argument("--frames-cache", type=Path, default=FRAMES)
    ap.add_argument("--decoders", nargs="+", default=["vae", "tiny=talkstream/weights/tiny_decoder.safetensors"])
    ap.add_argument("--out", type=Path, default=OUT)
    ap.add_argument("--baseline", type=Path, default=OUT, help="where the VAE decoder's row is when not in --out")
    a = ap.parse_args()
    make(a) if a.what == "make" else score(a)


if __name__ == "__main__":
    main()
