"""PCM helpers shared by the agent stages: int16 <-> float, WAV bytes, sample-rate checks."""

from __future__ import annotations

import io
import wave

import numpy as np

from ..media import resample

SAMPLE_RATE = 16_000
SUPPORTED_RATES = (8_000, 16_000, 22_050, 24_000, 32_000, 44_100, 48_000)


class AudioFormatError(ValueError):
    """Audio that is not what its sender said it is."""


def check_rate(sample_rate: int) -> int:
    if not isinstance(sample_rate, int) or isinstance(sample_rate, bool) or sample_rate not in SUPPORTED_RATES:
        raise AudioFormatError(f"unsupported sample rate {sample_rate!r}; use one of {list(SUPPORTED_RATES)} Hz")
    return sample_rate


def pcm16_to_float(data: bytes) -> np.ndarray:
    """Little-endian int16 mono PCM bytes -> float32 in [-1, 1)."""
    if len(data) % 2:
        raise AudioFormatError(f"PCM int16 payload has an odd number of bytes ({len(data)})")
    return np.frombuffer(data, "<i2").astype(np.float32) / 32768.0


def float_to_pcm16(audio: np.ndarray) -> bytes:
    return (np.clip(np.asarray(audio, np.float32), -1.0, 1.0) * 32767.0).round().astype("<i2").tobytes()


def to_16k(audio: np.ndarray, sample_rate: int) -> np.ndarray:
    return resample(np.asarray(audio, np.float32), sample_rate, SAMPLE_RATE)


def wav_bytes(audio: np.ndarray, sample_rate: int = SAMPLE_RATE) -> bytes:
    """float32 mono -> a 16-bit PCM WAV file in memory."""
    buf = io.BytesIO()
    with wave.open(buf, "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(sample_rate)
        w.writeframes(float_to_pcm16(audio))
    return buf.getvalue()


def read_wav_bytes(data: bytes) -> tuple[np.ndarray, int]:
    """A 16-bit PCM WAV file in memory -> (float32 mono, sample rate)."""
    try:
        with wave.open(io.BytesIO(data), "rb") as w:
            if w.getsampwidth() != 2:
                raise AudioFormatError(f"WAV must be 16-bit PCM, got {8 * w.getsampwidth()}-bit")
            rate, ch = w.getframerate(), w.getnchannels()
            a = np.frombuffer(w.readframes(w.getnframes()), "<i2").astype(np.float32) / 32768.0
    except (wave.Error, EOFError) as e:
        raise AudioFormatError(f"not a WAV file ({e})") from None
    if ch > 1:
        a = a.reshape(-1, ch).mean(1)
    return a, rate


__all__ = [
    "SAMPLE_RATE",
    "SUPPORTED_RATES",
    "AudioFormatError",
    "check_rate",
    "float_to_pcm16",
    "pcm16_to_float",
    "read_wav_bytes",
    "to_16k",
    "wav_bytes",
]
