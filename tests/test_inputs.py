"""Inputs a new user hands the Avatar API: images of other depths are converted, what cannot be is a one-line error."""

import numpy as np
import pytest
from PIL import Image

from talkstream.media import MediaError, atomic_path, write_audio
from talkstream.stream.avatar import image_to_uint8, load_reference


def _face(size=64):
    y, x = np.mgrid[:size, :size]
    face = (x - size / 2) ** 2 + (y - size / 2) ** 2 < (size / 3) ** 2
    return np.where(face[..., None], (0.8, 0.6, 0.5), (0.1, 0.5, 0.2))  # floats in [0, 1]


def test_16bit_grayscale_png_is_scaled_not_clipped(tmp_path):
    grey = (_face().mean(2) * 65535).astype(np.uint16)
    Image.fromarray(grey).save(tmp_path / "g16.png")
    assert Image.open(tmp_path / "g16.png").mode.startswith("I")  # a true 16-bit file
    out = load_reference(tmp_path / "g16.png", 32)
    assert out.shape == (32, 32, 3) and out.dtype == np.uint8
    expect = np.asarray(Image.fromarray((grey / 257).round().astype(np.uint8)).resize((32, 32), Image.LANCZOS))
    assert np.abs(out[..., 0].astype(int) - expect).max() <= 2  # the face, not a white (clipped) square


@pytest.mark.parametrize("kind", ["float01", "float255", "uint16", "grey_float", "grey_hw1"])
def test_arrays_of_other_depths_are_converted(kind):
    face = _face()
    arr = {
        "float01": face.astype(np.float32),
        "float255": face * 255.0,
        "uint16": (face * 65535).astype(np.uint16),
        "grey_float": face.mean(2),
        "grey_hw1": face.mean(2, keepdims=True),
    }[kind]
    out = load_reference(arr, 32)
    ref = load_reference((face * 255).round().astype(np.uint8), 32)
    if kind.startswith("grey"):
        ref = load_reference((face.mean(2) * 255).round().astype(np.uint8), 32)
    assert out.shape == (32, 32, 3) and np.abs(out.astype(int) - ref).max() <= 2  # rounding of the depths


def test_image_to_uint8_values():
    assert image_to_uint8(np.array([0.0, 0.5, 1.0])).tolist() == [0, 128, 255]
    assert image_to_uint8(np.array([0, 257, 65535], np.uint16)).tolist() == [0, 1, 255]
    assert image_to_uint8(np.array([True, False])).tolist() == [255, 0]
    assert image_to_uint8(np.array([3, 200], np.int64)).tolist() == [3, 200]


@pytest.mark.parametrize(
    "arr,match",
    [
        (np.full((32, 32, 3), np.nan, np.float32), "NaN"),
        (np.full((32, 32, 3), -0.5), "negative"),
        (np.full((32, 32, 3), 300.0), "expected \\[0, 1\\] or \\[0, 255\\]"),
        (np.full((32, 32, 3), 1 << 20, np.int64), "8- or 16-bit"),
        (np.zeros((32, 32, 3), np.float32), "flat colour"),
        (np.zeros((4, 32, 32, 3)), "must be"),
    ],
)
def test_unconvertible_arrays_are_one_line_errors(arr, match):
    with pytest.raises(MediaError, match=match) as e:
        load_reference(arr, 32)
    assert "\n" not in str(e.value)


def test_directory_as_image_says_so(tmp_path):
    with pytest.raises(MediaError, match="is a directory, not an image file"):
        load_reference(tmp_path, 32)


def test_writing_to_a_directory_says_so_and_leaves_nothing(tmp_path):
    (tmp_path / "out.wav").mkdir()
    with pytest.raises(MediaError, match="out.wav: is a directory") as e:
        write_audio(tmp_path / "out.wav", np.zeros(1600, np.float32))
    assert ".tmp" not in str(e.value)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.wav"]  # no temporary left behind
    with pytest.raises(MediaError, match="is a directory"), atomic_path(tmp_path):
        pass
