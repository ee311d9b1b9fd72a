"""Real-face metrics (dlib) on images we can ship: scikit-image's astronaut photo, warped."""

import numpy as np
import pytest
from PIL import Image

skdata = pytest.importorskip("skimage.data")
real_face = pytest.importorskip("talkstream.eval.real_face")


@pytest.fixture(scope="module")
def analyzer():
    return real_face.FaceAnalyzer(upsample=1)


@pytest.fixture(scope="module")
def face():
    return np.ascontiguousarray(skdata.astronaut()[20:300, 90:350])  # the face, with margin


def _open_mouth(img, landmarks, amount):
    """Stretch the region below the upper lip downwards by ``amount`` pixels, darkening the gap."""
    f = img.copy()
    top = int(landmarks[62][1])
    x0, x1 = int(landmarks[48][0]) - 6, int(landmarks[54][0]) + 6
    h = 36
    if amount <= 0:
        return f
    region = Image.fromarray(np.ascontiguousarray(img[top : top + h, x0:x1]))
    stretched = np.asarray(region.resize((x1 - x0, h + amount), Image.BICUBIC)).copy()
    stretched[:amount] = (stretched[:amount] * 0.15).astype(np.uint8)
    f[top : top + h + amount, x0:x1] = stretched[: f.shape[0] - top]
    return f


def test_mouth_aspect_ratio_follows_the_mouth_and_the_audio(analyzer, face):
    base = analyzer.analyze(face)
    assert base is not None
    rng = np.random.default_rng(0)
    env = np.repeat(rng.integers(0, 2, 8), 3).astype(float)  # open/closed in blocks of 3 frames
    frames = np.stack([_open_mouth(face, base["landmarks"], int(10 * e)) for e in env])
    t = np.arange(len(env) * 640) / 16000
    audio = (np.repeat(env, 640) * np.sin(2 * np.pi * 220 * t)).astype(np.float32)
    res = real_face.evaluate_real(frames, audio, face, analyzer)
    assert res["face_found_fraction"] == 1.0 and res["same_person"]
    mars = [real_face.mouth_aspect_ratio(analyzer.analyze(f)["landmarks"]) for f in frames[:6]]
    opened = [m for m, e in zip(mars, env[:6]) if e]
    closed = [m for m, e in zip(mars, env[:6]) if not e]
    if opened and closed:
        assert np.mean(opened) > np.mean(closed) + 0.05
    assert res["mar_energy_correlation"] > 0.5


def test_identity_survives_warps(analyzer, face):
    warped = np.asarray(Image.fromarray(face).rotate(7, resample=Image.BICUBIC).resize((300, 320)))
    res = real_face.evaluate_real(warped[None].repeat(2, 0), None, face, analyzer)
    assert res["same_person"] and res["face_distance_mean"] < real_face.SAME_PERSON
    assert res["lip_sync"].startswith("not measurable")


def test_no_face_is_not_measurable(analyzer, face):
    cat = skdata.chelsea()
    res = real_face.evaluate_real(cat[None].repeat(2, 0), np.zeros(1280, np.float32), face, analyzer)
    assert res["face_found_fraction"] == 0 and res["identity"].startswith("not measurable")
    res = real_face.evaluate_real(face[None].repeat(2, 0), None, cat, analyzer)
    assert res["identity"].startswith("not measurable: no face in the reference")
