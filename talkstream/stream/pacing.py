"""Wall-clock pacing of a frame stream: frame ``i`` is released at ``t0 + i / fps`` (``t0``: when the first frame
is ready, plus an optional playout ``delay``), never earlier, so a viewer sees 25 frames a second however bursty
the generator is (a chunk's 12 frames arrive together). A frame that is ready after its slot is released at once
and counted late; the clock is not reset, so the audio-video offset of a generator that falls behind grows and is
measured instead of hidden.

``PacingStats`` records, per released frame, the interval since the previous release and the offset of its release
from the audio clock (an audio track started with the first frame and played at ``fps``): their percentiles are
what a player would show (jitter, lip lag).
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import TypeVar

import numpy as np

from .threads import name_thread

T = TypeVar("T")


def percentiles(values, qs=(50, 95, 99)) -> dict:
    """{"p50": .., "p95": .., "p99": .., "max": ..} of ``values`` in milliseconds (seconds in), None when empty."""
    v = np.asarray(list(values), np.float64)
    if len(v) == 0:
        return {f"p{q}": None for q in qs} | {"max": None}
    return {f"p{q}": round(1000 * float(np.percentile(v, q)), 2) for q in qs} | {"max": round(1000 * v.max(), 2)}


@dataclass
class PacingStats:
    fps: float = 25.0
    released: list[float] = field(default_factory=list)  # wall time of each release
    offsets: list[float] = field(default_factory=list)  # release time - the frame's slot on the audio clock
    late: int = 0  # frames ready after their slot

    @property
    def intervals(self) -> np.ndarray:
        return np.diff(np.asarray(self.released, np.float64))

    def summary(self) -> dict:
        """Inter-frame interval and audio-video offset percentiles (ms), late frames, the delivered frame rate."""
        span = self.released[-1] - self.released[0] if len(self.released) > 1 else 0.0
        return dict(
            frames=len(self.released),
            fps_target=self.fps,
            fps_delivered=round((len(self.released) - 1) / span, 3) if span > 0 else None,
            inter_frame_ms=percentiles(self.intervals),
            av_offset_ms=percentiles(np.abs(np.asarray(self.offsets, np.float64))),
            late_frames=self.late,
        )


def paced(
    frames: Iterable[T],
    fps: float = 25.0,
    delay: float = 0.0,
    stats: PacingStats | None = None,
    clock: Callable[[], float] = time.perf_counter,
    sleep: Callable[[float], None] = time.sleep,
) -> Iterator[T]:
    """Yield ``frames`` no faster than ``fps`` on the wall clock: frame ``i`` at ``t0 + delay + i / fps`` where ``t0``
    is when frame 0 is ready (``delay``: a playout buffer that absorbs a slow chunk). ``stats`` collects the
    intervals and offsets actually delivered."""
    if fps <= 0:
        raise ValueError(f"fps must be > 0, got {fps}")
    if delay < 0:
        raise ValueError(f"delay must be >= 0, got {delay}")
    stats = stats if stats is not None else PacingStats(fps)
    t0 = None
    for i, frame in enumerate(frames):
        now = clock()
        if t0 is None:
            t0 = now + delay
        slot = t0 + i / fps
        if now < slot:
            sleep(slot - now)
            now = clock()
        else:
            stats.late += now > slot + 1e-3  # (1 ms of grace: a sleep's own overshoot is not lateness)
        stats.released.append(now)
        stats.offsets.append(now - slot)
        yield frame


def prefetch(items: Iterable[T], max_ahead: int = 48) -> Iterator[T]:
    """Run ``items`` on a worker thread, at most ``max_ahead`` items ahead of the consumer: a paced consumer sleeps
    while the next chunk is made instead of making it only after its sleep. An exception in ``items`` is raised in
    the consumer; a consumer that stops early stops the worker at its next item."""
    if max_ahead < 1:
        raise ValueError(f"max_ahead must be >= 1, got {max_ahead}")
    q: queue.Queue = queue.Queue(max_ahead)
    stop = threading.Event()
    done = object()

    def work() -> None:
        name_thread("ts-prefetch")
        try:
            for item in items:
                while not stop.is_set():
                    try:
                        q.put((item, None), timeout=0.1)
                        break
                    except queue.Full:
                        continue
                if stop.is_set():
                    return
            q.put((done, None))
        except BaseException as e:  # handed to the consumer
            q.put((done, e))

    worker = threading.Thread(target=work, name="ts-prefetch", daemon=True)
    worker.start()
    try:
        while True:
            item, error = q.get()
            if item is done:
                if error is not None:
                    raise error
                return
            yield item
    finally:
        stop.set()
        worker.join()


__all__ = ["PacingStats", "paced", "percentiles", "prefetch"]
