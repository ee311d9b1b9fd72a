"""Speech for the synthetic world: espeak-ng through its C API, with a sample-exact phoneme timeline.

libespeak-ng synthesizes at 22050 Hz and, with ``espeakINITIALIZE_PHONEME_EVENTS``, reports every
phoneme with the exact output sample at which it starts. We keep those sample positions, resample
the audio to 16 kHz and convert the positions to seconds, so a mouth driven by the timeline at
25 fps lines up with the audio to well under a frame.

libespeak-ng keeps its state per process (one voice, one callback) and carries it from one utterance to the next:
the same text and voice spoken again in one process comes out a few samples longer or shorter (the first time in a
process ~780 samples at 22050 Hz, 35 ms, shorter than later times on clip 900005's sentence:
``experiments/speech_determinism.py``), so a world clip made
from a seed depended on what the process had spoken before. ``synthesize`` therefore speaks each utterance in a
forked child process whose espeak-ng starts fresh (``speak_fresh``): a text and voice give the same samples in any
process, after anything. Nothing is loaded at import time.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import os
import pickle
import threading
from dataclasses import asdict, dataclass, field

import numpy as np
from scipy.signal import resample_poly

SAMPLE_RATE = 16_000
ESPEAK_RATE = 22_050

# espeak_AUDIO_OUTPUT, espeak_EVENT_TYPE, option bits and positions from speak_lib.h
_AUDIO_OUTPUT_SYNCHRONOUS = 2
_INIT_PHONEME_EVENTS = 0x0001
_INIT_DONT_EXIT = 0x8000
_EVENT_LIST_TERMINATED = 0
_EVENT_PHONEME = 7
_POS_CHARACTER = 1
_CHARS_UTF8 = 1
_PARAM_RATE, _PARAM_VOLUME, _PARAM_PITCH, _PARAM_RANGE = 1, 2, 3, 4

PAUSE_PHONEMES = frozenset({"_", "_:", "_!", "_|", "_^_", ""})


class EspeakError(RuntimeError):
    """espeak-ng is missing or failed to speak."""


class _Event(ctypes.Structure):
    _fields_ = [
        ("type", ctypes.c_int),
        ("unique_identifier", ctypes.c_uint),
        ("text_position", ctypes.c_int),
        ("length", ctypes.c_int),
        ("audio_position", ctypes.c_int),
        ("sample", ctypes.c_int),
        ("user_data", ctypes.c_void_p),
        ("id", ctypes.c_char * 8),
    ]


_Callback = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.POINTER(ctypes.c_short), ctypes.c_int, ctypes.POINTER(_Event))


@dataclass(frozen=True)
class Voice:
    """An espeak-ng voice: name, speaking rate (words/min), pitch and pitch range (0-100)."""

    name: str = "en-us"
    rate: int = 165
    pitch: int = 50
    range: int = 50

    @staticmethod
    def sample(rng: np.random.Generator) -> Voice:
        names = ["en-us", "en", "en-gb-x-rp", "en-029", "en-gb-scotland", "en-gb-x-gbcwmd", "en-gb-x-gbclan"]
        return Voice(
            name=str(rng.choice(names)),
            rate=int(rng.integers(130, 210)),
            pitch=int(rng.integers(25, 80)),
            range=int(rng.integers(30, 90)),
        )


@dataclass(frozen=True)
class Phoneme:
    symbol: str  # espeak-ng phoneme mnemonic, e.g. "aI", "t", "_:" (pause)
    start: float  # seconds
    end: float

    @property
    def is_pause(self) -> bool:
        return self.symbol in PAUSE_PHONEMES


@dataclass
class Speech:
    text: str
    audio: np.ndarray  # float32 mono in [-1, 1]
    phonemes: list[Phoneme]
    voice: Voice = field(default_factory=Voice)
    sample_rate: int = SAMPLE_RATE

    @property
    def duration(self) -> float:
        return len(self.audio) / self.sample_rate

    def timeline(self) -> list[dict]:
        return [asdict(p) for p in self.phonemes]


@functools.cache
def _find_library() -> str:
    for name in ("espeak-ng", "libespeak-ng.so.1"):
        path = ctypes.util.find_library(name) or name
        try:
            ctypes.CDLL(path)
            return path
        except OSError:
            continue
    raise EspeakError("espeak-ng is not installed (libespeak-ng not found): run `apt-get install -y espeak-ng`")


class Espeak:
    """One libespeak-ng per process; ``speak`` is thread-safe."""

    _instance: Espeak | None = None
    _instance_lock = threading.Lock()

    def __init__(self, path: str | None = None) -> None:
        self._lib = ctypes.CDLL(path or _find_library())
        self._lib.espeak_Synth.argtypes = [
            ctypes.c_void_p,
            ctypes.c_size_t,
            ctypes.c_uint,
            ctypes.c_int,
            ctypes.c_uint,
            ctypes.c_uint,
            ctypes.c_void_p,
            ctypes.c_void_p,
        ]
        self._lib.espeak_SetVoiceByName.argtypes = [ctypes.c_char_p]
        rate = self._lib.espeak_Initialize(_AUDIO_OUTPUT_SYNCHRONOUS, 0, None, _INIT_PHONEME_EVENTS | _INIT_DONT_EXIT)
        if rate != ESPEAK_RATE:
            raise EspeakError(f"espeak-ng failed to initialise (returned {rate}); is espeak-ng-data installed?")
        self._lock = threading.Lock()
        self._chunks: list[np.ndarray] = []
        self._events: list[tuple[str, int]] = []
        self._callback = _Callback(self._on_audio)  # keep a reference: C holds the pointer
        self._lib.espeak_SetSynthCallback(self._callback)

    @classmethod
    def get(cls) -> Espeak:
        with cls._instance_lock:
            if cls._instance is None:
                cls._instance = cls()
            return cls._instance

    def _on_audio(self, wav, n, events) -> int:
        if n > 0:
            self._chunks.append(np.ctypeslib.as_array(wav, shape=(n,)).copy())
        i = 0
        while events[i].type != _EVENT_LIST_TERMINATED:
            ev = events[i]
            if ev.type == _EVENT_PHONEME:
                self._events.append((ev.id.decode("utf-8", "replace"), int(ev.sample)))
            i += 1
        return 0

    def speak(self, text: str, voice: Voice) -> tuple[np.ndarray, list[tuple[str, int]]]:
        """Return int16 audio at 22050 Hz and (phoneme, start sample) events."""
        data = text.encode("utf-8")
        with self._lock:
            if self._lib.espeak_SetVoiceByName(voice.name.encode()) != 0:
                raise EspeakError(f"espeak-ng has no voice named {voice.name!r}")
            for param, value in (
                (_PARAM_RATE, voice.rate),
                (_PARAM_PITCH, voice.pitch),
                (_PARAM_RANGE, voice.range),
                (_PARAM_VOLUME, 100),
            ):
                self._lib.espeak_SetParameter(param, int(value), 0)
            self._chunks, self._events = [], []
            err = self._lib.espeak_Synth(data, len(data) + 1, 0, _POS_CHARACTER, 0, _CHARS_UTF8, None, None)
            self._lib.espeak_Synchronize()
            if err != 0:
                raise EspeakError(f"espeak-ng could not synthesize the text (error {err})")
            audio = np.concatenate(self._chunks) if self._chunks else np.zeros(0, np.int16)
            return audio, list(self._events)


def speak_fresh(text: str, voice: Voice) -> tuple[np.ndarray, list[tuple[str, int]]]:
    """``Espeak.speak`` in a forked child whose libespeak-ng is initialised for this utterance alone, so the result
    does not depend on what was spoken before (see the module's docstring). Where fork is missing: in-process."""
    path = _find_library()  # resolved (and checked) here: the child only loads it
    if not hasattr(os, "fork"):
        return Espeak.get().speak(text, voice)
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: speak, send (ok, payload), leave without running the parent's exit handlers
        code = 0
        try:
            os.close(r)
            try:
                payload = (True, Espeak(path).speak(text, voice))
            except BaseException as e:  # noqa: BLE001 - handed to the parent, which raises it
                payload = (False, e if isinstance(e, (EspeakError, ValueError)) else EspeakError(repr(e)))
            with os.fdopen(w, "wb") as f:
                pickle.dump(payload, f)
        except BaseException:  # noqa: BLE001
            code = 1
        finally:
            os._exit(code)
    os.close(w)
    try:
        with os.fdopen(r, "rb") as f:
            data = f.read()
    finally:
        _, status = os.waitpid(pid, 0)
    if not data:
        raise EspeakError(f"the espeak-ng process ended without speaking (wait status {status})")
    ok, result = pickle.loads(data)
    if not ok:
        raise result
    return result


def synthesize(text: str, voice: Voice | None = None, sample_rate: int = SAMPLE_RATE) -> Speech:
    """Speak ``text`` and return 16 kHz float audio with its phoneme timeline.

    Raises ``ValueError`` for empty or unspeakable text and ``EspeakError`` when espeak-ng is missing.
    """
    if not isinstance(text, str):
        raise TypeError(f"text must be a str, got {type(text).__name__}")
    if not text.strip():
        raise ValueError("text is empty: nothing to speak")
    voice = voice or Voice()
    raw, events = speak_fresh(text, voice)
    spoken = [(s, pos) for s, pos in events if s not in PAUSE_PHONEMES]
    if raw.size == 0 or not spoken:
        raise ValueError(f"text has nothing speakable for espeak-ng: {text[:60]!r}")
    audio = resample_poly(raw.astype(np.float32) / 32768.0, sample_rate, ESPEAK_RATE).astype(np.float32)
    np.clip(audio, -1.0, 1.0, out=audio)
    duration = len(audio) / sample_rate
    starts = [min(pos / ESPEAK_RATE, duration) for _, pos in events]
    phonemes = []
    for i, (symbol, _) in enumerate(events):
        end = starts[i + 1] if i + 1 < len(events) else duration
        if end > starts[i]:
            phonemes.append(Phoneme(symbol, starts[i], end))
    # leading silence before the first phoneme is a pause, so the timeline covers the whole audio
    if phonemes and phonemes[0].start > 0:
        phonemes.insert(0, Phoneme("_", 0.0, phonemes[0].start))
    if phonemes and phonemes[-1].end < duration:
        phonemes.append(Phoneme("_", phonemes[-1].end, duration))
    return Speech(text=text, audio=audio, phonemes=phonemes, voice=voice, sample_rate=sample_rate)


# --- an unbounded supply of distinct utterances ----------------------------------------------------

_SUBJECTS = [
    "I",
    "we",
    "you",
    "my friend",
    "the team",
    "our neighbour",
    "the teacher",
    "my sister",
    "the doctor",
    "everyone",
    "nobody",
    "the new manager",
    "my brother",
    "the pilot",
    "a stranger",
    "the children",
]
_VERBS = [
    "found",
    "painted",
    "moved",
    "opened",
    "carried",
    "forgot",
    "bought",
    "fixed",
    "visited",
    "watched",
    "cooked",
    "explained",
    "remembered",
    "borrowed",
    "cleaned",
    "described",
    "ordered",
    "wrote",
]
_ADJECTIVES = [
    "blue",
    "quiet",
    "enormous",
    "tiny",
    "old",
    "shiny",
    "broken",
    "wonderful",
    "strange",
    "warm",
    "heavy",
    "bright",
    "simple",
    "golden",
    "noisy",
    "gentle",
    "rapid",
    "careful",
]
_NOUNS = [
    "window",
    "garden",
    "bicycle",
    "letter",
    "kitchen",
    "mountain",
    "piano",
    "market",
    "river",
    "lamp",
    "station",
    "recipe",
    "camera",
    "bridge",
    "library",
    "harbour",
    "sandwich",
    "melody",
    "umbrella",
    "rocket",
]
_TIMES = [
    "yesterday",
    "this morning",
    "last week",
    "on Sunday",
    "after lunch",
    "at midnight",
    "in April",
    "every day",
    "two years ago",
    "right now",
    "before dinner",
    "later tonight",
]
_PLACES = [
    "near the park",
    "in the city",
    "by the sea",
    "at the office",
    "under the bridge",
    "at home",
    "on the train",
    "in the valley",
    "behind the school",
    "at the airport",
]
_QUESTION_STARTS = [
    "Did you see the",
    "Have you ever tried the",
    "Where is the",
    "Why did they paint the",
    "Can you tell me about the",
    "What happened to the",
    "How far is the",
    "Who moved the",
]
_REPLIES = [
    "Yes, of course.",
    "No, not really.",
    "I think so.",
    "That sounds great!",
    "Let me think about it.",
    "Absolutely, go ahead.",
    "Hmm, maybe later.",
    "Thank you so much.",
    "I am not sure.",
    "Good idea!",
    "Right, I see.",
    "Oh, really?",
    "Sure, why not.",
    "Well, it depends.",
]


class SentenceGenerator:
    """Statements, questions and short replies from word lists; distinct for distinct seeds."""

    def __init__(self, seed: int = 0) -> None:
        self.rng = np.random.default_rng(seed)

    def _pick(self, words: list[str]) -> str:
        return words[int(self.rng.integers(len(words)))]

    def statement(self) -> str:
        s = f"{self._pick(_SUBJECTS)} {self._pick(_VERBS)} the {self._pick(_ADJECTIVES)} {self._pick(_NOUNS)}"
        if self.rng.random() < 0.6:
            s += f" {self._pick(_PLACES)}"
        if self.rng.random() < 0.6:
            s += f" {self._pick(_TIMES)}"
        return s[0].upper() + s[1:] + "."

    def question(self) -> str:
        return f"{self._pick(_QUESTION_STARTS)} {self._pick(_ADJECTIVES)} {self._pick(_NOUNS)} {self._pick(_PLACES)}?"

    def reply(self) -> str:
        return self._pick(_REPLIES)

    def sentence(self) -> str:
        r = self.rng.random()
        return self.statement() if r < 0.55 else self.question() if r < 0.8 else self.reply()

    def utterance(self, max_sentences: int = 3) -> str:
        return " ".join(self.sentence() for _ in range(int(self.rng.integers(1, max_sentences + 1))))
