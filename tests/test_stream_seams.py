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


def test_no_seam_at_chunk_boundaries():
    torch.manual_seed(0)
    clip = make_clip(900_005, 3.0)
    truth = np.stack(list(render_states(clip.identity, clip.states, 256)))
    av = Avatar.from_pretrained(steps=4, decoder="tiny")
    frames = np.stack([f.image for f in av.stream(truth[0], [clip.audio])])[: clip.n_frames]
    assert len(frames) >= 60 and frames.std() > 5  # no blank output
    probe = load_frame_probe()
    cols = [0, 5, 6]  # jaw open, yaw, pitch (world state fields)
    read = probe.read(frames)["states"][:, cols]
    jumps = np.abs(np.diff(read, axis=0))  # jumps[i]: frame i -> i + 1
    first = 1 + 4 * (av.cfg.chunk - 1)  # frames in the first chunk, then 4 * chunk per chunk
    boundary = np.arange(first, len(frames), 4 * av.cfg.chunk) - 1
    inside = np.setdiff1d(np.arange(len(jumps)), boundary)
    truth_jump = np.abs(np.diff(clip.states[: len(frames)][:, cols], axis=0)).max(0)
    limit = np.maximum(2.5 * jumps[inside].mean(0), truth_jump)
    assert (jumps[boundary].mean(0) <= limit).all(), (jumps[boundary].mean(0), jumps[inside].mean(0), truth_jump)
