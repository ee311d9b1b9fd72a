import json

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from talkstream.world.behaviour import STATES, make_clip
from talkstream.world.identity import Identity
from talkstream.world.render import STATE_FIELDS, FrameState, Renderer, mouth_center

F = {n: i for i, n in enumerate(STATE_FIELDS)}


def test_identity_round_trip_and_variety():
    ids = [Identity.sample(i) for i in range(200)]
    for idn in ids[:20]:
        assert Identity.from_dict(json.loads(idn.to_json())) == idn
    assert len({idn.to_json() for idn in ids}) == 200
    vecs = np.stack([i.vector() for i in ids])
    assert np.isfinite(vecs).all() and vecs.shape[1] > 30
    # discrete combinations alone: 8 hair x 3 glasses x 4 clothes x 5 backgrounds x 7 skin x 8 hair colours
    assert 8 * 3 * 4 * 5 * 7 * 8 > 10**4  # and every continuous parameter multiplies this past 10^6


@given(st.dictionaries(st.text(max_size=8), st.integers(), max_size=5))
@settings(max_examples=50, deadline=None)
def test_identity_from_bad_dict_is_a_clear_error(d):
    with pytest.raises(ValueError, match="not an identity"):
        Identity.from_dict(d)


def test_render_deterministic_any_size():
    idn = Identity.sample(3)
    a = Renderer(idn).render(FrameState(jaw_open=0.5))
    b = Renderer(idn).render(FrameState(jaw_open=0.5))
    assert a.shape == (256, 256, 3) and a.dtype == np.uint8 and np.array_equal(a, b)
    assert Renderer(idn, (96, 160)).render().shape == (160, 96, 3)
    with pytest.raises(ValueError):
        Renderer(idn, 2)


def _region_change(a, b, box):
    y0, y1, x0, x1 = box
    return np.abs(a[y0:y1, x0:x1].astype(int) - b[y0:y1, x0:x1].astype(int)).mean()


def test_head_turn_blink_and_open_mouth_are_unmistakable():
    for seed in range(5):
        r = Renderer(Identity.sample(seed))
        rest = r.render(FrameState())
        mouth = r.render(FrameState(jaw_open=1.0, teeth=0.5))
        blink = r.render(FrameState(blink=1.0))
        turn = r.render(FrameState(yaw=25))
        # the mouth region changes a lot when the mouth opens; the eyes region when blinking
        assert _region_change(rest, mouth, (120, 160, 100, 156)) > 3
        assert _region_change(rest, blink, (85, 110, 80, 176)) > 4
        assert _region_change(rest, turn, (40, 200, 60, 196)) > 2.5
        # each change is local: the others do not move
        assert _region_change(rest, mouth, (85, 110, 80, 176)) < 0.5
        assert _region_change(rest, blink, (120, 160, 100, 156)) < 0.5


def test_clip_truth_audio_and_captions():
    clip = make_clip(11, seconds=6.0)
    assert clip.states.shape == (150, len(STATE_FIELDS)) and clip.behaviour.shape == (150,)
    assert len(clip.audio) == 6 * 16000
    assert clip.segments[0].start == 0.0 and all(s.caption for s in clip.segments)
    assert set(np.unique(clip.behaviour)) <= set(range(len(STATES)))
    assert all(c for c in clip.captions_per_frame())
    # smooth head motion: no frame-to-frame jump beyond a few degrees
    assert np.abs(np.diff(clip.states[:, F["yaw"]])).max() < 3.0
    assert np.abs(clip.states[:, F["yaw"]]).max() < 40
    a, b = make_clip(11, 6.0), make_clip(12, 6.0)
    # the same seed gives the same clip (espeak-ng's timing may move by one 22 kHz sample: tolerance)
    assert np.allclose(a.states, clip.states, atol=5e-3) and np.array_equal(a.behaviour, clip.behaviour)
    assert not np.allclose(a.states, b.states, atol=5e-3)


def test_mouth_truth_correlates_with_audio_energy_over_100_clips():
    rs = []
    for seed in range(100):
        clip = make_clip(1000 + seed, seconds=6.0)
        hop = 16000 // 25
        e = np.sqrt(np.mean(clip.audio[: clip.n_frames * hop].reshape(clip.n_frames, hop) ** 2, axis=1))
        if e.std() > 0 and clip.states[:, F["jaw_open"]].std() > 0:
            rs.append(np.corrcoef(e, clip.states[:, F["jaw_open"]])[0, 1])
    assert len(rs) >= 80
    assert np.mean(rs) >= 0.6, np.mean(rs)


def test_zero_length_clip_is_rejected():
    with pytest.raises(ValueError):
        make_clip(0, seconds=0)


@pytest.mark.parametrize(
    "seed,pose", [(0, (0, 0, 0, 0, 0)), (1, (20, 8, 10, 0.05, -0.03)), (2, (-25, -6, -12, -0.05, 0.04))]
)
def test_mouth_center_is_where_the_mouth_is_drawn(seed, pose):
    """Only the lips change between two renders that differ in lip width: their changed pixels are centred
    on mouth_center (turned, tilted, shifted heads included)."""
    yaw, pitch, roll, tx, ty = pose
    idn = Identity.sample(seed)
    r = Renderer(idn, 256)
    s = dict(jaw_open=0.5, yaw=yaw, pitch=pitch, roll=roll, tx=tx, ty=ty)
    a = r.render(FrameState(lip_width=0.0, **s)).astype(float)
    b = r.render(FrameState(lip_width=1.0, **s)).astype(float)
    ys, xs = np.nonzero(np.abs(a - b).sum(-1) > 20)
    assert len(xs) > 50
    mx, my = mouth_center(idn, FrameState(**s))
    assert abs(xs.mean() - mx) < 2.5 and abs(ys.mean() - my) < 2.5
