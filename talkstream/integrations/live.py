"""A live avatar for voice-agent frameworks: speech in segments (one per reply), frames out, each frame carrying
the 40 ms of audio it was made from.

    live = LiveAvatar(avatar, "me.png")
    live.push(pcm16k)            # any number of chunks of the reply's speech (float or int16, 16 kHz mono)
    live.end_segment()           # the reply is complete
    live.clear()                 # the user interrupted: queued speech and its frames are dropped
    async for f in live:         # MediaFrame: image, audio (None while idle), segment, last_of_segment
        ...                      # (or, rarely, SegmentEnd: a segment's end that came after its last frame)

The avatar (``Avatar.stream``) runs on a worker thread and never stops: without speech it is fed silence and
keeps idling / listening. Frame ``i`` is made from the samples ``640 i .. 640 (i + 1)`` of the audio timeline it
was fed, so each frame's audio is exactly what its mouth was drawn from. A segment starts on a frame boundary
and is padded with silence to end on one; silence fed inside an open segment (the speech came late) plays as
silence, in sync. The worker runs at most ``max_lead`` frames ahead of the consumer, so queued media stays
bounded and an interruption has little to drop.

This module imports no agent framework; ``livekit.py`` and ``pipecat.py`` wrap it.
"""

from __future__ import annotations

import asyncio
import queue
import threading
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

from ..media import SAMPLE_RATE, MediaError
from ..stream.avatar import Avatar, load_reference
from ..stream.engine import FPS

SAMPLES_PER_FRAME = SAMPLE_RATE // FPS  # 640: one video frame of audio at 16 kHz / 25 fps


@dataclass
class MediaFrame:
    index: int  # the avatar's frame index (frames dropped by clear() leave gaps)
    image: np.ndarray  # [H, W, 3] uint8 RGB
    audio: np.ndarray | None  # int16 [640]: the speech this frame was made from; None while idle
    segment: int | None  # the speech segment the frame belongs to (None: idle)
    last_of_segment: bool = False  # the segment's last frame: its playback ends with this frame


@dataclass
class SegmentEnd:
    """A segment's end when its last frame went out before the end was known (a model that needs no audio past a
    frame); otherwise that frame's ``last_of_segment`` says it."""

    segment: int


@dataclass(frozen=True)
class LiveConfig:
    max_lead: int = 24  # frames made ahead of the consumer (~1 s): bounds memory and what an interruption drops
    idle_wait: float = 0.1  # seconds without input before silence is fed while idle
    speech_wait: float = 0.4  # the same inside an open segment (a reply whose speech is still coming)
    silence_frames: int = 6  # frames of silence fed at a time when no audio is there
    segment_timeout: float = 5.0  # seconds of silence after which an open segment that never ended is closed

    def __post_init__(self) -> None:
        if self.max_lead < 1 or self.silence_frames < 1:
            raise ValueError("max_lead and silence_frames must be >= 1")
        if self.idle_wait <= 0 or self.speech_wait <= 0 or self.segment_timeout <= 0:
            raise ValueError("idle_wait, speech_wait and segment_timeout must be > 0")


def to_float(samples: np.ndarray) -> np.ndarray:
    """int16 PCM or float samples [N] -> float32 in [-1, 1]; anything else is a clear error."""
    a = np.asarray(samples)
    if a.ndim != 1:
        raise MediaError(f"audio must be mono samples [N], got shape {a.shape}")
    if a.dtype == np.int16:
        return a.astype(np.float32) / 32768.0
    if not np.issubdtype(a.dtype, np.floating):
        raise MediaError(f"audio must be int16 PCM or float samples, got {a.dtype}")
    a = a.astype(np.float32)
    if not np.isfinite(a).all():
        raise MediaError("audio contains NaN or infinite samples")
    return a


def to_int16(samples: np.ndarray) -> np.ndarray:
    """The inverse of ``to_float`` (int16 PCM passes through both unchanged)."""
    return np.clip(np.round(samples * 32768.0), -32768, 32767).astype(np.int16)


class _Timeline:
    """The audio the avatar was fed, sample by sample, with each sample's segment (-1: idle); frames take their
    640 samples from its front. Written by the avatar's audio source, read by the frame loop (either thread)."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.audio = np.zeros(0, np.float32)
        self.seg = np.zeros(0, np.int64)
        self.start = 0  # absolute sample index of audio[0]
        self.seg_end: dict[int, int] = {}  # segment -> absolute sample index where it ends

    @property
    def end(self) -> int:
        return self.start + len(self.audio)

    def append(self, samples: np.ndarray, seg: int | None) -> None:
        with self.lock:
            self.audio = np.concatenate([self.audio, samples])
            self.seg = np.concatenate([self.seg, np.full(len(samples), -1 if seg is None else seg, np.int64)])

    def end_segment(self, seg: int, at: int) -> bool:
        """Mark where ``seg`` ends; False when its last frame was already taken (the model needed no audio past it)."""
        with self.lock:
            if self.start >= at:
                return False
            self.seg_end[seg] = at
            return True

    def take(self, index: int) -> tuple[np.ndarray, int | None, bool]:
        """Frame ``index``'s samples (zeros where nothing was fed), its segment and whether the segment ends
        with it; everything before the frame's end is dropped."""
        s0, s1 = index * SAMPLES_PER_FRAME, (index + 1) * SAMPLES_PER_FRAME
        with self.lock:
            a = np.zeros(SAMPLES_PER_FRAME, np.float32)
            lo, hi = max(s0, self.start), min(s1, self.end)
            seg = -1
            if hi > lo:
                a[lo - s0 : hi - s0] = self.audio[lo - self.start : hi - self.start]
                seg = int(self.seg[lo - self.start])
            drop = max(0, min(s1, self.end) - self.start)
            self.audio, self.seg, self.start = self.audio[drop:], self.seg[drop:], self.start + drop
            if seg < 0:
                return a, None, False
            last = self.seg_end.get(seg) == s1
            if last:
                del self.seg_end[seg]
            return a, seg, last


class LiveAvatar:
    """One live avatar stream (one reference image) for one conversation; see the module docstring.

    The stream starts on the first ``push`` or iteration, which must happen in the event loop that iterates it
    (one task); after that, ``push`` / ``end_segment`` / ``clear`` may be called from any thread."""

    def __init__(self, avatar: Avatar, image, prompt: str | None = None, config: LiveConfig | None = None) -> None:
        self.avatar, self.prompt, self.cfg = avatar, prompt, config or LiveConfig()
        self.reference = load_reference(image, avatar.size)  # a bad image fails here, not on the worker
        self.size = avatar.size
        self._lock = threading.Condition()
        self._in: queue.Queue = queue.Queue()
        self._out: deque[MediaFrame | SegmentEnd] = deque()
        self._open: int | None = None  # the segment that push() is adding to
        self._next_seg = 0
        self._cleared_below = 0  # segments with a smaller id were cleared
        self._timeline = _Timeline()
        self._feeding: int | None = None  # the open segment as the avatar's audio source sees it
        self._silence_in_segment = 0
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._ready: asyncio.Event | None = None
        self._closed = self._done = False
        self._error: BaseException | None = None
        self.frames_made = self.frames_dropped = 0

    # -- input ------------------------------------------------------------------------------------------
    def push(self, samples: np.ndarray, sample_rate: int = SAMPLE_RATE) -> int | None:
        """Add speech (mono int16 PCM or float samples at 16 kHz) to the current segment, opening one if none
        is open; returns the segment's id (None for an empty chunk)."""
        if sample_rate != SAMPLE_RATE:
            raise MediaError(f"audio must be {SAMPLE_RATE} Hz, got {sample_rate} Hz (resample it first)")
        a = to_float(samples)
        if self._closed:
            raise RuntimeError("the live avatar is closed")
        self._ensure_started()
        if not len(a):
            return None
        with self._lock:
            if self._open is None:
                self._open = self._next_seg
                self._next_seg += 1
            self._in.put(("audio", self._open, a))
            return self._open

    def end_segment(self) -> int | None:
        """The current segment's speech is complete (its last frame will say so). Returns the segment's id, or
        None when none is open."""
        with self._lock:
            seg, self._open = self._open, None
            if seg is not None:
                self._in.put(("end", seg, None))
            return seg

    def clear(self) -> int:
        """Drop all speech not yet shown: audio not yet fed to the avatar, and queued frames of any segment so far.
        Frames still being made from speech that was already fed come out idle (no audio). Returns the number of
        queued frames dropped."""
        with self._lock:
            self._open = None
            self._cleared_below = self._next_seg
            while True:
                try:
                    self._in.get_nowait()
                except queue.Empty:
                    break
            kept = deque(f for f in self._out if f.segment is None)
            dropped = sum(isinstance(f, MediaFrame) for f in self._out) - len(kept)
            self._out = kept
            self.frames_dropped += dropped
            self._lock.notify_all()
        return dropped

    @property
    def queued(self) -> int:
        """Frames made and not yet taken (at most ``max_lead``)."""
        with self._lock:
            return sum(isinstance(f, MediaFrame) for f in self._out)

    def cleared(self, segment: int) -> bool:
        """Whether ``segment`` was dropped by ``clear()`` (a frame taken before the clear may still carry it)."""
        return segment < self._cleared_below

    @property
    def speaking(self) -> bool:
        """A segment is open or its frames are still queued."""
        with self._lock:
            return self._open is not None or any(f.segment is not None for f in self._out)

    # -- output -----------------------------------------------------------------------------------------
    def __aiter__(self) -> LiveAvatar:
        self._ensure_started()
        return self

    async def __anext__(self) -> MediaFrame | SegmentEnd:
        assert self._ready is not None
        while True:
            with self._lock:
                if self._out:
                    frame = self._out.popleft()
                    self._lock.notify_all()
                    return frame
                if self._done or self._closed:
                    if self._error is not None:
                        raise RuntimeError(f"the avatar stream failed: {self._error}") from self._error
                    raise StopAsyncIteration
                self._ready.clear()
            await self._ready.wait()

    async def aclose(self) -> None:
        """Stop the stream and its worker thread (frames not yet taken are dropped)."""
        with self._lock:
            self._closed = True
            self._out.clear()
            self._lock.notify_all()
        self._in.put(None)
        if self._thread is not None:
            await asyncio.get_running_loop().run_in_executor(None, self._thread.join)
        if self._ready is not None:
            self._ready.set()

    # -- the worker -------------------------------------------------------------------------------------
    def _ensure_started(self) -> None:
        if self._thread is not None:
            return
        self._loop = asyncio.get_running_loop()
        self._ready = asyncio.Event()
        self._thread = threading.Thread(target=self._run, name="talkstream-live-avatar", daemon=True)
        self._thread.start()

    def _wake(self) -> None:
        assert self._loop is not None and self._ready is not None
        try:
            self._loop.call_soon_threadsafe(self._ready.set)
        except RuntimeError:  # the loop is closed: nobody is waiting
            pass

    def _run(self) -> None:
        frames = self.avatar.stream(self.reference, self._source(), prompt=self.prompt)
        try:
            for fr in frames:
                audio, seg, last = self._timeline.take(fr.index)
                with self._lock:
                    while len(self._out) >= self.cfg.max_lead and not self._closed:
                        self._lock.wait()
                    if self._closed:
                        break
                    if seg is not None and seg < self._cleared_below:  # made from speech cleared since
                        seg, last = None, False
                    img = np.ascontiguousarray(fr.image)
                    self._out.append(MediaFrame(fr.index, img, None if seg is None else to_int16(audio), seg, last))
                    self.frames_made += 1
                self._wake()
        except BaseException as e:  # surfaces in the consumer as one clear error
            self._error = e
        finally:
            frames.close()
            with self._lock:
                self._done = True
            self._wake()

    def _feed(self, samples: np.ndarray, seg: int | None) -> np.ndarray:
        self._timeline.append(samples, seg)
        return samples

    def _close_feeding(self) -> Iterator[np.ndarray]:
        """End the segment being fed: silence up to the next frame boundary, then its end mark."""
        seg, self._feeding = self._feeding, None
        pad = -self._timeline.end % SAMPLES_PER_FRAME
        if not self._timeline.end_segment(seg, self._timeline.end + pad):  # (marked before its frame can be made)
            with self._lock:  # its last frame is out already: the end follows it on its own
                if seg >= self._cleared_below and not self._closed:
                    self._out.append(SegmentEnd(seg))
            self._wake()
        if pad:
            yield self._feed(np.zeros(pad, np.float32), seg)

    def _source(self) -> Iterator[np.ndarray]:
        """The avatar's audio: the pushed speech, or silence when none comes (the avatar keeps moving)."""
        c = self.cfg
        silence = np.zeros(c.silence_frames * SAMPLES_PER_FRAME, np.float32)
        while True:
            with self._lock:
                if self._closed:
                    return
                if self._feeding is not None and self._feeding < self._cleared_below:
                    self._feeding = None  # cleared: no padding, no end mark
            try:
                item = self._in.get(timeout=c.speech_wait if self._feeding is not None else c.idle_wait)
            except queue.Empty:
                if self._feeding is not None:
                    self._silence_in_segment += len(silence)
                    if self._silence_in_segment >= c.segment_timeout * SAMPLE_RATE:
                        yield from self._close_feeding()
                        continue
                yield self._feed(silence, self._feeding)
                continue
            if item is None:
                return
            kind, seg, samples = item
            with self._lock:
                if seg < self._cleared_below:
                    continue
            if kind == "audio":
                if self._feeding is not None and self._feeding != seg:
                    yield from self._close_feeding()
                if self._feeding is None:  # a segment starts on a frame boundary
                    pad = -self._timeline.end % SAMPLES_PER_FRAME
                    if pad:
                        yield self._feed(np.zeros(pad, np.float32), None)
                self._feeding, self._silence_in_segment = seg, 0
                yield self._feed(samples, seg)
            elif kind == "end" and self._feeding == seg:
                yield from self._close_feeding()


__all__ = ["LiveAvatar", "LiveConfig", "MediaFrame", "SegmentEnd", "SAMPLES_PER_FRAME", "to_float", "to_int16"]
