"""Voice activity: the Silero VAD network (ONNX, run with onnxruntime) and a turn segmenter on top of it.

The ONNX file ships inside PyPI packages that the conversation loop installs anyway: faster-whisper's
``assets/silero_vad_v6.onnx`` (inputs ``input [n, 576]``, ``h``, ``c``) or pipecat-ai's
``audio/vad/data/silero_vad.onnx`` (v5: ``input``, ``state``, ``sr``). Both read 512-sample windows (32 ms at
16 kHz) with the 64 samples before each window as context and carry a recurrent state from window to window.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .audio import SAMPLE_RATE

WINDOW = 512  # samples per Silero window at 16 kHz
CONTEXT = 64


def silero_path() -> Path:
    """The Silero VAD ONNX file from an installed package (pipecat-ai first, then faster-whisper)."""
    for pkg, rel in (("pipecat", "audio/vad/data/silero_vad.onnx"), ("faster_whisper", "assets/silero_vad_v6.onnx")):
        spec = importlib.util.find_spec(pkg)
        if spec is not None and spec.submodule_search_locations:
            path = Path(next(iter(spec.submodule_search_locations))) / rel
            if path.is_file():
                return path
    raise FileNotFoundError("no Silero VAD model: pip install faster-whisper (or pipecat-ai), or talkstream[serve]")


class SileroVAD:
    """Streaming speech probabilities, one per 32 ms window of 16 kHz audio."""

    def __init__(self, path: str | Path | None = None) -> None:
        import onnxruntime as ort

        opts = ort.SessionOptions()
        opts.intra_op_num_threads = opts.inter_op_num_threads = 1
        opts.log_severity_level = 3
        self.path = Path(path) if path else silero_path()
        self.session = ort.InferenceSession(str(self.path), sess_options=opts, providers=["CPUExecutionProvider"])
        self.v5 = "state" in {i.name for i in self.session.get_inputs()}
        self.reset()

    def reset(self) -> None:
        self.pending = np.zeros(0, np.float32)
        self.context = np.zeros(CONTEXT, np.float32)
        self.state = np.zeros((2, 1, 128), np.float32)
        self.h = np.zeros((1, 1, 128), np.float32)
        self.c = np.zeros((1, 1, 128), np.float32)

    def _window(self, x: np.ndarray) -> float:
        inp = np.concatenate([self.context, x])[None].astype(np.float32)
        self.context = x[-CONTEXT:]
        if self.v5:
            out, self.state = self.session.run(
                None, {"input": inp, "state": self.state, "sr": np.array(SAMPLE_RATE, np.int64)}
            )
        else:
            out, self.h, self.c = self.session.run(None, {"input": inp, "h": self.h, "c": self.c})
        return float(np.asarray(out).reshape(-1)[0])

    def push(self, audio: np.ndarray) -> np.ndarray:
        """16 kHz float audio -> the speech probability of every window it completes."""
        self.pending = np.concatenate([self.pending, np.asarray(audio, np.float32)])
        n = len(self.pending) // WINDOW
        probs = [self._window(self.pending[i * WINDOW : (i + 1) * WINDOW]) for i in range(n)]
        self.pending = self.pending[n * WINDOW :]
        return np.array(probs, np.float32)


@dataclass(frozen=True)
class VADConfig:
    onset: float = 0.5  # probability that counts as speech
    offset: float = 0.35  # below this counts as silence (hysteresis)
    min_speech: float = 0.064  # seconds of speech before a turn starts (2 windows)
    min_silence: float = 0.5  # seconds of silence that end a turn
    pre_roll: float = 0.3  # seconds kept from before the onset (the first syllable)
    max_utterance: float = 30.0  # a turn is cut here (a monologue is answered, not buffered for ever)


@dataclass
class VADEvent:
    kind: str  # "start" | "end"
    sample: int  # absolute sample index of the onset / of the end of speech (before the closing silence)
    audio: np.ndarray | None = None  # the utterance, for "end"
    cut: bool = False  # the utterance reached max_utterance


@dataclass
class TurnSegmenter:
    """Speech probabilities -> turn start / end events with the utterance's audio (bounded by max_utterance)."""

    vad: SileroVAD
    cfg: VADConfig = field(default_factory=VADConfig)

    def __post_init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.vad.reset()
        self.received = 0  # samples pushed so far
        self.speaking = False
        self.run = 0  # consecutive speech / silence windows
        self.history = np.zeros(0, np.float32)  # recent audio (pre-roll) while not speaking
        self.utterance: list[np.ndarray] = []
        self.utterance_len = 0
        self.onset = self.last_speech = 0

    def speech_so_far(self) -> np.ndarray:
        """While speaking: the utterance up to its last speech window, as an end of the turn now would hand it."""
        if not self.speaking or not self.utterance:
            return np.zeros(0, np.float32)
        audio = np.concatenate(self.utterance)
        return audio[: max(0, len(audio) - (self.received - self.last_speech))]

    def push(self, audio: np.ndarray) -> list[VADEvent]:
        audio = np.asarray(audio, np.float32)
        start = self.received - len(self.vad.pending)  # sample index of the first window this push completes
        probs = self.vad.push(audio)
        self.received += len(audio)
        events: list[VADEvent] = []
        need_speech = max(1, round(self.cfg.min_speech * SAMPLE_RATE / WINDOW))
        need_silence = max(1, round(self.cfg.min_silence * SAMPLE_RATE / WINDOW))
        max_len = int(self.cfg.max_utterance * SAMPLE_RATE)
        pre = int(self.cfg.pre_roll * SAMPLE_RATE)
        if self.speaking:
            self.utterance.append(audio)
            self.utterance_len += len(audio)
        else:
            self.history = np.concatenate([self.history, audio])[-(pre + 2 * WINDOW * need_speech + len(audio)) :]
        for i, p in enumerate(probs):
            w_end = start + (i + 1) * WINDOW
            if not self.speaking:
                self.run = self.run + 1 if p >= self.cfg.onset else 0
                if self.run >= need_speech:
                    self.speaking, self.run = True, 0
                    self.onset = w_end - need_speech * WINDOW
                    keep = self.received - max(0, self.onset - pre)
                    self.utterance = [self.history[-keep:]] if keep > 0 else []
                    self.utterance_len = sum(len(u) for u in self.utterance)
                    self.last_speech = w_end
                    events.append(VADEvent("start", self.onset))
            else:
                if p >= self.cfg.offset:
                    self.run, self.last_speech = 0, w_end
                else:
                    self.run += 1
                cut = self.utterance_len >= max_len
                if self.run >= need_silence or cut:
                    audio_all = np.concatenate(self.utterance) if self.utterance else np.zeros(0, np.float32)
                    end = self.received if cut else self.last_speech
                    keep = len(audio_all) - (self.received - end)
                    events.append(VADEvent("end", end, audio_all[: max(0, min(keep, max_len))], cut))
                    self.speaking, self.run = False, 0
                    self.utterance, self.utterance_len = [], 0
                    self.history = np.zeros(0, np.float32)
        return events


__all__ = ["SileroVAD", "TurnSegmenter", "VADConfig", "VADEvent", "silero_path"]
