"""Avatar identities: a small, serializable parameter set describing one person of the world."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, fields

import numpy as np

HAIR_STYLES = ("bald", "short", "long", "bob", "curly", "bun", "mohawk", "side_part")
GLASSES = ("none", "round", "square")
CLOTHING = ("tshirt", "collar", "hoodie", "suit")
BACKGROUNDS = ("solid", "gradient", "wall", "vignette", "stripes")

SKIN_TONES = np.array(
    [[255, 224, 196], [241, 194, 160], [224, 172, 130], [198, 134, 96], [160, 102, 66], [120, 74, 48], [88, 54, 36]],
    np.float32,
)
HAIR_COLOURS = np.array(
    [
        [20, 16, 14],
        [60, 40, 25],
        [110, 70, 35],
        [170, 120, 60],
        [220, 190, 120],
        [150, 60, 30],
        [190, 190, 195],
        [90, 90, 95],
    ],
    np.float32,
)
EYE_COLOURS = np.array([[70, 45, 25], [110, 75, 40], [60, 110, 160], [70, 130, 90], [100, 100, 110]], np.float32)

RGB = tuple[int, int, int]


def _rgb(c) -> RGB:
    return tuple(int(np.clip(round(float(x)), 0, 255)) for x in c)  # type: ignore[return-value]


@dataclass(frozen=True)
class Identity:
    """Face geometry (fractions of the canvas), colours (RGB 0..255) and discrete styles."""

    face_width: float  # half-width of the head ellipse, in units of canvas width
    face_height: float
    jaw_width: float  # 0.6 (pointed chin) .. 1.0 (square)
    skin: RGB
    hair_style: str
    hair_colour: RGB
    eye_size: float
    eye_spacing: float
    eye_height: float  # eyes' vertical position on the face, 0 = centre, +down
    eye_colour: RGB
    brow_thickness: float
    brow_tilt: float
    nose_length: float
    nose_width: float
    mouth_width: float
    lip_colour: RGB
    glasses: str
    glasses_colour: RGB
    clothing: str
    clothing_colour: RGB
    background: str
    background_colours: tuple[RGB, RGB]

    @staticmethod
    def sample(rng: np.random.Generator | int) -> Identity:
        rng = np.random.default_rng(rng) if isinstance(rng, (int, np.integer)) else rng
        u = rng.uniform
        skin = SKIN_TONES[rng.integers(len(SKIN_TONES))] * u(0.93, 1.05, 3)
        hair = HAIR_COLOURS[rng.integers(len(HAIR_COLOURS))] * u(0.85, 1.15, 3)
        eye = EYE_COLOURS[rng.integers(len(EYE_COLOURS))] * u(0.85, 1.15, 3)
        lip = skin * np.array([0.85, 0.55, 0.55]) * u(0.85, 1.05)
        bg1 = rng.integers(20, 236, 3)
        bg2 = np.clip(bg1 + rng.integers(-70, 70, 3), 0, 255)
        return Identity(
            face_width=float(u(0.19, 0.235)),
            face_height=float(u(0.26, 0.31)),
            jaw_width=float(u(0.6, 1.0)),
            skin=_rgb(skin),
            hair_style=str(rng.choice(HAIR_STYLES)),
            hair_colour=_rgb(hair),
            eye_size=float(u(0.8, 1.25)),
            eye_spacing=float(u(0.85, 1.15)),
            eye_height=float(u(-0.03, 0.03)),
            eye_colour=_rgb(eye),
            brow_thickness=float(u(0.6, 1.5)),
            brow_tilt=float(u(-0.25, 0.25)),
            nose_length=float(u(0.8, 1.25)),
            nose_width=float(u(0.75, 1.3)),
            mouth_width=float(u(0.85, 1.2)),
            lip_colour=_rgb(lip),
            glasses=str(rng.choice(GLASSES, p=[0.7, 0.15, 0.15])),
            glasses_colour=_rgb(rng.integers(0, 200, 3)),
            clothing=str(rng.choice(CLOTHING)),
            clothing_colour=_rgb(rng.integers(10, 245, 3)),
            background=str(rng.choice(BACKGROUNDS)),
            background_colours=(_rgb(bg1), _rgb(bg2)),
        )

    def to_dict(self) -> dict:
        return asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @staticmethod
    def from_dict(d: dict) -> Identity:
        names = {f.name for f in fields(Identity)}
        missing, extra = names - d.keys(), d.keys() - names
        if missing or extra:
            raise ValueError(f"not an identity: missing {sorted(missing)}, unexpected {sorted(extra)}")
        d = dict(d)
        for k in ("skin", "hair_colour", "eye_colour", "lip_colour", "glasses_colour", "clothing_colour"):
            d[k] = tuple(d[k])
        d["background_colours"] = tuple(tuple(c) for c in d["background_colours"])
        return Identity(**d)

    def vector(self) -> np.ndarray:
        """A numeric description (continuous values scaled to ~0..1, styles one-hot): identity ground truth."""
        cont = [
            self.face_width / 0.22,
            self.face_height / 0.29,
            self.jaw_width,
            self.eye_size / 1.25,
            self.eye_spacing / 1.15,
            self.eye_height * 10 + 0.5,
            self.brow_thickness / 1.5,
            self.brow_tilt + 0.5,
            self.nose_length / 1.25,
            self.nose_width / 1.3,
            self.mouth_width / 1.2,
        ]
        cols = [
            c / 255.0
            for c in (
                *self.skin,
                *self.hair_colour,
                *self.eye_colour,
                *self.clothing_colour,
                *self.background_colours[0],
                *self.background_colours[1],
            )
        ]
        onehots = []
        for value, options in (
            (self.hair_style, HAIR_STYLES),
            (self.glasses, GLASSES),
            (self.clothing, CLOTHING),
            (self.background, BACKGROUNDS),
        ):
            onehots += [float(value == o) for o in options]
        return np.asarray(cont + cols + onehots, np.float32)
