"""wav2vec2 audio features as OmniAvatar / LiveTalk use them, offline and streamed with a fixed look-ahead.

OmniAvatar's recipe for a clip of ``n`` video frames (its audio: ``(n - 1) / fps`` seconds at 16 kHz):
normalise the waveform to zero mean and unit variance, run wav2vec2's convolutional feature encoder
(50 Hz), resample those features linearly (``align_corners=True``) to ``n`` positions - one per video
frame - then run the projection and the transformer on that frame-rate sequence and concatenate the last
hidden state with all 13 hidden states: ``[n, 14 * 768]`` for wav2vec2-base-960h. ``clip_features`` does
exactly that.

wav2vec2 is bidirectional (attention over the whole clip, a 128-wide positional convolution, the
waveform's and the first convolution's normalisation over time), so no streaming computation can equal
the whole-clip one for an arbitrary clip. A stream's features are therefore defined by windows:

* video frames are cut into hops aligned to latent frames: [0, 1), [1, 1 + hop), [1 + hop, 1 + 2 hop), ...
* a hop's features are OmniAvatar's features of the clip made of the window from ``look_back`` frames
  before the hop to ``look_ahead`` frames after it (cut at the stream's start and end), taken at the hop's
  frames.

``Wav2VecFeatures.encode`` (offline) and ``Wav2VecFeatures.stream`` (live) compute the same windows, so
streamed features equal offline ones to float rounding; a window covering the whole clip gives exactly
``clip_features``. A live stream emits a hop once it holds audio up to ``look_ahead`` frames past it.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F

if TYPE_CHECKING:
    from transformers import Wav2Vec2Model

SAMPLE_RATE = 16_000

# facebook/wav2vec2-base-960h's config.json (the fields that shape the model), for tests and checks
BASE_960H_CONFIG = dict(
    hidden_size=768,
    num_hidden_layers=12,
    num_attention_heads=12,
    intermediate_size=3072,
    hidden_act="gelu",
    conv_dim=(512, 512, 512, 512, 512, 512, 512),
    conv_stride=(5, 2, 2, 2, 2, 2, 2),
    conv_kernel=(10, 3, 3, 3, 3, 2, 2),
    conv_bias=False,
    feat_extract_norm="group",
    feat_extract_activation="gelu",
    num_conv_pos_embeddings=128,
    num_conv_pos_embedding_groups=16,
    do_stable_layer_norm=False,
    layer_norm_eps=1e-5,
    vocab_size=32,
)


class Wav2VecError(ValueError):
    pass


def load_wav2vec(
    path: str | os.PathLike, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32
) -> Wav2Vec2Model:
    """``transformers``' ``Wav2Vec2Model`` from a local folder (e.g. the user's wav2vec2-base-960h): no download."""
    try:
        from transformers import Wav2Vec2Model
    except ImportError:
        raise Wav2VecError("wav2vec2 features need the PyPI package 'transformers': pip install transformers") from None
    path = Path(path)
    if not (path / "config.json").exists():
        raise Wav2VecError(f"{path}: no wav2vec2 model here (expected config.json and its weights)")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    model = Wav2Vec2Model.from_pretrained(str(path), local_files_only=True)
    return model.to(device=device, dtype=dtype).eval()


def normalize_waveform(audio: torch.Tensor) -> torch.Tensor:
    """Zero mean, unit variance (``Wav2Vec2FeatureExtractor``'s ``do_normalize``), over the last axis."""
    return (audio - audio.mean(-1, keepdim=True)) / torch.sqrt(audio.var(-1, unbiased=False, keepdim=True) + 1e-7)


@torch.no_grad()
def clip_features(model, audio: np.ndarray | torch.Tensor, n_frames: int) -> torch.Tensor:
    """OmniAvatar's features of one clip: [n_frames, (layers + 2) * hidden] (float32, on the model's device);
    clips of equal length batched as [B, samples] give [B, n_frames, ...]."""
    if getattr(model.config, "do_stable_layer_norm", False):
        raise Wav2VecError("only wav2vec2-base-style models (do_stable_layer_norm=False) are supported")
    p = next(model.parameters())
    a = torch.as_tensor(np.asarray(audio, np.float32) if not torch.is_tensor(audio) else audio).float()
    if a.ndim not in (1, 2):
        raise Wav2VecError(f"audio must be mono [samples] (or a batch [B, samples]), got shape {tuple(a.shape)}")
    if n_frames < 2:
        raise Wav2VecError(f"a clip needs at least 2 video frames, got {n_frames}")
    x = normalize_waveform(a.to(p.device)).reshape(-1, a.shape[-1]).to(p.dtype)
    feats = model.feature_extractor(x)  # [B, 512, N] at 50 Hz
    feats = F.interpolate(feats.float(), size=n_frames, mode="linear", align_corners=True).to(p.dtype)
    h, _ = model.feature_projection(feats.transpose(1, 2))
    enc = model.encoder
    h = enc.layer_norm(h + enc.pos_conv_embed(h))
    states = [h]
    for layer in enc.layers:
        out = layer(h)
        h = out[0] if isinstance(out, tuple) else out
        states.append(h)
    out = torch.cat([states[-1], *states], dim=-1).float()
    return out[0] if a.ndim == 1 else out


def feature_dim(model) -> int:
    return (model.config.num_hidden_layers + 2) * model.config.hidden_size


@dataclass
class Wav2VecFeatures:
    """Per-video-frame wav2vec2 features at ``fps``, from windows of ``look_back`` + hop + ``look_ahead``."""

    model: object
    fps: int = 16  # Wan-family models; talkstream's own models run at 25
    hop: int = 4  # video frames per hop after the first (one latent frame at 4x temporal compression)
    # seconds of past audio each window holds: with the hop and look-ahead, ~5 s, the length of the clips LiveTalk's
    # student was trained on (81 frames at 16 fps), so a window looks like a training clip to it
    look_back: float = 4.0
    look_ahead: float = 0.5  # seconds of future audio each window holds (a live stream's added delay)
    show_progress: bool = False

    def __post_init__(self) -> None:
        if SAMPLE_RATE % self.fps:
            raise Wav2VecError(f"fps must divide {SAMPLE_RATE} (16 and 25 do), got {self.fps}")
        if self.hop < 1 or self.look_back < 0 or self.look_ahead < 0:
            raise Wav2VecError(f"need hop >= 1 and look_back, look_ahead >= 0, got {self.hop}, {self.look_back}, "
                               f"{self.look_ahead}")  # fmt: skip

    @property
    def samples_per_frame(self) -> int:
        return SAMPLE_RATE // self.fps

    @property
    def back_frames(self) -> int:
        return int(round(self.look_back * self.fps))

    @property
    def ahead_frames(self) -> int:
        return int(round(self.look_ahead * self.fps))

    @property
    def dim(self) -> int:
        return feature_dim(self.model)

    def n_frames(self, n_samples: int) -> int:
        """Video frames of a signal: one at t = 0 and one per 1 / fps after it that the audio reaches."""
        return n_samples // self.samples_per_frame + 1

    def hops(self, n_frames: int) -> list[tuple[int, int]]:
        bounds = [0, *range(1, n_frames, self.hop), n_frames]
        return [(a, b) for a, b in zip(bounds[:-1], bounds[1:]) if b > a]

    def window(self, a: int, b: int, n_frames: int | None = None) -> tuple[int, int]:
        """The window's frames [f0, f1) for the hop's frames [a, b), ending at the stream's last frame once it is
        known (``n_frames``); a window is a clip of at least 2 frames."""
        f1 = b + self.ahead_frames if n_frames is None else min(b + self.ahead_frames, n_frames)
        return max(0, a - self.back_frames), max(f1, 2)

    def samples_needed(self, a: int, b: int) -> int:
        """Audio (samples from the stream's start) a hop's window needs while the stream goes on."""
        return (self.window(a, b)[1] - 1) * self.samples_per_frame

    def _segment(self, audio: np.ndarray, a: int, b: int, n_frames: int | None, offset: int = 0) -> np.ndarray:
        """Hop [a, b)'s window audio; ``audio`` starts ``offset`` samples into the stream."""
        f0, f1 = self.window(a, b, n_frames)
        spf = self.samples_per_frame
        if offset > f0 * spf:
            raise Wav2VecError("the audio before this hop's window was already dropped")
        seg = audio[f0 * spf - offset : (f1 - 1) * spf - offset]
        need = (f1 - 1 - f0) * spf
        if len(seg) < need:  # only a 1-frame stream's 2-frame window reaches past the audio: silence
            seg = np.concatenate([seg, np.zeros(need - len(seg), np.float32)])
        return seg

    def _hop_features(
        self, audio: np.ndarray, a: int, b: int, n_frames: int | None = None, offset: int = 0
    ) -> torch.Tensor:
        f0, f1 = self.window(a, b, n_frames)
        return clip_features(self.model, self._segment(audio, a, b, n_frames, offset), f1 - f0)[a - f0 : b - f0]

    def encode(self, audio: np.ndarray, batch: int = 16) -> torch.Tensor:
        """Offline: [n_frames(len(audio)), dim] features of a whole signal, equal to streaming it (windows of equal
        length run ``batch`` at a time)."""
        from tqdm import tqdm

        audio = np.asarray(audio, np.float32)
        if audio.ndim != 1:
            raise Wav2VecError(f"audio must be mono 16 kHz [samples], got shape {audio.shape}")
        n = self.n_frames(len(audio))
        hops = self.hops(n)
        groups: dict[int, list[int]] = {}  # window length -> hop indices
        for i, (a, b) in enumerate(hops):
            f0, f1 = self.window(a, b, n)
            groups.setdefault(f1 - f0, []).append(i)
        rows: list[torch.Tensor | None] = [None] * len(hops)
        with tqdm(total=len(hops), disable=not self.show_progress, unit="hop") as bar:
            for length, idx in groups.items():
                for k in range(0, len(idx), batch):
                    part = idx[k : k + batch]
                    segs = np.stack([self._segment(audio, *hops[i], n) for i in part])
                    feats = clip_features(self.model, segs, length)
                    for j, i in enumerate(part):
                        a, b = hops[i]
                        f0 = self.window(a, b, n)[0]
                        rows[i] = feats[j, a - f0 : b - f0].cpu()
                    bar.update(len(part))
        return torch.cat(rows)

    def stream(self) -> Wav2VecStream:
        return Wav2VecStream(self)


@dataclass
class Wav2VecStream:
    """Live audio in (16 kHz mono, any piece size), features out: ``push`` returns every hop its audio completes
    (look-ahead included); ``flush`` ends the stream (silence after it) and returns the rest."""

    enc: Wav2VecFeatures
    audio: np.ndarray = field(default_factory=lambda: np.zeros(0, np.float32))
    offset: int = 0  # samples dropped from the front of ``audio``
    next_frame: int = 0  # the first frame not yet emitted
    done: bool = False

    @property
    def received(self) -> int:
        return self.offset + len(self.audio)

    def _next_hop(self, n_frames: int | None) -> tuple[int, int] | None:
        a = self.next_frame
        b = 1 if a == 0 else a + self.enc.hop
        if n_frames is not None:
            b = min(b, n_frames)
            return (a, b) if b > a else None
        return (a, b) if self.enc.samples_needed(a, b) <= self.received else None

    def _emit(self, n_frames: int | None) -> torch.Tensor:
        out = []
        spf = self.enc.samples_per_frame
        while (hop := self._next_hop(n_frames)) is not None:
            a, b = hop
            out.append(self.enc._hop_features(self.audio, a, b, n_frames, self.offset))
            self.next_frame = b
            keep_from = self.enc.window(b, b + self.enc.hop)[0] * spf  # the next window's first sample: older audio
            # is never needed again
            drop = max(0, keep_from - self.offset)
            if drop:
                self.audio, self.offset = self.audio[drop:], self.offset + drop
        return torch.cat(out).cpu() if out else torch.zeros(0, self.enc.dim)

    def push(self, samples: np.ndarray) -> torch.Tensor:
        if self.done:
            raise Wav2VecError("this stream was flushed; start a new one")
        samples = np.asarray(samples, np.float32)
        if samples.ndim != 1:
            raise Wav2VecError(f"audio must be mono 16 kHz [samples], got shape {samples.shape}")
        self.audio = np.concatenate([self.audio, samples])
        return self._emit(None)

    def flush(self) -> torch.Tensor:
        """The remaining frames up to the signal's last (``n_frames`` of everything pushed)."""
        self.done = True
        return self._emit(self.enc.n_frames(self.received))
