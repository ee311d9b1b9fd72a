"""World-truth probes: small CNNs that read the world's ground truth back from rendered frames.

``FrameProbe`` sees a frame (resized to 256x256) through two windows: the face at full resolution
(a fixed 128x128 crop that holds the eyes and mouth for every pose the world produces) and the whole
frame at 64x64 (pose, hair, clothes, background). It predicts the per-frame state (mouth, blink,
pose, gaze, brows, smile) and the identity vector. ``BehaviourProbe`` classifies the behaviour state
(idle / listening / speaking / thinking) from a window of per-frame readouts.

Probes are trained only on rendered ground truth, never on model outputs (``train_frame_probe``).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from ..world.behaviour import STATES, make_clip
from ..world.identity import Identity
from ..world.render import STATE_FIELDS, FrameState, Renderer

WEIGHTS_DIR = Path(__file__).resolve().parents[1] / "weights"
FRAME_PROBE_FILE = WEIGHTS_DIR / "frame_probe.safetensors"
BEHAVIOUR_PROBE_FILE = WEIGHTS_DIR / "behaviour_probe.safetensors"

# per-field scale: the net predicts value / scale (all targets ~ unit range)
STATE_SCALE = dict(
    jaw_open=1,
    lip_width=1,
    lip_round=1,
    teeth=1,
    tongue=1,
    yaw=25,
    pitch=12,
    roll=10,
    tx=0.04,
    ty=0.03,
    blink=1,
    gaze_x=1,
    gaze_y=1,
    brow=1,
    smile=1,
)
_SCALE = torch.tensor([STATE_SCALE[f] for f in STATE_FIELDS], dtype=torch.float32)
ID_DIM = len(Identity.sample(0).vector())
FACE_BOX = (48, 176, 64, 192)  # y0, y1, x0, x1 at 256x256


def _conv(cin, cout, stride=1):
    return nn.Sequential(nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


class FrameProbe(nn.Module):
    def __init__(self, width: int = 32) -> None:
        super().__init__()
        w = width
        self.face = nn.Sequential(
            _conv(3, w, 2),
            _conv(w, w),
            _conv(w, 2 * w, 2),
            _conv(2 * w, 2 * w),
            _conv(2 * w, 3 * w, 2),
            _conv(3 * w, 4 * w, 2),
            _conv(4 * w, 4 * w, 2),
            nn.AdaptiveAvgPool2d(2),
            nn.Flatten(),
        )  # 128 -> 4 -> 2x2
        self.glob = nn.Sequential(
            _conv(3, w, 2),
            _conv(w, 2 * w, 2),
            _conv(2 * w, 3 * w, 2),
            _conv(3 * w, 4 * w, 2),
            nn.AdaptiveAvgPool2d(2),
            nn.Flatten(),
        )  # 64 -> 4 -> 2x2
        self.embed = nn.Sequential(nn.Linear(2 * 16 * w, 256), nn.ReLU(inplace=True))
        self.state_head = nn.Linear(256, len(STATE_FIELDS))
        self.id_head = nn.Linear(256, ID_DIM)

    @staticmethod
    def prepare(frames: np.ndarray | torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """uint8 frames [N, H, W, 3] (any size) -> (face crops [N, 3, 128, 128], globals [N, 3, 64, 64])."""
        x = torch.as_tensor(np.asarray(frames)).permute(0, 3, 1, 2).float() / 127.5 - 1
        if x.shape[-2:] != (256, 256):
            x = F.interpolate(x, size=(256, 256), mode="bilinear", antialias=True, align_corners=False)
        y0, y1, x0, x1 = FACE_BOX
        return x[:, :, y0:y1, x0:x1].contiguous(), F.avg_pool2d(x, 4)

    def forward(self, face: torch.Tensor, glob: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        h = self.embed(torch.cat([self.face(face), self.glob(glob)], 1))
        return self.state_head(h), self.id_head(h), h

    @torch.no_grad()
    def read(self, frames: np.ndarray, batch: int = 128) -> dict[str, np.ndarray]:
        """Per-frame readouts: 'states' [N, 15] in world units, 'identity' [N, ID_DIM], 'features' [N, 256]."""
        self.eval()
        states, ids, feats = [], [], []
        for i in range(0, len(frames), batch):
            face, glob = self.prepare(frames[i : i + batch])
            s, d, h = self(face, glob)
            states.append(s * _SCALE)
            ids.append(d)
            feats.append(h)
        return dict(
            states=torch.cat(states).numpy(), identity=torch.cat(ids).numpy(), features=torch.cat(feats).numpy()
        )


def random_state(rng: np.random.Generator) -> FrameState:
    """A frame state drawn to cover (and slightly exceed) what world clips produce."""
    u = rng.uniform
    return FrameState(
        jaw_open=float(u(0, 1) if rng.random() < 0.7 else 0.0),
        lip_width=float(u(0.2, 0.9)),
        lip_round=float(u(0, 1)),
        teeth=float(u(0, 1)),
        tongue=float(u(0, 1)),
        yaw=float(u(-25, 25)),
        pitch=float(u(-12, 12)),
        roll=float(u(-10, 10)),
        tx=float(u(-0.035, 0.035)),
        ty=float(u(-0.025, 0.025)),
        blink=float(0.0 if rng.random() < 0.5 else u(0, 1)),
        gaze_x=float(u(-1, 1)),
        gaze_y=float(u(-1, 1)),
        brow=float(u(-0.4, 1)),
        smile=float(u(0, 1)),
    )


def render_probe_set(n: int, seed: int, identities: int | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """n rendered 256x256 frames with random identities and states: (frames, states, identity vectors)."""
    rng = np.random.default_rng(seed)
    n_id = identities or n
    people = [Identity.sample(np.random.default_rng([seed, 7, i])) for i in range(n_id)]
    renderers: dict[int, Renderer] = {}
    frames = np.empty((n, 256, 256, 3), np.uint8)
    states = np.empty((n, len(STATE_FIELDS)), np.float32)
    ids = np.empty((n, ID_DIM), np.float32)
    for i in range(n):
        k = i % n_id
        if k not in renderers:
            renderers[k] = Renderer(people[k])
            if len(renderers) > 256:
                renderers.pop(next(iter(renderers)))
        s = random_state(rng)
        frames[i] = renderers[k].render(s)
        states[i] = s.to_array()
        ids[i] = people[k].vector()
    return frames, states, ids


def _render_part(args):
    n, seed, identities = args
    frames, states, ids = render_probe_set(n, seed, identities)
    face, glob = FrameProbe.prepare(frames)
    return face.half(), glob.half(), states, ids


def render_training_set(
    n: int, seed: int, workers: int = 1
) -> tuple[torch.Tensor, torch.Tensor, np.ndarray, np.ndarray]:
    """Prepared probe inputs for n frames (1 identity per 4 frames), rendered over ``workers`` processes."""
    from concurrent.futures import ProcessPoolExecutor
    from multiprocessing import get_context

    parts = max(1, workers) * 4
    jobs = [(n // parts + (i < n % parts), seed * 1000 + i, max(1, (n // parts) // 4)) for i in range(parts)]
    if workers <= 1:
        out = [_render_part(j) for j in jobs]
    else:
        with ProcessPoolExecutor(workers, mp_context=get_context("fork")) as pool:
            out = list(pool.map(_render_part, jobs))
    return (
        torch.cat([o[0] for o in out]),
        torch.cat([o[1] for o in out]),
        np.concatenate([o[2] for o in out]),
        np.concatenate([o[3] for o in out]),
    )


def train_frame_probe(
    n_train: int = 12000,
    epochs: int = 6,
    seed: int = 0,
    batch: int = 64,
    lr: float = 2e-3,
    workers: int = 1,
    device: str = "cpu",
    log=print,
) -> tuple[FrameProbe, dict]:
    torch.manual_seed(seed)
    t0 = time.perf_counter()
    face, glob, states, ids = render_training_set(n_train, 1 + seed, workers)
    log(f"rendered {n_train} training frames in {time.perf_counter() - t0:.1f}s")
    face, glob = face.to(device), glob.to(device)
    y_state = (torch.from_numpy(states) / _SCALE).to(device)
    y_id = torch.from_numpy(ids).to(device)
    model = FrameProbe().to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    steps = epochs * (n_train // batch)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.15)
    g = torch.Generator().manual_seed(seed)
    step = 0
    for ep in range(epochs):
        model.train()
        perm = torch.randperm(n_train, generator=g).to(device)
        tot = 0.0
        for i in range(0, n_train - batch + 1, batch):
            idx = perm[i : i + batch]
            s, d, _ = model(face[idx].float(), glob[idx].float())
            loss = F.smooth_l1_loss(s, y_state[idx], beta=0.05) + 0.5 * F.smooth_l1_loss(d, y_id[idx], beta=0.05)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            step += 1
            tot += loss.item()
        log(f"epoch {ep + 1}/{epochs} loss {tot / (n_train // batch):.4f} ({time.perf_counter() - t0:.0f}s)")
    return model.cpu().eval(), dict(n_train=n_train, epochs=epochs, seconds=round(time.perf_counter() - t0, 1))


@dataclass
class ProbeAccuracy:
    mouth_open_mae: float
    mouth_mae: dict
    blink_f1: float
    yaw_mae_deg: float
    pitch_mae_deg: float
    roll_mae_deg: float
    identity_nn_accuracy: float

    def to_dict(self) -> dict:
        return self.__dict__.copy()


def evaluate_frame_probe(model: FrameProbe, n: int = 600, n_identities: int = 100, seed: int = 777) -> ProbeAccuracy:
    """Accuracy on held-out renders (seeds disjoint from training). Identity: each of ``n_identities``
    people is rendered twice with different states; a query's nearest gallery embedding must be its own."""
    frames, states, _ = render_probe_set(n, seed=seed)
    out = model.read(frames)["states"]
    f = {k: i for i, k in enumerate(STATE_FIELDS)}
    err = np.abs(out - states)
    truth_blink, pred_blink = states[:, f["blink"]] > 0.5, out[:, f["blink"]] > 0.5
    tp = (truth_blink & pred_blink).sum()
    f1 = 2 * tp / max(1, truth_blink.sum() + pred_blink.sum())
    rng = np.random.default_rng(seed + 1)
    people = [Identity.sample(np.random.default_rng([seed, 9, i])) for i in range(n_identities)]
    gallery = np.stack([Renderer(p).render(random_state(rng)) for p in people])
    query = np.stack([Renderer(p).render(random_state(rng)) for p in people])
    ga, qa = model.read(gallery)["identity"], model.read(query)["identity"]
    dist = ((qa[:, None] - ga[None]) ** 2).sum(-1)
    acc = float((dist.argmin(1) == np.arange(n_identities)).mean())
    return ProbeAccuracy(
        mouth_open_mae=float(err[:, f["jaw_open"]].mean()),
        mouth_mae={k: float(err[:, f[k]].mean()) for k in ("lip_width", "lip_round", "teeth", "tongue")},
        blink_f1=float(f1),
        yaw_mae_deg=float(err[:, f["yaw"]].mean()),
        pitch_mae_deg=float(err[:, f["pitch"]].mean()),
        roll_mae_deg=float(err[:, f["roll"]].mean()),
        identity_nn_accuracy=acc,
    )


# -- behaviour ------------------------------------------------------------------------------------------
BEHAVIOUR_WINDOW = 25  # frames (1 s)
_BEHAVIOUR_FIELDS = (
    "jaw_open",
    "lip_width",
    "lip_round",
    "yaw",
    "pitch",
    "roll",
    "blink",
    "gaze_x",
    "gaze_y",
    "brow",
    "smile",
)
_BIDX = [STATE_FIELDS.index(k) for k in _BEHAVIOUR_FIELDS]


class BehaviourProbe(nn.Module):
    """Behaviour state per frame from a 1 s window of per-frame readouts (temporal 1D CNN)."""

    def __init__(self, width: int = 48) -> None:
        super().__init__()
        c = len(_BEHAVIOUR_FIELDS)
        self.net = nn.Sequential(
            nn.Conv1d(c, width, 5, padding=2),
            nn.ReLU(),
            nn.Conv1d(width, width, 5, padding=2),
            nn.ReLU(),
            nn.Conv1d(width, width, 5, padding=4, dilation=2),
            nn.ReLU(),
            nn.Conv1d(width, len(STATES), 1),
        )

    @staticmethod
    def features(states: np.ndarray) -> torch.Tensor:
        """[T, 15] world-unit states -> [1, C, T] normalised inputs."""
        s = torch.as_tensor(states[:, _BIDX], dtype=torch.float32) / _SCALE[_BIDX]
        return s.T[None]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)  # [B, n_states, T] logits

    @torch.no_grad()
    def classify(self, states: np.ndarray) -> np.ndarray:
        self.eval()
        return self(self.features(states))[0].argmax(0).numpy()


def train_behaviour_probe(
    n_clips: int = 300, seconds: float = 12.0, epochs: int = 30, seed: int = 0, noise: float = 0.05, log=print
) -> tuple[BehaviourProbe, dict]:
    """Trained on world clips' per-frame truth plus readout-sized noise (no rendering needed)."""
    torch.manual_seed(seed)
    clips = [make_clip(50_000 + seed * 10_000 + i, seconds) for i in range(n_clips)]
    x = torch.cat([BehaviourProbe.features(c.states) for c in clips])
    y = torch.stack([torch.as_tensor(c.behaviour, dtype=torch.long) for c in clips])
    model = BehaviourProbe()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(seed)
    for _ep in range(epochs):
        perm = torch.randperm(n_clips, generator=g)
        for i in range(0, n_clips, 16):
            idx = perm[i : i + 16]
            xb = x[idx] + noise * torch.randn(x[idx].shape, generator=g)
            loss = F.cross_entropy(model(xb), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    log(f"behaviour probe: final loss {loss.item():.3f}")
    return model.eval(), dict(n_clips=n_clips, seconds=seconds, epochs=epochs, input_noise=noise)


def evaluate_behaviour_probe(model: BehaviourProbe, n_clips: int = 40, seed: int = 99_000) -> float:
    correct = total = 0
    for i in range(n_clips):
        c = make_clip(seed + i, 12.0)
        noisy = c.states + np.random.default_rng(i).normal(0, 0.05, c.states.shape).astype(np.float32) * _SCALE.numpy()
        pred = model.classify(noisy)
        correct += int((pred == c.behaviour).sum())
        total += len(pred)
    return correct / total


# -- shipped weights ----------------------------------------------------------------------------------------
def load_frame_probe(path: str | Path | None = None) -> FrameProbe:
    return _load(FrameProbe(), path or FRAME_PROBE_FILE)


def load_behaviour_probe(path: str | Path | None = None) -> BehaviourProbe:
    return _load(BehaviourProbe(), path or BEHAVIOUR_PROBE_FILE)


def _load(model: nn.Module, path) -> nn.Module:
    from safetensors.torch import load_file

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"probe weights {path} are missing: train them with `python experiments/train_probes.py`"
        )
    model.load_state_dict(load_file(str(path)))
    return model.eval()
