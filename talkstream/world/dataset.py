"""World data sets on disk, and one reader for them and for folders of real talking-face videos.

Layout written by ``talkstream world make``::

    OUT/world.json                    what was asked for (size, fps, seconds, seed)
    OUT/shard_0000/clip_000000.mp4    H.264 video with the clip's speech muxed as AAC
    OUT/shard_0000/clip_000000.flac   the exact 16 kHz audio
    OUT/shard_0000/clip_000000.npz    per-frame ground truth: states [T, 15], behaviour [T], identity vector
    OUT/shard_0000/clip_000000.json   identity, segments with captions and phonemes (written last: the
                                      clip is complete when its json exists)

Every file is written atomically, so an interrupted run leaves only complete clips and ``make``
resumes where it stopped. A real-data folder is any folder of ``*.mp4`` files with audio (HDTF /
AVSpeech style); it is read through the same ``Sample`` / ``Window`` interface, without truth.
"""

from __future__ import annotations

import json
import os
import zipfile
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from multiprocessing import get_context
from pathlib import Path

import numpy as np
from tqdm import tqdm

from ..media import MediaError, atomic_path, read_audio, read_video, write_audio, write_video
from .behaviour import FPS, STATES, make_clip
from .identity import Identity
from .render import STATE_FIELDS, render_states
from .speech import SAMPLE_RATE

CLIPS_PER_SHARD = 250
_PARTS = (".mp4", ".flac", ".npz", ".json")


class DatasetError(ValueError):
    """A data set folder or clip that cannot be read."""


@dataclass
class Sample:
    frames: np.ndarray  # [T, H, W, 3] uint8
    audio: np.ndarray  # float32 mono, 16 kHz, T / fps seconds
    fps: float
    name: str
    states: np.ndarray | None = None  # [T, 15] world truth (FrameState rows)
    behaviour: np.ndarray | None = None  # [T] index into STATES
    captions: list[str] | None = None  # per frame
    identity: Identity | None = None


@dataclass
class Window(Sample):
    start: int = 0  # first frame of the window in its clip


def clip_stem(index: int) -> str:
    return f"shard_{index // CLIPS_PER_SHARD:04d}/clip_{index:06d}"


def _write_clip(out: Path, index: int, seed: int, seconds: float, size: int) -> None:
    clip = make_clip(seed, seconds)
    base = out / clip_stem(index)
    write_video(base.with_suffix(".mp4"), render_states(clip.identity, clip.states, size), clip.fps, clip.audio)
    write_audio(base.with_suffix(".flac"), clip.audio)
    with atomic_path(base.with_suffix(".npz")) as tmp:
        with open(tmp, "wb") as f:
            np.savez_compressed(f, states=clip.states, behaviour=clip.behaviour, identity=clip.identity.vector())
    meta = dict(
        index=index,
        seed=seed,
        fps=clip.fps,
        size=size,
        n_frames=clip.n_frames,
        sample_rate=clip.sample_rate,
        state_fields=list(STATE_FIELDS),
        behaviours=list(STATES),
        identity=clip.identity.to_dict(),
        segments=[s.to_dict() for s in clip.segments],
    )
    with atomic_path(base.with_suffix(".json")) as tmp:
        tmp.write_text(json.dumps(meta))


def _complete(out: Path, index: int) -> bool:
    base = out / clip_stem(index)
    return all(base.with_suffix(s).is_file() for s in _PARTS)


def make_world(
    out: str | os.PathLike,
    clips: int,
    seconds: float = 8.0,
    size: int = 256,
    workers: int = 1,
    seed: int = 0,
    progress: bool = True,
) -> dict:
    """Render ``clips`` clips into ``out`` (resumable). Returns counts of made and skipped clips."""
    if clips <= 0 or seconds <= 0 or size < 16:
        raise ValueError(f"need clips > 0, seconds > 0 and size >= 16 (got {clips}, {seconds}, {size})")
    out = Path(out)
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / ".write_test"
        probe.write_text("ok")
        probe.unlink()
    except OSError as e:
        raise DatasetError(f"cannot write to {out}: {e.strerror or e}") from None
    spec = dict(seconds=seconds, size=size, fps=FPS, seed=seed, sample_rate=SAMPLE_RATE)
    spec_file = out / "world.json"
    if spec_file.exists():
        old = json.loads(spec_file.read_text())
        if {k: old.get(k) for k in spec} != spec:
            raise DatasetError(f"{out} holds a world made with {old}; asked for {spec}: use another folder")
    else:
        with atomic_path(spec_file) as tmp:
            tmp.write_text(json.dumps(spec))
    todo = [i for i in range(clips) if not _complete(out, i)]
    bar = tqdm(total=clips, initial=clips - len(todo), desc="world make", unit="clip", disable=not progress)
    if workers <= 1:
        for i in todo:
            _write_clip(out, i, seed + i, seconds, size)
            bar.update()
    else:
        with ProcessPoolExecutor(workers, mp_context=get_context("fork")) as pool:
            futures = [pool.submit(_write_clip, out, i, seed + i, seconds, size) for i in todo]
            for f in futures:
                f.result()
                bar.update()
    bar.close()
    index = [clip_stem(i) for i in range(clips) if _complete(out, i)]
    with atomic_path(out / "index.jsonl") as tmp:
        tmp.write_text("".join(json.dumps({"clip": c}) + "\n" for c in index))
    return dict(made=len(todo), skipped=clips - len(todo), total=len(index))


def _slice_audio(audio: np.ndarray, start: int, n: int, fps: float) -> np.ndarray:
    a, b = int(round(start / fps * SAMPLE_RATE)), int(round((start + n) / fps * SAMPLE_RATE))
    out = audio[a:b]
    return np.pad(out, (0, (b - a) - len(out))) if len(out) < b - a else out


class _Reader:
    names: list[str]

    def __len__(self) -> int:
        return len(self.names)

    def load(self, i: int) -> Sample:
        raise NotImplementedError

    def window(self, rng: np.random.Generator, n_frames: int, i: int | None = None) -> Window:
        """A random window of ``n_frames`` frames (and the matching audio) from clip ``i`` (random if None)."""
        if len(self) == 0:
            raise DatasetError("the data set is empty")
        i = int(rng.integers(len(self))) if i is None else i
        s = self.load(i)
        T = len(s.frames)
        if T < n_frames:
            raise DatasetError(f"{s.name} has {T} frames, fewer than the window's {n_frames}")
        a = int(rng.integers(T - n_frames + 1))
        sl = slice(a, a + n_frames)
        return Window(
            s.frames[sl],
            _slice_audio(s.audio, a, n_frames, s.fps),
            s.fps,
            s.name,
            None if s.states is None else s.states[sl],
            None if s.behaviour is None else s.behaviour[sl],
            None if s.captions is None else s.captions[sl],
            s.identity,
            start=a,
        )


class WorldDataset(_Reader):
    """A folder written by ``make_world``."""

    def __init__(self, root: str | os.PathLike) -> None:
        self.root = Path(root)
        index = self.root / "index.jsonl"
        if index.is_file():
            self.names = [json.loads(line)["clip"] for line in index.read_text().splitlines() if line.strip()]
        else:  # an interrupted make: take every complete clip
            self.names = sorted(str(p.relative_to(self.root).with_suffix("")) for p in self.root.glob("shard_*/*.json"))

    def load(self, i: int) -> Sample:
        base = self.root / self.names[i]
        try:
            meta = json.loads(base.with_suffix(".json").read_text())
            with np.load(base.with_suffix(".npz")) as z:
                states, behaviour = z["states"], z["behaviour"]
            video = read_video(base.with_suffix(".mp4"))
            audio = read_audio(base.with_suffix(".flac"))
        except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as e:
            raise DatasetError(f"{base}: corrupted clip ({e})") from None
        T = meta["n_frames"]
        if len(video.frames) != T or len(states) != T:
            raise DatasetError(
                f"{base}: corrupted clip ({len(video.frames)} video frames, {len(states)} truth rows, expected {T})"
            )
        captions = [""] * T
        for seg in meta["segments"]:
            for f in range(int(round(seg["start"] * FPS)), min(int(round(seg["end"] * FPS)), T)):
                captions[f] = seg["caption"]
        return Sample(
            video.frames,
            _slice_audio(audio, 0, T, FPS),
            FPS,
            self.names[i],
            states,
            behaviour,
            captions,
            Identity.from_dict(meta["identity"]),
        )


class VideoFolder(_Reader):
    """A folder of real talking-face videos (``*.mp4`` with audio, any fps; read at 25 fps, 16 kHz mono)."""

    def __init__(self, root: str | os.PathLike, fps: float = FPS) -> None:
        self.root = Path(root)
        self.fps = fps
        self.names = sorted(str(p.relative_to(self.root)) for p in self.root.rglob("*.mp4"))

    def load(self, i: int) -> Sample:
        path = self.root / self.names[i]
        try:
            video = read_video(path)
        except MediaError as e:
            raise DatasetError(str(e)) from None
        if video.audio is None:
            raise DatasetError(f"{path}: has no audio track (talking-face clips need their speech)")
        frames = video.frames
        if abs(video.fps - self.fps) > 0.01:  # nearest-frame resampling to the target rate
            n = int(len(frames) * self.fps / video.fps)
            idx = np.minimum(np.round(np.arange(n) * video.fps / self.fps).astype(int), len(frames) - 1)
            frames = frames[idx]
        return Sample(frames, _slice_audio(video.audio, 0, len(frames), self.fps), self.fps, self.names[i])


def open_dataset(root: str | os.PathLike) -> WorldDataset | VideoFolder:
    """A world folder (has world.json) or a folder of real mp4 videos."""
    root = Path(root)
    if not root.is_dir():
        raise DatasetError(f"{root}: no such folder")
    if (root / "world.json").is_file():
        return WorldDataset(root)
    folder = VideoFolder(root)
    if not folder.names:
        raise DatasetError(f"{root}: neither a world data set (no world.json) nor a folder of .mp4 videos")
    return folder
