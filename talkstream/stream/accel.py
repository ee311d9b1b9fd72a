"""Speed settings of the streaming path that do not change the model's code: the compute dtype a device runs
fastest (bf16 where the CPU has bf16 dot-product instructions, fp32 elsewhere), the CPU thread count, and the
optional ``torch.compile`` of the DiT's dense parts.

bf16 on CPU: with AVX512-BF16 or AMX the matrix products run in bf16 at several times fp32's rate (the DiT's
norms, modulation and softmax stay in fp32 inside the model); without those instructions bf16 is emulated and
slower than fp32, so ``stream_dtype`` answers fp32 there.
"""

from __future__ import annotations

import os
import types
from functools import lru_cache

import torch

DTYPES = {"auto": None, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "fp32": torch.float32}
DTYPES["float32"] = torch.float32
BF16_FLAGS = ("avx512_bf16", "amx_bf16")  # /proc/cpuinfo flags of native bf16 dot products


@lru_cache(maxsize=1)
def cpu_flags() -> frozenset[str]:
    """The CPU's feature flags (Linux /proc/cpuinfo; empty elsewhere)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


def cpu_has_bf16(flags: frozenset[str] | None = None) -> bool:
    """True when the CPU computes bf16 dot products natively (AVX512-BF16 or AMX) and oneDNN will use them."""
    flags = cpu_flags() if flags is None else flags
    if not any(f in flags for f in BF16_FLAGS):
        return False
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def stream_dtype(device: str = "cpu", dtype: str | torch.dtype = "auto") -> torch.dtype:
    """The dtype a stream runs in: ``dtype`` if given ("bf16" / "fp32" / a torch dtype), else bf16 on CUDA and on
    CPUs with native bf16 (``cpu_has_bf16``), fp32 on other CPUs."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; choose one of {sorted(DTYPES)}")
    if DTYPES[dtype] is not None:
        return DTYPES[dtype]
    if str(device).startswith("cuda"):
        return torch.bfloat16
    return torch.bfloat16 if cpu_has_bf16() else torch.float32


def physical_cores() -> int:
    """CPUs this process may run on (its affinity mask; the whole machine where that is unknown)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def set_threads(n: int | None = None) -> int:
    """Intra-op threads for torch on CPU: ``n`` or every CPU this process may use. Returns the count set."""
    n = physical_cores() if n is None else int(n)
    if n < 1:
        raise ValueError(f"threads must be >= 1, got {n}")
    torch.set_num_threads(n)
    return n


def compile_dit(dit, dynamic: bool = False) -> None:
    """``torch.compile`` (inductor) the dense parts around attention of every block, in place (attention stays on
    SDPA). One compiled function per part serves every block (their parameters are its inputs), so a shape compiles
    once, not once per block. The first call of each new shape compiles (seconds to minutes): warm up first."""
    torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 64)
    kind = type(dit.blocks[0])
    pre = torch.compile(kind.pre_attention, dynamic=dynamic)
    post = torch.compile(kind.post_attention, dynamic=dynamic)
    for block in dit.blocks:
        block.pre_attention = types.MethodType(pre, block)
        block.post_attention = types.MethodType(post, block)


__all__ = ["cpu_flags", "cpu_has_bf16", "compile_dit", "physical_cores", "set_threads", "stream_dtype"]
