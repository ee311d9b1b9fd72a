"""Pipecat: the avatar as a video service (``pip install talkstream[pipecat]``; pipecat-ai 1.14.0).

    avatar = TalkstreamVideoService(Avatar.from_pretrained(), "me.png")
    Pipeline([transport.input(), stt, user_agg, llm, tts, avatar, transport.output(), assistant_agg])

The service takes the TTS's ``TTSAudioRawFrame``s (any rate, resampled to 16 kHz; not forwarded) and emits, per
avatar frame, an ``OutputImageRawFrame`` (RGB, ``sync_with_audio``) followed by the 40 ms of audio it was drawn
from: the speech as ``TTSAudioRawFrame`` while speaking (so the transport's bot-speaking logic works as without
an avatar), silence as a plain ``OutputAudioRawFrame`` while idle. Images ride the transport's audio queue, so
each is shown when the audio before it has played: lips stay in sync with the voice. ``TTSStoppedFrame`` is held
back and sent after the reply's last frame. ``InterruptionFrame`` / ``UserStartedSpeakingFrame`` drop the queued
speech and its frames at once. Frames are released at 25 a second (``lead`` seconds ahead), so the transport's
queue stays short and an interruption has little to flush.

Transport settings: ``video_out_enabled=True, video_out_is_live=False, video_out_framerate=25``, the avatar's
size as ``video_out_width`` / ``video_out_height``; ``audio_out_sample_rate=16000`` avoids a resampling step.
"""

from __future__ import annotations

import asyncio
import time

import numpy as np
from pipecat.audio.utils import create_stream_resampler
from pipecat.frames.frames import (
    CancelFrame,
    EndFrame,
    Frame,
    InterruptionFrame,
    OutputAudioRawFrame,
    OutputImageRawFrame,
    StartFrame,
    TTSAudioRawFrame,
    TTSStoppedFrame,
    UserStartedSpeakingFrame,
)
from pipecat.processors.frame_processor import FrameDirection
from pipecat.services.ai_service import AIService
from pipecat.services.settings import ServiceSettings

from ..media import SAMPLE_RATE
from ..stream.avatar import Avatar
from ..stream.engine import FPS
from .live import SAMPLES_PER_FRAME, LiveAvatar, LiveConfig, MediaFrame, SegmentEnd


class TalkstreamVideoService(AIService):
    """See the module docstring. ``end_timeout``: on ``EndFrame``, how long to wait for the last reply's frames
    before stopping anyway."""

    def __init__(
        self,
        avatar: Avatar,
        image,
        *,
        prompt: str | None = None,
        live_config: LiveConfig | None = None,
        lead: float = 0.2,
        end_timeout: float = 120.0,
        **kwargs,
    ) -> None:
        kwargs.setdefault("settings", ServiceSettings(model=None))
        super().__init__(**kwargs)
        self.avatar, self.image, self.prompt, self.live_config = avatar, image, prompt, live_config
        self.lead, self.end_timeout = lead, end_timeout
        self.live = LiveAvatar(avatar, image, prompt, live_config)  # a bad image fails here, at construction
        self._resampler = create_stream_resampler()
        self._task: asyncio.Task | None = None
        self._stops: dict[int, TTSStoppedFrame | None] = {}  # segment -> its held TTSStoppedFrame
        self._contexts: dict[int, str | None] = {}  # segment -> the TTS context id its audio came with
        self._all_out = asyncio.Event()
        self._t0: float | None = None
        self._released = 0

    @property
    def size(self) -> tuple[int, int]:
        return (self.live.size, self.live.size)

    # -- lifecycle --------------------------------------------------------------------------------------
    async def start(self, frame: StartFrame) -> None:
        await super().start(frame)
        if self._task is None:
            self._task = self.create_task(self._emit())

    async def stop(self, frame: EndFrame) -> None:
        """Graceful end: the reply being spoken is rendered to its last frame first."""
        await super().stop(frame)
        seg = self.live.end_segment()
        if seg is not None:
            self._stops.setdefault(seg, None)
        if self._stops:
            self._all_out.clear()
            try:
                await asyncio.wait_for(self._all_out.wait(), self.end_timeout)
            except TimeoutError:
                pass
        await self._shutdown()

    async def cancel(self, frame: CancelFrame) -> None:
        await super().cancel(frame)
        await self._shutdown()

    async def cleanup(self) -> None:
        await super().cleanup()
        await self._shutdown()

    async def _shutdown(self) -> None:
        if self._task is not None:
            await self.cancel_task(self._task)
            self._task = None
        await self.live.aclose()

    # -- input ------------------------------------------------------------------------------------------
    async def process_frame(self, frame: Frame, direction: FrameDirection) -> None:
        await super().process_frame(frame, direction)
        if isinstance(frame, TTSAudioRawFrame) and direction == FrameDirection.DOWNSTREAM:
            pcm = np.frombuffer(frame.audio, np.int16)
            if frame.num_channels > 1:
                pcm = pcm.reshape(-1, frame.num_channels).mean(axis=1).round().astype(np.int16)
            if frame.sample_rate != SAMPLE_RATE:
                pcm = np.frombuffer(
                    await self._resampler.resample(pcm.tobytes(), frame.sample_rate, SAMPLE_RATE), np.int16
                )
            seg = self.live.push(pcm.copy())
            if seg is not None:
                self._contexts.setdefault(seg, frame.context_id)
            return
        if isinstance(frame, TTSStoppedFrame) and direction == FrameDirection.DOWNSTREAM:
            seg = self.live.end_segment()
            if seg is None:  # no speech came with it
                await self.push_frame(frame, direction)
            else:
                self._stops[seg] = frame
            return
        if isinstance(frame, (InterruptionFrame, UserStartedSpeakingFrame)):
            self.live.clear()
            self._stops.clear()
            self._contexts.clear()
            self._resampler = create_stream_resampler()  # its history belongs to the dropped speech
            self._t0 = None  # the transport flushed its queue: what comes next plays now
            self._all_out.set()
        await self.push_frame(frame, direction)

    # -- output -----------------------------------------------------------------------------------------
    async def _pace(self) -> None:
        """Release frames at 25 a second, ``lead`` seconds ahead of the clock; start the clock over when the
        avatar falls behind it (a slow machine) or after an interruption."""
        now = time.perf_counter()
        if self._t0 is None or now - (self._t0 + self._released / FPS) > 0.5:
            self._t0, self._released = now, 0
        delay = self._t0 + self._released / FPS - self.lead - now
        if delay > 0:
            await asyncio.sleep(delay)
        self._released += 1

    async def _emit(self) -> None:
        try:
            async for f in self.live:
                if isinstance(f, SegmentEnd):  # takes no time of its own
                    if not self.live.cleared(f.segment):
                        await self._end_segment(f.segment)
                    continue
                await self._pace()
                if f.segment is not None and self.live.cleared(f.segment):
                    continue  # interrupted while it waited for its turn
                await self._push_media(f)
        except RuntimeError as e:  # the avatar's stream failed: say why, upstream
            await self.push_error(error_msg=f"talkstream avatar: {e}", exception=e)

    async def _push_media(self, f: MediaFrame) -> None:
        h, w = f.image.shape[:2]
        image = OutputImageRawFrame(image=f.image.tobytes(), size=(w, h), format="RGB")
        image.sync_with_audio = True  # shown when the audio before it has played
        await self.push_frame(image)
        if f.audio is None:
            await self.push_frame(OutputAudioRawFrame(bytes(2 * SAMPLES_PER_FRAME), SAMPLE_RATE, 1))
        else:
            ctx = self._contexts.get(f.segment) if f.segment is not None else None
            await self.push_frame(TTSAudioRawFrame(f.audio.tobytes(), SAMPLE_RATE, 1, context_id=ctx))
        if f.last_of_segment and f.segment is not None:
            await self._end_segment(f.segment)

    async def _end_segment(self, segment: int) -> None:
        self._contexts.pop(segment, None)
        if segment in self._stops:
            stop = self._stops.pop(segment)
            if stop is not None:
                await self.push_frame(stop)
            if not self._stops:
                self._all_out.set()


__all__ = ["TalkstreamVideoService"]
