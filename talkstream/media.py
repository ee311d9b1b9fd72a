"""Reading and writing video and audio (PyAV): H.264 mp4 with muxed AAC audio, wav/flac, resampling.

Every writer writes to a temporary file beside the target and renames it into place, so a failure
never leaves a half-written file behind.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from fractions import Fraction
from math import gcd
from pathlib import Path

try:
    import av
except ImportError:  # a machine without PyAV (e.g. a remote GPU) still gets everything but mp4/wav I/O
    av = None
import numpy as np
from scipy.signal import resample_poly

SAMPLE_RATE = 16_000


class MediaError(ValueError):
    """A file that cannot be read or written as the media it should be."""


def _need_av() -> None:
    if av is None:
        raise MediaError("reading or writing audio/video files needs PyAV (pip install av)")


@dataclass
class Video:
    frames: np.ndarray  # [T, H, W, 3] uint8
    fps: float
    audio: np.ndarray | None  # float32 mono at sample_rate, or None if the file has no audio track
    sample_rate: int = SAMPLE_RATE


def resample(audio: np.ndarray, rate_from: int, rate_to: int) -> np.ndarray:
    """Polyphase resampling of a mono float signal."""
    if rate_from == rate_to:
        return audio.astype(np.float32, copy=False)
    if rate_from <= 0 or rate_to <= 0:
        raise ValueError(f"sample rates must be positive, got {rate_from} -> {rate_to}")
    g = gcd(int(rate_from), int(rate_to))
    return resample_poly(audio.astype(np.float32), rate_to // g, rate_from // g).astype(np.float32)


def _umask() -> int:
    """The process's file-mode mask, read without changing it (os.umask can only set it; Linux: /proc)."""
    try:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1], 8) for line in f if line.startswith("Umask:"))
    except (OSError, StopIteration, ValueError):
        return 0o022


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; rename it to ``path`` only if the block succeeds."""
    path = Path(path)
    if path.is_dir():
        raise MediaError(f"{path}: is a directory; name the file to write inside it")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=f".tmp{path.suffix}", dir=path.parent)
        os.close(fd)
    except OSError as e:
        raise MediaError(f"cannot write to {path.parent}: {e.strerror or e}") from None
    try:
        yield Path(tmp)
        try:
            os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes it private (0600): give it an ordinary file's mode
            os.replace(tmp, path)
        except OSError as e:  # (e.g. a directory made at ``path`` meanwhile): name the target, not the temporary
            raise MediaError(f"cannot write {path}: {e.strerror or e}") from None
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)


def _as_mono_float(audio: np.ndarray) -> np.ndarray:
    a = np.asarray(audio)
    if a.ndim != 1:
        raise MediaError(f"audio must be mono [samples], got shape {a.shape}")
    if a.dtype == np.int16:
        a = a.astype(np.float32) / 32768.0
    return np.clip(a.astype(np.float32), -1.0, 1.0)


def _encode(container, stream, frame) -> None:
    """Encode one frame (None flushes) and mux its packets."""
    for packet in stream.encode(frame):
        container.mux(packet)


def _encode_mono(container, stream, samples: np.ndarray, fmt: str, sample_rate: int) -> None:
    """Encode a whole mono signal ([samples] in ``fmt``: 'fltp' float or 's16') and flush the stream."""
    frame = av.AudioFrame.from_ndarray(samples[None, :], format=fmt, layout="mono")
    frame.sample_rate, frame.pts = sample_rate, 0
    _encode(container, stream, frame)
    _encode(container, stream, None)


def write_gif(path: str | os.PathLike, frames: Iterable[np.ndarray], fps: float = 25) -> Path:
    """uint8 RGB frames -> an animated GIF (no audio; Pillow only, for machines without PyAV)."""
    from PIL import Image

    images = [Image.fromarray(np.asarray(f, np.uint8)) for f in frames]
    if not images:
        raise MediaError("no frames to write")
    path = Path(path)
    images[0].save(path, save_all=True, append_images=images[1:], duration=round(1000 / fps), loop=0)
    return path


def write_video(
    path: str | os.PathLike,
    frames: Iterable[np.ndarray] | np.ndarray,
    fps: float = 25,
    audio: np.ndarray | None = None,
    sample_rate: int = SAMPLE_RATE,
    crf: int = 18,
    preset: str = "veryfast",
) -> Path:
    """Write RGB uint8 frames (and optional mono audio, muxed as AAC) to an H.264 mp4."""
    _need_av()
    path = Path(path)
    with atomic_path(path) as tmp:
        container = av.open(str(tmp), "w", format="mp4")
        try:
            vstream = None
            astream = None
            if audio is not None:
                audio = _as_mono_float(audio)
            for frame in frames:
                frame = np.ascontiguousarray(frame)
                if frame.dtype != np.uint8 or frame.ndim != 3 or frame.shape[2] != 3:
                    raise MediaError(f"frames must be uint8 [H, W, 3], got {frame.dtype} {frame.shape}")
                if vstream is None:
                    h, w = frame.shape[:2]
                    vstream = container.add_stream("libx264", rate=Fraction(fps).limit_denominator(1001))
                    vstream.width, vstream.height = w + w % 2, h + h % 2  # yuv420p needs even sizes
                    vstream.pix_fmt = "yuv420p"
                    vstream.options = {"crf": str(crf), "preset": preset}
                    if audio is not None:
                        astream = container.add_stream("aac", rate=sample_rate)
                        astream.layout = "mono"
                if frame.shape[0] % 2 or frame.shape[1] % 2:
                    frame = np.pad(frame, ((0, frame.shape[0] % 2), (0, frame.shape[1] % 2), (0, 0)), mode="edge")
                _encode(container, vstream, av.VideoFrame.from_ndarray(frame, format="rgb24"))
            if vstream is None:
                raise MediaError("no frames to write")
            _encode(container, vstream, None)
            if astream is not None and len(audio):
                _encode_mono(container, astream, audio, "fltp", sample_rate)
        finally:
            container.close()
    return path


def _open(path: str | os.PathLike):
    _need_av()
    path = Path(path)
    if not path.is_file():
        raise MediaError(f"{path}: no such file")
    try:
        return av.open(str(path))
    except (av.error.FFmpegError, UnicodeDecodeError) as e:
        raise MediaError(f"{path}: not a readable media file ({e})") from None


def _decode_audio(container, stream, sample_rate: int) -> np.ndarray:
    chunks, rate = [], stream.rate
    for frame in container.decode(stream):
        a = frame.to_ndarray()
        if a.dtype.kind == "i":
            a = a.astype(np.float32) / float(np.iinfo(a.dtype).max + 1)
        a = a.astype(np.float32)
        if frame.format.is_planar:
            a = a.mean(0)  # [channels, samples] -> mono
        else:
            a = a.reshape(-1, len(frame.layout.channels)).mean(1)
        chunks.append(a)
        rate = frame.sample_rate
    audio = np.concatenate(chunks) if chunks else np.zeros(0, np.float32)
    return resample(audio, rate, sample_rate)


def _audio_track(container, path, sample_rate: int) -> np.ndarray:
    """The container's first audio track as mono float32 at ``sample_rate``; a decoding failure is a MediaError."""
    try:
        return _decode_audio(container, container.streams.audio[0], sample_rate)
    except av.error.FFmpegError as e:
        raise MediaError(f"{path}: audio is corrupted or truncated ({e})") from None


def read_audio(path: str | os.PathLike, sample_rate: int = SAMPLE_RATE) -> np.ndarray:
    """Any audio file (or a video's audio track) -> float32 mono at ``sample_rate``."""
    container = _open(path)
    try:
        if not container.streams.audio:
            raise MediaError(f"{path}: has no audio track")
        return _audio_track(container, path, sample_rate)
    finally:
        container.close()


def write_audio(path: str | os.PathLike, audio: np.ndarray, sample_rate: int = SAMPLE_RATE) -> Path:
    """Mono audio to .wav (16-bit PCM) or .flac, chosen by the suffix."""
    _need_av()
    path = Path(path)
    codec = {".wav": "pcm_s16le", ".flac": "flac"}.get(path.suffix.lower())
    if codec is None:
        raise MediaError(f"{path}: audio files must be .wav or .flac")
    pcm = (np.clip(_as_mono_float(audio), -1, 1) * 32767).astype(np.int16)
    with atomic_path(path) as tmp:
        container = av.open(str(tmp), "w", format=path.suffix[1:].lower())
        try:
            stream = container.add_stream(codec, rate=sample_rate)
            stream.layout = "mono"
            _encode_mono(container, stream, pcm, "s16", sample_rate)
        finally:
            container.close()
    return path


def read_video(
    path: str | os.PathLike, sample_rate: int = SAMPLE_RATE, max_frames: int | None = None, start_frame: int = 0
) -> Video:
    """Decode an mp4 (or any video) to RGB frames, its frame rate and its mono audio (None if absent)."""
    container = _open(path)
    try:
        if not container.streams.video:
            raise MediaError(f"{path}: has no video track")
        vs = container.streams.video[0]
        fps = float(vs.average_rate or vs.guessed_rate or 25)
        frames = []
        try:
            for i, frame in enumerate(container.decode(vs)):
                if i < start_frame:
                    continue
                if max_frames is not None and len(frames) >= max_frames:
                    break
                frames.append(frame.to_ndarray(format="rgb24"))
        except av.error.FFmpegError as e:
            raise MediaError(f"{path}: video is corrupted or truncated ({e})") from None
        if not frames:
            raise MediaError(f"{path}: no decodable video frames")
        audio = None
        if container.streams.audio:
            container.seek(0)
            audio = _audio_track(container, path, sample_rate)
    finally:
        container.close()
    return Video(np.stack(frames), fps, audio, sample_rate)
