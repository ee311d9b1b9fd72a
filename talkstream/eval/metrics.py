"""Metrics on a generated clip, given its driving audio and reference (pure functions of arrays).

Convention: ``best_offset = +k`` means the audio is k frames late relative to the mouth (delaying a
clip's audio track by 5 frames reads as +5); the search covers -max_offset..max_offset frames.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from scipy import linalg

from ..world.render import STATE_FIELDS
from ..world.speech import Phoneme
from ..world.visemes import mouth_track

F = {k: i for i, k in enumerate(STATE_FIELDS)}

# thresholds, calibrated on ground-truth world renders (see tests/test_metrics.py)
BLACK_LEVEL = 12 / 255  # mean intensity below this: a black frame
BLANK_STD = 2 / 255  # pixel std below this: a blank (uniform) frame
FROZEN_DIFF = 0.05 / 255  # mean abs change below this between consecutive frames: frozen
FROZEN_RUN = 13  # frames (~0.5 s) of no change that count as a freeze
FLICKER_LIMIT = 0.012  # mean |f_t - (f_t-1 + f_t+1) / 2| (0..1 scale) above this: flickering
SILHOUETTE_THRESHOLD = 0.1  # mean |frame - empty scene| (0..1 scale) above this: a person pixel (silhouette_iou)
IDENTITY_LIMIT = 0.8  # probe identity distance above this: not the reference person
MIN_CONFIDENCE_TRUTH = 0.005  # offset search confidence below which the offset is not reported
MIN_CONFIDENCE_ENERGY = 0.05


def _shifted_pairs(a: np.ndarray, b: np.ndarray, o: int) -> tuple[np.ndarray, np.ndarray]:
    """a[t] paired with b[t - o]."""
    if o >= 0:
        return a[o:], b[: len(b) - o] if o else b
    return a[:o], b[-o:]


def _by_offset(
    a: np.ndarray, b: np.ndarray, max_offset: int, score: Callable[[np.ndarray, np.ndarray], float]
) -> tuple[list[int], list[float]]:
    """The offset search: ``score`` of a[t] against b[t + o] for o in -max_offset .. max_offset."""
    offsets = list(range(-max_offset, max_offset + 1))
    return offsets, [score(*_shifted_pairs(a, b, -o)) for o in offsets]


def _correlation(x: np.ndarray, y: np.ndarray) -> float:
    """Pearson correlation, 0 where either side is constant."""
    return float(np.corrcoef(x, y)[0, 1]) if x.std() > 1e-9 and y.std() > 1e-9 else 0.0


def lip_sync_truth(mouth_pred: np.ndarray, mouth_truth: np.ndarray, max_offset: int = 5) -> dict:
    """Mouth-open read back from the video vs the audio's viseme truth: error at offset 0, and the offset
    search (our Sync-D = error at the best offset, Sync-C = median error - best error)."""
    n = min(len(mouth_pred), len(mouth_truth))
    a, b = np.asarray(mouth_pred[:n], np.float64), np.asarray(mouth_truth[:n], np.float64)
    offsets, errs = _by_offset(a, b, max_offset, lambda x, y: float(np.abs(x - y).mean()))
    best = int(np.argmin(errs))
    conf = float(np.median(errs) - errs[best])
    res = dict(
        mouth_error=errs[max_offset],
        best_offset=offsets[best],
        sync_distance=errs[best],
        sync_confidence=conf,
        error_by_offset=dict(zip(offsets, errs)),
    )
    if b.std() < 0.05 or conf < MIN_CONFIDENCE_TRUTH:  # too little speech to locate the offset
        res["best_offset"] = "not measurable"
    return res


def audio_envelope(audio: np.ndarray, n_frames: int, fps: float = 25.0, sample_rate: int = 16000) -> np.ndarray:
    hop = sample_rate / fps
    out = np.zeros(n_frames)
    for i in range(n_frames):
        seg = audio[int(i * hop) : int((i + 1) * hop)]
        out[i] = np.sqrt(np.mean(seg.astype(np.float64) ** 2)) if len(seg) else 0.0
    return out


def lip_sync_energy(
    mouth_pred: np.ndarray, audio: np.ndarray, fps: float = 25.0, max_offset: int = 5, sample_rate: int = 16000
) -> dict:
    """For any audio: correlation of mouth opening with the audio's loudness, with an offset search."""
    env = audio_envelope(audio, len(mouth_pred), fps, sample_rate)
    offsets, corrs = _by_offset(np.asarray(mouth_pred, np.float64), env, max_offset, _correlation)
    best = int(np.argmax(corrs))
    conf = float(corrs[best] - np.median(corrs))
    res = dict(
        energy_correlation=corrs[max_offset],
        best_offset=offsets[best],
        best_correlation=corrs[best],
        sync_confidence=conf,
        correlation_by_offset=dict(zip(offsets, corrs)),
    )
    if env.std() < 1e-4 or conf < MIN_CONFIDENCE_ENERGY:
        res["best_offset"] = "not measurable"
    return res


def mouth_truth_from_segments(segments: list[dict], n_frames: int, fps: float = 25.0) -> np.ndarray:
    """Jaw-open truth from a world clip's segments (json): each spoken segment's phonemes (absolute times)."""
    truth = np.zeros(n_frames, np.float32)
    for seg in segments:
        if not seg.get("phonemes"):
            continue
        a, b = int(round(seg["start"] * fps)), min(int(round(seg["end"] * fps)), n_frames)
        phon = [Phoneme(s, st - seg["start"], en - seg["start"]) for s, st, en in seg["phonemes"]]
        truth[a:b] = mouth_track(phon, b - a, fps, offset=seg["start"] - a / fps)[:, 0]
    return truth


def identity_drift(identity_pred: np.ndarray, reference: np.ndarray, fps: float = 25.0) -> dict:
    """Probe identity distance of every frame to the reference, its trend (per minute) and a verdict."""
    d = np.sqrt(((identity_pred - reference[None]) ** 2).sum(1))
    t = np.arange(len(d)) / fps
    slope = float(np.polyfit(t, d, 1)[0]) if len(d) > 2 else 0.0
    return dict(
        identity_distance_mean=float(d.mean()),
        identity_distance_max=float(d.max()),
        drift_per_minute=slope * 60.0,
        identity_mismatch=bool(np.median(d) > IDENTITY_LIMIT),
        distance_per_frame=d,
    )


def stability(frames: np.ndarray) -> dict:
    """Flicker (high-frequency frame-to-frame change), black / blank frames, frozen runs."""
    x = frames.astype(np.float32) / 255.0
    means = x.mean(axis=(1, 2, 3))
    stds = x.reshape(len(x), -1).std(1)
    black = np.nonzero(means < BLACK_LEVEL)[0]
    blank = np.nonzero((stds < BLANK_STD) & (means >= BLACK_LEVEL))[0]
    diffs = np.abs(np.diff(x, axis=0)).mean(axis=(1, 2, 3)) if len(x) > 1 else np.zeros(0)
    flicker_per_frame = np.abs(x[1:-1] - 0.5 * (x[:-2] + x[2:])).mean(axis=(1, 2, 3)) if len(x) > 2 else np.zeros(0)
    runs, start = [], None
    for i, still in enumerate(diffs < FROZEN_DIFF):
        if still and start is None:
            start = i
        if (not still or i == len(diffs) - 1) and start is not None:
            end = i + 1 if still else i
            if end - start + 1 >= FROZEN_RUN:
                runs.append((start, end))
            start = None
    flicker = float(flicker_per_frame.mean()) if len(flicker_per_frame) else 0.0
    return dict(
        flicker=flicker,
        flickering=flicker > FLICKER_LIMIT,
        black_frames=black.tolist(),
        blank_frames=blank.tolist(),
        frozen_runs=runs,
        frozen=bool(runs),
        mean_change=float(diffs.mean()) if len(diffs) else 0.0,
        flicker_per_frame=flicker_per_frame,
    )


def person_mask(frames: np.ndarray, background: np.ndarray, threshold: float = SILHOUETTE_THRESHOLD) -> np.ndarray:
    """Where a person is: pixels whose mean absolute RGB difference from the empty scene is above ``threshold``
    (of the 0-1 range). frames [T, H, W, 3] or [H, W, 3] uint8, background [H, W, 3] uint8 -> bool mask."""
    if frames.shape[-3:] != background.shape:
        raise ValueError(f"frames {frames.shape[-3:]} and background {background.shape} differ in size")
    diff = np.abs(frames.astype(np.int16) - background.astype(np.int16)).mean(-1) / 255.0
    return diff > threshold


def silhouette_iou(frames: np.ndarray, truth_frames: np.ndarray, background: np.ndarray) -> dict:
    """How much of the person's outline a generated video keeps: per frame, the intersection over union of the
    person masks (``person_mask``) of the generated frame and the true one, over their common frames. 1 for the
    truth itself; a face that melts, skin blobs beside the neck or a shifted head lower it. The identity probe's
    nearest-reference test does not see such damage (it reads 100% on faces that have lost their shape)."""
    n = min(len(frames), len(truth_frames))
    if n == 0:
        raise ValueError("silhouette_iou needs at least one frame")
    a, b = person_mask(frames[:n], background), person_mask(truth_frames[:n], background)
    union = (a | b).sum((1, 2))
    per_frame = np.where(union > 0, (a & b).sum((1, 2)) / np.maximum(union, 1), 1.0)
    return dict(silhouette_iou=float(per_frame.mean()), silhouette_iou_per_frame=per_frame)


def frechet_distance(a: np.ndarray, b: np.ndarray) -> float:
    """Fréchet distance between Gaussians fitted to two feature sets [N, D] (our FD, on probe features)."""
    if len(a) < 2 or len(b) < 2:
        raise ValueError("need at least two samples on each side")
    mu1, mu2 = a.mean(0), b.mean(0)
    s1, s2 = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    covmean = linalg.sqrtm(s1 @ s2)
    if not np.isfinite(covmean).all():
        eps = np.eye(len(s1)) * 1e-6
        covmean = linalg.sqrtm((s1 + eps) @ (s2 + eps))
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1 + s2 - 2 * covmean.real))


def motion(states: np.ndarray, fps: float = 25.0) -> dict:
    """Head-pose variety (std of yaw/pitch/roll, degrees) and repetition (peak autocorrelation of the pose
    signal at lags of 1 s or more: near 1 means the motion loops)."""
    pose = states[:, [F["yaw"], F["pitch"], F["roll"]]].astype(np.float64)
    variety = pose.std(0)
    p = pose - pose.mean(0)
    rep = 0.0
    lag0 = int(fps)
    if len(p) > 2 * lag0:
        denom = (p**2).sum()
        if denom > 1e-9:
            ac = [float((p[k:] * p[:-k]).sum() / denom * len(p) / (len(p) - k)) for k in range(lag0, len(p) // 2)]
            rep = max(ac) if ac else 0.0
    return dict(yaw_std=float(variety[0]), pitch_std=float(variety[1]), roll_std=float(variety[2]), repetition=rep)


@dataclass
class ClipReport:
    values: dict
    series: dict  # per-frame curves for the plot

    def flags(self) -> list[str]:
        v = self.values
        out = []
        if v.get("black_frames"):
            out.append("black frames")
        if v.get("blank_frames"):
            out.append("blank frames")
        if v.get("frozen"):
            out.append("frozen")
        if v.get("flickering"):
            out.append("flickering")
        if v.get("identity_mismatch"):
            out.append("identity mismatch")
        if v.get("best_offset") not in (None, 0, "not measurable"):
            out.append(f"lip-sync offset {v['best_offset']}")
        return out
