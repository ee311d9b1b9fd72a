"""Phonemes -> per-frame mouth parameters, with coarticulation.

Each espeak-ng phoneme maps to a viseme target (jaw open, lip width, lip rounding, teeth and tongue
visibility, all in 0..1). Frames blend the targets of neighbouring phonemes with the Cohen-Massaro
dominance model: every phoneme has a dominance that peaks at its centre and decays exponentially
with distance; bilabials and rounded vowels dominate strongly, so /p b m/ still close the lips
between vowels while weak consonants take on their neighbours' shape.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .speech import Phoneme

MOUTH_PARAMS = ("jaw_open", "lip_width", "lip_round", "teeth", "tongue")


@dataclass(frozen=True)
class Viseme:
    name: str
    target: tuple[float, float, float, float, float]  # MOUTH_PARAMS
    dominance: float  # peak dominance (how strongly it holds its shape)
    rate: float  # decay of dominance per second (higher = more local)


REST = Viseme("rest", (0.0, 0.5, 0.1, 0.0, 0.0), 0.6, 12.0)
_V = {
    "bilabial": Viseme("bilabial", (0.0, 0.45, 0.15, 0.0, 0.0), 6.0, 35.0),
    "labiodental": Viseme("labiodental", (0.1, 0.5, 0.05, 1.0, 0.0), 2.0, 28.0),
    "dental": Viseme("dental", (0.18, 0.55, 0.0, 0.8, 1.0), 1.2, 28.0),
    "alveolar": Viseme("alveolar", (0.2, 0.55, 0.05, 0.7, 0.3), 0.5, 25.0),
    "sibilant": Viseme("sibilant", (0.12, 0.6, 0.05, 1.0, 0.0), 1.0, 28.0),
    "postalveolar": Viseme("postalveolar", (0.15, 0.4, 0.65, 0.8, 0.0), 1.2, 25.0),
    "velar": Viseme("velar", (0.3, 0.5, 0.1, 0.3, 0.0), 0.3, 22.0),
    "glottal": Viseme("glottal", (0.35, 0.5, 0.1, 0.2, 0.0), 0.2, 20.0),
    "rhotic": Viseme("rhotic", (0.22, 0.4, 0.5, 0.3, 0.2), 0.8, 24.0),
    "w": Viseme("w", (0.12, 0.25, 0.95, 0.0, 0.0), 2.0, 26.0),
    "j": Viseme("j", (0.18, 0.75, 0.0, 0.6, 0.2), 0.8, 26.0),
    "open": Viseme("open", (0.95, 0.55, 0.1, 0.4, 0.3), 1.5, 16.0),
    "mid": Viseme("mid", (0.55, 0.6, 0.1, 0.4, 0.2), 1.2, 16.0),
    "schwa": Viseme("schwa", (0.4, 0.5, 0.15, 0.3, 0.2), 0.8, 18.0),
    "front": Viseme("front", (0.3, 0.85, 0.0, 0.7, 0.1), 1.2, 18.0),
    "round_open": Viseme("round_open", (0.65, 0.35, 0.7, 0.2, 0.1), 1.5, 16.0),
    "round_close": Viseme("round_close", (0.28, 0.25, 0.95, 0.1, 0.0), 1.8, 16.0),
}

_CONSONANTS = {
    "p": "bilabial",
    "b": "bilabial",
    "m": "bilabial",
    "f": "labiodental",
    "v": "labiodental",
    "T": "dental",
    "D": "dental",
    "t": "alveolar",
    "d": "alveolar",
    "n": "alveolar",
    "l": "alveolar",
    "t#": "alveolar",
    "d#": "alveolar",
    "s": "sibilant",
    "z": "sibilant",
    "S": "postalveolar",
    "Z": "postalveolar",
    "tS": "postalveolar",
    "dZ": "postalveolar",
    "k": "velar",
    "g": "velar",
    "N": "velar",
    "x": "velar",
    "h": "glottal",
    "?": "glottal",
    "r": "rhotic",
    "r-": "rhotic",
    "R": "rhotic",
    "w": "w",
    "W": "w",
    "j": "j",
    "C": "j",
}

# vowels by their first letters (espeak mnemonics: a A aI aU @ 3: e eI E i I u U o oU O V ...)
_VOWEL_PREFIXES = [
    ("aI", "open"),
    ("aU", "open"),
    ("a", "open"),
    ("A", "open"),
    ("V", "mid"),
    ("eI", "front"),
    ("e@", "mid"),
    ("e", "mid"),
    ("E", "mid"),
    ("i", "front"),
    ("I", "front"),
    ("3", "schwa"),
    ("@", "schwa"),
    ("oU", "round_open"),
    ("o", "round_open"),
    ("O", "round_open"),
    ("0", "round_open"),
    ("u", "round_close"),
    ("U", "round_close"),
    ("y", "round_close"),
]


def viseme_for(symbol: str) -> Viseme:
    """The viseme of an espeak-ng phoneme mnemonic (stress marks and length marks are ignored)."""
    s = symbol.lstrip("',%=").rstrip(":;")
    if not s or s.startswith("_"):
        return REST
    if s in _CONSONANTS:
        return _V[_CONSONANTS[s]]
    if s[:2] in _CONSONANTS:
        return _V[_CONSONANTS[s[:2]]]
    for prefix, name in _VOWEL_PREFIXES:
        if s.startswith(prefix):
            return _V[name]
    if s[0] in _CONSONANTS:
        return _V[_CONSONANTS[s[0]]]
    return _V["schwa"]


def mouth_track(phonemes: list[Phoneme], n_frames: int, fps: float = 25.0, offset: float = 0.0) -> np.ndarray:
    """[n_frames, 5] mouth parameters (MOUTH_PARAMS) for frames at times ``offset + (i + 0.5) / fps``.

    Frames outside every phoneme get the rest shape. Pure function of its inputs.
    """
    out = np.tile(np.asarray(REST.target, np.float32), (n_frames, 1))
    if not phonemes or n_frames == 0:
        return out
    t = (np.arange(n_frames, dtype=np.float64) + 0.5) / fps - offset  # frame centre in speech time
    vis = [viseme_for(p.symbol) for p in phonemes]
    centres = np.array([(p.start + p.end) / 2 for p in phonemes])
    half = np.array([(p.end - p.start) / 2 for p in phonemes])
    peak = np.array([v.dominance for v in vis])
    rate = np.array([v.rate for v in vis])
    targets = np.array([v.target for v in vis], np.float64)
    # dominance is flat inside the phoneme and decays outside it (Cohen-Massaro, c = 1)
    dist = np.maximum(np.abs(t[:, None] - centres[None, :]) - half[None, :], 0.0)
    dom = peak[None, :] * np.exp(-rate[None, :] * dist)  # [F, P]
    # the rest shape competes outside speech, so silence before/after closes the mouth
    before, after = phonemes[0].start, phonemes[-1].end
    outside = np.maximum(np.maximum(before - t, t - after), 0.0)
    rest_dom = REST.dominance * (1.0 - np.exp(-25.0 * outside)) * 50.0
    num = dom @ targets + rest_dom[:, None] * np.asarray(REST.target)[None, :]
    den = dom.sum(1) + rest_dom
    out[:] = (num / den[:, None]).astype(np.float32)
    return out
