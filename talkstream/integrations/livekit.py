"""LiveKit Agents: the avatar as a ``VideoGenerator`` run by LiveKit's own ``AvatarRunner``
(``pip install talkstream[livekit]``; livekit-agents 1.8.9).

Two layouts, both started by ``TalkstreamAvatarSession.start(agent_session, room)``:

- in the agent's process (default): the agent's speech goes to a ``QueueAudioOutput``, the ``AvatarRunner``
  reads it, runs ``TalkstreamVideoGenerator`` and publishes ``avatar_video`` / ``avatar_audio`` as the agent;
- as a worker process (``worker=True``): the session mints a token for a separate avatar participant and
  starts ``python -m talkstream.integrations.livekit`` (this module's ``main``), which joins the room and
  receives the agent's speech through ``DataStreamAudioReceiver`` (byte streams on ``lk.audio_stream``, RPCs
  ``lk.clear_buffer`` / ``lk.playback_started`` / ``lk.playback_finished``); the agent sends it with
  ``DataStreamAudioOutput``. Run the worker on the machine with the GPU.

The generator yields, per avatar frame, an ``rtc.VideoFrame`` (RGB24) and, while speaking, the
``rtc.AudioFrame`` of 640 samples (16 kHz mono, 40 ms) it was drawn from, then ``AudioSegmentEnd`` after a
reply's last frame; LiveKit's ``AVSynchronizer`` paces them at 25 fps.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import numpy as np
from livekit import api, rtc
from livekit.agents import get_job_context
from livekit.agents.types import ATTRIBUTE_PUBLISH_ON_BEHALF
from livekit.agents.voice.avatar import (
    AudioSegmentEnd,
    AvatarOptions,
    AvatarRunner,
    AvatarSession,
    DataStreamAudioOutput,
    DataStreamAudioReceiver,
    QueueAudioOutput,
    VideoGenerator,
)

from ..media import SAMPLE_RATE
from ..stream.avatar import Avatar, load_reference
from ..stream.engine import FPS
from .live import SAMPLES_PER_FRAME, LiveAvatar, LiveConfig, SegmentEnd

logger = logging.getLogger("talkstream.livekit")


def avatar_options(size: int) -> AvatarOptions:
    """The runner's track settings for an avatar of ``size`` x ``size`` pixels: 25 fps video, 16 kHz mono audio."""
    return AvatarOptions(
        video_width=size, video_height=size, video_fps=FPS, audio_sample_rate=SAMPLE_RATE, audio_channels=1
    )


class TalkstreamVideoGenerator(VideoGenerator):
    """The avatar behind LiveKit's ``VideoGenerator`` interface.

    ``push_audio``: the agent's speech (``rtc.AudioFrame`` at any rate / channel count: mixed to mono and
    resampled to 16 kHz), or ``AudioSegmentEnd`` when a reply is complete. ``clear_buffer``: the user interrupted;
    queued speech and its frames are dropped at once (no ``AudioSegmentEnd`` follows for it: the runner reports
    the interrupted playback itself). Iterating yields video / audio frames and segment ends in play order."""

    def __init__(self, live: LiveAvatar) -> None:
        self.live = live
        self._resampler: rtc.AudioResampler | None = None
        self._resampler_rate = 0

    @property
    def options(self) -> AvatarOptions:
        return avatar_options(self.live.size)

    async def push_audio(self, frame: rtc.AudioFrame | AudioSegmentEnd) -> None:
        if isinstance(frame, AudioSegmentEnd):
            self._flush_resampler()
            self.live.end_segment()
            return
        if not isinstance(frame, rtc.AudioFrame):
            raise TypeError(f"push_audio takes rtc.AudioFrame or AudioSegmentEnd, got {type(frame).__name__}")
        pcm = np.frombuffer(frame.data, np.int16)
        if frame.num_channels > 1:
            pcm = pcm.reshape(-1, frame.num_channels).mean(axis=1).round().astype(np.int16)
        if frame.sample_rate != SAMPLE_RATE:
            if self._resampler is None or self._resampler_rate != frame.sample_rate:
                self._flush_resampler()
                self._resampler = rtc.AudioResampler(frame.sample_rate, SAMPLE_RATE, num_channels=1)
                self._resampler_rate = frame.sample_rate
            for out in self._resampler.push(bytearray(pcm.tobytes())):
                self.live.push(np.frombuffer(out.data, np.int16).copy())
            return
        self.live.push(pcm.copy())

    def _flush_resampler(self) -> None:
        if self._resampler is not None:
            for out in self._resampler.flush():
                self.live.push(np.frombuffer(out.data, np.int16).copy())
            self._resampler = None

    def clear_buffer(self) -> None:
        self._resampler = None  # its tail belongs to the cleared speech
        dropped = self.live.clear()
        logger.debug("clear_buffer: %d queued frames dropped", dropped)

    async def __aiter__(self) -> AsyncIterator[rtc.VideoFrame | rtc.AudioFrame | AudioSegmentEnd]:
        size = self.live.size
        async for f in self.live:
            if f.segment is not None and self.live.cleared(f.segment):
                continue
            if isinstance(f, SegmentEnd):
                yield AudioSegmentEnd()
                continue
            yield rtc.VideoFrame(size, size, rtc.VideoBufferType.RGB24, f.image.tobytes())
            if f.segment is None or self.live.cleared(f.segment):  # idle, or cleared while the video was taken
                continue
            yield rtc.AudioFrame(f.audio.tobytes(), SAMPLE_RATE, 1, SAMPLES_PER_FRAME)
            if f.last_of_segment:
                yield AudioSegmentEnd()

    async def aclose(self) -> None:
        await self.live.aclose()


class TalkstreamAvatarSession(AvatarSession):
    """Starts the avatar for an ``AgentSession``: ``await avatar.start(session, room=ctx.room)`` before
    ``session.start(...)``.

    In process (default): ``avatar`` (an ``Avatar``) and ``image`` are used here. With ``worker=True``, a worker
    process joins the room as ``avatar_identity`` and loads its own avatar (``weights`` / ``device`` / ``size``);
    ``api_key`` / ``api_secret`` / ``url`` default to ``LIVEKIT_API_KEY`` / ``LIVEKIT_API_SECRET`` /
    ``LIVEKIT_URL``."""

    def __init__(
        self,
        image,
        avatar: Avatar | None = None,
        *,
        prompt: str | None = None,
        live_config: LiveConfig | None = None,
        worker: bool = False,
        avatar_identity: str = "talkstream-avatar",
        weights: str | None = None,
        device: str = "cpu",
        size: int = 256,
        url: str | None = None,
        api_key: str | None = None,
        api_secret: str | None = None,
    ) -> None:
        super().__init__()
        if not worker and avatar is None:
            raise ValueError("give avatar= (in-process layout) or worker=True (the worker process loads its own)")
        if worker and not Path(str(image)).is_file():
            raise ValueError(f"{image}: the worker process needs the reference image as a file path")
        self.image, self.avatar, self.prompt, self.live_config = image, avatar, prompt, live_config
        self.worker, self._identity = worker, avatar_identity
        self.weights, self.device, self.size = weights, device, size
        self.url, self.api_key, self.api_secret = url, api_key, api_secret
        self._local_room: rtc.Room | None = None
        self.runner: AvatarRunner | None = None
        self.generator: TalkstreamVideoGenerator | None = None
        self.process: asyncio.subprocess.Process | None = None

    @property
    def avatar_identity(self) -> str:
        """In process, the agent itself (read when asked: the room may connect after ``start``)."""
        if not self.worker and self._local_room is not None:
            return self._local_room.local_participant.identity
        return self._identity

    @property
    def provider(self) -> str:
        return "talkstream"

    async def start(self, agent_session, room: rtc.Room) -> None:
        if not self.worker:
            self._local_room = room  # the agent publishes the avatar's tracks itself
        await super().start(agent_session, room)
        if self.worker:
            await self._start_worker(agent_session, room)
        else:
            await self._start_local(agent_session, room)

    async def _start_local(self, agent_session, room: rtc.Room) -> None:
        assert self.avatar is not None
        audio = QueueAudioOutput(sample_rate=SAMPLE_RATE, wait_playback_start=True)
        self.generator = TalkstreamVideoGenerator(LiveAvatar(self.avatar, self.image, self.prompt, self.live_config))
        self.runner = AvatarRunner(room, audio_recv=audio, video_gen=self.generator, options=self.generator.options)
        await self.runner.start()
        agent_session.output.replace_audio_tail(audio)

    @staticmethod
    def _agent_identity(room: rtc.Room) -> str:
        """The agent's identity: from its job's token (the room connects only at session.start), else the room."""
        job = get_job_context(required=False)
        if job is not None:
            return job.token_claims().identity
        if not room.isconnected():
            raise RuntimeError("the room is not connected and there is no job context: connect the room first")
        return room.local_participant.identity

    async def _start_worker(self, agent_session, room: rtc.Room) -> None:
        url = self.url or os.environ.get("LIVEKIT_URL")
        if not url:
            raise ValueError("the worker needs the LiveKit URL: url= or LIVEKIT_URL")
        token = (
            api.AccessToken(self.api_key, self.api_secret)
            .with_kind("agent")
            .with_identity(self._identity)
            .with_name("talkstream avatar")
            .with_grants(api.VideoGrants(room_join=True, room=room.name))
            .with_attributes({ATTRIBUTE_PUBLISH_ON_BEHALF: self._agent_identity(room)})
            .to_jwt()
        )
        args = ["--url", url, "--image", str(self.image), "--device", self.device, "--size", str(self.size)]
        if self.weights:
            args += ["--weights", str(self.weights)]
        if self.prompt:
            args += ["--prompt", self.prompt]
        env = {**os.environ, "TALKSTREAM_LIVEKIT_TOKEN": token}  # not on the command line, where ps shows it
        self.process = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "talkstream.integrations.livekit", *args, env=env
        )
        agent_session.output.replace_audio_tail(
            DataStreamAudioOutput(
                room,
                destination_identity=self._identity,
                sample_rate=SAMPLE_RATE,
                wait_remote_track=rtc.TrackKind.KIND_VIDEO,
                wait_playback_start=True,
            )
        )

    async def aclose(self) -> None:
        await super().aclose()
        if self.runner is not None:
            await self.runner.aclose()
            self.runner = None
        if self.generator is not None:
            await self.generator.aclose()
            self.generator = None
        if self.process is not None and self.process.returncode is None:
            self.process.terminate()
            try:
                await asyncio.wait_for(self.process.wait(), 10)
            except TimeoutError:
                self.process.kill()
                await self.process.wait()
        self.process = None


async def run_worker(
    room: rtc.Room, live: LiveAvatar, sender_identity: str | None = None
) -> tuple[AvatarRunner, TalkstreamVideoGenerator]:
    """The worker side on a connected room: ``DataStreamAudioReceiver`` -> ``AvatarRunner`` -> the generator.
    Returns the started runner (``await runner.wait_for_complete()``; ``aclose()`` both when done)."""
    generator = TalkstreamVideoGenerator(live)
    receiver = DataStreamAudioReceiver(room, sender_identity=sender_identity)
    runner = AvatarRunner(room, audio_recv=receiver, video_gen=generator, options=generator.options)
    await runner.start()
    return runner, generator


async def _worker_main(opts: argparse.Namespace) -> None:
    token = os.environ.get("TALKSTREAM_LIVEKIT_TOKEN") or opts.token
    if not token:
        raise SystemExit("no token: set TALKSTREAM_LIVEKIT_TOKEN or pass --token")
    load_reference(opts.image, opts.size)  # a bad image fails before anything loads or connects
    avatar = Avatar.from_pretrained(opts.weights, device=opts.device, size=opts.size)
    live = LiveAvatar(avatar, opts.image, opts.prompt)
    room = rtc.Room()
    gone = asyncio.Event()
    room.on("disconnected", lambda *_: gone.set())
    try:
        await room.connect(opts.url, token)
    except rtc.ConnectError as e:
        raise SystemExit(f"could not join the LiveKit room at {opts.url}: {e}") from None
    logger.info("avatar worker joined %s as %s", room.name, room.local_participant.identity)
    runner, generator = await run_worker(room, live, opts.sender)
    try:
        done = asyncio.ensure_future(runner.wait_for_complete())
        await asyncio.wait({done, asyncio.ensure_future(gone.wait())}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        await runner.aclose()
        await generator.aclose()
        await room.disconnect()


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(
        prog="python -m talkstream.integrations.livekit",
        description="A talkstream avatar worker: joins a LiveKit room and renders the agent's speech.",
    )
    p.add_argument("--url", required=True, help="LiveKit server URL (wss://...)")
    p.add_argument("--token", help="join token (better: the TALKSTREAM_LIVEKIT_TOKEN environment variable)")
    p.add_argument("--image", required=True, help="reference image of the avatar")
    p.add_argument("--weights", help="folder with causal / vae safetensors (default: the embedded weights)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--size", type=int, default=256)
    p.add_argument("--prompt", help="text prompt (behaviour caption)")
    p.add_argument("--sender", help="identity of the agent whose speech to render (default: the first agent)")
    logging.basicConfig(level=logging.INFO)
    asyncio.run(_worker_main(p.parse_args(argv)))


if __name__ == "__main__":
    main()


__all__ = ["TalkstreamAvatarSession", "TalkstreamVideoGenerator", "avatar_options", "run_worker"]
