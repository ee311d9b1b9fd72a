"""Local stand-ins for remote model endpoints, served on 127.0.0.1 only (the tests import them), and their own checks:
- an OpenAI-compatible chat endpoint (streamed SSE) whose reply, first-token delay and HTTP status are chosen;
- an OpenAI-style audio chat endpoint implemented with our own stages: Whisper transcribes the user's audio, the reply
  says what was heard, espeak-ng speaks it, streamed back as 24 kHz PCM16 with its transcript."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import socket
import threading
import time

import numpy as np
import pytest

pytest.importorskip("starlette")
pytest.importorskip("uvicorn")
pytest.importorskip("httpx")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def serve_in_thread(app, port: int | None = None):
    """Run an ASGI app with uvicorn on 127.0.0.1 in a thread; yields its base URL; stops it on exit."""
    import uvicorn

    port = port or free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", lifespan="on"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.time() + 300
    while not server.started:
        if not thread.is_alive() or time.time() > deadline:
            raise RuntimeError("stand-in server did not start")
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(30)


def _sse(obj) -> str:
    return f"data: {json.dumps(obj)}\n\n"


def chat_app(reply="[smile] Hello! I am fine, thank you.", first_delay: float = 0.0, status: int = 200):
    """An OpenAI-compatible ``/v1/chat/completions`` that streams ``reply`` word by word (``reply`` may be a function
    of the request's messages). Requests are recorded in ``app.state.requests``."""
    from starlette.applications import Starlette
    from starlette.responses import JSONResponse, StreamingResponse
    from starlette.routing import Route

    async def completions(request):
        body = await request.json()
        app.state.requests.append(body)
        if status != 200:
            return JSONResponse({"error": {"message": "stand-in failure"}}, status_code=status)
        text = reply(body["messages"]) if callable(reply) else reply

        async def events():
            await asyncio.sleep(first_delay)
            for i, word in enumerate(text.split(" ")):
                piece = word if i == 0 else " " + word
                yield _sse({"choices": [{"index": 0, "delta": {"content": piece}}]})
                await asyncio.sleep(0.005)
            yield _sse({"choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]})
            yield "data: [DONE]\n\n"

        return StreamingResponse(events(), media_type="text/event-stream")

    app = Starlette(routes=[Route("/v1/chat/completions", completions, methods=["POST"])])
    app.state.requests = []
    return app


def audio_chat_app(asr, tts):
    """OpenAI-style audio chat implemented with our own ASR and TTS: the reply repeats what it heard."""
    from starlette.applications import Starlette
    from starlette.responses import JSONResponse, StreamingResponse
    from starlette.routing import Route

    from talkstream.agent.audio import float_to_pcm16, read_wav_bytes, to_16k
    from talkstream.media import resample

    async def completions(request):
        body = await request.json()
        if "audio" not in body.get("modalities", []) or body.get("audio", {}).get("format") != "pcm16":
            return JSONResponse({"error": {"message": "this stand-in answers audio chat only"}}, status_code=400)
        part = body["messages"][-1]["content"][0]
        wav, rate = read_wav_bytes(base64.b64decode(part["input_audio"]["data"]))
        heard = await asyncio.to_thread(asr.transcribe, to_16k(wav, rate))
        text = f"[nod] You said: {heard.strip(' .?!')}."
        speech = await asyncio.to_thread(tts.synthesize, text.replace("[nod] ", ""))
        pcm = float_to_pcm16(resample(speech, 16_000, 24_000))

        async def events():
            for i, word in enumerate(text.split(" ")):
                yield _sse({"choices": [{"delta": {"audio": {"transcript": word if i == 0 else " " + word}}}]})
            step = 24_000 * 2 // 5  # 0.2 s of PCM16 per event
            for k in range(0, len(pcm), step):
                data = base64.b64encode(pcm[k : k + step]).decode()
                yield _sse({"choices": [{"delta": {"audio": {"data": data}}}]})
            yield "data: [DONE]\n\n"

        return StreamingResponse(events(), media_type="text/event-stream")

    return Starlette(routes=[Route("/v1/chat/completions", completions, methods=["POST"])])


def spoken(text: str) -> np.ndarray:
    from talkstream.agent.tts import EspeakTTS

    return EspeakTTS().synthesize(text)


def collect(agen, limit: float = 30.0) -> list:
    async def run():
        out = []
        async with asyncio.timeout(limit):
            async for x in agen:
                out.append(x)
        return out

    return asyncio.run(run())


# -- the stand-ins' own checks ----------------------------------------------------------------------
def test_chat_standin_streams_reply_word_by_word():
    from talkstream.agent.llm import OpenAIChatLLM

    app = chat_app("One two three.")
    with serve_in_thread(app) as url:
        pieces = collect(OpenAIChatLLM(url).stream([{"role": "user", "content": "count"}]))
    assert pieces == ["One", " two", " three."]
    assert app.state.requests[0]["stream"] is True and app.state.requests[0]["messages"][-1]["content"] == "count"
