"""A/V pacing of the LiveKit adapter under LiveKit's own AvatarRunner (in-process layout: QueueAudioOutput ->
AvatarRunner -> TalkstreamVideoGenerator -> AVSynchronizer -> VideoSource / AudioSource; the room is a minimal
in-memory stand-in, as no LiveKit server runs here).

For each speech frame: when its video frame enters the VideoSource (shown) and when its 40 ms of audio starts to
play (the moment it enters the AudioSource plus the audio already queued there). offset = video - audio (positive:
the picture is late). Two renderers:
- ``instant``: a stand-in that returns the reference image at once (a renderer faster than real time, as on a GPU):
  the adapter's and LiveKit's pacing alone;
- ``avatar``: the real embedded avatar on this CPU (128x128, 4 steps, tiny decoder), slower than real time.

Writes benchmarks/results/livekit_av_sync_cpu.json.
"""

import asyncio
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from livekit import rtc  # noqa: E402
from livekit.agents.voice.avatar import AvatarRunner, QueueAudioOutput  # noqa: E402

from talkstream.integrations.live import LiveAvatar, to_int16  # noqa: E402
from talkstream.integrations.livekit import TalkstreamVideoGenerator  # noqa: E402
from talkstream.machine import describe, report  # noqa: E402
from talkstream.stream.avatar import WEIGHTS, Avatar, Frame, load_reference  # noqa: E402

REFERENCE = WEIGHTS.parent / "assets" / "reference.png"
OUT = Path(__file__).resolve().parent / "results" / "livekit_av_sync_cpu.json"


class InstantAvatar:
    """Frames at once (the reference image), consuming audio as Avatar.stream does: a renderer faster than real time."""

    def __init__(self, size: int) -> None:
        self.size, self.image = size, load_reference(REFERENCE, size)

    def stream(self, image, chunks, prompt=None):
        fed, i = 0, 0
        for c in chunks:
            fed += len(c)
            while fed >= 640 * (i + 1 + 6):
                yield Frame(i, i / 25, self.image)
                i += 1


class Tagged(TalkstreamVideoGenerator):
    """Records the order it yields in: which video frame each audio frame belongs to."""

    def __init__(self, live: LiveAvatar) -> None:
        super().__init__(live)
        self.yields: list[str] = []

    async def __aiter__(self):
        async for item in super().__aiter__():
            self.yields.append(
                "v" if isinstance(item, rtc.VideoFrame) else "a" if isinstance(item, rtc.AudioFrame) else "e"
            )
            yield item


class _Publication:
    def __init__(self, track) -> None:
        self.track, self.kind = track, track.kind

    async def wait_for_subscription(self) -> None:
        return None


class _Room(rtc.EventEmitter):
    def __init__(self) -> None:
        super().__init__()
        self.local_participant = self
        self.identity, self.track_publications = "agent", {}

    def isconnected(self) -> bool:
        return True

    async def publish_track(self, track, options):
        self.track_publications[str(len(self.track_publications))] = pub = _Publication(track)
        return pub


async def measure(avatar, speech: np.ndarray) -> dict:
    audio = QueueAudioOutput(sample_rate=16000)
    gen = Tagged(LiveAvatar(avatar, REFERENCE))
    yields = gen.yields
    runner = AvatarRunner(_Room(), audio_recv=audio, video_gen=gen, options=gen.options)
    shown: list[float] = []
    played: list[float] = []
    vcap, acap = runner._video_source.capture_frame, runner._audio_source.capture_frame

    def video_capture(frame, **kw):
        shown.append(time.perf_counter())
        return vcap(frame, **kw)

    async def audio_capture(frame):
        played.append(time.perf_counter() + runner._audio_source.queued_duration)
        return await acap(frame)

    runner._video_source.capture_frame = video_capture
    runner._audio_source.capture_frame = audio_capture
    await runner.start()
    finished = asyncio.get_running_loop().create_future()
    audio.on("playback_finished", lambda ev: finished.done() or finished.set_result(ev))
    t0 = time.perf_counter()
    for i in range(0, len(speech), 160):
        await audio.capture_frame(rtc.AudioFrame(speech[i : i + 160].tobytes(), 16000, 1, len(speech[i : i + 160])))
    audio.flush()
    await asyncio.wait_for(finished, 600)
    wall = time.perf_counter() - t0
    await runner.aclose()
    await gen.aclose()

    v = a = 0
    pairs = []  # (video index, audio index) of each speech frame
    for y in yields:
        if y == "v":
            v += 1
        elif y == "a":
            pairs.append((v - 1, a))
            a += 1
    offsets = np.array([(shown[i] - played[j]) * 1000 for i, j in pairs if i < len(shown) and j < len(played)])
    audio_s = len(speech) / 16000
    gaps = np.diff(np.array([played[j] for _, j in pairs]))
    return {
        "speech_s": round(audio_s, 2),
        "speech_frames": len(pairs),
        "reply_wall_s": round(wall, 2),  # from the first audio pushed to playback_finished
        "offset_ms_p50": round(float(np.percentile(offsets, 50)), 1),
        "offset_ms_p95_abs": round(float(np.percentile(np.abs(offsets), 95)), 1),
        "offset_ms_max_abs": round(float(np.abs(offsets).max()), 1),
        "audio_stalls": int((gaps > 0.04 + 0.02).sum()),  # 40 ms frames that started > 20 ms late
        "audio_stall_s": round(float(np.clip(gaps - 0.04, 0, None).sum()), 2),
    }


def main() -> None:
    from talkstream.world.speech import synthesize

    speech = to_int16(synthesize("Hello there. This is a test of the avatar's lips and voice, in time.").audio)
    avatar = Avatar.from_pretrained(size=128, decoder="tiny", steps=4)
    next(iter(avatar.stream(REFERENCE, [np.zeros(16000, np.float32)])))  # load the audio encoder, warm up
    res = {
        "machine": describe(),
        "layout": "in process: QueueAudioOutput -> AvatarRunner (livekit-agents 1.8.9) -> TalkstreamVideoGenerator",
        "offset": "video shown - its audio starts playing, per speech frame (ms; positive: picture late)",
        "instant": asyncio.run(measure(InstantAvatar(128), speech)),
        "avatar_128_cpu": asyncio.run(measure(avatar, speech)),
    }
    report(res, OUT)


if __name__ == "__main__":
    main()
