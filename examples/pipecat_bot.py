"""A Pipecat bot with a talkstream avatar, served to the browser over Pipecat's SmallWebRTC transport with its
prebuilt page. The bot needs no cloud service; the prebuilt page fetches Daily's call-machine bundle from its CDN
when you press Connect (for microphone handling), so the browser needs the internet; without it, check the bot with
examples/pipecat_webrtc_check.py.

    pip install "talkstream[pipecat]"
    python examples/pipecat_bot.py -t webrtc          # then open http://localhost:7860/client and press Connect

The conversation here is a script, so that it runs offline: the bot greets you, and each time you stop talking
(Silero VAD, bundled with pipecat) it says its next line with espeak-ng; talking over it interrupts it (the avatar
drops the rest of the line at once). For a real assistant, put speech-to-text, an LLM and text-to-speech where
``ScriptedVoice`` is (the order: transport.input(), stt, user aggregator, llm, tts, avatar, transport.output(),
assistant aggregator).

    TALKSTREAM_IMAGE    reference image (default: the bundled one)
    TALKSTREAM_DEVICE   cpu / cuda (real time needs a GPU; the CPU renders ~10 fps at 128x128)
    TALKSTREAM_SIZE     output size in pixels (default 256; 128 on CPU)
"""

from __future__ import annotations

import asyncio
import os

from pipecat.audio.vad.silero import SileroVADAnalyzer
from pipecat.frames.frames import (
    Frame,
    TTSAudioRawFrame,
    TTSStartedFrame,
    TTSStoppedFrame,
    VADUserStartedSpeakingFrame,
    VADUserStoppedSpeakingFrame,
)
from pipecat.pipeline.pipeline import Pipeline
from pipecat.pipeline.worker import PipelineParams, PipelineWorker
from pipecat.processors.audio.vad_processor import VADProcessor
from pipecat.processors.frame_processor import FrameDirection, FrameProcessor
from pipecat.runner.types import SmallWebRTCRunnerArguments
from pipecat.transports.base_transport import TransportParams
from pipecat.transports.smallwebrtc.transport import SmallWebRTCTransport
from pipecat.workers.runner import WorkerRunner

from talkstream.integrations.live import to_int16
from talkstream.integrations.pipecat import TalkstreamVideoService
from talkstream.stream.avatar import WEIGHTS, Avatar

IMAGE = os.environ.get("TALKSTREAM_IMAGE") or str(WEIGHTS.parent / "assets" / "reference.png")
DEVICE = os.environ.get("TALKSTREAM_DEVICE", "cpu")
SIZE = int(os.environ.get("TALKSTREAM_SIZE", "128" if DEVICE == "cpu" else "256"))
SCRIPT = [
    "Hello! I am a talking avatar, drawn live from one photo. Say something, and I will answer.",
    "That is interesting. Every frame of my face is made from the sound of my voice.",
    "You can talk over me at any time: I stop at once and listen.",
    "Thank you for talking with me. Goodbye!",
]


class ScriptedVoice(FrameProcessor):
    """Stands where STT + LLM + TTS would: speaks the script's next line (espeak-ng, 16 kHz) when the user stops
    talking, and interrupts its own speech when the user starts."""

    def __init__(self) -> None:
        super().__init__()
        self.line = 0
        self.speaking: asyncio.Task | None = None

    async def say_next(self) -> None:
        from talkstream.world.speech import synthesize

        text = SCRIPT[self.line % len(SCRIPT)]
        self.line += 1
        pcm = to_int16((await asyncio.to_thread(synthesize, text)).audio)
        ctx = f"line-{self.line}"
        await self.push_frame(TTSStartedFrame(context_id=ctx))
        for i in range(0, len(pcm), 320):  # 20 ms chunks, as a streaming TTS sends them
            await self.push_frame(TTSAudioRawFrame(pcm[i : i + 320].tobytes(), 16000, 1, context_id=ctx))
        await self.push_frame(TTSStoppedFrame(context_id=ctx))

    async def process_frame(self, frame: Frame, direction: FrameDirection) -> None:
        await super().process_frame(frame, direction)
        await self.push_frame(frame, direction)
        if isinstance(frame, VADUserStartedSpeakingFrame):
            if self.speaking is not None and not self.speaking.done():
                await self.cancel_task(self.speaking)
            await self.broadcast_interruption()  # the avatar and the transport drop the rest of the line
        elif isinstance(frame, VADUserStoppedSpeakingFrame):
            self.speaking = self.create_task(self.say_next())


async def bot(runner_args: SmallWebRTCRunnerArguments) -> None:
    avatar = TalkstreamVideoService(Avatar.from_pretrained(device=DEVICE, size=SIZE), IMAGE)
    transport = SmallWebRTCTransport(
        webrtc_connection=runner_args.webrtc_connection,
        params=TransportParams(
            audio_in_enabled=True,
            audio_out_enabled=True,
            audio_out_sample_rate=16000,
            video_out_enabled=True,
            video_out_is_live=False,  # the avatar's images ride the audio queue (sync_with_audio)
            video_out_width=SIZE,
            video_out_height=SIZE,
            video_out_framerate=25,
        ),
    )
    voice = ScriptedVoice()
    pipeline = Pipeline(
        [transport.input(), VADProcessor(vad_analyzer=SileroVADAnalyzer()), voice, avatar, transport.output()]
    )
    worker = PipelineWorker(pipeline, params=PipelineParams(audio_out_sample_rate=16000))

    @transport.event_handler("on_client_connected")
    async def on_client_connected(transport, client) -> None:
        voice.speaking = voice.create_task(voice.say_next())

    @transport.event_handler("on_client_disconnected")
    async def on_client_disconnected(transport, client) -> None:
        await worker.cancel()

    runner = WorkerRunner(handle_sigint=runner_args.handle_sigint)
    await runner.add_workers(worker)
    await runner.run()


if __name__ == "__main__":
    from pipecat.runner.run import main

    print(f"avatar: {IMAGE} at {SIZE}x{SIZE} on {DEVICE}; speech: espeak-ng; turns: Silero VAD")
    main()
