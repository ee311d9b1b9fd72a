"""The Pipecat video service in Pipecat's own test pipeline (pipecat.tests.utils.run_test), with the real embedded
avatar on CPU at 128x128: TTS audio in, images + the same audio out in sync, TTSStoppedFrame after the reply's last
frame, interruption drops the queued speech."""

import asyncio

import numpy as np
import pytest

pytest.importorskip("pipecat", reason="the pipecat extra is not installed (pip install talkstream[pipecat])")

from pipecat.frames.frames import (  # noqa: E402
    InterruptionFrame,
    OutputAudioRawFrame,
    OutputImageRawFrame,
    TTSAudioRawFrame,
    TTSStartedFrame,
    TTSStoppedFrame,
)
from pipecat.tests.utils import SleepFrame, run_test  # noqa: E402

from talkstream.integrations.live import LiveConfig  # noqa: E402
from talkstream.integrations.pipecat import TalkstreamVideoService  # noqa: E402
from talkstream.media import MediaError  # noqa: E402
from talkstream.stream.avatar import WEIGHTS, Avatar, load_reference  # noqa: E402

SIZE = 128
BUNDLED_REFERENCE = WEIGHTS.parent / "assets" / "reference.png"


@pytest.fixture(scope="module")
def avatar():
    av = Avatar.from_pretrained(size=SIZE, decoder="tiny", steps=4)
    next(iter(av.stream(BUNDLED_REFERENCE, [np.zeros(16000, np.float32)])))  # load the audio encoder, warm up
    return av


@pytest.fixture(scope="module")
def speech():
    from talkstream.world.speech import synthesize

    a = synthesize("hello there, nice to meet you").audio
    return np.clip(np.round(a * 32768), -32768, 32767).astype(np.int16)


def tts_frames(pcm: np.ndarray, rate: int = 16000, ms: int = 20, ctx: str = "reply-1"):
    n = rate * ms // 1000
    return [TTSAudioRawFrame(pcm[i : i + n].tobytes(), rate, 1, context_id=ctx) for i in range(0, len(pcm), n)]


def looks_like_reference(images, reference) -> float:
    """Mean absolute difference (0-255) of the images from the reference at the same size."""
    return float(np.mean([np.abs(im.astype(np.float32) - reference).mean() for im in images]))


def image_array(frame: OutputImageRawFrame) -> np.ndarray:
    w, h = frame.size
    return np.frombuffer(frame.image, np.uint8).reshape(h, w, 3)


def test_tts_audio_becomes_synced_frames_and_passes_through(avatar, speech):
    service = TalkstreamVideoService(avatar, BUNDLED_REFERENCE)
    send = [TTSStartedFrame(context_id="reply-1"), *tts_frames(speech), TTSStoppedFrame(context_id="reply-1")]
    down, _ = asyncio.run(run_test(service, frames_to_send=send))

    kinds = [type(f) for f in down]
    assert kinds[0] is TTSStartedFrame  # forwarded at once
    tts = [i for i, f in enumerate(down) if type(f) is TTSAudioRawFrame]
    assert tts, "no speech came out"
    for i in tts:  # each 40 ms of speech right after the image drawn from it, which waits for the audio before it
        assert type(down[i - 1]) is OutputImageRawFrame and down[i - 1].sync_with_audio
        f = down[i]
        assert (f.sample_rate, f.num_channels, len(f.audio)) == (16000, 1, 1280) and f.context_id == "reply-1"
    out = np.concatenate([np.frombuffer(down[i].audio, np.int16) for i in tts])
    pad = -len(speech) % 640
    assert np.array_equal(out, np.pad(speech, (0, pad)))  # every sample, in order, padded to a frame boundary
    assert tts == list(range(tts[0], tts[-1] + 1, 2))  # one unbroken run: no idle frame inside the reply

    stops = [i for i, f in enumerate(down) if isinstance(f, TTSStoppedFrame)]
    assert stops == [tts[-1] + 1]  # held back until the reply's last frame is out

    images = [image_array(f) for f in down if isinstance(f, OutputImageRawFrame)]
    assert len(images) == len([f for f in down if isinstance(f, OutputAudioRawFrame)])  # one image per 40 ms
    assert all(im.shape == (SIZE, SIZE, 3) for im in images)
    ref = load_reference(BUNDLED_REFERENCE, SIZE).astype(np.float32)
    assert looks_like_reference(images, ref) < 30  # the avatar's face, not a blank or noise frame
    assert looks_like_reference([np.zeros_like(ref)], ref) > 60  # (what a blank frame would score)
    speaking = np.stack([image_array(down[i - 1]) for i in tts]).astype(np.float32)
    assert np.abs(np.diff(speaking, axis=0)).mean() > 0.5  # the face moves from frame to frame
    idle = [f for f in down if type(f) is OutputAudioRawFrame]
    assert all(not np.frombuffer(f.audio, np.int16).any() for f in idle)  # idle frames carry silence


def test_resamples_tts_audio_to_16k(avatar, speech):
    from talkstream.media import resample

    pcm24 = np.clip(np.round(resample(speech / 32768.0, 16000, 24000) * 32768), -32768, 32767).astype(np.int16)
    service = TalkstreamVideoService(avatar, BUNDLED_REFERENCE)
    down, _ = asyncio.run(run_test(service, frames_to_send=[*tts_frames(pcm24, 24000), TTSStoppedFrame()]))
    out = np.concatenate([np.frombuffer(f.audio, np.int16) for f in down if type(f) is TTSAudioRawFrame])
    assert abs(len(out) - len(speech)) <= 640 + 320  # 24 kHz -> 16 kHz, padded to a frame boundary
    n = min(len(out), len(speech)) - 400
    corr = np.corrcoef(out[200:n].astype(np.float64), speech[200:n].astype(np.float64))[0, 1]
    assert corr > 0.9


def test_interruption_drops_queued_speech(avatar, speech):
    long = np.concatenate([speech] * 8)  # ~12 s: more than twice what can play (real time at most) before the cut
    service = TalkstreamVideoService(avatar, BUNDLED_REFERENCE, live_config=LiveConfig(max_lead=12))
    send = [*tts_frames(long), TTSStoppedFrame(), SleepFrame(sleep=5.0), InterruptionFrame(), SleepFrame(sleep=2.0)]
    down, _ = asyncio.run(run_test(service, frames_to_send=send))

    cut = next(i for i, f in enumerate(down) if isinstance(f, InterruptionFrame))
    before = [f for f in down[:cut] if type(f) is TTSAudioRawFrame]
    after = down[cut + 1 :]
    assert before, "no speech before the interruption"
    assert not any(type(f) is TTSAudioRawFrame for f in after)  # nothing of the dropped reply plays
    assert not any(isinstance(f, TTSStoppedFrame) for f in down)  # its stop went with it
    played = np.concatenate([np.frombuffer(f.audio, np.int16) for f in before])
    assert len(played) < len(long) // 2 and np.array_equal(played, long[: len(played)])
    assert sum(isinstance(f, OutputImageRawFrame) for f in after) >= 3  # the avatar goes on (idle frames)


def test_bad_reference_fails_at_construction(avatar, tmp_path):
    (tmp_path / "x.png").write_text("not an image")
    with pytest.raises(MediaError, match="not an image"):
        TalkstreamVideoService(avatar, tmp_path / "x.png")
