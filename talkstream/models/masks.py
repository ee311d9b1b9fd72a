"""Attention visibility between frames (pure functions).

A frame-level boolean matrix ``visible[q, k]`` (True: queries of frame q may attend keys of frame k)
over ``[reference/sink frames | video frames]``. ``attention_groups`` turns it into runs of query
frames that share one visibility row, which is how the DiT executes it: one attention call per run,
each over exactly the keys that run may see (no wasted masked work, and the same arithmetic as the
KV-cache path).
"""

from __future__ import annotations

import torch


def full_mask(n_sink: int, n_frames: int) -> torch.Tensor:
    n = n_sink + n_frames
    return torch.ones(n, n, dtype=torch.bool, device="cpu")


def block_causal_mask(n_sink: int, n_frames: int, chunk: int, window: int | None = None) -> torch.Tensor:
    """Chunks of ``chunk`` frames see themselves, earlier chunks (the last ``window`` frames before their
    start, if given) and the sinks. Sinks see only sinks: they are clean anchors, never updated by the video."""
    if chunk <= 0:
        raise ValueError(f"chunk must be positive, got {chunk}")
    n = n_sink + n_frames
    m = torch.zeros(n, n, dtype=torch.bool, device="cpu")
    m[:n_sink, :n_sink] = True
    m[n_sink:, :n_sink] = True
    for start in range(0, n_frames, chunk):
        end = min(start + chunk, n_frames)
        lo = 0 if window is None else max(0, start - window)
        m[n_sink + start : n_sink + end, n_sink + lo : n_sink + end] = True
    return m


def attention_groups(visible: torch.Tensor) -> list[tuple[int, int, list[int]]]:
    """Consecutive query frames with identical rows: [(q_start, q_end, visible key frames), ...]."""
    groups: list[tuple[int, int, list[int]]] = []
    n = visible.shape[0]
    q = 0
    while q < n:
        e = q + 1
        while e < n and torch.equal(visible[e], visible[q]):
            e += 1
        groups.append((q, e, visible[q].nonzero().flatten().tolist()))
        q = e
    return groups
