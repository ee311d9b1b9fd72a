"""The ASGI app: the page, a few JSON endpoints and one WebSocket per conversation.

    app = build_app(ServeConfig(...))            # models load once, when the app starts
    uvicorn.run(app, host="127.0.0.1", port=8000)

Models are shared by all sessions (the avatar's weights, Whisper, the LLM, the voices); each session has its own
avatar stream, VAD state, history and queues, and everything it holds is freed when its socket closes. A malformed
message is answered with an ``error`` message and the session goes on; a session's failure never reaches another.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import logging
import os
import secrets
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image

from ..agent.actions import STATE_CAPTIONS
from ..agent.avatar_loop import AvatarLoop, MediaFrame
from ..agent.conversation import Conversation, ConversationConfig, Event
from ..media import MediaError
from ..stream.batch import ChunkBatcher, batch_runner
from ..stream.engine import FPS
from . import protocol as P
from .capacity import Capacity, memory_ok
from .security import Guard, SecurityConfig, check_image_header

if TYPE_CHECKING:
    from starlette.applications import Starlette

    from ..agent.tts import TTS

STATIC = Path(__file__).resolve().parent / "static"
REFERENCE = Path(__file__).resolve().parent.parent / "assets" / "reference.png"
WORLD_FACES = {"ada": 11, "ben": 23, "cleo": 37}  # bundled faces rendered from these world identities
log = logging.getLogger("talkstream.serve")


@dataclass
class ServeConfig:
    weights: str | None = None  # a folder with causal/vae(/tiny_decoder) safetensors; default: the embedded model
    device: str = "cpu"
    size: int = 256
    decoder: str = "tiny"  # the tiny decoder: ~30x the VAE decoder's speed for 1.2 dB
    image: str | None = None  # the default reference image (a path); default: the bundled reference
    llm_url: str | None = None  # an OpenAI-compatible chat endpoint; None: the local GGUF model (llama.cpp)
    llm_model: str = "default"
    llm_api_key: str | None = None
    llm_timeout: float = 10.0  # seconds to the first token before the avatar apologises
    audio_chat_url: str | None = None  # an audio-native endpoint (speech in, speech + text out): no ASR/TTS here
    voice: str = "piper"  # piper | espeak (the default voice; a session may pick another)
    speed: str = "auto"  # fast | quality | auto (fast on CPU, where the quality path is not live; quality elsewhere)
    max_sessions: int | None = None  # None: what this machine holds in real time, measured when the models load
    batch: bool | None = None  # sessions' chunks in one forward pass; None: where it measured faster (start-up)
    headroom: float = 0.75  # share of real time the avatars may take (the rest: ASR, LLM, voice, encoding)
    verify_s: float = 3.0  # start-up: the admitted count run as live sessions this long, lowered until real time
    # a new session is refused while a live one's frames are this many seconds behind the wall clock (None: never):
    # the start-up measures silent sessions, and sessions that all talk need more than that (docs/serve.md)
    refuse_behind_s: float | None = 2.0
    audio_workers: int | None = None  # parallel speech recognitions / audio-feature encodings; None: cores // 4
    avatar_nice: int = 0  # > 0: the avatars' threads this much nicer than ASR / LLM / voice (AvatarLoop's ``nice``)
    preemptive_silence: float | None = 0.1  # seconds of silence before a reply is prepared (None: at the turn's end)
    security: SecurityConfig = field(default_factory=SecurityConfig)  # token, rate and picture limits
    upload_bytes: int = 8_000_000
    jpeg_quality: int = 80
    stream_options: dict = field(default_factory=dict)  # StreamConfig fields for the avatar (steps, anchor, ...)


SPEEDS = ("auto", "fast", "quality")
FAST = dict(sampler="few_step", timesteps=(1000.0, 750.0), cache_mode="timestep_forcing")  # the fastest measured
# path (docs/speed.md): the few-step schedule (1000, 750) started at the model's sigma 0.9 is one denoising pass, whose
# last step writes the cache (timestep forcing: no commit pass); with the tiny decoder it is what makes a 256x256
# stream live on 2 CPU cores. Its costs are in docs/speed.md's quality table (forcing +11% mouth error; one pass
# instead of the model's 6 softens the face) and docs/serve.md says so.


def speed_path(cfg: ServeConfig) -> str:
    """ "fast" or "quality": what ``cfg.speed`` means on ``cfg.device``."""
    if cfg.speed not in SPEEDS:
        raise ValueError(f"speed must be one of {SPEEDS}, got {cfg.speed!r}")
    if cfg.speed != "auto":
        return cfg.speed
    return "fast" if cfg.device == "cpu" and not cfg.stream_options else "quality"


def stream_options(cfg: ServeConfig) -> dict:
    """The avatar's StreamConfig options: the fast path's, then ``cfg.stream_options`` on top."""
    return {**(FAST if speed_path(cfg) == "fast" else {}), **cfg.stream_options}


class Models:
    """What every session shares, loaded once (heavy imports happen here, not at import time)."""

    def __init__(self, cfg: ServeConfig) -> None:
        from ..agent.tts import VOICES, EspeakTTS
        from ..stream.avatar import Avatar, load_reference

        self.cfg = cfg
        t = time.perf_counter()
        self.speed = speed_path(cfg)
        self.avatar = Avatar.from_pretrained(
            cfg.weights, device=cfg.device, decoder=cfg.decoder, size=cfg.size, **stream_options(cfg)
        )
        # the sessions share one speech recogniser and one audio encoder: on many cores they run several calls at once
        self.audio_workers = cfg.audio_workers or max(1, (os.cpu_count() or 2) // 4)
        self.avatar.audio_workers = self.audio_workers
        self.avatar.whisper  # noqa: B018 (load the audio encoder now, not in the first session)
        self.avatar.encode_prompt(STATE_CAPTIONS["speaking"])  # and the text encoder
        self.images: dict[str, np.ndarray] = {"reference": load_reference(cfg.image or REFERENCE, cfg.size)}
        self.images.update(self._world_faces(cfg.size))
        self.uploads: OrderedDict[str, np.ndarray] = OrderedDict()
        self._guard = None
        self.voices: tuple[str, ...] = () if cfg.audio_chat_url else VOICES
        self._tts: dict = {}
        self.fallback_tts = EspeakTTS()
        self.asr = None
        if cfg.audio_chat_url:
            from ..agent.audio_chat import AudioChatLLM

            self.llm = AudioChatLLM(cfg.audio_chat_url, cfg.llm_model, api_key=cfg.llm_api_key)
        else:
            from ..agent.asr import WhisperASR

            self.asr = WhisperASR(workers=self.audio_workers)
            if cfg.llm_url:
                from ..agent.llm import OpenAIChatLLM

                self.llm = OpenAIChatLLM(
                    cfg.llm_url, cfg.llm_model, cfg.llm_api_key, first_token_timeout=cfg.llm_timeout
                )
            else:
                from ..agent.llm import LlamaCppLLM

                self.llm = LlamaCppLLM()
            self.tts(cfg.voice)
        self.capacity = self._capacity(cfg)
        self.batcher = (
            ChunkBatcher(
                max_batch=self.capacity.sessions,
                runner=batch_runner(self.avatar.dit, cfg.device, self.capacity.sessions),
            )
            if self.capacity.batch
            else None
        )
        self.load_s = time.perf_counter() - t

    def _capacity(self, cfg: ServeConfig) -> Capacity:
        """Measured (``max_sessions`` None) or given; the per-session memory bound is measured either way."""
        from .capacity import calibrate, given

        ref = self.images["reference"]
        if cfg.max_sessions is None:
            cap = calibrate(
                self.avatar, ref, headroom=cfg.headroom, batch=cfg.batch, progress=log.info, verify_s=cfg.verify_s
            )
            log.info("capacity: %d real-time session(s), batched: %s (%s)", cap.sessions, cap.batch, cap.round_s)
            if not cap.real_time:
                log.warning("one session is slower than real time on this machine (%s)", cap.round_s)
            return cap
        one = calibrate(self.avatar, ref, max_sessions=1, rounds=1, batch=False)
        return given(cfg.max_sessions, bool(cfg.batch), one.memory_per_session_mb)

    @staticmethod
    def _world_faces(size: int) -> dict[str, np.ndarray]:
        from ..world.identity import Identity
        from ..world.render import render_frame

        return {name: render_frame(Identity.sample(seed), size=size) for name, seed in WORLD_FACES.items()}

    def tts(self, voice: str | None) -> TTS:
        from ..agent.tts import make_tts

        voice = voice or self.cfg.voice
        if voice not in self._tts:
            self._tts[voice] = make_tts(voice)
        return self._tts[voice]

    def conversation_config(self) -> ConversationConfig:
        return ConversationConfig(preemptive_silence=self.cfg.preemptive_silence)

    def avatar_loop(self, image: np.ndarray) -> AvatarLoop:
        """A session's avatar stream, as the server runs it (shared batcher, the avatar's thread priority)."""
        return AvatarLoop(self.avatar, image, batcher=self.batcher, nice=self.cfg.avatar_nice)

    def image(self, name: str) -> np.ndarray:
        if name.startswith("upload:"):
            img = self.uploads.get(name[7:])
        else:
            img = self.images.get(name)
        if img is None:
            raise P.ProtocolError("image", f"no image {name!r}; bundled: {sorted(self.images)}, or upload one")
        return img

    def add_upload(self, data: bytes) -> tuple[str, str | None]:
        """A picture's bytes -> (its id, the out-of-domain warning for the embedded model or None)."""
        from ..stream.avatar import load_reference

        img = load_reference(data, self.cfg.size)  # MediaError for anything that is not a usable picture
        warning = None
        if self.cfg.weights is None:  # the embedded model only knows the synthetic world's faces: say so
            from ..eval.guard import OODGuard

            if self._guard is None:
                self._guard = OODGuard.load()
            res = self._guard.check(np.array(img))  # a writable copy for torch
            warning = None if res.in_domain else res.message().removeprefix("talkstream: warning: ")
        key = secrets.token_hex(8)
        self.uploads[key] = img
        while len(self.uploads) > 64:
            self.uploads.popitem(last=False)
        return key, warning


def png_bytes(img: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="PNG")
    return buf.getvalue()


class Session:
    """One WebSocket conversation."""

    def __init__(self, ws, models: Models, sid: str) -> None:
        self.ws, self.models, self.sid = ws, models, sid
        self.conv: Conversation | None = None
        self.rate = 16_000
        self.sender: asyncio.Task | None = None
        self.errors = 0

    async def send_json(self, msg: dict) -> None:
        await self.ws.send_text(json.dumps(msg))

    def behind_s(self) -> float:
        """How far this session's video is behind the wall clock (``AvatarLoop.behind_s``; 0 before it starts)."""
        return 0.0 if self.conv is None else self.conv.loop_avatar.behind_s()

    async def error(self, code: str, message: str, **extra) -> None:
        self.errors += 1
        await self.send_json({"type": "error", "code": code, "message": message, **extra})

    async def hello(self, msg: dict) -> None:
        if self.conv is not None:
            raise P.ProtocolError("hello_again", "this session has started already (one hello per session)")
        m = self.models
        h = P.parse_hello(msg, m.voices)
        image = m.image(h.image)
        tts = None if m.asr is None else m.tts(h.voice)
        self.rate = h.sample_rate
        loop = m.avatar_loop(image)
        self.conv = Conversation(loop, m.asr, m.llm, tts, cfg=m.conversation_config(), fallback_tts=m.fallback_tts)
        await self.conv.start()
        self.sender = asyncio.create_task(self._send_loop())
        await self.send_json(
            dict(
                type="ready",
                version=P.VERSION,
                session=self.sid,
                fps=FPS,
                sample_rate=16_000,
                size=m.cfg.size,
                voice=None if tts is None else tts.name,
                llm=m.llm.name,
                device=m.cfg.device,
                speed=m.speed,
            )
        )

    async def _send_loop(self) -> None:
        q = self.models.cfg.jpeg_quality
        async for item in self.conv.frames():
            if isinstance(item, MediaFrame):
                data = await asyncio.to_thread(P.encode_frame, item.index, item.pts, item.image, item.audio, q)
                await self.ws.send_bytes(data)
            elif isinstance(item, Event):
                await self.send_json(item.message())
                if item.data.get("fatal"):
                    await self.ws.close(1011)
                    return

    async def handle(self, message: dict) -> bool:
        """One received WebSocket message; False when the session should end."""
        if message.get("type") == "websocket.disconnect":
            return False
        text, data = message.get("text"), message.get("bytes")
        try:
            if text is not None:
                msg = P.parse_control(text)
                kind = msg["type"]
                if kind == "hello":
                    await self.hello(msg)
                elif kind == "ping":
                    await self.send_json({"type": "pong", "t": msg.get("t")})
                elif kind == "bye":
                    return False
                elif self.conv is None:
                    raise P.ProtocolError("no_hello", "send a hello message first")
                elif kind == "text":
                    typed = msg.get("text")
                    if not isinstance(typed, str) or not typed.strip() or len(typed) > P.MAX_TYPED_CHARS:
                        raise P.ProtocolError("bad_text", f"text must be 1-{P.MAX_TYPED_CHARS} characters")
                    try:
                        await self.conv.push_text(typed)
                    except ValueError as e:
                        raise P.ProtocolError("bad_text", str(e)) from None
                elif kind == "interrupt":
                    self.conv.interrupt()
            elif data is not None:
                audio = P.decode_audio(data)
                if self.conv is None:
                    raise P.ProtocolError("no_hello", "send a hello message before audio")
                await self.conv.push_audio(audio, self.rate)
        except P.ProtocolError as e:
            await self.error(e.code, str(e))
        except (MediaError, ValueError) as e:  # AudioFormatError included
            await self.error("bad_input", str(e))
        return True

    async def close(self) -> None:
        if self.conv is not None:
            await self.conv.close()
        if self.sender is not None:
            self.sender.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self.sender


def build_app(cfg: ServeConfig, models: Models | None = None) -> Starlette:
    """The Starlette app; ``models`` may be given (tests share one load between apps)."""
    from starlette.applications import Starlette
    from starlette.responses import FileResponse, JSONResponse, Response
    from starlette.routing import Mount, Route, WebSocketRoute
    from starlette.staticfiles import StaticFiles
    from starlette.websockets import WebSocket, WebSocketDisconnect

    state: dict = {"models": models, "sessions": {}}

    @contextlib.asynccontextmanager
    async def lifespan(app):
        if state["models"] is None:
            state["models"] = await asyncio.to_thread(Models, cfg)
            log.info("models loaded in %.1f s", state["models"].load_s)
        yield
        for s in list(state["sessions"].values()):
            await s.close()

    async def index(request):
        return FileResponse(STATIC / "index.html")

    async def info(request):
        m: Models = state["models"]
        cap = capacity()
        return JSONResponse(
            dict(
                version=P.VERSION,
                images=sorted(m.images),
                voices=list(m.voices),
                default_voice=None if not m.voices else cfg.voice,
                llm=m.llm.name,
                size=cfg.size,
                device=cfg.device,
                speed=m.speed,
                sessions=len(state["sessions"]),
                max_sessions=cap.sessions,
                capacity=cap.as_dict(),
                audio_workers=m.audio_workers,
                behind_s=round(behind_s(), 2),
            )
        )

    async def image(request):
        name = request.path_params["name"]
        img = state["models"].images.get(name)
        if img is None:
            return JSONResponse({"error": f"no bundled image {name!r}"}, status_code=404)
        return Response(png_bytes(img), media_type="image/png")

    async def upload(request):
        size = int(request.headers.get("content-length") or 0)
        if size > cfg.upload_bytes:
            return JSONResponse({"error": f"image over {cfg.upload_bytes} bytes"}, status_code=413)
        body = b""
        async for chunk in request.stream():
            body += chunk
            if len(body) > cfg.upload_bytes:
                return JSONResponse({"error": f"image over {cfg.upload_bytes} bytes"}, status_code=413)
        try:
            check_image_header(body, cfg.security.max_pixels)
            key, warning = await asyncio.to_thread(state["models"].add_upload, body)
        except MediaError as e:
            return JSONResponse({"error": str(e)}, status_code=400)
        return JSONResponse({"id": f"upload:{key}", "warning": warning})

    def capacity() -> Capacity:
        """The app's own ``max_sessions`` when given, else what the models measured at start-up."""
        m: Models = state["models"]
        if cfg.max_sessions is None or cfg.max_sessions == m.capacity.sessions:
            return m.capacity
        from .capacity import given

        return given(cfg.max_sessions, m.capacity.batch, m.capacity.memory_per_session_mb)

    def behind_s() -> float:
        """How far the live session furthest behind the wall clock is (``Session.behind_s``)."""
        return max((s.behind_s() for s in state["sessions"].values()), default=0.0)

    async def session(ws: WebSocket):
        await ws.accept()
        sessions = state["sessions"]
        cap = capacity()
        fits, avail = memory_ok(cap)
        behind = behind_s()
        late = cfg.refuse_behind_s is not None and behind > cfg.refuse_behind_s
        if len(sessions) >= cap.sessions or not fits or late:
            if len(sessions) >= cap.sessions:
                reason, msg = "sessions", cap.busy_message()
            elif not fits:
                reason = "memory"
                msg = (
                    f"the server is low on memory ({avail:.0f} MB free, a conversation needs up to "
                    f"{cap.memory_per_session_mb:.0f} MB); try again in a minute"
                )
            else:
                reason = "load"
                msg = (
                    f"the conversations here are running {behind:.1f} s behind real time; a new one would slow "
                    "them further: try again in a minute"
                )
            busy = dict(type="busy", message=msg, reason=reason, retry_after_s=60)
            await ws.send_text(json.dumps({**busy, "sessions": len(sessions), "max_sessions": cap.sessions}))
            await ws.close(1013)
            return
        sid = secrets.token_hex(6)
        s = Session(ws, state["models"], sid)
        sessions[sid] = s
        try:
            while await s.handle(await ws.receive()):
                pass
        except WebSocketDisconnect:
            pass
        except Exception as e:  # a bug in one session ends that session with a message, never the server
            log.exception("session %s failed", sid)
            with contextlib.suppress(Exception):
                await s.error("internal", f"{type(e).__name__}: {e}", fatal=True)
        finally:
            sessions.pop(sid, None)
            await s.close()
            with contextlib.suppress(Exception):
                await ws.close()

    routes = [
        Route("/", index),
        Route("/api/info", info),
        Route("/api/images/{name}.png", image),
        Route("/api/images", upload, methods=["POST"]),
        WebSocketRoute("/ws", session),
        Mount("/static", StaticFiles(directory=STATIC), name="static"),
    ]
    from starlette.middleware import Middleware

    app = Starlette(routes=routes, lifespan=lifespan, middleware=[Middleware(Guard, cfg=cfg.security)])
    app.state.talkstream = state
    return app


__all__ = ["Models", "ServeConfig", "Session", "build_app"]
