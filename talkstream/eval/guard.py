"""The out-of-domain guard: does the embedded model know how to draw this reference image?

The embedded model learned the synthetic world only; a photograph, a drawing unlike the world's avatars or an image
without a face comes out as a cartoon face painted over it. The guard reads the reference with the world's frame
probe (``eval.probes.FrameProbe``, trained on world renders only): the outputs of its two convolutional branches
(the face window and the whole frame, 512 + 512 values, log1p) and measures how far they lie from those of world
renders: the Mahalanobis distance under a Gaussian fitted to rendered world frames (covariance shrunk towards its
mean variance, so rare directions cannot dominate). A reference farther than the threshold gets a warning.

Chosen by measurement (``benchmarks/results/ood_guard_cpu.json``): the probe's 256-d embedding separated world
renders from real images poorly (held-out world up to 11.7, photographs from 11.3), its branch outputs well. The
threshold is 1.1 x the largest score of a calibration set of world renders that neither the fit nor the false-alarm
measurement uses. The statistics and the threshold ship in ``weights/ood_guard.safetensors``, made by ``fit_guard``
(``python -m talkstream.eval.guard --fit``).
"""

from __future__ import annotations

import argparse
import io
import json
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from .probes import WEIGHTS_DIR, FrameProbe, load_frame_probe, render_probe_set

GUARD_FILE = WEIGHTS_DIR / "ood_guard.safetensors"
FIT_SEED = 424_242  # world renders the statistics are fitted on
CALIBRATION_SEED = 616_161  # world renders that set the threshold
HELD_OUT_SEED = 515_151  # world renders held out from both (the false-alarm measurement)
SHRINK = 0.1

WARNING = (
    "talkstream: warning: this reference image does not look like the synthetic avatars the embedded model was "
    "trained on (out-of-domain score {score:.1f}, threshold {threshold:.1f}); the embedded model is a small "
    "demonstration model of talkstream's synthetic world and cannot draw photographs, other drawings or images "
    "without a face: it would paint a cartoon face over it. For real faces run published weights with "
    "--weights DIR (see docs/real-weights.md); pass --force to generate with the embedded model anyway."
)


@dataclass(frozen=True)
class GuardResult:
    score: float  # Mahalanobis distance of the probe's branch features to the world renders'
    threshold: float

    @property
    def in_domain(self) -> bool:
        return self.score <= self.threshold

    def message(self) -> str:
        return WARNING.format(score=self.score, threshold=self.threshold)


def mahalanobis(features: np.ndarray, mean: np.ndarray, precision: np.ndarray) -> np.ndarray:
    """Distances of rows [N, D] under a Gaussian (mean [D], precision = inverse covariance [D, D])."""
    d = np.asarray(features, np.float64) - mean
    return np.sqrt(np.maximum(np.einsum("nd,de,ne->n", d, precision, d), 0.0))


def shrunk_precision(features: np.ndarray, shrink: float = SHRINK) -> tuple[np.ndarray, np.ndarray]:
    """(mean, inverse of the covariance shrunk towards its mean variance by ``shrink``) of rows [N, D]."""
    f = np.asarray(features, np.float64)
    mean = f.mean(0)
    cov = np.cov(f, rowvar=False)
    cov = (1 - shrink) * cov + shrink * np.trace(cov) / cov.shape[0] * np.eye(cov.shape[0])
    return mean, np.linalg.inv(cov)


@torch.no_grad()
def probe_features(probe: FrameProbe, frames: np.ndarray, batch: int = 64) -> np.ndarray:
    """The frame probe's face-window and whole-frame branch outputs, log1p: [N, 1024] for uint8 frames [N, H, W, 3]."""
    probe.eval()
    out = []
    for i in range(0, len(frames), batch):
        face, glob = probe.prepare(frames[i : i + batch])
        out.append(torch.cat([probe.face(face), probe.glob(glob)], 1).clamp_min(0).log1p())
    return torch.cat(out).double().numpy()


def _as_reference(image) -> np.ndarray:
    from ..stream.avatar import load_reference

    return load_reference(image, 256)


class OODGuard:
    """``check(image)`` -> ``GuardResult`` (score vs threshold) for a reference image (path, bytes, PIL, array)."""

    def __init__(self, probe: FrameProbe, mean: np.ndarray, precision: np.ndarray, threshold: float) -> None:
        self.probe, self.mean, self.precision, self.threshold = probe.eval(), mean, precision, float(threshold)

    @staticmethod
    def load(path: str | Path | None = None, probe: FrameProbe | None = None) -> OODGuard:
        path = Path(path) if path else GUARD_FILE
        if not path.exists():
            raise FileNotFoundError(f"{path}: no guard statistics (make them: python -m talkstream.eval.guard --fit)")
        t = load_file(str(path))
        return OODGuard(probe or load_frame_probe(), t["mean"].double().numpy(), _precision(t), float(t["threshold"]))

    def scores(self, frames: np.ndarray) -> np.ndarray:
        """Scores of uint8 frames [N, H, W, 3] (already references: square, any size)."""
        return mahalanobis(probe_features(self.probe, frames), self.mean, self.precision)

    def check(self, image) -> GuardResult:
        return GuardResult(float(self.scores(_as_reference(image)[None])[0]), self.threshold)


class OutOfDomainError(ValueError):
    pass


def guard_reference(image, force: bool = False, guard: OODGuard | None = None) -> GuardResult:
    """Before the embedded model generates: print the warning (stderr) for a reference it cannot draw, and refuse
    (``OutOfDomainError``) unless ``force``."""
    import sys

    res = (guard or OODGuard.load()).check(image)
    if not res.in_domain:
        print(res.message(), file=sys.stderr)
        if not force:
            raise OutOfDomainError(
                "not generating with the embedded model from an out-of-domain reference (pass --force to generate "
                "anyway, or --weights DIR for published weights)"
            )
    return res


# -- fitting and measuring ----------------------------------------------------------------------------------
def _jpeg(frame: np.ndarray, quality: int) -> np.ndarray:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(frame).save(buf, "JPEG", quality=quality)
    return np.asarray(Image.open(io.BytesIO(buf.getvalue())).convert("RGB"))


def world_references(n: int, seed: int, variants: bool = True) -> np.ndarray:
    """n world renders (random identities and states) as a user would hand them in: every third saved as a JPEG
    (quality 60-95), every third of the others resized to 512 and back through ``load_reference``."""
    from PIL import Image

    frames, _, _ = render_probe_set(n, seed)
    if not variants:
        return frames
    rng = np.random.default_rng(seed)
    out = []
    for i, f in enumerate(frames):
        if i % 3 == 1:
            f = _jpeg(f, int(rng.integers(60, 96)))
        elif i % 3 == 2:
            f = np.asarray(Image.fromarray(f).resize((512, 512), Image.Resampling.BICUBIC))
        out.append(_as_reference(f))
    return np.stack(out)


def other_images() -> dict[str, np.ndarray]:
    """Images the embedded model cannot draw, from scikit-image's bundled data: real portraits (the astronaut, and
    the 100 face crops of its LFW subset), photographs without a person, drawings / graphics, a drawn cartoon face
    unlike the world's avatars, noise."""
    import skimage.data as data
    from PIL import Image, ImageDraw

    out: dict[str, np.ndarray] = {"portrait/astronaut": data.astronaut()}
    lfw = data.lfw_subset()[:100]  # the first 100 are faces (25x25 grey)
    for i, face in enumerate(lfw):
        out[f"portrait/lfw_{i:03d}"] = (face * 255).round().astype(np.uint8)
    for name in ("camera", "coffee", "chelsea", "rocket", "immunohistochemistry", "brick", "grass", "moon", "clock"):
        out[f"photo/{name}"] = getattr(data, name)()
    out["drawing/logo"] = data.logo()
    out["drawing/colorwheel"] = data.colorwheel()
    out["drawing/text"] = data.text()
    img = Image.new("RGB", (256, 256), (250, 240, 200))  # a smiley: a face, but not one of the world's
    d = ImageDraw.Draw(img)
    d.ellipse((40, 40, 216, 216), fill=(255, 220, 0), outline=(0, 0, 0), width=4)
    d.ellipse((90, 95, 110, 125), fill=(0, 0, 0))
    d.ellipse((146, 95, 166, 125), fill=(0, 0, 0))
    d.arc((80, 110, 176, 180), 20, 160, fill=(0, 0, 0), width=5)
    out["drawing/smiley"] = np.asarray(img)
    out["noise/uniform"] = np.random.default_rng(0).integers(0, 256, (256, 256, 3), dtype=np.uint8)
    return {k: _as_reference(v if v.ndim == 3 else np.repeat(v[..., None], 3, 2)) for k, v in out.items()}


def _precision(t: dict) -> np.ndarray:
    """The precision matrix of a guard file: whole (``precision``) or its upper triangle (``precision_upper``)."""
    if "precision" in t:
        return t["precision"].double().numpy()
    upper = t["precision_upper"].double().numpy()
    n = int(round((np.sqrt(8 * len(upper) + 1) - 1) / 2))
    m = np.zeros((n, n))
    m[np.triu_indices(n)] = upper
    return m + np.triu(m, 1).T


def save_guard(out: str | Path, mean: np.ndarray, precision: np.ndarray, threshold: float, n_fit: int) -> None:
    """The guard file: the mean (fp32), the symmetric precision matrix's upper triangle (fp16: 1 MB instead of the
    whole matrix's 4 MB in fp32; ``check_guard`` measures the stored file: the same alarms and warnings) and the
    threshold (fp32)."""
    p = np.asarray(precision)
    save_file(
        {
            "mean": torch.from_numpy(np.asarray(mean)).float(),
            "precision_upper": torch.from_numpy(p[np.triu_indices(p.shape[0])]).half(),
            "threshold": torch.tensor(float(threshold)),
        },
        str(out),
        metadata={"talkstream": json.dumps(dict(kind="ood_guard", renders=n_fit, seed=FIT_SEED, shrink=SHRINK))},
    )


def check_guard(path: str | Path | None = None, n_calibration: int = 200, n_held_out: int = 200) -> dict:
    """A guard file measured as shipped: the calibration renders' largest score (the threshold is 1.1x it), false
    alarms on the held-out world renders, and warnings on ``other_images``."""
    t0 = time.perf_counter()
    guard = OODGuard.load(path)
    cal = guard.scores(world_references(n_calibration, CALIBRATION_SEED))
    held = guard.scores(world_references(n_held_out, HELD_OUT_SEED))
    others = other_images()
    names = list(others)
    other_scores = guard.scores(np.stack([others[k] for k in names]))
    portraits = np.array([s for k, s in zip(names, other_scores) if k.startswith("portrait/")])
    return dict(
        file=Path(path or GUARD_FILE).name,
        stored={
            k: f"{tuple(v.shape)} {v.dtype}".replace("torch.", "")
            for k, v in load_file(str(path or GUARD_FILE)).items()
        },
        threshold=guard.threshold,
        calibration=dict(renders=n_calibration, seed=CALIBRATION_SEED, max=float(cal.max())),
        held_out_world=dict(
            renders=n_held_out,
            seed=HELD_OUT_SEED,
            false_alarms=int((held > guard.threshold).sum()),
            max=float(held.max()),
        ),
        other=dict(
            images=len(names),
            warned=int((other_scores > guard.threshold).sum()),
            min=float(other_scores.min()),
            min_image=names[int(other_scores.argmin())],
            portraits=len(portraits),
            portraits_warned=int((portraits > guard.threshold).sum()),
            portraits_min=float(portraits.min()),
        ),
        seconds=round(time.perf_counter() - t0, 1),
    )


def fit_guard(
    n_fit: int = 600, n_calibration: int = 200, n_held_out: int = 200, margin: float = 1.1, out: Path | None = None
) -> dict:
    """Fit the statistics on ``n_fit`` world renders; threshold = ``margin`` x the largest score of ``n_calibration``
    other renders; measure ``n_held_out`` renders of a third seed and ``other_images``. Writes the guard file
    (``out``) and returns the measurement."""
    t0 = time.perf_counter()
    probe = load_frame_probe()
    fit = world_references(n_fit, FIT_SEED)
    mean, precision = shrunk_precision(probe_features(probe, fit))
    guard = OODGuard(probe, mean, precision, 0.0)
    fit_scores = guard.scores(fit)
    cal = guard.scores(world_references(n_calibration, CALIBRATION_SEED))
    guard.threshold = float(margin * cal.max())
    held = guard.scores(world_references(n_held_out, HELD_OUT_SEED))
    others = other_images()
    names = list(others)
    other_scores = guard.scores(np.stack([others[k] for k in names]))
    by_kind: dict[str, list[float]] = {}
    for k, s in zip(names, other_scores):
        by_kind.setdefault(k.split("/")[0], []).append(float(s))
    res = dict(
        what="out-of-domain guard: Mahalanobis distance of the frame probe's branch features to world renders",
        features="FrameProbe face-window + whole-frame branch outputs (512 + 512, log1p), weights/frame_probe",
        shrink=SHRINK,
        fit=dict(renders=n_fit, seed=FIT_SEED, max=float(fit_scores.max()), p50=float(np.median(fit_scores))),
        calibration=dict(renders=n_calibration, seed=CALIBRATION_SEED, max=float(cal.max())),
        threshold=guard.threshold,
        margin=margin,
        rejected_alternative=(
            "the probe's 256-d embedding (same Mahalanobis, shrink 0.1, 600 fit renders): held-out world renders up "
            "to 11.68, other images from 11.30, real portraits from 12.51: no threshold separates them"
        ),
        held_out_world=dict(
            renders=n_held_out,
            seed=HELD_OUT_SEED,
            false_alarms=int((held > guard.threshold).sum()),
            max=float(held.max()),
            p50=float(np.median(held)),
            p99=float(np.percentile(held, 99)),
        ),
        other=dict(
            images=len(names),
            warned=int((other_scores > guard.threshold).sum()),
            min=float(other_scores.min()),
            min_over_threshold=float(other_scores.min() / guard.threshold),
            min_image=names[int(other_scores.argmin())],
            by_kind={
                k: dict(images=len(v), warned=sum(s > guard.threshold for s in v), min=min(v), p50=float(np.median(v)))
                for k, v in by_kind.items()
            },
            scores={k: round(float(s), 2) for k, s in zip(names, other_scores) if not k.startswith("portrait/lfw")},
        ),
        seconds=round(time.perf_counter() - t0, 1),
    )
    if out is not None:
        save_guard(out, mean, precision, guard.threshold, n_fit)
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description="fit / measure the out-of-domain guard")
    ap.add_argument("--fit", action="store_true", help="fit the statistics and write the guard file")
    ap.add_argument("--check", action="store_true", help="measure the guard file as it is (--out) into --json")
    ap.add_argument("--renders", type=int, default=600)
    ap.add_argument("--calibration", type=int, default=200)
    ap.add_argument("--held-out", type=int, default=200)
    ap.add_argument("--out", type=Path, default=GUARD_FILE)
    ap.add_argument("--json", type=Path, default=Path("benchmarks/results/ood_guard_cpu.json"))
    a = ap.parse_args()
    if not a.fit and not a.check:
        raise SystemExit("nothing to do: pass --fit or --check")
    from ..machine import describe

    if a.check:
        res = dict(check_guard(a.out, a.calibration, a.held_out), machine=describe())
        a.json.parent.mkdir(parents=True, exist_ok=True)
        a.json.write_text(json.dumps(res, indent=2) + "\n")
        print(json.dumps({k: v for k, v in res.items() if k != "machine"}, indent=2))
        return

    res = fit_guard(a.renders, a.calibration, a.held_out, out=a.out)
    res["machine"] = describe()
    a.json.parent.mkdir(parents=True, exist_ok=True)
    a.json.write_text(json.dumps(res, indent=2))
    print(json.dumps({k: v for k, v in res.items() if k != "other"}, indent=2))
    print(json.dumps(res["other"]["by_kind"], indent=2))


if __name__ == "__main__":
    main()


__all__ = [
    "GUARD_FILE",
    "GuardResult",
    "OODGuard",
    "check_guard",
    "save_guard",
    "OutOfDomainError",
    "guard_reference",
    "WARNING",
    "fit_guard",
    "mahalanobis",
    "other_images",
    "probe_features",
    "world_references",
]
