"""The embedded model streams without seams: at chunk boundaries the probe's pose / mouth readouts jump no
more than they do inside chunks (and than the ground truth moves)."""

import numpy as np
import pytest
import torch

from talkstream.eval.probes import load_frame_probe
from talkstream.stream.avatar import WEIGHTS, Avatar
from talkstream.world.behaviour import make_clip
from talkstream.world.render import render_states

pytestmark = pytest.mark.skipif(not (WEIGHTS / "causal.safetensors.index.json").exists(),
                                reason="the embedded causal model is not installed")


def _seam_ratio(av: Avatar, probe, seed: int) -> np.ndarray:
    """Mean probe-readout jump at chunk boundaries / its limit (2.5x the mean jump inside chunks, or the
    largest frame-to-frame move of the truth), for jaw open, yaw and pitch."""
    torch.manual_seed(0)
    clip = make_clip(seed, 3.0)
    truth = np.stack(list(render_states(clip.identity, clip.states, 256)))
    frames = np.stack([f.image for f in av.stream(truth[0], [clip.audio])])[: clip.n_frames]
    assert len(frames) >= 60 and frames.std() > 5  # no blank output
    cols = [0, 5, 6]  # jaw open, yaw, pitch (world state fields)
    jumps = np.abs(np.diff(probe.read(frames)["states"][:, cols], axis=0))  # jumps[i]: frame i -> i + 1
    first = 1 + 4 * (av.cfg.chunk - 1)  # frames in the first chunk, then 4 * chunk per chunk
    boundary = np.arange(first, len(frames), 4 * av.cfg.chunk) - 1
    inside = np.setdiff1d(np.arange(len(jumps)), boundary)
    truth_jump = np.abs(np.diff(clip.states[: len(frames)][:, cols], axis=0)).max(0)
    return jumps[boundary].mean(0) / np.maximum(2.5 * jumps[inside].mean(0), truth_jump)


def test_no_seam_at_chunk_boundaries():
    """Averaged over three held-out clips: one clip's ratio swings by ~2x from clip to clip (measured in session 6:
    yaw 1.4-3.0x the inside jump over six clips, for the session-4 and session-6 models alike)."""
    av = Avatar.from_pretrained(steps=4, decoder="tiny")
    probe = load_frame_probe()
    ratios = np.stack([_seam_ratio(av, probe, seed) for seed in (900_005, 900_006, 900_007)])
    assert (ratios.mean(0) <= 1).all(), ratios
