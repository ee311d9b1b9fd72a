"""The command line as a new user meets it: `python -m talkstream`, the bundled reference, and one-line errors for
a device the machine lacks and an --out that names a directory."""

import subprocess
import sys

import numpy as np
import pytest
import torch

from talkstream.cli import BUNDLED_REFERENCE, main
from talkstream.machine import check_device
from talkstream.media import read_video, write_audio


@pytest.fixture(scope="module")
def weights(tiny_weights):
    """The tiny random model (conftest) and 0.75 s of audio beside it."""
    write_audio(tiny_weights / "speech.wav", (0.1 * np.sin(np.arange(12000) / 9)).astype(np.float32))
    return tiny_weights


def _generate(weights, *extra):
    return ["generate", "--weights", str(weights), "--size", "32", "--steps", "1", "--quiet", *extra]


def test_python_m_talkstream_runs_the_cli():
    r = subprocess.run([sys.executable, "-m", "talkstream", "--help"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and "usage: talkstream" in r.stdout and "generate" in r.stdout


def test_generate_without_image_uses_the_bundled_reference_and_says_so(weights, tmp_path, capsys):
    out = tmp_path / "o.mp4"
    assert main(_generate(weights, "--audio", str(weights / "speech.wav"), "--out", str(out))) == 0
    assert f"using the bundled reference image {BUNDLED_REFERENCE}" in capsys.readouterr().err
    assert BUNDLED_REFERENCE.is_file() and len(read_video(out).frames) == 19  # 0.75 s at 25 fps


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_device_the_machine_lacks_is_a_one_line_error(weights, tmp_path, capsys):
    out = tmp_path / "o.mp4"
    assert main(_generate(weights, "--audio", str(weights / "speech.wav"), "--out", str(out), "--device", "cuda")) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("talkstream: error: --device cuda:") and "\n" not in err and not out.exists()
    assert main(["bench", "--device", "cuda:0", "--chunks", "1"]) == 2
    assert "--device cuda:0" in capsys.readouterr().err
    with pytest.raises(ValueError, match="not a device name"):
        check_device("gpu")
    assert check_device("cpu") == "cpu"


def test_out_naming_a_directory_fails_first_and_names_it(weights, tmp_path, capsys):
    (tmp_path / "videos").mkdir()
    assert main(_generate(weights, "--audio", str(weights / "speech.wav"), "--out", str(tmp_path / "videos"))) == 2
    err = capsys.readouterr().err
    assert "videos: is a directory" in err and ".tmp" not in err and list((tmp_path / "videos").iterdir()) == []


def test_image_naming_a_directory_says_so(weights, tmp_path, capsys):
    args = _generate(weights, "--image", str(tmp_path), "--audio", str(weights / "speech.wav"))
    assert main([*args, "--out", str(tmp_path / "o.mp4")]) == 2
    assert "is a directory, not an image file" in capsys.readouterr().err
