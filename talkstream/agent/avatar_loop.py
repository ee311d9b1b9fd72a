"""One live avatar stream driven by a conversation: queued speech or silence in, frames with their audio out.

A worker thread runs the streaming engine chunk after chunk. Each chunk pulls the audio it needs: reply speech queued
by ``say()`` if there is any, silence otherwise (the avatar listens / idles, never freezes), and gets the caption of
its middle frame through ``StreamEngine.set_prompt``: the conversation's state (listening, thinking, idle) on
silence, the speaking caption (or the reply's action tag) on speech. Every frame leaves with the 640 samples (40 ms)
of audio it was generated from and its timestamp (``pts = index / 25``), so a player keeps sound and lips in sync
whatever rate the engine runs at. When the engine is faster than real time it is paced to stay at most ``lead``
seconds ahead of the wall clock (frames made too far ahead would delay a reply); when slower, frames flow at the
rate it gives. Queued reply speech may run one chunk further ahead: its first chunk starts at once, and the rest
follow at the pace of the wall clock, on the same grid as silence, so that a speaking session still shares its
passes with the others on a batcher (rendered as fast as possible, one speaking session's chunks ran alone,
pass after pass, and took a GPU's time from every other session: docs/serve.md). ``interrupt()`` (barge-in) drops
queued speech and mutes what was already fed but not yet shown.
"""

from __future__ import annotations

import math
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, replace

import numpy as np

from ..stream.avatar import Avatar
from ..stream.batch import ChunkBatcher
from ..stream.engine import FPS
from .actions import STATE_CAPTIONS
from .audio import SAMPLE_RATE

SAMPLES_PER_FRAME = SAMPLE_RATE // FPS  # 640
DECODE_MODES = ("latency", "sync", "overlapped")


def lower_thread_priority(by: int) -> bool:
    """Make the calling thread ``by`` nicer (Linux: a thread is a task with its own nice value, which threads it
    starts inherit). False where the OS does not allow it."""
    try:
        tid = threading.get_native_id()
        os.setpriority(os.PRIO_PROCESS, tid, min(19, os.getpriority(os.PRIO_PROCESS, tid) + by))
        return True
    except (AttributeError, OSError):
        return False


@dataclass
class MediaFrame:
    index: int
    pts: float  # seconds from the stream's start (index / 25)
    image: np.ndarray | None  # [H, W, 3] uint8 (None: dropped for a slow reader, the audio still plays)
    audio: np.ndarray  # float32 [640]: what the avatar says during this frame
    reply: int  # id of the reply whose speech this frame carries, -1 for silence
    caption: str  # the caption the frame's chunk was made with
    made_at: float = 0.0  # perf_counter when it left the engine

    @property
    def speech(self) -> bool:
        return self.reply >= 0


class AvatarLoop:
    def __init__(
        self,
        avatar: Avatar,
        image,
        lead: float = 0.3,
        on_error: Callable | None = None,
        decode: str = "auto",
        batcher: ChunkBatcher | None = None,
        nice: int = 0,
    ) -> None:
        """``decode``: when a chunk's frames leave. "latency" (the engine's ``emit="latency"``): as soon as the chunk
        is decoded, while the next one is denoised on another thread; "sync": each chunk decoded before the next is
        denoised, on one thread; "overlapped" (the engine's default for files): decoded while the next is denoised but
        shown after it, one chunk later; "auto": "sync" on a CPU, "latency" elsewhere. A conversation wants the reply
        soon: on 2 loaded CPU cores "sync" measured 1.87 s from reply audio to its first frame against 2.70 s for
        "overlapped" (64x64, 4 steps; benchmarks/results/conversation_avatar_64_steps4_*), and 2.32 s against 4.13 s
        for "latency" (256x256, the fast path, load 10-12: denoising and decoding on two threads fight over the two
        cores; conversation_avatar_256_fast_{sync,latency}_cpu.json). On a GPU the decode runs on its own CUDA stream
        and "latency" hides it (not measured here).
        ``batcher``: a ``stream.batch.ChunkBatcher`` shared by several loops (one model serving several sessions).
        ``nice`` > 0: the engine's threads (this loop's, and the denoising / decoding threads and pools it starts) run
        that much nicer than the rest of the process, so that on a busy CPU speech recognition, the language model
        and the voice, which decide when a reply starts, take the cores first (Linux; elsewhere ignored)."""
        self.avatar, self.image, self.lead = avatar, image, lead
        if decode not in (*DECODE_MODES, "auto"):
            raise ValueError(f"decode must be one of {DECODE_MODES} or 'auto', got {decode!r}")
        if decode == "auto":
            decode = "sync" if str(avatar.device) == "cpu" else "latency"
        self.decode = decode
        self.nice = nice
        self.batcher = batcher  # shared with other sessions: their chunks denoised in one pass (stream.batch)
        self.on_error = on_error
        self._cond = threading.Condition()
        self._queue: list[tuple[np.ndarray, int, int]] = []  # (audio, reply id, caption id) waiting to be fed
        self._captions: list[str] = []
        self._caption_ids: dict[str, int] = {}
        self._encoded: dict[str, tuple] = {}
        self._state_caption = self._cid(STATE_CAPTIONS["idle"])
        self._muted: set[int] = set()
        # what has been fed to the engine and not yet emitted: audio, reply id and caption id per sample
        self._audio = np.zeros(0, np.float32)
        self._reply = np.zeros(0, np.int32)
        self._cap = np.zeros(0, np.int16)
        self._offset = 0  # absolute sample index of _audio[0]
        self._closed = False
        self._thread: threading.Thread | None = None
        self.started_at: float | None = None
        self.frames_out = 0
        self.error: BaseException | None = None

    # -- control (any thread) -----------------------------------------------------------------------
    def _cid(self, caption: str) -> int:
        if caption not in self._caption_ids:
            self._caption_ids[caption] = len(self._captions)
            self._captions.append(caption)
        return self._caption_ids[caption]

    def set_state(self, state: str) -> None:
        """The caption silence is fed with from now on (listening, thinking, idle)."""
        with self._cond:
            self._state_caption = self._cid(STATE_CAPTIONS[state])

    def say(self, audio: np.ndarray, caption: str, reply: int) -> None:
        """Queue reply speech (16 kHz float) to be spoken next, after what is queued."""
        a = np.asarray(audio, np.float32)
        if len(a) == 0:
            return
        with self._cond:
            self._queue.append((a, int(reply), self._cid(caption)))
            self._cond.notify_all()

    def interrupt(self, reply: int) -> None:
        """Barge-in: drop reply ``reply``'s queued speech and mute its audio already fed but not yet emitted."""
        with self._cond:
            self._queue = [q for q in self._queue if q[1] != reply]
            self._muted.add(int(reply))
            self._cond.notify_all()

    @property
    def queued_seconds(self) -> float:
        with self._cond:
            return sum(len(q[0]) for q in self._queue) / SAMPLE_RATE

    def pending_speech(self, reply: int) -> bool:
        """Whether any of reply ``reply``'s speech is still queued or fed but not yet emitted."""
        with self._cond:
            return any(q[1] == reply for q in self._queue) or bool((self._reply == reply).any())

    def _restart_clock(self, period: float) -> None:
        """At the first frame: the stream's clock moves on by the time that frame took (a player starts its clock
        at the first frame it gets; left behind, the stream would catch up and every later frame, the replies'
        too, would wait that long in the player's buffer). On a batcher by whole chunk periods, keeping the grid."""
        late = time.perf_counter() - self.started_at
        if late > 0:
            self.started_at += late if self.batcher is None else math.floor(late / period) * period

    def behind_s(self, settle_s: float = 5.0) -> float:
        """Seconds this stream's frames are behind the wall clock (0 while ahead, not yet started, or within its first
        ``settle_s``, while a new stream catches up with its clock). A stream leaves a chunk of frames at a time, so a
        real-time one reads up to a chunk's seconds behind just before its next chunk."""
        if self.started_at is None:
            return 0.0
        elapsed = time.perf_counter() - self.started_at
        return 0.0 if elapsed < settle_s else max(0.0, elapsed - self.frames_out / FPS)

    def start(self, on_frame: Callable[[MediaFrame], None]) -> None:
        self._on_frame = on_frame
        self._thread = threading.Thread(target=self._run, daemon=True, name="avatar-loop")
        self._thread.start()

    def close(self, timeout: float = 30.0) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout)

    # -- the engine thread --------------------------------------------------------------------------
    def _encoded_caption(self, cid: int):
        caption = self._captions[cid]
        if caption not in self._encoded:
            self._encoded[caption] = self.avatar.encode_prompt(caption)
        return self._encoded[caption]

    def _take(self, n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """n samples for the engine: queued speech first, silence (with the state's caption) after it."""
        audio = np.zeros(n, np.float32)
        reply = np.full(n, -1, np.int32)
        cap = np.full(n, self._state_caption, np.int16)
        filled = 0
        while filled < n and self._queue:
            a, r, c = self._queue[0]
            m = min(n - filled, len(a))
            audio[filled : filled + m], reply[filled : filled + m], cap[filled : filled + m] = a[:m], r, c
            filled += m
            if m == len(a):
                self._queue.pop(0)
            else:
                self._queue[0] = (a[m:], r, c)
        return audio, reply, cap

    def _run(self) -> None:
        try:
            if self.nice:
                lower_thread_priority(self.nice)
            self._stream()
        except BaseException as e:  # reported to the conversation, which ends the session with a message
            self.error = e
            if self.on_error is not None:
                self.on_error(e)

    def _stream(self) -> None:
        avatar = self.avatar
        text, mask = self._encoded_caption(self._state_caption)
        engine = avatar.start_engine(self.image, text, mask)
        engine.async_decode = self.decode != "sync"
        engine.cfg = replace(engine.cfg, emit="latency" if self.decode == "latency" else "overlapped")
        if self.batcher is not None:
            self.batcher.attach(engine)
            try:
                self._frames(engine, avatar)
            finally:
                self.batcher.detach(engine)
        else:
            self._frames(engine, avatar)

    def _frames(self, engine, avatar: Avatar) -> None:
        feed, ws = avatar.audio_feed(), avatar.whisper.stream()
        hop = ws.enc.hop_samples
        now = time.perf_counter()
        # sessions that share a batcher keep one pacing grid: their chunks are asked for together and batched
        period = avatar.cfg.chunk * 4 / FPS
        self.started_at = now if self.batcher is None else self.batcher.pace_origin(now, period)
        current = [self._state_caption]

        def audio_for(first: int, k: int):
            first_frame = 0 if first == 0 else 1 + (first - 1) * 4
            with self._cond:  # pace: no more than `lead` seconds ahead of the wall clock (woken by speech)
                while not self._closed:
                    lead = self.lead + (period if self._queue else 0.0)  # (speech: one chunk more, same grid)
                    ahead = first_frame / FPS - (time.perf_counter() - self.started_at)
                    if ahead <= lead:
                        break
                    self._cond.wait(min(ahead - lead, 0.1))
                if self._closed:
                    raise StopIteration
            while not feed.ready(first, k):
                with self._cond:
                    if self._closed:
                        raise StopIteration
                    a, r, c = self._take(hop)
                    self._audio = np.concatenate([self._audio, a])
                    self._reply = np.concatenate([self._reply, r])
                    self._cap = np.concatenate([self._cap, c])
                feed.push(ws.push(a))
            mid = ((first + k // 2) * 4) * SAMPLES_PER_FRAME - self._offset
            with self._cond:
                cid = int(self._cap[min(max(mid, 0), len(self._cap) - 1)]) if len(self._cap) else current[0]
            if cid != current[0]:
                engine.set_prompt(*self._encoded_caption(cid))
                current[0] = cid
            return feed.windows(first, k)

        for idx, img in engine.frames(audio_for):
            start = idx * SAMPLES_PER_FRAME - self._offset
            with self._cond:
                a = self._audio[start : start + SAMPLES_PER_FRAME].copy()
                r = self._reply[start : start + SAMPLES_PER_FRAME]
                c = self._cap[start : start + SAMPLES_PER_FRAME]
                reply = int(r.max()) if len(r) else -1
                caption = self._captions[int(c[len(c) // 2])] if len(c) else self._captions[current[0]]
                if reply in self._muted:
                    a[:], reply = 0.0, -1
                drop = max(0, start + SAMPLES_PER_FRAME)
                self._audio, self._reply, self._cap = self._audio[drop:], self._reply[drop:], self._cap[drop:]
                self._offset += drop
            if len(a) < SAMPLES_PER_FRAME:
                a = np.pad(a, (0, SAMPLES_PER_FRAME - len(a)))
            if self.frames_out == 0:
                self._restart_clock(period)
            self.frames_out += 1
            self._on_frame(MediaFrame(idx, idx / FPS, img, a, reply, caption, time.perf_counter()))
            if self._closed:
                return


__all__ = ["AvatarLoop", "DECODE_MODES", "MediaFrame", "SAMPLES_PER_FRAME"]
