"""The streaming path's threads on a CPU: names the operating system shows, the decode worker's priority, and the
OpenMP runtime's spin-wait.

On two cores a live stream runs the denoiser (its thread + one OpenMP worker), the decoder (a worker thread + its
own OpenMP worker), Whisper (CTranslate2's threads, its own OpenMP runtime) and the pacing threads. Each OpenMP team
belongs to the thread that started it, so up to three teams share two cores:

- **spin-wait** (``GOMP_SPINCOUNT``): after each parallel region GNU OpenMP's workers spin for up to 300,000 pause
  instructions (several ms on these cores) before they sleep; a team spinning between the denoiser's thousands of
  small regions keeps a core from the other teams. ``omp_environment`` sets 10,000 (~0.25 ms), measured faster for
  the live path on 2 cores (docs/speed.md). It is read when the runtime loads, so it must be in the environment
  before ``torch`` is imported (the command line does it first); a value the user set is kept.
- **the decode worker's priority** (``lower_thread_priority``): the denoiser is the stream's critical path (the next
  chunk waits for it) while a chunk's decode has until the next chunk is denoised; a nicer decode thread (its
  OpenMP workers inherit the nice value when they start) takes the cores when the denoiser leaves them (Whisper,
  Python between kernels, waits for audio) instead of splitting every parallel region with it.
- **names** (``name_thread``): the threads and the OpenMP workers they start carry the name in ``top -H`` and
  ``/proc/<pid>/task/*/comm``; ``thread_cpu_seconds`` sums CPU time by that name (the soak's per-stage CPU).
"""

from __future__ import annotations

import ctypes
import os
import threading
from collections.abc import Iterator, MutableMapping
from contextlib import contextmanager

OMP_SPINCOUNT = "10000"  # GNU OpenMP spin-wait iterations before a waiting worker sleeps (its default: 300,000)
_PR_SET_NAME = 15


def omp_environment(environ: MutableMapping[str, str] | None = None) -> dict[str, str]:
    """Put the OpenMP settings of the streaming path into ``environ`` (default ``os.environ``) unless already set;
    returns what is in effect. Only a runtime loaded afterwards reads them (call before ``import torch``)."""
    env = os.environ if environ is None else environ
    env.setdefault("GOMP_SPINCOUNT", OMP_SPINCOUNT)
    return {"GOMP_SPINCOUNT": env["GOMP_SPINCOUNT"]}


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
    "OMP_SPINCOUNT",
    "lower_thread_priority",
    "name_thread",
    "omp_environment",
    "thread_cpu_seconds",
    "thread_named",
]
