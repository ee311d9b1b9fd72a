"""3D rotary position embedding as in Wan2.1 (pure functions).

The head dimension is split into time / height / width parts (``h = w = 2 * (head_dim // 6)``, time
takes the rest); each part rotates interleaved channel pairs by ``position * theta^(-2i/d)``. Angles
are computed in float64 so large positions stay exact enough.
"""

from __future__ import annotations

import torch


def rope_split(head_dim: int) -> tuple[int, int, int]:
    hw = 2 * (head_dim // 6)
    return head_dim - 2 * hw, hw, hw


def _angles(pos: torch.Tensor, dim: int, theta: float) -> torch.Tensor:
    inv = theta ** (-torch.arange(0, dim, 2, dtype=torch.float64, device=pos.device) / dim)
    return pos.to(torch.float64)[:, None] * inv[None, :]  # [N, dim / 2]


def rope_cos_sin(
    frame_pos: torch.Tensor,
    height: int,
    width: int,
    head_dim: int,
    theta: float = 10000.0,
    dtype: torch.dtype = torch.float32,
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin, each [len(frame_pos) * height * width, head_dim], tokens ordered frame, row, column."""
    dt, dh, dw = rope_split(head_dim)
    dev = frame_pos.device
    at = _angles(frame_pos, dt, theta)  # [F, dt/2]
    ah = _angles(torch.arange(height, device=dev), dh, theta)
    aw = _angles(torch.arange(width, device=dev), dw, theta)
    F = len(frame_pos)
    ang = torch.cat(
        [
            at[:, None, None, :].expand(F, height, width, -1),
            ah[None, :, None, :].expand(F, height, width, -1),
            aw[None, None, :, :].expand(F, height, width, -1),
        ],
        dim=-1,
    ).reshape(F * height * width, -1)
    ang = ang.repeat_interleave(2, dim=-1)  # interleaved pairs
    return ang.cos().to(dtype), ang.sin().to(dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate x [B, L, H, D] by per-token cos/sin [L, D] (interleaved channel pairs)."""
    x1, x2 = x.unflatten(-1, (-1, 2)).unbind(-1)
    rot = torch.stack((-x2, x1), dim=-1).flatten(-2)
    c, s = cos[None, :, None, :].to(x.dtype), sin[None, :, None, :].to(x.dtype)
    return x * c + rot * s


def rolling_frame_positions(n_sink: int, n_context: int, n_query: int) -> torch.Tensor:
    """Temporal positions for [sinks | context window | query chunk]: sinks first, then consecutive frames.

    Rolling RoPE: positions are re-based on every chunk, so however long a stream runs the largest
    position is ``n_sink + window + chunk - 1`` and the sink always sits just before the context.
    """
    return torch.arange(n_sink + n_context + n_query)
