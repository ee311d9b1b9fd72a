"""Behaviour: a clip is a timeline of states (speaking, listening, idle, thinking) with captions.

Every state has its own motion style (head-motion amplitudes, nods, breathing, gaze, smile); the
per-frame style is a smooth blend of the states' one-hot timeline, so transitions never jump. The
mouth follows the speech's visemes; blinks are a Poisson process. The result is exact per-frame
ground truth (``FrameState`` rows), the clip's audio, and a caption per segment.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from scipy.ndimage import gaussian_filter1d

from .identity import Identity
from .render import STATE_FIELDS, FrameState
from .speech import SAMPLE_RATE, SentenceGenerator, Speech, Voice, synthesize
from .visemes import mouth_track

FPS = 25
STATES = ("idle", "listening", "speaking", "thinking")
_F = {name: i for i, name in enumerate(STATE_FIELDS)}

# per-state motion style: amplitude of smooth head motion (deg / canvas fraction), blink rate (1/s)
_STYLE = {
    "idle": dict(yaw=3.0, pitch=2.0, roll=1.5, tx=0.006, ty=0.004, blink=0.25, gaze=0.25),
    "listening": dict(yaw=4.0, pitch=2.5, roll=2.5, tx=0.008, ty=0.005, blink=0.35, gaze=0.15),
    "speaking": dict(yaw=8.0, pitch=4.5, roll=3.0, tx=0.012, ty=0.008, blink=0.3, gaze=0.3),
    "thinking": dict(yaw=5.0, pitch=2.0, roll=5.0, tx=0.006, ty=0.004, blink=0.2, gaze=0.2),
}


@dataclass
class Segment:
    state: str
    start: float  # seconds
    end: float
    caption: str
    text: str = ""  # what is said (speaking only)
    smile: float = 0.0
    speech: Speech | None = field(default=None, repr=False)

    def to_dict(self) -> dict:
        d = dict(
            state=self.state, start=self.start, end=self.end, caption=self.caption, text=self.text, smile=self.smile
        )
        if self.speech is not None:
            d["voice"] = self.speech.voice.__dict__
            d["phonemes"] = [(p.symbol, p.start + self.start, p.end + self.start) for p in self.speech.phonemes]
        return d


@dataclass
class Clip:
    """A planned clip: identity, per-frame ground truth, audio and segments."""

    identity: Identity
    states: np.ndarray  # [T, len(STATE_FIELDS)] float32 FrameState rows
    behaviour: np.ndarray  # [T] int8 index into STATES
    audio: np.ndarray  # float32, 16 kHz mono, exactly T / FPS seconds
    segments: list[Segment]
    seed: int
    fps: int = FPS
    sample_rate: int = SAMPLE_RATE

    @property
    def n_frames(self) -> int:
        return len(self.states)

    def frame_state(self, i: int) -> FrameState:
        return FrameState.from_array(self.states[i])

    def captions_per_frame(self) -> list[str]:
        out = [""] * self.n_frames
        for seg in self.segments:
            for i in range(int(round(seg.start * self.fps)), min(int(round(seg.end * self.fps)), self.n_frames)):
                out[i] = seg.caption
        return out


def _smooth_noise(rng: np.random.Generator, n: int, sigma_frames: float) -> np.ndarray:
    """Unit-variance smooth noise (Gaussian-filtered white noise)."""
    x = gaussian_filter1d(rng.standard_normal(n + 4 * int(sigma_frames)), sigma_frames)[2 * int(sigma_frames) :][:n]
    return x / (x.std() + 1e-8)


def _caption(state: str, rng: np.random.Generator, voice: Voice | None, smile: float) -> str:
    if state == "speaking":
        pace = "quickly" if voice and voice.rate > 185 else "slowly" if voice and voice.rate < 145 else "calmly"
        return f"smiles and speaks {pace}" if smile > 0.45 else f"speaks {pace}"
    if state == "listening":
        return "listens with a small smile" if smile > 0.3 else "nods while listening"
    if state == "thinking":
        return f"thinks, looking up to the {rng.choice(['left', 'right'])}"
    return "idles, breathing calmly and blinking"


def plan_segments(
    rng: np.random.Generator, seconds: float, sentences: SentenceGenerator, voice: Voice
) -> list[Segment]:
    """A sequence of behaviour segments filling ``seconds``; speaking segments carry synthesized speech."""
    segs: list[Segment] = []
    t = 0.0
    state = str(rng.choice(STATES, p=[0.2, 0.25, 0.4, 0.15]))
    while t < seconds - 1e-6:
        smile = float(rng.uniform(0, 0.8))
        if state == "speaking":
            speech = synthesize(sentences.utterance(2), voice)
            dur = speech.duration
            seg = Segment(
                state, t, min(t + dur, seconds), _caption(state, rng, voice, smile), speech.text, smile, speech
            )
        else:
            dur = float(rng.uniform(1.2, 3.5))
            seg = Segment(state, t, min(t + dur, seconds), _caption(state, rng, None, smile), smile=smile)
        segs.append(seg)
        t += dur
        # after speaking, a pause state; otherwise speak more often than not
        state = (
            str(rng.choice(["idle", "listening", "thinking"], p=[0.35, 0.45, 0.2]))
            if state == "speaking"
            else str(rng.choice(["speaking", "listening", "idle"], p=[0.7, 0.2, 0.1]))
        )
    return segs


def make_clip(
    seed: int, seconds: float = 8.0, identity: Identity | None = None, voice: Voice | None = None, fps: int = FPS
) -> Clip:
    """Plan a clip: deterministic for a seed (espeak-ng's output is deterministic for a voice and text)."""
    if seconds <= 0:
        raise ValueError(f"a clip must last more than 0 seconds, got {seconds}")
    rng = np.random.default_rng(seed)
    identity = identity or Identity.sample(np.random.default_rng([seed, 1]))
    voice = voice or Voice.sample(np.random.default_rng([seed, 2]))
    segments = plan_segments(rng, seconds, SentenceGenerator(int(rng.integers(2**31))), voice)
    return compose(segments, identity, seconds, rng, fps, seed)


def compose(
    segments: list[Segment], identity: Identity, seconds: float, rng: np.random.Generator, fps: int = FPS, seed: int = 0
) -> Clip:
    """Turn segments into per-frame ground truth and audio."""
    n = int(round(seconds * fps))
    states = np.tile(FrameState().to_array(), (n, 1))
    audio = np.zeros(int(round(n / fps * SAMPLE_RATE)), np.float32)
    onehot = np.zeros((n, len(STATES)), np.float32)
    behaviour = np.zeros(n, np.int8)
    smile = np.zeros(n, np.float32)
    for seg in segments:
        a, b = int(round(seg.start * fps)), min(int(round(seg.end * fps)), n)
        onehot[a:b, STATES.index(seg.state)] = 1
        behaviour[a:b] = STATES.index(seg.state)
        smile[a:b] = seg.smile if seg.state in ("speaking", "listening") else seg.smile * 0.3
        if seg.speech is not None:
            s0 = int(round(seg.start * SAMPLE_RATE))
            chunk = seg.speech.audio[: max(0, len(audio) - s0)]
            audio[s0 : s0 + len(chunk)] = chunk
            mouth = mouth_track(seg.speech.phonemes, b - a, fps, offset=seg.start - a / fps)
            states[a:b, _F["jaw_open"] : _F["tongue"] + 1] = mouth
    sig = 0.3 * fps  # transitions blend over ~0.3 s
    w = gaussian_filter1d(onehot, sig, axis=0, mode="nearest")
    w /= w.sum(1, keepdims=True) + 1e-8
    t = np.arange(n) / fps

    def style(key: str) -> np.ndarray:
        return w @ np.array([_STYLE[s][key] for s in STATES], np.float32)

    for key, sigma in (("yaw", 0.8), ("pitch", 0.6), ("roll", 1.2), ("tx", 1.5), ("ty", 1.5)):
        states[:, _F[key]] = style(key) * _smooth_noise(rng, n, sigma * fps)
    # listening: nods (pitch oscillation at ~1.6 Hz in bursts); idle: breathing sway
    nod_env = np.clip(_smooth_noise(rng, n, 0.7 * fps) + 0.3, 0, None)
    states[:, _F["pitch"]] += w[:, STATES.index("listening")] * 5.0 * nod_env * np.sin(2 * np.pi * 1.6 * t)
    states[:, _F["ty"]] += w[:, STATES.index("idle")] * 0.006 * np.sin(2 * np.pi * 0.25 * t + rng.uniform(0, 6.3))
    # thinking: gaze up to one side, brows raised, head tilted
    think = w[:, STATES.index("thinking")]
    side = rng.choice([-1.0, 1.0])
    states[:, _F["gaze_x"]] = style("gaze") * _smooth_noise(rng, n, 0.5 * fps) + think * 0.7 * side
    states[:, _F["gaze_y"]] = 0.5 * style("gaze") * _smooth_noise(rng, n, 0.5 * fps) - think * 0.7
    states[:, _F["brow"]] = 0.25 * _smooth_noise(rng, n, 0.6 * fps) * w[:, STATES.index("speaking")] + think * 0.6
    states[:, _F["roll"]] += think * 6.0 * side
    states[:, _F["smile"]] = gaussian_filter1d(smile, sig, mode="nearest")
    # blinks: Poisson events, each a 5-frame close/open
    rate = style("blink")
    shape = np.array([0.5, 1.0, 0.7, 0.35, 0.1], np.float32)
    blink = np.zeros(n, np.float32)
    i = 0
    while i < n:
        if rng.random() < rate[i] / fps:
            k = min(len(shape), n - i)
            blink[i : i + k] = np.maximum(blink[i : i + k], shape[:k])
            i += 8
        i += 1
    states[:, _F["blink"]] = blink
    return Clip(identity, states.astype(np.float32), behaviour, audio, segments, seed, fps)
