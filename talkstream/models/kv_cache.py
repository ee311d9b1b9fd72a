"""The streaming KV cache: per layer, sink frames (reference / identity anchors) and a bounded window.

Keys are stored after q/k-norm but *before* RoPE: rotation happens when they are read, at positions
re-based for the current chunk (rolling RoPE), so the positions a stream uses never grow.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class KVCache:
    num_layers: int
    window: int  # most non-sink frames kept
    sink_k: list[torch.Tensor | None] = field(default_factory=list)  # per layer [B, n_sink, S, H, D]
    sink_v: list[torch.Tensor | None] = field(default_factory=list)
    k: list[torch.Tensor | None] = field(default_factory=list)  # per layer [B, n_ctx, S, H, D]
    v: list[torch.Tensor | None] = field(default_factory=list)
    frame_ids: list[int] = field(default_factory=list)  # absolute index of each cached context frame
    next_frame: int = 0  # absolute index of the next frame the stream will generate
    ref_tokens: torch.Tensor | None = None  # the reference's tokens added to every frame's (DiT ``ref_concat``)
    reference: torch.Tensor | None = None  # the clean reference latent (OmniAvatar layout: its input channels)
    sink_frames: int = 0  # the stream's first committed frames that become sinks (LiveTalk's Anchor-Heavy Identity
    # Sinks), before any frame enters the window
    sink_ids: list[int] = field(default_factory=list)  # absolute index of each such committed sink frame

    def __post_init__(self) -> None:
        if self.window < 0:
            raise ValueError(f"window must be >= 0, got {self.window}")
        for name in ("sink_k", "sink_v", "k", "v"):
            if not getattr(self, name):
                setattr(self, name, [None] * self.num_layers)

    @property
    def n_sink(self) -> int:
        return 0 if self.sink_k[0] is None else self.sink_k[0].shape[1]

    @property
    def n_context(self) -> int:
        return len(self.frame_ids)

    def set_sinks(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> None:
        self.sink_k[layer], self.sink_v[layer] = k, v

    def append(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> None:
        """Add one chunk's frames to a layer, dropping the oldest beyond the window (then call ``advance``)."""
        take = min(max(0, self.sink_frames - len(self.sink_ids)), k.shape[1])
        if take:  # the stream's first frames fill the sinks
            sk, sv = k[:, :take], v[:, :take]
            if self.sink_k[layer] is not None:
                sk, sv = torch.cat([self.sink_k[layer], sk], 1), torch.cat([self.sink_v[layer], sv], 1)
            self.sink_k[layer], self.sink_v[layer] = sk, sv
            k, v = k[:, take:], v[:, take:]
            if not k.shape[1]:
                return
        if self.k[layer] is not None:
            k, v = torch.cat([self.k[layer], k], 1), torch.cat([self.v[layer], v], 1)
        drop = max(0, k.shape[1] - self.window)
        self.k[layer], self.v[layer] = k[:, drop:], v[:, drop:]

    def advance(self, n_frames: int) -> None:
        take = min(max(0, self.sink_frames - len(self.sink_ids)), n_frames)
        self.sink_ids += list(range(self.next_frame, self.next_frame + take))
        first = self.next_frame + take
        ids = self.frame_ids + list(range(first, self.next_frame + n_frames))
        self.frame_ids = ids[max(0, len(ids) - self.window) :]
        self.next_frame += n_frames

    def clear_window(self) -> None:
        """Forget the context window (sinks stay); ``next_frame`` keeps counting."""
        self.k, self.v, self.frame_ids = [None] * self.num_layers, [None] * self.num_layers, []

    def sinks_only(self) -> KVCache:
        """A cache that shares this one's sinks and has an empty window (for repair passes)."""
        return KVCache(
            self.num_layers,
            self.window,
            list(self.sink_k),
            list(self.sink_v),
            next_frame=self.next_frame,
            ref_tokens=self.ref_tokens,
            reference=self.reference,
            sink_ids=list(self.sink_ids),
        )

    def context(self, layer: int) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """[sinks | window] keys and values of a layer (None if empty)."""
        ks = [t for t in (self.sink_k[layer], self.k[layer]) if t is not None and t.shape[1]]
        vs = [t for t in (self.sink_v[layer], self.v[layer]) if t is not None and t.shape[1]]
        if not ks:
            return None, None
        return (torch.cat(ks, 1), torch.cat(vs, 1)) if len(ks) > 1 else (ks[0], vs[0])

    def nbytes(self) -> int:
        return sum(
            t.numel() * t.element_size()
            for lst in (self.sink_k, self.sink_v, self.k, self.v)
            for t in lst
            if t is not None
        )
