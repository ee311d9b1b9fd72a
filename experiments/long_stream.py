"""A long stream of the embedded model: memory, identity distance and stability over time (plot + JSON).

Audio: world utterances (espeak-ng) separated by pauses, looped, fed live chunk by chunk. Every minute of
video (or ``--every`` seconds): process RSS, KV-cache bytes, probe identity distance to the reference,
black / frozen frames. The issue asks for 60 minutes; on 2 CPU cores we run a shorter stream and state
the length measured (the growth figures are per minute of stream).

    python experiments/long_stream.py --minutes 60 --device cuda
    python experiments/long_stream.py --minutes 3 --every 15        # CPU
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from talkstream.eval.metrics import stability  # noqa: E402
from talkstream.eval.probes import load_frame_probe  # noqa: E402
from talkstream.eval.speed import rss_mib  # noqa: E402
from talkstream.machine import describe  # noqa: E402
from talkstream.stream.avatar import Avatar  # noqa: E402
from talkstream.world.behaviour import make_clip  # noqa: E402
from talkstream.world.render import render_states  # noqa: E402


def speech_loop(seed: int, chunk_samples: int):
    clips = [make_clip(seed + i, 6.0).audio for i in range(4)]
    pause = np.zeros(16000 * 2, np.float32)
    audio = np.concatenate([x for c in clips for x in (c, pause)])
    i = 0
    while True:
        yield (
            audio[i : i + chunk_samples]
            if i + chunk_samples <= len(audio)
            else np.concatenate([audio[i:], audio[: i + chunk_samples - len(audio)]])
        )
        i = (i + chunk_samples) % len(audio)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--minutes", type=float, default=3.0)
    ap.add_argument("--every", type=float, default=15.0, help="seconds of video per measurement window")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--decoder", default="tiny")
    ap.add_argument("--anchor", default="reference")
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--refine-every", type=int, default=4, help="memory_bank: memory refinement interval (chunks)")
    ap.add_argument(
        "--model", default=None, help="a folder with causal / vae / tiny_decoder weights (default: embedded)"
    )
    ap.add_argument("--seed", type=int, default=0, help="the stream's noise seed (another draw of the same stream)")
    ap.add_argument(
        "--reference-init",
        type=float,
        help="each chunk starts at this sigma from the noised reference (default: the engine's own)",
    )
    ap.add_argument(
        "--reference-seed", type=int, default=900_002, help="the world clip whose first frame is the reference"
    )
    ap.add_argument("--out", default="benchmarks/results/long_stream_cpu.json")
    ap.add_argument("--plot", default="", help="the plot (default: --out with .png)")
    a = ap.parse_args()
    torch.set_grad_enabled(False)
    clip = make_clip(a.reference_seed, 1.0)
    ref = next(iter(render_states(clip.identity, clip.states[:1], 256)))
    extra = dict(refine_every=a.refine_every) if a.anchor == "memory_bank" else {}
    start = {} if a.reference_init is None else dict(reference_init=a.reference_init)  # (default: the engine's)
    avatar = Avatar.from_pretrained(
        a.model, device=a.device, decoder=a.decoder, steps=a.steps, anchor=a.anchor, seed=a.seed, **extra, **start
    )
    probe = load_frame_probe()
    ref_id = probe.read(ref[None])["identity"][0]
    n_total, per = int(a.minutes * 60 * 25), int(a.every * 25)
    rows, window, t0 = [], [], time.perf_counter()
    frames_iter = avatar.stream(ref, speech_loop(7, 16000 * 12 // 25))
    for f in frames_iter:
        window.append(f.image)
        if len(window) == per:
            x = np.stack(window)
            ids = probe.read(x[::5])["identity"]
            st = stability(x)
            rows.append(
                dict(
                    video_s=round((f.index + 1) / 25, 2),
                    wall_s=round(time.perf_counter() - t0, 1),
                    rss_mib=round(rss_mib(), 1),
                    identity_distance=float(np.sqrt(((ids - ref_id) ** 2).sum(1)).mean()),
                    black=len(st["black_frames"]),
                    blank=len(st["blank_frames"]),
                    frozen_runs=len(st["frozen_runs"]),
                    mean_change=st["mean_change"],
                )
            )
            print(json.dumps(rows[-1]), flush=True)
            window = []
        if f.index + 1 >= n_total:
            break
    frames_iter.close()
    rss = [r["rss_mib"] for r in rows]
    after = [r for r in rows if r["video_s"] > 60] or rows[len(rows) // 2 :]
    growth = (after[-1]["rss_mib"] - after[0]["rss_mib"]) / after[0]["rss_mib"] if len(after) > 1 else 0.0
    summary = dict(
        video_minutes=rows[-1]["video_s"] / 60,
        wall_minutes=rows[-1]["wall_s"] / 60,
        rss_growth_after_first_minute=growth,
        rss_first=rss[0],
        rss_last=rss[-1],
        identity_distance_first=rows[0]["identity_distance"],
        identity_distance_last=rows[-1]["identity_distance"],
        identity_slope_per_minute=float(
            np.polyfit([r["video_s"] / 60 for r in rows], [r["identity_distance"] for r in rows], 1)[0]
        )
        if len(rows) > 2
        else 0.0,
        black_frames=sum(r["black"] for r in rows),
        frozen_runs=sum(r["frozen_runs"] for r in rows),
    )
    res = dict(
        machine=describe(),
        model=a.model or "embedded",
        device=a.device,
        decoder=a.decoder,
        anchor=a.anchor,
        steps=a.steps,
        seed=a.seed,
        reference_seed=a.reference_seed,
        reference_init=avatar.cfg.reference_init,
        **extra,
        note="measured length is video_minutes; growth figures extrapolate per minute",
        summary=summary,
        rows=rows,
    )
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(res, indent=2))
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(3, 1, figsize=(8, 7), sharex=True)
    m = [r["video_s"] / 60 for r in rows]
    ax[0].plot(m, rss, "o-")
    ax[0].set_ylabel("RSS (MiB)")
    ax[1].plot(m, [r["identity_distance"] for r in rows], "o-")
    ax[1].set_ylabel("identity distance")
    ax[2].plot(m, [r["mean_change"] for r in rows], "o-")
    ax[2].set_ylabel("mean frame change")
    ax[2].set_xlabel("minutes of video")
    fig.suptitle(
        f"long stream, {a.device}, {a.decoder} decoder, {a.anchor} anchor: {summary['video_minutes']:.1f} min measured"
    )
    fig.tight_layout()
    fig.savefig(a.plot or str(Path(a.out).with_suffix(".png")), dpi=80)
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
