"""A long live stream at real-time pacing (``talkstream bench soak --minutes 60``): what an hour of use does to
memory, identity, frame health and timing.

Speech (espeak-ng sentences with pauses between them, looped) is pushed into ``LiveAudio`` in 0.1 s packets on the
wall clock, as a microphone would; ``Avatar.stream`` paces its frames at 25 FPS, each chunk leaving as soon as it is
decoded (``StreamConfig.emit="latency"``: the next chunk's audio is still arriving). Per minute: RSS, the frame
probe's identity distance to the reference (one frame a second), black / blank frames and frozen runs
(``eval.metrics`` thresholds), the inter-frame interval and audio-video offset percentiles. Written as JSON and a
plot.

The identity frames are written to a temporary folder as PNGs while streaming and read by the probe after the stream:
probing a minute's 60 frames takes ~1 s of both cores, which in the stream's middle would make 25 frames late.

The playout delay (``PACE_DELAY``): with live audio a chunk can start only once its audio (and the model's look-ahead)
has arrived, so its frames are ready one packet, one Whisper hop and one chunk's work after that audio, while the
clock starts at the first (one-latent) chunk's frame. Frame 12i - 11 (chunk i's first) is due at
t0 + delay + (12i - 11) / 25 with t0 = 0.48 s + the first chunk's work, and ready at 0.48 (i + 1) s + one packet
(0.1 s) + chunk i's work: the delay must cover 0.28 s + 0.1 s + a chunk's work (0.45-0.6 s on 2 cores) and its jitter.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from ..eval.metrics import BLACK_LEVEL, BLANK_STD, FROZEN_DIFF, FROZEN_RUN
from .speed import loadavg, machine_cpu_jiffies, rss_mib

if TYPE_CHECKING:
    from ..stream.avatar import LiveAudio

PACE_DELAY = 1.0  # seconds of playout buffer: the module docstring says how it is sized
SENTENCES = (
    "Hello, I am a talkstream avatar.",
    "I listen, I think, and then I answer you.",
    "This stream runs for as long as you keep talking to me.",
    "Let me know what you would like to hear next.",
)


class FrameHealth:
    """Black / blank frames and frozen runs of a frame stream, counted as the frames pass (constant memory)."""

    def __init__(self) -> None:
        self.black = self.blank = self.frozen_runs = 0
        self.prev: np.ndarray | None = None
        self.still = 0

    def add(self, frame: np.ndarray) -> None:
        x = frame.astype(np.float32) / 255.0
        mean, std = float(x.mean()), float(x.std())
        self.black += mean < BLACK_LEVEL
        self.blank += std < BLANK_STD and mean >= BLACK_LEVEL
        if self.prev is not None and float(np.abs(x - self.prev).mean()) < FROZEN_DIFF:
            self.still += 1
            self.frozen_runs += self.still + 1 == FROZEN_RUN  # counted once, when the run reaches its length
        else:
            self.still = 0
        self.prev = x

    def counts(self) -> dict:
        return dict(black=self.black, blank=self.blank, frozen_runs=self.frozen_runs)


def speech_loop(sentences=SENTENCES, pause: float = 1.5) -> np.ndarray:
    from ..media import SAMPLE_RATE
    from ..world.speech import synthesize

    gap = np.zeros(int(pause * SAMPLE_RATE), np.float32)
    return np.concatenate([np.concatenate([synthesize(s).audio.astype(np.float32), gap]) for s in sentences])


def push_live(
    live: LiveAudio, audio: np.ndarray, seconds: float, packet: float = 0.1, stop: threading.Event | None = None
) -> None:
    """Push ``audio`` (looped) into ``live`` in ``packet``-second pieces on the wall clock for ``seconds``; close."""
    from ..media import SAMPLE_RATE

    n = int(packet * SAMPLE_RATE)
    t0, i = time.perf_counter(), 0
    while i * packet < seconds and not (stop and stop.is_set()):
        live.push(audio[(i * n + np.arange(n)) % len(audio)])
        i += 1
        time.sleep(max(0.0, t0 + i * packet - time.perf_counter()))
    live.close()


def soak(
    minutes: float,
    out: Path,
    weights: str | None = None,
    device: str = "cpu",
    steps: int = 2,
    cache_mode: str = "timestep_forcing",
    pace_delay: float = PACE_DELAY,
    progress: bool = True,
    emit: str = "latency",
    decode_nice: int | None = None,
    size: int = 256,
) -> dict:
    """Stream ``minutes`` of live speech at real-time pacing; write the per-minute record to ``out`` (+ .png)."""
    from PIL import Image
    from tqdm import tqdm

    from ..eval.probes import load_frame_probe
    from ..stream.avatar import BUNDLED_REFERENCE, Avatar, LiveAudio, load_reference
    from ..stream.engine import FPS, StreamStats
    from ..stream.pacing import PacingStats, percentiles
    from ..stream.threads import thread_cpu_seconds, thread_named

    if minutes <= 0:
        raise ValueError(f"minutes must be > 0, got {minutes}")
    avatar = Avatar.from_pretrained(
        weights,
        device=device,
        sampler="few_step",
        timesteps=(1000, 750, 500, 250)[:steps],
        cache_mode=cache_mode,
        first_chunk=1,
        decoder="tiny",  # the soak measures the fastest path (its record says so); the VAE decoder is not real time
        size=size,
        emit=emit,
        **({} if decode_nice is None else {"decode_nice": decode_nice}),
    )
    warm = avatar.warm_up()
    with thread_named("ts-whisper"):  # CTranslate2's threads, started with the model, carry the name
        _ = avatar.whisper
    probe = load_frame_probe()
    ref = load_reference(BUNDLED_REFERENCE, avatar.size)
    ref_id = probe.read(ref[None])["identity"][0]
    audio = speech_loop()
    live, stop = LiveAudio(wait=0.05), threading.Event()
    pusher = threading.Thread(target=push_live, args=(live, audio, minutes * 60, 0.1, stop), daemon=True)
    pacing = PacingStats(FPS)
    health = FrameHealth()
    per_frame = int(FPS * 60)
    rows, n_released, done_chunks = [], 0, [0]
    stats = StreamStats()
    seen: dict[int, tuple[str, float]] = {}  # thread CPU seconds by thread id (threads that ended still count)
    marks = [_cpu_mark(seen)]  # at the start and each minute's end
    load0 = loadavg()
    bar = tqdm(total=int(minutes * 60 * FPS), unit="frame", desc="soak", disable=not progress)
    shots = Path(tempfile.mkdtemp(prefix="talkstream-soak-"))  # identity frames, probed after the stream

    def close_minute() -> None:
        lo = len(rows) * per_frame
        c0 = rows[-1]["chunks_so_far"] if rows else 0
        marks.append(_cpu_mark(seen))
        rows.append(
            dict(
                minute=len(rows) + 1,
                rss_mib=round(rss_mib(), 1),
                identity_distance=None,  # filled in after the stream
                inter_frame_ms=percentiles(np.diff(pacing.released[max(0, lo - 1) :])),
                fps_delivered=_rate(pacing.released[max(0, lo - 1) :]),
                av_offset_ms=percentiles(np.abs(pacing.offsets[lo:])),
                late_frames_so_far=pacing.late,
                **health.counts(),
                chunks_so_far=stats.chunks,
                denoise_s_per_chunk=round(stats.denoise_s / max(stats.chunks, 1), 3),
                chunk_latency_ms=percentiles(stats.chunk_latency_s[done_chunks[0] :]),
                stage_ms={k: percentiles(v[c0 : stats.chunks]) for k, v in stats.stages.items()},
                **_cpu_use(marks[-2], marks[-1], stats.chunks - c0),
                loadavg=loadavg(),
            )
        )
        done_chunks[0] = len(stats.chunk_latency_s)

    t0 = time.perf_counter()
    pusher.start()
    try:
        for frame in avatar.stream(
            BUNDLED_REFERENCE, live, pace=True, pace_delay=pace_delay, pacing=pacing, stats=stats
        ):
            health.add(frame.image)
            if frame.index % FPS == 0:
                Image.fromarray(frame.image).save(shots / f"{frame.index:08d}.png", compress_level=1)
            n_released += 1
            bar.update()
            if n_released % FPS == 0:
                thread_cpu_seconds(seen)
            if n_released % per_frame == 0:
                close_minute()
    except BaseException:
        shutil.rmtree(shots, ignore_errors=True)  # a failed or interrupted soak leaves no frames behind
        raise
    finally:
        stop.set()
        bar.close()
    if n_released % per_frame:
        close_minute()
    wall = time.perf_counter() - t0
    _identity(rows, shots, probe, ref_id, per_frame)
    summary = _summary(rows, pacing, health, n_released, wall, warm)
    summary["ttff_s"] = None if stats.ttff is None else round(stats.ttff, 3)
    summary["chunk_latency_ms"] = percentiles(stats.chunk_latency_s[1:])  # (the first chunk is one latent)
    summary["stage_ms"] = {k: percentiles(v[1:]) for k, v in stats.stages.items()}
    summary.update(_cpu_use(marks[0], marks[-1], stats.chunks))
    res = dict(
        minutes=minutes,
        config=dict(
            steps=steps,
            cache_mode=cache_mode,
            pace_delay_s=pace_delay,
            decoder="tiny",
            first_chunk=1,
            size=size,
            emit=emit,
            decode_nice=avatar.cfg.decode_nice,
            torch_threads=torch.get_num_threads(),
            gomp_spincount=os.environ.get("GOMP_SPINCOUNT"),
        ),
        weights=str(weights or "embedded causal model"),
        summary=summary,
        per_minute=rows,
        loadavg_start=load0,
        loadavg_end=loadavg(),
    )
    from ..machine import describe

    res["machine"] = describe()
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(res, indent=2))
    _plot(rows, out.with_suffix(".png"))
    print(json.dumps(summary, indent=2))
    print(f"wrote {out}")
    return res


def _rate(released: list[float]) -> float | None:
    """Frames a second over release times (the frames after the first, over the span)."""
    span = released[-1] - released[0] if len(released) > 1 else 0.0
    return round((len(released) - 1) / span, 3) if span > 0 else None


def _cpu_mark(seen: dict) -> tuple[float, float, dict[str, float], tuple[int, int] | None]:
    """(wall, process CPU, CPU seconds by thread name, the machine's busy/total ticks) now."""
    from ..stream.threads import thread_cpu_seconds

    return time.perf_counter(), time.process_time(), thread_cpu_seconds(seen), machine_cpu_jiffies()


def _cpu_use(a: tuple, b: tuple, chunks: int) -> dict:
    """Where the CPU went between two ``_cpu_mark``s: the process's CPU seconds a chunk, split by thread name (each
    named thread with the OpenMP workers it started: ts-producer = Whisper's log-mel windows + denoising, ts-decode,
    ts-whisper = the Whisper encoder's own threads, ts-prefetch and the caller's = pacing and the frame checks), the
    cores the process kept busy on average, and the share of the machine's cores busy (anything running)."""
    wall, n = b[0] - a[0], max(chunks, 1)
    by_thread = {k: round((v - a[2].get(k, 0.0)) / n, 4) for k, v in sorted(b[2].items())}
    out = dict(
        cpu_s_per_chunk=round((b[1] - a[1]) / n, 4),
        cpu_s_per_chunk_by_thread={k: v for k, v in by_thread.items() if v > 0},
        process_cores_busy=round((b[1] - a[1]) / wall, 3) if wall > 0 else None,
    )
    if a[3] is not None and b[3] is not None and b[3][1] > a[3][1]:
        out["machine_busy_fraction"] = round((b[3][0] - a[3][0]) / (b[3][1] - a[3][1]), 3)
    return out


def _identity(rows: list[dict], shots: Path, probe, ref_id: np.ndarray, per_frame: int) -> None:
    """Each minute's mean identity distance to the reference from the frames saved in ``shots`` (then removed)."""
    from PIL import Image

    files = sorted(shots.glob("*.png"))
    for row in rows:
        lo, hi = (row["minute"] - 1) * per_frame, row["minute"] * per_frame
        mine = [f for f in files if lo <= int(f.stem) < hi]
        if mine:
            ids = probe.read(np.stack([np.asarray(Image.open(f).convert("RGB")) for f in mine]))["identity"]
            row["identity_distance"] = round(float(np.sqrt(((ids - ref_id[None]) ** 2).sum(1)).mean()), 4)
    shutil.rmtree(shots, ignore_errors=True)


def _summary(rows, pacing, health, frames, wall, warm) -> dict:
    from ..stream.pacing import percentiles

    rss = [r["rss_mib"] for r in rows]
    ids = [r["identity_distance"] for r in rows if r["identity_distance"] is not None]
    slope = float(np.polyfit(np.arange(len(ids)), ids, 1)[0]) if len(ids) > 2 else None
    return dict(
        frames=frames,
        wall_s=round(wall, 1),
        warm_up_s=round(warm, 2),
        rss_growth_after_first_minute_pct=round(100 * (rss[-1] - rss[0]) / rss[0], 2) if rss else None,
        identity_distance_first_last=[ids[0], ids[-1]] if ids else None,
        identity_distance_slope_per_minute=None if slope is None else round(slope, 5),
        **{f"{k}_frames" if k != "frozen_runs" else k: v for k, v in health.counts().items()},
        inter_frame_ms=percentiles(pacing.intervals),
        av_offset_ms=percentiles(np.abs(pacing.offsets)),
        late_frames=pacing.late,
        fps_delivered=pacing.summary()["fps_delivered"],  # releases a second from the first frame to the last
    )


def _plot(rows: list[dict], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    m = [r["minute"] for r in rows]
    fig, ax = plt.subplots(1, 3, figsize=(13, 3.2))
    ax[0].plot(m, [r["rss_mib"] for r in rows], "o-")
    ax[0].set_title("RSS (MiB)")
    ax[1].plot(m, [r["identity_distance"] for r in rows], "o-")
    ax[1].set_title("identity distance to the reference")
    ax[2].plot(m, [r["inter_frame_ms"]["p99"] for r in rows], "o-", label="inter-frame p99")
    ax[2].plot(m, [r["av_offset_ms"]["p99"] for r in rows], "o-", label="A/V offset p99")
    ax[2].axhline(60, color="k", ls="--", lw=1)
    ax[2].set_title("ms")
    ax[2].legend(fontsize=8)
    for a in ax:
        a.set_xlabel("minute")
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)


__all__ = ["PACE_DELAY", "FrameHealth", "push_live", "soak", "speech_loop"]
