"""Real-face metrics with dlib (``dlib-bin``) and the models of the PyPI package ``face-recognition-models``.

* lip sync: the 68-landmark inner-mouth aspect ratio (MAR) per frame against the audio's loudness, with
  the same offset search as the world metric;
* identity: dlib's 128-d face descriptor distance to the reference (CSIM-like; dlib calls < 0.6 the
  same person).

Frames without a detectable face are reported as not measurable, never as a number.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np

from . import metrics

SAME_PERSON = 0.6


def _models_dir() -> Path:
    spec = importlib.util.find_spec("face_recognition_models")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError("real-face metrics need the PyPI package 'face-recognition-models'")
    return Path(list(spec.submodule_search_locations)[0]) / "models"


class FaceAnalyzer:
    def __init__(self, upsample: int = 1) -> None:
        try:
            import dlib
        except ImportError:
            raise ImportError("real-face metrics need the PyPI package 'dlib-bin' (prebuilt dlib)") from None
        d = _models_dir()
        self.detector = dlib.get_frontal_face_detector()
        self.shape = dlib.shape_predictor(str(d / "shape_predictor_68_face_landmarks.dat"))
        self.recognizer = dlib.face_recognition_model_v1(str(d / "dlib_face_recognition_resnet_model_v1.dat"))
        self.upsample = upsample

    def analyze(self, frame: np.ndarray) -> dict | None:
        """The largest face: 68 landmarks [68, 2] and its 128-d descriptor; None if no face is found."""
        img = np.ascontiguousarray(frame[..., :3], dtype=np.uint8)
        faces = self.detector(img, self.upsample)
        if not faces:
            return None
        face = max(faces, key=lambda r: r.width() * r.height())
        shape = self.shape(img, face)
        pts = np.array([(shape.part(i).x, shape.part(i).y) for i in range(68)], np.float64)
        desc = np.array(self.recognizer.compute_face_descriptor(img, shape))
        return dict(landmarks=pts, descriptor=desc, box=(face.left(), face.top(), face.right(), face.bottom()))


def mouth_aspect_ratio(landmarks: np.ndarray) -> float:
    """Inner-lip opening over inner-lip width (landmarks 60-67)."""
    p = landmarks
    vertical = np.linalg.norm(p[61] - p[67]) + np.linalg.norm(p[62] - p[66]) + np.linalg.norm(p[63] - p[65])
    return float(vertical / (3 * np.linalg.norm(p[60] - p[64]) + 1e-9))


def evaluate_real(
    frames: np.ndarray,
    audio: np.ndarray | None,
    reference: np.ndarray | None,
    analyzer: FaceAnalyzer | None = None,
    fps: float = 25.0,
) -> dict:
    analyzer = analyzer or FaceAnalyzer()
    out: dict = dict(frames=len(frames))
    ref_desc = None
    if reference is not None:
        ref = analyzer.analyze(reference)
        if ref is None:
            out["identity"] = "not measurable: no face in the reference image"
        else:
            ref_desc = ref["descriptor"]
    mar, dist, found = [], [], 0
    for f in frames:
        a = analyzer.analyze(f)
        if a is None:
            mar.append(np.nan)
            dist.append(np.nan)
            continue
        found += 1
        mar.append(mouth_aspect_ratio(a["landmarks"]))
        dist.append(float(np.linalg.norm(a["descriptor"] - ref_desc)) if ref_desc is not None else np.nan)
    out["face_found_fraction"] = found / max(1, len(frames))
    if found == 0:
        out["lip_sync"] = out["identity"] = "not measurable: no face found in the video"
        return out
    mar_a = np.array(mar)
    out["mouth_aspect_ratio_mean"] = float(np.nanmean(mar_a))
    if ref_desc is not None:
        d = np.array(dist)
        out["face_distance_mean"] = float(np.nanmean(d))
        out["same_person"] = bool(np.nanmedian(d) < SAME_PERSON)
    if audio is None:
        out["lip_sync"] = "not measurable: no audio"
    elif found < 3 or np.nanstd(mar_a) < 1e-6:
        out["lip_sync"] = "not measurable: too few frames with a face, or a mouth that never moves"
    else:
        filled = np.where(np.isnan(mar_a), np.nanmean(mar_a), mar_a)
        out.update({f"mar_{k}": v for k, v in metrics.lip_sync_energy(filled, audio, fps).items()})
    return out
