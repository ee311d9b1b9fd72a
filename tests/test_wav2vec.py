"""wav2vec2 features as OmniAvatar computes them; streamed per hop == offline; frame alignment at 16 and 25 fps."""

import numpy as np
import pytest
import torch

transformers = pytest.importorskip("transformers")

from talkstream.models.wav2vec import (  # noqa: E402
    BASE_960H_CONFIG,
    SAMPLE_RATE,
    Wav2VecError,
    Wav2VecFeatures,
    clip_features,
    feature_dim,
    load_wav2vec,
    normalize_waveform,
)


@pytest.fixture(scope="module")
def model():
    """A randomly initialised Wav2Vec2Model of facebook/wav2vec2-base-960h's config (95M parameters)."""
    torch.manual_seed(0)
    return transformers.Wav2Vec2Model(transformers.Wav2Vec2Config(**BASE_960H_CONFIG)).eval()


def _speech_like(seconds: float, seed: int = 0) -> np.ndarray:
    """Noise under a syllable-rate envelope, so windows differ in level as speech does."""
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * SAMPLE_RATE)) / SAMPLE_RATE
    env = 0.05 + 0.5 * np.abs(np.sin(2 * np.pi * 2.7 * t)) * (rng.random() + 0.5)
    return (rng.standard_normal(len(t)) * env).astype(np.float32)


def test_normalisation_is_the_feature_extractors():
    audio = _speech_like(0.7) + 0.3
    ext = transformers.Wav2Vec2FeatureExtractor(do_normalize=True, sampling_rate=SAMPLE_RATE)
    want = ext(audio, sampling_rate=SAMPLE_RATE).input_values[0]
    assert np.abs(normalize_waveform(torch.from_numpy(audio)).numpy() - want).max() < 1e-5


@torch.no_grad()
def test_clip_features_are_all_hidden_states_of_the_model(model):
    audio = _speech_like(0.6)
    x = normalize_waveform(torch.from_numpy(audio))[None]
    n = model.feature_extractor(x).shape[-1]  # at its own 50 Hz rate the resampling is the identity
    out = model(x, output_hidden_states=True)
    want = torch.cat([out.last_hidden_state, *out.hidden_states], -1)[0]  # OmniAvatar: last + all 13
    got = clip_features(model, audio, n)
    assert got.shape == (n, 14 * 768) == want.shape and feature_dim(model) == 10752
    assert (got - want).abs().max() < 1e-4


@pytest.mark.parametrize("fps", [16, 25])
@torch.no_grad()
def test_streaming_equals_offline_and_frames_align(model, fps):
    enc = Wav2VecFeatures(model, fps=fps, hop=4, look_back=0.5, look_ahead=0.25)
    audio = _speech_like(1.3, seed=fps)
    n = len(audio) * fps // SAMPLE_RATE + 1  # one frame at t = 0 and one per 1 / fps that the audio reaches
    assert enc.n_frames(len(audio)) == n
    assert enc.hops(10) == [(0, 1), (1, 5), (5, 9), (9, 10)]  # hops are latent frames (4x temporal compression)
    offline = enc.encode(audio)
    assert offline.shape == (n, 10752)
    stream, parts, pos = enc.stream(), [], 0
    rng = np.random.default_rng(fps)
    while pos < len(audio):
        k = int(rng.integers(1, 6000))
        got = stream.push(audio[pos : pos + k])
        pos += min(k, len(audio) - pos)
        done = sum(p.shape[0] for p in parts) + got.shape[0]
        # a frame is out only once the audio reaches look_ahead past the end of its hop, never earlier
        if done:
            last_hop_end = done
            assert enc.samples_needed(last_hop_end - 1, last_hop_end) <= pos or last_hop_end == 1
        parts.append(got)
    parts.append(stream.flush())
    streamed = torch.cat(parts)
    assert streamed.shape == offline.shape
    assert (streamed - offline).abs().max() <= 1e-5
    # alignment: the same audio one hop later gives the same features one hop later (windows inside the clip)
    spf = SAMPLE_RATE // fps
    later = enc.encode(np.concatenate([_speech_like(4 / fps, seed=9), audio]))
    # hops [1 + 4k, 5 + 4k) whose windows are cut neither at the stream's start nor at its end
    ks = [k for k in range(n) if 1 + 4 * k - enc.back_frames >= 0 and 5 + 4 * k + enc.ahead_frames <= n]
    assert len(ks) >= 2
    a, b = 1 + 4 * ks[0], 5 + 4 * ks[-1]
    assert (later[4 + a : 4 + b] - offline[a:b]).abs().max() <= 1e-4
    assert (later[4 + a : 4 + b] - offline[a - 1 : b - 1]).abs().max() > 1e-2  # one frame off is far off
    assert spf * fps == SAMPLE_RATE


@pytest.mark.parametrize("fps", [16, 25])
@torch.no_grad()
def test_a_window_spanning_the_clip_is_omniavatars_clip(model, fps):
    audio = _speech_like(0.9, seed=3)
    enc = Wav2VecFeatures(model, fps=fps, hop=4, look_back=5.0, look_ahead=5.0)
    n = enc.n_frames(len(audio))
    clip = clip_features(model, audio[: (n - 1) * (SAMPLE_RATE // fps)], n)  # OmniAvatar trims to (n - 1) / fps s
    assert (enc.encode(audio) - clip).abs().max() <= 1e-4
    # a short window is an approximation of the whole clip: the first hop sees no less than its own frames
    short = Wav2VecFeatures(model, fps=fps, hop=4, look_back=0.25, look_ahead=0.0).encode(audio)
    assert short.shape == clip.shape and (short - clip).abs().max() > 1e-3


def test_clear_errors(model, tmp_path):
    with pytest.raises(Wav2VecError, match="fps must divide"):
        Wav2VecFeatures(model, fps=30)
    with pytest.raises(Wav2VecError, match="mono"):
        Wav2VecFeatures(model).encode(np.zeros((2, 100), np.float32))
    with pytest.raises(Wav2VecError, match="no wav2vec2 model here"):
        load_wav2vec(tmp_path)
    stream = Wav2VecFeatures(model).stream()
    stream.flush()
    with pytest.raises(Wav2VecError, match="flushed"):
        stream.push(np.zeros(10, np.float32))


def test_loads_a_local_folder(model, tmp_path):
    model.save_pretrained(tmp_path / "wav2vec2-base-960h")
    loaded = load_wav2vec(tmp_path / "wav2vec2-base-960h")
    audio = _speech_like(0.3)
    assert torch.equal(clip_features(loaded, audio, 5), clip_features(model, audio, 5))
