"""The LiveKit Agents adapter at the framework's boundary, with LiveKit's real classes (rtc frames, sources,
tracks and streams, AVSynchronizer, AvatarRunner, QueueAudioOutput, DataStreamAudioOutput / Receiver,
AgentSession); only the room is an in-memory stand-in (no LiveKit server can run here): it carries byte streams,
RPCs and track publications between two participants, and the tests read the published tracks back through
rtc.VideoStream / rtc.AudioStream, as a subscriber would.

The real embedded avatar (CPU, 128x128, 4 steps) renders in the layout tests; ``EchoAvatar`` stands in where a
test checks the adapter's own bookkeeping frame by frame (which audio each frame was drawn from)."""

import asyncio
import uuid
from types import SimpleNamespace

import numpy as np
import pytest

pytest.importorskip("livekit.agents", reason="the livekit extra is not installed (pip install talkstream[livekit])")

from livekit import rtc  # noqa: E402
from livekit.agents import AgentSession  # noqa: E402
from livekit.agents.voice.avatar import AudioSegmentEnd, DataStreamAudioOutput  # noqa: E402

from talkstream.integrations.live import LiveAvatar, LiveConfig, to_int16  # noqa: E402
from talkstream.integrations.livekit import (  # noqa: E402
    TalkstreamAvatarSession,
    TalkstreamVideoGenerator,
    run_worker,
)
from talkstream.stream.avatar import WEIGHTS, Avatar, Frame, load_reference  # noqa: E402

SIZE = 128
REFERENCE = WEIGHTS.parent / "assets" / "reference.png"


# -- inputs -----------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def avatar():
    av = Avatar.from_pretrained(size=SIZE, decoder="tiny", steps=4)
    next(iter(av.stream(REFERENCE, [np.zeros(16000, np.float32)])))  # load the audio encoder, warm up
    return av


@pytest.fixture(scope="module")
def speech():
    from talkstream.world.speech import synthesize

    return to_int16(synthesize("hello there, nice to meet you").audio)


def audio_frames(pcm: np.ndarray, rate: int = 16000, channels: int = 1, ms: int = 10) -> list[rtc.AudioFrame]:
    """10 ms rtc.AudioFrames, as an agent's TTS sends them (``pcm`` [N] or [N, channels] int16)."""
    n = rate * ms // 1000
    return [
        rtc.AudioFrame(pcm[i : i + n].tobytes(), rate, channels, len(pcm[i : i + n])) for i in range(0, len(pcm), n)
    ]


def padded(pcm: np.ndarray) -> np.ndarray:
    return np.pad(pcm, (0, -len(pcm) % 640))


def looks_like_reference(images: list[np.ndarray], size: int = SIZE) -> float:
    ref = load_reference(REFERENCE, size).astype(np.float32)
    return float(np.mean([np.abs(im.astype(np.float32) - ref).mean() for im in images]))


def voiced(pcm: np.ndarray) -> np.ndarray:
    """The non-zero samples in order. A viewer's stream has silence wherever the avatar (slower than real time on
    this CPU) had no audio ready yet; the speech itself must come through sample for sample, in order."""
    return pcm[pcm != 0]


class EchoAvatar:
    """Stands in for ``Avatar`` where a test checks the adapters' bookkeeping: it takes audio from the source as
    ``Avatar.stream`` does (pulls chunks until frame i's samples and a look-ahead have arrived) and draws frame i
    from its own 640 samples only: every pixel holds a checksum of them."""

    size = 16

    def __init__(self, look_ahead: int = 6) -> None:
        self.look_ahead = look_ahead

    @staticmethod
    def checksum(window: np.ndarray) -> np.ndarray:
        pcm = window.astype(np.int64) if window.dtype == np.int16 else to_int16(window).astype(np.int64)
        v = int(np.abs(pcm).sum() * 31 + (pcm * np.arange(1, len(pcm) + 1)).sum()) % (1 << 24)
        return np.array([v >> 16, (v >> 8) & 255, v & 255], np.uint8)

    def stream(self, image, chunks, prompt=None):
        fed, i = np.zeros(0, np.float32), 0
        for c in chunks:
            fed = np.concatenate([fed, c])
            while len(fed) >= 640 * (i + 1 + self.look_ahead):
                img = np.broadcast_to(self.checksum(fed[640 * i : 640 * (i + 1)]), (self.size, self.size, 3))
                yield Frame(i, i / 25, img.copy())
                i += 1


# -- an in-memory room: two participants, byte streams, RPCs, track publications ----------------------------
class _ByteStream:
    """One byte stream, written by the sender and read by the receiver (in order, then closed)."""

    def __init__(self, name: str, attributes: dict[str, str]) -> None:
        self.info = SimpleNamespace(stream_id=name, attributes=attributes)
        self._q: asyncio.Queue = asyncio.Queue()

    async def write(self, data: bytes) -> None:
        await self._q.put(bytes(data))

    async def aclose(self) -> None:
        await self._q.put(None)

    def __aiter__(self):
        return self

    async def __anext__(self) -> bytes:
        item = await self._q.get()
        if item is None:
            raise StopAsyncIteration
        return item


class _Publication:
    def __init__(self, track, sid: str) -> None:
        self.track, self.sid, self.kind, self.subscribed = track, sid, track.kind, True

    async def wait_for_subscription(self) -> None:
        return None


class _Participant:
    def __init__(self, room: "Room", identity: str, kind) -> None:
        self.room, self.identity, self.kind = room, identity, kind
        self.state = rtc.ParticipantState.PARTICIPANT_STATE_ACTIVE
        self.attributes: dict[str, str] = {}
        self.track_publications: dict[str, _Publication] = {}
        self._rpc_handlers: dict = {}
        self.rpc_calls: list[tuple[str, str]] = []

    def register_rpc_method(self, method: str, handler) -> None:
        self._rpc_handlers[method] = handler

    async def perform_rpc(self, *, destination_identity: str, method: str, payload: str, response_timeout=None):
        self.rpc_calls.append((method, payload))
        handler = self.room.peers[destination_identity].local_participant._rpc_handlers.get(method)
        if handler is None:
            raise rtc.RpcError(rtc.RpcError.ErrorCode.UNSUPPORTED_METHOD, "unsupported method")
        data = rtc.RpcInvocationData(uuid.uuid4().hex, self.identity, payload, response_timeout or 15.0, method, None)
        result = handler(data)
        return await result if asyncio.iscoroutine(result) else result

    async def stream_bytes(self, *, name: str, topic: str, destination_identities, attributes=None, **_):
        stream = _ByteStream(name, dict(attributes or {}))
        for dest in destination_identities:
            handler = self.room.peers[dest].byte_handlers.get(topic)
            if handler is not None:
                handler(stream, self.identity)
        return stream

    async def publish_track(self, track, options):
        pub = _Publication(track, f"TR_{self.identity}_{len(self.track_publications)}")
        self.track_publications[pub.sid] = pub
        self.room.emit("local_track_published", pub, track)
        for peer in self.room.peers.values():
            peer.emit("track_published", pub, self)
        return pub


class Room(rtc.EventEmitter):
    """The parts of ``rtc.Room`` that AvatarRunner and the data-stream audio classes use, in memory."""

    def __init__(self, identity: str, kind=rtc.ParticipantKind.PARTICIPANT_KIND_STANDARD) -> None:
        super().__init__()
        self.name = "test-room"
        self.local_participant = _Participant(self, identity, kind)
        self.remote_participants: dict[str, _Participant] = {}
        self.peers: dict[str, Room] = {}
        self.byte_handlers: dict = {}

    def isconnected(self) -> bool:
        return True

    def register_byte_stream_handler(self, topic: str, handler) -> None:
        self.byte_handlers[topic] = handler

    @staticmethod
    def pair(a: "Room", b: "Room") -> None:
        for x, y in ((a, b), (b, a)):
            x.peers[y.local_participant.identity] = y
            x.remote_participants[y.local_participant.identity] = y.local_participant


class Subscriber:
    """Reads a room's published avatar tracks back, as a viewer would: RGB video frames and 16 kHz audio."""

    def __init__(self, room: Room) -> None:
        self.video: list[np.ndarray] = []
        self.audio: list[np.ndarray] = []
        self.tasks: list[asyncio.Task] = []
        self.streams: list = []
        room.on("local_track_published", self._on_published)

    def _on_published(self, pub, track) -> None:
        if pub.kind == rtc.TrackKind.KIND_VIDEO:
            stream = rtc.VideoStream(track)
            self.tasks.append(asyncio.create_task(self._read_video(stream)))
        else:
            stream = rtc.AudioStream(track, sample_rate=16000, num_channels=1)
            self.tasks.append(asyncio.create_task(self._read_audio(stream)))
        self.streams.append(stream)

    async def _read_video(self, stream) -> None:
        async for ev in stream:
            f = ev.frame.convert(rtc.VideoBufferType.RGB24)
            self.video.append(np.frombuffer(f.data, np.uint8).reshape(f.height, f.width, 3).copy())

    async def _read_audio(self, stream) -> None:
        async for ev in stream:
            self.audio.append(np.frombuffer(ev.frame.data, np.int16).copy())

    def pcm(self) -> np.ndarray:
        return np.concatenate(self.audio) if self.audio else np.zeros(0, np.int16)

    async def wait_video(self, n: int, timeout: float = 120) -> None:
        await self._until(lambda: len(self.video) >= n, timeout)

    async def wait_voiced(self, n: int, timeout: float = 10) -> None:
        """Until ``n`` speech samples have been heard: playback is reported finished when the last audio frame
        enters the audio source, whose queue plays out 100 ms later."""
        await self._until(lambda: len(voiced(self.pcm())) >= n, timeout)

    @staticmethod
    async def _until(condition, timeout: float) -> None:
        async def poll():
            while not condition():
                await asyncio.sleep(0.05)

        await asyncio.wait_for(poll(), timeout)

    async def aclose(self) -> None:
        for t in self.tasks:
            t.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)
        for stream in self.streams:
            await stream.aclose()


async def next_event(emitter, name: str, timeout: float = 120):
    fut = asyncio.get_running_loop().create_future()

    def on(ev):
        if not fut.done():
            fut.set_result(ev)

    emitter.once(name, on)
    return await asyncio.wait_for(fut, timeout)


# -- the generator on its own ---------------------------------------------------------------------------------
async def collect(gen: TalkstreamVideoGenerator, segment_ends: int, idle_after: int = 3) -> list:
    out, ends, idle = [], 0, 0
    async for item in gen:
        out.append(item)
        ends += isinstance(item, AudioSegmentEnd)
        if ends >= segment_ends:
            idle += isinstance(item, rtc.VideoFrame)
            if idle > idle_after:
                break
    return out


def pairs(items: list) -> list[tuple[rtc.VideoFrame, rtc.AudioFrame | None, bool]]:
    """Items -> (video, its audio or None, segment ends after it), checking the order the runner relies on:
    each audio frame right after its video frame, each AudioSegmentEnd right after an audio frame."""
    out = []
    for i, it in enumerate(items):
        if isinstance(it, rtc.VideoFrame):
            out.append([it, None, False])
        elif isinstance(it, rtc.AudioFrame):
            assert isinstance(items[i - 1], rtc.VideoFrame), "audio must follow its video frame"
            assert (it.sample_rate, it.num_channels, it.samples_per_channel) == (16000, 1, 640)
            out[-1][1] = it
        else:
            assert isinstance(it, AudioSegmentEnd) and isinstance(items[i - 1], rtc.AudioFrame)
            out[-1][2] = True
    return [tuple(p) for p in out]


@pytest.mark.parametrize("look_ahead", [6, 0])  # 0: a reply's last frame is made as soon as its padding arrives
def test_each_frame_carries_the_audio_it_was_drawn_from(look_ahead):
    async def run():
        live = LiveAvatar(EchoAvatar(look_ahead), REFERENCE, config=LiveConfig(idle_wait=0.02))
        gen = TalkstreamVideoGenerator(live)
        rng = np.random.default_rng(0)
        first = (rng.standard_normal((4410 * 3, 2)) * 3000).astype(np.int16)  # 0.28 s, 48 kHz stereo: resampled
        second = (rng.standard_normal(16000) * 3000).astype(np.int16)  # 1 s at 16 kHz: passes bit-exact
        for f in audio_frames(first, 48000, 2):
            await gen.push_audio(f)
        await gen.push_audio(AudioSegmentEnd())
        for f in audio_frames(second):
            await gen.push_audio(f)
        await gen.push_audio(AudioSegmentEnd())
        items = await asyncio.wait_for(collect(gen, segment_ends=2), 30)
        await gen.aclose()
        return items, second

    items, second = asyncio.run(run())
    frames = pairs(items)
    silence = EchoAvatar.checksum(np.zeros(640, np.int16))
    for video, audio, _ in frames:
        pixel = np.frombuffer(video.data, np.uint8)[:3]
        expected = silence if audio is None else EchoAvatar.checksum(np.frombuffer(audio.data, np.int16))
        assert np.array_equal(pixel, expected)  # drawn from exactly the samples it carries (or from silence)
    runs = [i for i, (_, a, _) in enumerate(frames) if a is not None]
    ends = [i for i, (_, _, e) in enumerate(frames) if e]
    assert len(ends) == 2 and ends[1] == runs[-1]
    first_n = ends[0] - runs[0] + 1
    assert abs(first_n * 640 - 4410) <= 640  # 0.28 s at 16 kHz, padded to a frame
    tail = np.concatenate([np.frombuffer(frames[i][1].data, np.int16) for i in runs[first_n:]])
    assert np.array_equal(tail, padded(second))


def test_clear_buffer_drops_queued_speech_and_the_next_reply_plays():
    async def run():
        live = LiveAvatar(EchoAvatar(), REFERENCE, config=LiveConfig(idle_wait=0.02, max_lead=8))
        gen = TalkstreamVideoGenerator(live)
        rng = np.random.default_rng(1)
        long = (rng.standard_normal(16000 * 5) * 3000).astype(np.int16)
        after = (rng.standard_normal(8000) * 3000).astype(np.int16)
        for f in audio_frames(long):
            await gen.push_audio(f)
        items, speech_seen = [], 0
        it = gen.__aiter__()
        while speech_seen < 10:  # ten frames of the long reply are out
            item = await it.__anext__()
            items.append(item)
            speech_seen += isinstance(item, rtc.AudioFrame)
        while live.queued < 8:  # and eight more are queued
            await asyncio.sleep(0.01)
        gen.clear_buffer()
        cut = len(items)
        await gen.push_audio(AudioSegmentEnd())  # the interrupted reply's end arrives late: ignored
        for f in audio_frames(after):
            await gen.push_audio(f)
        await gen.push_audio(AudioSegmentEnd())
        ends = 0
        while ends < 1:
            item = await it.__anext__()
            items.append(item)
            ends += isinstance(item, AudioSegmentEnd)
        await gen.aclose()
        return items, cut, long, after, live.frames_dropped

    items, cut, long, after, dropped = asyncio.run(run())
    assert dropped == 8  # the queued frames of the interrupted reply were thrown away
    played = np.concatenate([np.frombuffer(i.data, np.int16) for i in items[:cut] if isinstance(i, rtc.AudioFrame)])
    assert np.array_equal(played, long[: len(played)])
    rest = np.concatenate([np.frombuffer(i.data, np.int16) for i in items[cut:] if isinstance(i, rtc.AudioFrame)])
    assert np.array_equal(rest, padded(after))  # after the clear: only the next reply, whole
    assert sum(isinstance(i, AudioSegmentEnd) for i in items) == 1


def test_late_speech_inside_a_reply_plays_as_silence_in_sync_and_a_reply_without_end_times_out():
    async def run():
        cfg = LiveConfig(idle_wait=0.02, speech_wait=0.05, silence_frames=2, segment_timeout=0.5)
        gen = TalkstreamVideoGenerator(LiveAvatar(EchoAvatar(), REFERENCE, config=cfg))
        rng = np.random.default_rng(2)
        a, b, c = ((rng.standard_normal(n) * 3000).astype(np.int16) for n in (5000, 3000, 2000))
        for f in audio_frames(a):
            await gen.push_audio(f)
        it, items = gen.__aiter__(), []
        while sum(isinstance(i, rtc.AudioFrame) for i in items) < 12:  # the avatar ran past the speech: silence
            items.append(await it.__anext__())
        for f in audio_frames(b):  # the rest of the reply comes late
            await gen.push_audio(f)
        await gen.push_audio(AudioSegmentEnd())
        for f in audio_frames(c):  # a reply whose end never comes
            await gen.push_audio(f)
        while sum(isinstance(i, AudioSegmentEnd) for i in items) < 2:
            items.append(await it.__anext__())
        await gen.aclose()
        return items, a, b, c

    items, a, b, c = asyncio.run(run())
    frames = pairs(items)
    for video, audio, _ in frames:
        pixel = np.frombuffer(video.data, np.uint8)[:3]
        window = np.zeros(640, np.int16) if audio is None else np.frombuffer(audio.data, np.int16)
        assert np.array_equal(pixel, EchoAvatar.checksum(window))
    ends = [i for i, (_, _, e) in enumerate(frames) if e]
    first = [i for i, (_, au, _) in enumerate(frames) if au is not None and i <= ends[0]]
    assert first == list(range(first[0], ends[0] + 1))  # one unbroken reply: the wait is inside it, as silence
    played = np.concatenate([np.frombuffer(frames[i][1].data, np.int16) for i in first])
    assert np.array_equal(played[: len(a)], a) and not played[len(a) : len(a) + 640].any()  # then the gap
    assert np.array_equal(voiced(played), voiced(np.concatenate([a, b])))
    second = np.concatenate(
        [
            np.frombuffer(frames[i][1].data, np.int16)
            for i in range(ends[0] + 1, ends[1] + 1)
            if frames[i][1] is not None
        ]
    )
    assert np.array_equal(second[: len(c)], c) and not second[len(c) :].any()  # closed after 0.5 s of silence


def test_bad_input_is_refused_with_a_clear_error(avatar, tmp_path):
    gen = TalkstreamVideoGenerator(LiveAvatar(EchoAvatar(), REFERENCE))

    async def push(x):
        await gen.push_audio(x)

    with pytest.raises(TypeError, match="rtc.AudioFrame or AudioSegmentEnd"):
        asyncio.run(push(b"\x00" * 640))
    (tmp_path / "x.png").write_text("not an image")
    with pytest.raises(ValueError, match="not an image"):
        LiveAvatar(avatar, tmp_path / "x.png")
    with pytest.raises(ValueError, match="avatar="):
        TalkstreamAvatarSession(REFERENCE)


# -- the real avatar ------------------------------------------------------------------------------------------
def test_real_avatar_frames_and_speech(avatar, speech):
    async def run():
        gen = TalkstreamVideoGenerator(LiveAvatar(avatar, REFERENCE))
        assert (gen.options.video_width, gen.options.video_fps, gen.options.audio_sample_rate) == (SIZE, 25, 16000)
        for f in audio_frames(speech):
            await gen.push_audio(f)
        await gen.push_audio(AudioSegmentEnd())
        items = await collect(gen, segment_ends=1)
        await gen.aclose()
        return items

    frames = pairs(asyncio.run(run()))
    speaking = [(v, a) for v, a, _ in frames if a is not None]
    out = np.concatenate([np.frombuffer(a.data, np.int16) for _, a in speaking])
    assert np.array_equal(out, padded(speech))  # every sample, in order
    images = [np.frombuffer(v.data, np.uint8).reshape(SIZE, SIZE, 3) for v, _ in speaking]
    assert all(v.type == rtc.VideoBufferType.RGB24 and (v.width, v.height) == (SIZE, SIZE) for v, _, _ in frames)
    assert looks_like_reference(images) < 30  # the avatar's face (a blank frame scores > 60)
    assert np.abs(np.diff(np.stack(images).astype(np.float32), axis=0)).mean() > 0.5  # and it moves
    assert frames[-1][1] is None  # idle after the reply: video goes on without audio


def test_in_process_layout_agent_session_queue_audio_output(avatar, speech):
    """TalkstreamAvatarSession.start: QueueAudioOutput becomes the AgentSession's audio sink, LiveKit's AvatarRunner
    publishes the avatar's tracks; playback is reported back, clear_buffer interrupts."""

    async def run():
        room = Room("agent-1", rtc.ParticipantKind.PARTICIPANT_KIND_AGENT)
        viewer = Subscriber(room)
        session = AgentSession()
        avatar_session = TalkstreamAvatarSession(REFERENCE, avatar)
        await avatar_session.start(session, room)
        sink = session.output.audio
        assert avatar_session.avatar_identity == "agent-1"
        assert type(sink).__name__ == "QueueAudioOutput"

        started = next_event(sink, "playback_started")
        finished = next_event(sink, "playback_finished")
        for f in audio_frames(speech):
            await sink.capture_frame(f)
        sink.flush()
        await started
        done = await finished
        await viewer.wait_voiced(len(voiced(speech)))
        first = viewer.pcm()

        long = np.concatenate([speech] * 4)
        started = next_event(sink, "playback_started")
        finished = next_event(sink, "playback_finished")
        for f in audio_frames(long):
            await sink.capture_frame(f)
        sink.flush()
        await started
        await viewer.wait_video(len(viewer.video) + 10)  # some of the long reply has played
        sink.clear_buffer()
        cut = await finished
        heard_at_cut = viewer.pcm()
        await viewer.wait_video(len(viewer.video) + 25)  # a second more of video
        heard_later = viewer.pcm()
        n_video = len(viewer.video)
        images = viewer.video[-5:]
        await avatar_session.aclose()
        await viewer.aclose()
        return done, first, cut, heard_at_cut, heard_later, long, n_video, images

    done, first, cut, heard_at_cut, heard_later, long, n_video, images = asyncio.run(run())
    assert not done.interrupted and done.playback_position == pytest.approx(len(padded(speech)) / 16000, abs=1e-6)
    assert np.array_equal(voiced(first), voiced(speech))  # the viewer heard the reply, sample for sample
    assert cut.interrupted and 0 < cut.playback_position < len(long) / 16000 / 2
    n = len(voiced(speech))
    at_cut, later = voiced(heard_at_cut)[n:], voiced(heard_later)[n:]
    assert 0 < len(at_cut) and np.array_equal(later, voiced(long)[: len(later)])  # a prefix of the long reply
    assert len(later) - len(at_cut) <= 1600 + 640  # after the cut: at most the audio source's 100 ms queue
    assert n_video > 25 and looks_like_reference(images) < 35  # the viewer sees the avatar (through I420)


def test_worker_layout_datastream(avatar, speech):
    """The avatar as a separate participant: the agent's DataStreamAudioOutput streams speech over lk.audio_stream,
    the worker's DataStreamAudioReceiver feeds LiveKit's AvatarRunner; lk.playback_started / lk.playback_finished
    come back over RPC and lk.clear_buffer interrupts."""

    async def run():
        agent_room = Room("agent-1", rtc.ParticipantKind.PARTICIPANT_KIND_AGENT)
        worker_room = Room("talkstream-avatar", rtc.ParticipantKind.PARTICIPANT_KIND_AGENT)
        Room.pair(agent_room, worker_room)
        viewer = Subscriber(worker_room)
        out = DataStreamAudioOutput(
            agent_room,
            destination_identity="talkstream-avatar",
            sample_rate=16000,
            wait_remote_track=rtc.TrackKind.KIND_VIDEO,
            wait_playback_start=True,
        )
        runner, gen = await run_worker(worker_room, LiveAvatar(avatar, REFERENCE), sender_identity="agent-1")

        started = next_event(out, "playback_started")
        finished = next_event(out, "playback_finished")
        for f in audio_frames(speech):
            await out.capture_frame(f)
        out.flush()
        await started
        done = await finished
        await viewer.wait_voiced(len(voiced(speech)))
        first = viewer.pcm()

        long = np.concatenate([speech] * 4)
        started = next_event(out, "playback_started")
        finished = next_event(out, "playback_finished")
        for f in audio_frames(long):
            await out.capture_frame(f)
        out.flush()
        await started
        await viewer.wait_video(len(viewer.video) + 10)
        out.clear_buffer()
        cut = await finished
        rpcs = [m for m, _ in worker_room.local_participant.rpc_calls]
        agent_rpcs = [m for m, _ in agent_room.local_participant.rpc_calls]
        await runner.aclose()
        await gen.aclose()
        await viewer.aclose()
        return done, first, cut, rpcs, agent_rpcs, long

    done, first, cut, rpcs, agent_rpcs, long = asyncio.run(run())
    assert not done.interrupted and done.playback_position == pytest.approx(len(padded(speech)) / 16000, abs=1e-6)
    assert np.array_equal(voiced(first), voiced(speech))
    assert cut.interrupted and 0 < cut.playback_position < len(long) / 16000 / 2
    assert agent_rpcs == ["lk.clear_buffer"]
    assert rpcs == ["lk.playback_started", "lk.playback_finished", "lk.playback_started", "lk.playback_finished"]


def test_worker_session_mints_a_token_and_starts_the_worker(monkeypatch):
    """worker=True: a join token for the avatar participant (agent kind, publishing on the agent's behalf) goes to
    ``python -m talkstream.integrations.livekit`` through its environment, and the agent's speech goes to a
    DataStreamAudioOutput aimed at that participant. The process launch is recorded instead of run (no server)."""
    import jwt

    launched = {}

    class Process:
        returncode = None

        def terminate(self):
            launched["terminated"] = True
            self.returncode = -15

        async def wait(self):
            return self.returncode

    async def fake_exec(*argv, env=None, **_):
        launched.update(argv=argv, env=env)
        return Process()

    monkeypatch.setattr(asyncio, "create_subprocess_exec", fake_exec)

    async def run():
        room = Room("agent-1", rtc.ParticipantKind.PARTICIPANT_KIND_AGENT)
        session = AgentSession()
        avatar_session = TalkstreamAvatarSession(
            REFERENCE, worker=True, device="cuda", size=256, url="wss://lk.example", api_key="k", api_secret="s" * 32
        )
        await avatar_session.start(session, room)
        sink = session.output.audio
        await avatar_session.aclose()
        return avatar_session, sink

    avatar_session, sink = asyncio.run(run())
    argv, env = launched["argv"], launched["env"]
    assert argv[1:3] == ("-m", "talkstream.integrations.livekit")
    opts = dict(zip(argv[3::2], argv[4::2]))
    assert opts == {"--url": "wss://lk.example", "--image": str(REFERENCE), "--device": "cuda", "--size": "256"}
    assert not any("eyJ" in a for a in argv)  # the token is not on the command line
    claims = jwt.decode(env["TALKSTREAM_LIVEKIT_TOKEN"], "s" * 32, algorithms=["HS256"])
    assert claims["sub"] == avatar_session.avatar_identity == "talkstream-avatar" and claims["kind"] == "agent"
    assert claims["video"]["roomJoin"] and claims["video"]["room"] == "test-room"
    assert claims["attributes"] == {"lk.publish_on_behalf": "agent-1"}
    assert isinstance(sink, DataStreamAudioOutput) and sink._destination_identity == "talkstream-avatar"
    assert launched["terminated"]  # aclose ends the worker
