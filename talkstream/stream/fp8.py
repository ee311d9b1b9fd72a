"""FP8 linears for the DiT's large matrix products on Hopper-class GPUs (``torch._scaled_mm``), swapped in place of
``nn.Linear`` without touching the model's code.

Weights are stored once as float8 e4m3 with a per-tensor scale; activations are scaled per tensor on the fly (their
absolute maximum, one reduction per call) and the product accumulates in fp32 and comes out in bf16. Only the
linears over video tokens are swapped (self-attention q/k/v/o, the caption cross-attention's q/o, the FFN); the
small embeddings and the audio/text key/value projections stay in bf16.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

E4M3_MAX = 448.0
SWAPPED = ("self_attn.q", "self_attn.k", "self_attn.v", "self_attn.o", "cross_attn.q", "cross_attn.o", "ffn.0", "ffn.2")


def fp8_supported(device: torch.device | str) -> bool:
    """``torch._scaled_mm`` with float8 needs a CUDA GPU of compute capability 8.9 or more (Ada, Hopper)."""
    dev = torch.device(device)
    return dev.type == "cuda" and torch.cuda.is_available() and torch.cuda.get_device_capability(dev) >= (8, 9)


class FP8Linear(nn.Module):
    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        w = linear.weight.detach().float()
        if w.shape[0] % 16 or w.shape[1] % 16:
            raise ValueError(f"FP8 linears need both sizes divisible by 16, got {tuple(w.shape)}")
        scale = w.abs().amax().clamp(min=1e-12) / E4M3_MAX
        self.register_buffer("weight_fp8", (w / scale).to(torch.float8_e4m3fn))  # [out, in], row-major
        self.register_buffer("weight_scale", scale.reshape(()))
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach().to(torch.bfloat16))
        self.in_features, self.out_features = linear.in_features, linear.out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        a = x.reshape(-1, shape[-1])
        pad = -a.shape[0] % 16
        if pad:
            a = F.pad(a, (0, 0, 0, pad))
        scale_a = a.abs().amax().float().clamp(min=1e-12) / E4M3_MAX
        a8 = (a.float() / scale_a).to(torch.float8_e4m3fn)
        y = torch._scaled_mm(
            a8,
            self.weight_fp8.t(),
            scale_a=scale_a,
            scale_b=self.weight_scale,
            bias=self.bias,
            out_dtype=torch.bfloat16,
        )
        if pad:
            y = y[: y.shape[0] - pad]
        return y.reshape(*shape[:-1], self.out_features).to(x.dtype)


def to_fp8(dit: nn.Module, names: tuple[str, ...] = SWAPPED) -> int:
    """Swap the linears of every block whose names end with one of ``names`` for ``FP8Linear``, in place; returns
    how many were swapped."""
    n = 0
    for block in dit.blocks:
        for name, module in list(block.named_modules()):
            if isinstance(module, nn.Linear) and any(name == s for s in names):
                parent_name, _, child = name.rpartition(".")
                parent = block.get_submodule(parent_name) if parent_name else block
                setattr(parent, child, FP8Linear(module))
                n += 1
    return n


__all__ = ["FP8Linear", "fp8_supported", "to_fp8"]
