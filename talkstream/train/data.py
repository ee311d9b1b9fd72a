"""World packs: everything a training run needs except the pixels, small enough to carry to a GPU machine.

A pack holds, per clip, the per-frame world truth (which the renderer turns back into frames on any
machine with skia, in parallel), the identity, behaviour labels, the caption of every frame and,
optionally, the Whisper encoder features of the clip's speech (computed here, where espeak-ng and
CTranslate2 live). Captions are stored once as a table of MiniLM token embeddings.
"""

from __future__ import annotations

import json
import os
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from multiprocessing import get_context, shared_memory
from pathlib import Path

import numpy as np
from tqdm import tqdm

from ..world.behaviour import make_clip
from ..world.identity import Identity
from ..world.render import UNITS, FrameState, Renderer, mouth_center


@dataclass
class WorldPack:
    states: np.ndarray  # [N, T, 15] float32
    behaviour: np.ndarray  # [N, T] int8
    identities: list[Identity]
    caption_ids: np.ndarray  # [N, T] int16 index into captions
    captions: list[str]
    caption_emb: np.ndarray | None  # [n_captions, L, 384] float16
    caption_mask: np.ndarray | None  # [n_captions, L] bool
    audio_features: np.ndarray | None  # [N, 2T, 384] float16 (Whisper, 50 Hz)
    seeds: np.ndarray

    @property
    def n_clips(self) -> int:
        return len(self.states)

    @property
    def n_frames(self) -> int:
        return self.states.shape[1]


def make_pack(
    out: str | Path,
    clips: int,
    seconds: float,
    seed: int = 0,
    audio: bool = True,
    text: bool = True,
    progress: bool = True,
) -> Path:
    """Plan ``clips`` world clips (seeds seed..seed+clips-1) and write their pack."""
    from ..models.encoders import TextEncoder, WhisperFeatures

    whisper = WhisperFeatures() if audio else None
    caption_index: dict[str, int] = {}
    states, behaviour, ids, cap_ids, feats = [], [], [], [], []
    for i in tqdm(range(clips), desc="pack", disable=not progress):
        clip = make_clip(seed + i, seconds)
        states.append(clip.states)
        behaviour.append(clip.behaviour)
        ids.append(clip.identity.to_json())
        cap_ids.append([caption_index.setdefault(c, len(caption_index)) for c in clip.captions_per_frame()])
        if whisper is not None:
            f = whisper.encode(clip.audio)[: 2 * clip.n_frames]
            feats.append(f.astype(np.float16))
    captions = sorted(caption_index, key=caption_index.get)
    arrays = dict(
        states=np.stack(states),
        behaviour=np.stack(behaviour),
        identities=np.array(ids),
        caption_ids=np.array(cap_ids, np.int16),
        captions=np.array(captions),
        seeds=np.arange(seed, seed + clips),
    )
    if feats:  # 8 bits per value: half the size of float16, so the pack travels beside more (quantize_features)
        q, lo, step = quantize_features(np.stack(feats))
        arrays.update(audio_features_q=q, audio_features_lo=lo, audio_features_step=step)
    if text:
        emb, mask = TextEncoder().encode(captions)
        arrays["caption_emb"] = emb.numpy().astype(np.float16)
        arrays["caption_mask"] = mask.numpy()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".tmp.npz")
    np.savez_compressed(tmp, **arrays)
    os.replace(tmp, out)
    return out


def quantize_features(f: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Features [..., A] -> uint8 codes, per-channel minimum and step [A] float32 (error <= step / 2)."""
    f = np.asarray(f, np.float32)
    flat = f.reshape(-1, f.shape[-1])
    lo, hi = flat.min(0), flat.max(0)
    step = np.maximum(hi - lo, 1e-6) / 255
    return np.clip(np.round((f - lo) / step), 0, 255).astype(np.uint8), lo, step.astype(np.float32)


def dequantize_features(q: np.ndarray, lo: np.ndarray, step: np.ndarray) -> np.ndarray:
    return (q.astype(np.float32) * step + lo).astype(np.float16)


def pack_paths(spec: str | Path | list) -> list[Path]:
    """A training config's ``data``: one pack, several joined by commas, or a list of them."""
    items = spec if isinstance(spec, (list, tuple)) else str(spec).split(",")
    paths = [Path(str(p).strip()) for p in items if str(p).strip()]
    if not paths:
        raise ValueError("no world pack given")
    return paths


def load_pack(path: str | Path | list) -> WorldPack:
    """One pack, or several (``pack_paths``) joined into one: clips in the order given, captions merged."""
    paths = pack_paths(path)
    if len(paths) > 1:
        return concat_packs([_load_one(p) for p in paths])
    return _load_one(paths[0])


def concat_packs(packs: list[WorldPack]) -> WorldPack:
    """Packs with the same clip length -> one pack; each pack's caption ids are remapped into the merged
    caption table (token embeddings zero-padded to the longest, masks False there)."""
    if len({p.n_frames for p in packs}) != 1:
        raise ValueError(f"packs of different clip lengths cannot be joined: {[p.n_frames for p in packs]} frames")
    seeds = np.concatenate([p.seeds for p in packs])
    if len(np.unique(seeds)) != len(seeds):
        raise ValueError("the packs share clips (the same world seeds): each clip would be counted twice")
    with_text = all(p.caption_emb is not None for p in packs)
    index: dict[str, int] = {}
    emb_of: dict[str, tuple] = {}
    remapped = []
    for p in packs:
        table = np.array([index.setdefault(c, len(index)) for c in p.captions], np.int16)
        remapped.append(table[p.caption_ids])
        if with_text:
            for k, c in enumerate(p.captions):
                emb_of.setdefault(c, (p.caption_emb[k], p.caption_mask[k]))
    captions = list(index)
    emb = mask = None
    if with_text:
        n_tok = max(e.shape[0] for e, _ in emb_of.values())
        emb = np.zeros((len(captions), n_tok, packs[0].caption_emb.shape[-1]), packs[0].caption_emb.dtype)
        mask = np.zeros((len(captions), n_tok), bool)
        for k, c in enumerate(captions):
            e, m = emb_of[c]
            emb[k, : len(e)], mask[k, : len(m)] = e, m
    audio = (
        np.concatenate([p.audio_features for p in packs]) if all(p.audio_features is not None for p in packs) else None
    )
    return WorldPack(
        states=np.concatenate([p.states for p in packs]),
        behaviour=np.concatenate([p.behaviour for p in packs]),
        identities=[i for p in packs for i in p.identities],
        caption_ids=np.concatenate(remapped),
        captions=captions,
        caption_emb=emb,
        caption_mask=mask,
        audio_features=audio,
        seeds=seeds,
    )


def _load_one(path: Path) -> WorldPack:
    with np.load(path, allow_pickle=False) as z:
        get = lambda k: z[k] if k in z.files else None
        audio = get("audio_features")  # (packs written before quantization)
        if "audio_features_q" in z.files:
            audio = dequantize_features(z["audio_features_q"], z["audio_features_lo"], z["audio_features_step"])
        return WorldPack(
            states=z["states"],
            behaviour=z["behaviour"],
            identities=[Identity.from_dict(json.loads(s)) for s in z["identities"]],
            caption_ids=z["caption_ids"],
            captions=[str(c) for c in z["captions"]],
            caption_emb=get("caption_emb"),
            caption_mask=get("caption_mask"),
            audio_features=audio,
            seeds=z["seeds"],
        )


def _render_clips(args) -> None:
    shm_name, shape, size, jobs = args
    shm = shared_memory.SharedMemory(name=shm_name)
    try:
        frames = np.ndarray(shape, np.uint8, buffer=shm.buf)
        for i, identity_json, states in jobs:
            r = Renderer(Identity.from_dict(json.loads(identity_json)), size)
            for t, row in enumerate(states):
                frames[i, t] = r.render(FrameState.from_array(row))
    finally:
        shm.close()


def render_pack(
    pack: WorldPack, size: int = 256, workers: int = 1, clips: slice | list[int] | None = None
) -> np.ndarray:
    """All frames of (a slice or a list of clips of) the pack, [N, T, size, size, 3] uint8, rendered over
    ``workers`` processes."""
    idx = list(clips) if isinstance(clips, (list, tuple)) else list(range(pack.n_clips))[clips or slice(None)]
    shape = (len(idx), pack.n_frames, size, size, 3)
    shm = shared_memory.SharedMemory(create=True, size=int(np.prod(shape)))
    try:
        jobs = [(k, pack.identities[i].to_json(), pack.states[i]) for k, i in enumerate(idx)]
        parts = [(shm.name, shape, size, jobs[w :: max(1, workers)]) for w in range(max(1, workers))]
        if workers <= 1:
            _render_clips(parts[0])
        else:
            with ProcessPoolExecutor(workers, mp_context=get_context("fork")) as pool:
                list(pool.map(_render_clips, parts))
        return np.ndarray(shape, np.uint8, buffer=shm.buf).copy()
    finally:
        shm.close()
        shm.unlink()


def mouth_maps(
    pack: WorldPack,
    clips: slice | None,
    n_latent: int,
    grid: int,
    temporal_factor: int = 4,
    sigma: tuple[float, float] = (3.0, 2.0),
) -> np.ndarray:
    """Where each latent frame's mouth is: [N, n_latent, grid, grid] float32 in [0, 1], a Gaussian (sigma in
    latent pixels, x then y) around the mean mouth centre of the video frames the latent covers (the first
    latent covers frame 0 alone, latent l > 0 frames 4l-3..4l). From the world's exact geometry."""
    ys, xs = np.mgrid[0:grid, 0:grid].astype(np.float32) + 0.5
    per_frame = mouth_pixels(pack, clips, grid)  # [N, T, 2] in latent pixels
    out = np.zeros((len(per_frame), n_latent, grid, grid), np.float32)
    for k, centres in enumerate(per_frame):
        for t in range(n_latent):
            lo = max(0, temporal_factor * t - (temporal_factor - 1))
            mx, my = centres[lo : temporal_factor * t + 1].mean(0)
            out[k, t] = np.exp(-0.5 * (((xs - mx) / sigma[0]) ** 2 + ((ys - my) / sigma[1]) ** 2))
    return out


def mouth_pixels(pack: WorldPack, clips: slice | None, size: int) -> np.ndarray:
    """The mouth centre of every frame in pixels of a ``size`` x ``size`` render: [N, T, 2] float32 (x, y)."""
    idx = list(range(pack.n_clips))[clips or slice(None)]
    return np.array(
        [[mouth_center(pack.identities[i], FrameState.from_array(row)) for row in pack.states[i]] for i in idx],
        np.float32,
    ) * (size / UNITS)
