"""A description of the machine a measurement ran on (every benchmark JSON carries one), and the one way a
script reports a measurement: printed, and written as JSON."""

from __future__ import annotations

import json
import os
import platform
from pathlib import Path


def describe() -> dict:
    info = dict(
        python=platform.python_version(),
        platform=platform.platform(),
        processor=platform.processor(),
        cpu_count=os.cpu_count(),
        affinity=len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
    )
    try:
        with open("/proc/cpuinfo") as f:
            names = [line.split(":", 1)[1].strip() for line in f if line.startswith("model name")]
        info["cpu_model"] = names[0] if names else None
    except OSError:
        pass
    try:
        import torch

        info["torch"] = torch.__version__
        info["torch_threads"] = torch.get_num_threads()
        if torch.cuda.is_available():
            p = torch.cuda.get_device_properties(0)
            info["gpu"] = dict(
                name=p.name,
                memory_gib=round(p.total_memory / 2**30, 1),
                multiprocessors=p.multi_processor_count,
                count=torch.cuda.device_count(),
                cuda=torch.version.cuda,
            )
    except ImportError:
        pass
    return info


def report(res: dict, out: str | os.PathLike | None = None, show: dict | None = None) -> dict:
    """Print ``show`` (default: ``res``) as JSON and write ``res`` to ``out`` (parents made; None: print only)."""
    print(json.dumps(res if show is None else show, indent=2, default=str))
    if out is not None:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(json.dumps(res, indent=2, default=str))
    return res


def check_device(device: str) -> str:
    """``device`` if this machine can run on it; otherwise a one-line ``ValueError`` saying what it lacks (asked for
    ``cuda`` on a machine without a CUDA GPU, torch itself fails with a bare ``AssertionError``)."""
    import torch

    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise ValueError(f"--device {device!r}: not a device name (cpu, cuda, cuda:1, mps)") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            why = "this torch build has no CUDA support" if torch.version.cuda is None else "no CUDA GPU is visible"
            raise ValueError(f"--device {device}: {why} on this machine (use --device cpu)")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ValueError(f"--device {device}: this machine has {torch.cuda.device_count()} CUDA GPU(s)")
    elif dev.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"--device {device}: Apple's MPS is not available on this machine (use --device cpu)")
    elif dev.type not in ("cpu", "cuda", "mps"):
        raise ValueError(f"--device {device}: talkstream runs on cpu, cuda or mps")
    return device
