"""The out-of-domain guard: world renders pass, real portraits / photos / other drawings / no-face images warn, and
`talkstream generate` stops on them unless --force; published weights are refused on a CPU with a clear message."""

import numpy as np
import pytest
from PIL import Image

from talkstream.cli import BUNDLED_REFERENCE, main
from talkstream.eval.guard import (
    HELD_OUT_SEED,
    OODGuard,
    OutOfDomainError,
    guard_reference,
    mahalanobis,
    other_images,
    shrunk_precision,
    world_references,
)


@pytest.fixture(scope="module")
def guard():
    return OODGuard.load()


def test_mahalanobis_is_euclidean_under_identity_and_shrinkage_inverts_rank_deficient_data():
    x = np.array([[3.0, 4.0], [0.0, 0.0]])
    assert np.allclose(mahalanobis(x, np.zeros(2), np.eye(2)), [5.0, 0.0])
    f = np.random.default_rng(0).normal(size=(5, 20))  # 5 samples in 20 dimensions: a singular covariance
    mean, precision = shrunk_precision(f)
    assert np.isfinite(precision).all() and np.allclose(mean, f.mean(0))


def test_world_renders_pass(guard):
    """Renders of a seed neither the fit nor the calibration used (as PNG, JPEG and resized copies)."""
    refs = world_references(12, HELD_OUT_SEED + 1)
    scores = guard.scores(refs)
    assert (scores <= guard.threshold).all(), scores.max()
    assert guard.check(BUNDLED_REFERENCE).in_domain  # make demo's own reference


def test_real_portraits_photos_drawings_and_noise_warn(guard):
    imgs = other_images()
    names = ["portrait/astronaut", *[f"portrait/lfw_{i:03d}" for i in range(0, 100, 20)]]
    names += ["photo/camera", "photo/coffee", "drawing/smiley", "drawing/logo", "noise/uniform"]
    scores = guard.scores(np.stack([imgs[n] for n in names]))
    assert (scores > guard.threshold).all(), dict(zip(names, scores.round(1)))


def test_guard_reference_warns_then_refuses_unless_forced(guard, tmp_path, capsys):
    import skimage.data

    photo = tmp_path / "astronaut.png"
    Image.fromarray(skimage.data.astronaut()).save(photo)
    with pytest.raises(OutOfDomainError, match="pass --force"):
        guard_reference(photo, guard=guard)
    assert "does not look like the synthetic avatars" in capsys.readouterr().err
    res = guard_reference(photo, force=True, guard=guard)
    assert not res.in_domain and "--weights DIR" in capsys.readouterr().err
    assert guard_reference(BUNDLED_REFERENCE, guard=guard).in_domain and capsys.readouterr().err == ""


def test_generate_stops_before_any_work_on_a_photo(tmp_path, capsys):
    import skimage.data

    photo = tmp_path / "astronaut.jpg"
    Image.fromarray(skimage.data.astronaut()).save(photo, quality=90)
    out = tmp_path / "out.mp4"
    rc = main(["generate", "--image", str(photo), "--say", "hello", "--out", str(out), "--quiet"])
    err = capsys.readouterr().err
    assert rc == 2 and not out.exists()
    assert "talkstream: warning:" in err and "--force" in err and "docs/real-weights.md" in err


def test_generate_with_published_weights_names_missing_files_and_refuses_a_cpu(tmp_path, capsys):
    out = tmp_path / "out.mp4"
    args = ["generate", "--image", str(BUNDLED_REFERENCE), "--audio", "x.wav", "--out", str(out)]
    assert main([*args, "--weights", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "LiveTalk-1.3B-V0.1/model.safetensors" in err and "wav2vec2-base-960h" in err
    for name in ("LiveTalk-1.3B-V0.1/model.safetensors", "Wan2.1-T2V-1.3B/Wan2.1_VAE.pth", "wav2vec2-base-960h/c"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(b"x")
    assert main([*args, "--weights", str(tmp_path), "--device", "cpu"]) == 2
    assert "needs a GPU" in capsys.readouterr().err and not out.exists()


def test_guard_file_keeps_the_precision_upper_triangle_in_fp16(tmp_path):
    import torch
    from safetensors.torch import load_file

    from talkstream.eval.guard import GUARD_FILE, _precision, save_guard

    f = np.random.default_rng(1).normal(size=(40, 6))
    mean, precision = shrunk_precision(f)
    save_guard(tmp_path / "g.safetensors", mean, precision, 3.5, 40)
    t = load_file(str(tmp_path / "g.safetensors"))
    assert set(t) == {"mean", "precision_upper", "threshold"} and t["precision_upper"].dtype == torch.float16
    assert t["precision_upper"].shape == (21,) and float(t["threshold"]) == 3.5
    back = _precision(t)
    assert np.array_equal(back, back.T) and np.allclose(back, precision, rtol=1e-3, atol=1e-4)
    g = OODGuard.load(tmp_path / "g.safetensors", probe=OODGuard.load().probe)
    assert np.allclose(mahalanobis(f, g.mean, g.precision), mahalanobis(f, mean, precision), rtol=1e-3)
    assert GUARD_FILE.stat().st_size < 1.1e6  # the shipped file: 1 MB (4.2 MB as a whole fp32 matrix)
