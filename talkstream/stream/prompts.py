"""A text prompt that changes over a clip: encoded captions and which one holds at each video frame.

A conversation is a plan of behaviours (speaking, listening, idling, thinking), each with its caption; the models
are trained that way (each training window carries the caption of its middle latent frame). A ``PromptTrack``
gives a sampler the caption of the latent frames it is about to make, chosen by the same rule.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np
import torch


@dataclass(frozen=True)
class PromptTrack:
    text: torch.Tensor  # [n_captions, L, D] encoded captions
    mask: torch.Tensor | None  # [n_captions, L] their token masks
    of_frame: np.ndarray  # [n_frames] int: the caption of each video frame
    temporal_factor: int = 4  # video frames per latent frame (latent j is video frame 4 j, as in training)

    def __post_init__(self) -> None:
        of_frame = np.asarray(self.of_frame)
        if of_frame.ndim != 1 or len(of_frame) == 0:
            raise ValueError(f"a prompt track needs a caption index per video frame, got shape {of_frame.shape}")
        if of_frame.min() < 0 or of_frame.max() >= len(self.text):
            raise ValueError(
                f"caption indices must lie in [0, {len(self.text)}), got {of_frame.min()}..{of_frame.max()}"
            )
        if self.mask is not None and self.mask.shape[:2] != self.text.shape[:2]:
            raise ValueError(f"mask {tuple(self.mask.shape)} does not match captions {tuple(self.text.shape)}")

    def to(self, device=None, dtype: torch.dtype | None = None) -> PromptTrack:
        """The same track with its encoded captions on ``device`` / in ``dtype`` (masks follow the device)."""
        return replace(self, text=self.text.to(device, dtype), mask=None if self.mask is None else self.mask.to(device))

    @staticmethod
    def from_captions(captions: list[str], encode) -> PromptTrack:
        """Per-frame captions + ``encode(list[str]) -> (emb [n, L, D], mask [n, L])`` (``TextEncoder.encode``)."""
        if not captions:
            raise ValueError("a prompt track needs at least one frame's caption")
        unique = list(dict.fromkeys(captions))
        text, mask = encode(unique)
        index = {c: i for i, c in enumerate(unique)}
        return PromptTrack(text, mask, np.array([index[c] for c in captions], np.int64))

    def index_for(self, first: int, count: int) -> int:
        """The caption index of latent frames ``first .. first + count - 1``: that of their middle one."""
        frame = min((first + count // 2) * self.temporal_factor, len(self.of_frame) - 1)
        return int(self.of_frame[frame])

    def for_latents(self, first: int, count: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(text [1, L, D], mask [1, L] or None) for latent frames ``first .. first + count - 1``."""
        i = self.index_for(first, count)
        return self.text[i : i + 1], None if self.mask is None else self.mask[i : i + 1]


__all__ = ["PromptTrack"]
