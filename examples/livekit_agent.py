"""A LiveKit voice agent with a talkstream avatar (needs a LiveKit server: LiveKit Cloud or a self-hosted one).

    pip install "talkstream[livekit]"
    export LIVEKIT_URL=wss://... LIVEKIT_API_KEY=... LIVEKIT_API_SECRET=...
    python examples/livekit_agent.py dev            # then join the room from any LiveKit client

The agent's speech-to-text, LLM and text-to-speech are LiveKit Inference model names here (set them with
AGENT_STT / AGENT_LLM / AGENT_TTS, or put any livekit-plugins-* objects in their place). The avatar:

    TALKSTREAM_IMAGE    reference image (default: the bundled one)
    TALKSTREAM_DEVICE   cpu / cuda (real time needs a GPU; the CPU renders ~10 fps at 128x128)
    TALKSTREAM_SIZE     output size in pixels (default 256)
    TALKSTREAM_WORKER   1: render in a separate avatar worker process (its own participant) instead of in the
                        agent's process
"""

from __future__ import annotations

import os
from pathlib import Path

from livekit.agents import Agent, AgentServer, AgentSession, JobContext, JobProcess, cli

from talkstream.integrations.livekit import TalkstreamAvatarSession
from talkstream.stream.avatar import WEIGHTS, Avatar

IMAGE = os.environ.get("TALKSTREAM_IMAGE") or str(WEIGHTS.parent / "assets" / "reference.png")
DEVICE = os.environ.get("TALKSTREAM_DEVICE", "cpu")
SIZE = int(os.environ.get("TALKSTREAM_SIZE", "256"))
WORKER = os.environ.get("TALKSTREAM_WORKER") == "1"

server = AgentServer()


def prewarm(proc: JobProcess) -> None:
    """Load the model once per job process, before any call comes (the worker layout loads its own)."""
    if not WORKER:
        proc.userdata["avatar"] = Avatar.from_pretrained(device=DEVICE, size=SIZE)


server.setup_fnc = prewarm


@server.rtc_session()
async def entrypoint(ctx: JobContext) -> None:
    session = AgentSession(
        stt=os.environ.get("AGENT_STT", "deepgram/nova-3"),
        llm=os.environ.get("AGENT_LLM", "openai/gpt-4.1-mini"),
        tts=os.environ.get("AGENT_TTS", "cartesia/sonic-2"),
        # an avatar cannot pause its speech: an interruption always ends the reply
        turn_handling={"interruption": {"resume_false_interruption": False}},
    )
    if WORKER:
        avatar = TalkstreamAvatarSession(IMAGE, worker=True, device=DEVICE, size=SIZE)
    else:
        avatar = TalkstreamAvatarSession(IMAGE, ctx.proc.userdata["avatar"])
    await avatar.start(session, room=ctx.room)
    await session.start(
        agent=Agent(instructions="You are a friendly assistant with a face. Keep your answers short."),
        room=ctx.room,
    )
    await session.generate_reply(instructions="Greet the user in one sentence.")


if __name__ == "__main__":
    if not Path(IMAGE).is_file():
        raise SystemExit(f"{IMAGE}: no such image (set TALKSTREAM_IMAGE)")
    cli.run_app(server)
