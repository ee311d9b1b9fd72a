"""The streaming path's threads on a CPU: the names the operating system shows, per-thread CPU accounting, and the
decode worker's priority.

On two cores a live stream runs the denoiser (the producer thread + one OpenMP worker), the decoder (a worker thread
+ its own OpenMP worker), Whisper (CTranslate2's threads, with their own OpenMP runtime) and the pacing threads.

- **names** (``name_thread``, ``thread_named``): the threads and the OpenMP workers they start (which inherit the
  name) show as ts-producer / ts-decode / ts-prefetch in ``top -H`` and ``/proc/<pid>/task/*/comm``;
  ``thread_cpu_seconds`` sums CPU time by that name (the soak's CPU a chunk, per stage).
- **the decode worker's priority** (``lower_thread_priority``, ``StreamConfig.decode_nice``): a nicer decode thread
  (its OpenMP workers inherit the nice value when they start) leaves the cores to the denoiser. Measured on 2 cores
  it did not raise the live stream's rate and doubled a chunk's decode time, so it is off by default
  (docs/speed.md). OpenMP's spin-wait (``GOMP_SPINCOUNT``, read when the runtime loads) was measured the same way:
  no difference beyond this machine's drift, so nothing sets it.
"""

from __future__ import annotations

import ctypes
import os
import threading
from collections.abc import Iterator
from contextlib import contextmanager

_PR_SET_NAME = 15


def name_thread(name: str, os_name: str | None = None) -> None:
    """Name the calling thread, for Python and for the operating system (``os_name``, default ``name``; Linux: 15
    characters)."""
    threading.current_thread().name = name
    try:
        ctypes.CDLL(None).prctl(_PR_SET_NAME, (os_name or name)[:15].encode(), 0, 0, 0)
    except (OSError, AttributeError):
        pass


@contextmanager
def thread_named(name: str) -> Iterator[None]:
    """The calling thread named ``name`` inside the block (threads it starts meanwhile keep the name), its own
    names back after it."""
    before = threading.current_thread().name
    try:
        with open(f"/proc/self/task/{threading.get_native_id()}/comm") as f:
            os_before = f.read().strip()
    except OSError:
        os_before = before
    name_thread(name)
    try:
        yield
    finally:
        name_thread(before, os_before)


def lower_thread_priority(by: int) -> int:
    """Make the calling thread ``by`` nicer (Linux: each thread has its own nice value, and threads it starts later,
    such as its OpenMP workers, inherit it); returns the thread's nice value (0 where threads have none)."""
    if by <= 0 or not hasattr(os, "setpriority"):
        return 0
    tid = threading.get_native_id()
    try:
        os.setpriority(os.PRIO_PROCESS, tid, min(19, os.getpriority(os.PRIO_PROCESS, tid) + by))
        return os.getpriority(os.PRIO_PROCESS, tid)
    except OSError:
        return 0


def thread_cpu_seconds(seen: dict[int, tuple[str, float]] | None = None) -> dict[str, float]:
    """CPU seconds (user + system) of this process's threads, summed by thread name (Linux ``/proc``; empty
    elsewhere). ``seen``: a dict kept between calls so that threads that have ended since still count (each call
    updates it with the living threads)."""
    seen = {} if seen is None else seen
    tick = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
    try:
        tids = os.listdir("/proc/self/task")
    except OSError:
        return {}
    for tid in tids:
        try:
            with open(f"/proc/self/task/{tid}/stat") as f:
                stat = f.read()
        except OSError:  # ended meanwhile
            continue
        name = stat[stat.index("(") + 1 : stat.rindex(")")]
        fields = stat[stat.rindex(")") + 2 :].split()
        seen[int(tid)] = (name, (int(fields[11]) + int(fields[12])) / tick)
    out: dict[str, float] = {}
    for name, cpu in seen.values():
        out[name] = out.get(name, 0.0) + cpu
    return out


__all__ = [
    "lower_thread_priority",
    "name_thread",
    "thread_cpu_seconds",
    "thread_named",
]
