"""The embedded model streams without seams: at chunk boundaries the probe's pose / mouth readouts jump no
more than they do inside chunks (and than the ground truth moves)."""

import numpy as np
import pytest

from talkstream.eval.evaluate import seam_ratio
from talkstream.eval.probes import load_frame_probe
from talkstream.stream.avatar import WEIGHTS, Avatar

pytestmark = pytest.mark.skipif(
    not (WEIGHTS / "causal.safetensors.index.json").exists(), reason="the embedded causal model is not installed"
)


def test_no_seam_at_chunk_boundaries():
    """Averaged over three held-out clips: one clip's ratio swings by ~2x from clip to clip (measured on six clips:
    yaw 1.4-3.0x the inside jump, for two successive causal models alike)."""
    av = Avatar.from_pretrained(steps=4, decoder="tiny")
    probe = load_frame_probe()
    ratios = np.stack([seam_ratio(av, probe, seed) for seed in (900_005, 900_006, 900_007)])
    assert (ratios.mean(0) <= 1).all(), ratios
