"""Who may use ``talkstream serve`` and how much: tokens, per-client rate limits, upload and picture limits.

- The server binds 127.0.0.1 by default. Any other host needs a token (``--token`` or ``--token-file``); start-up is
  refused without one (``check_bind``).
- With a token set, every API request and WebSocket needs it: ``Authorization: Bearer <token>`` or ``?token=<token>``
  (a browser's WebSocket cannot set headers). The page and its static files are served without it; they hold no data.
  Tokens are compared in constant time. A refused HTTP request gets 401 with the reason; a refused WebSocket is
  accepted, told ``{"type": "error", "code": "unauthorized", ...}`` and closed with code 1008.
- Per client address: new connections (WebSocket sessions and uploads) and WebSocket messages are rate limited with
  token buckets. Messages over the limit are dropped and the client is told once per burst (``rate_limited``); the
  session goes on. Connections over the limit are refused with the reason (HTTP 429 / WebSocket close 1008).
- Uploaded pictures are checked from their header before any pixel is decoded (``check_image_header``).

``Guard`` is plain ASGI middleware: ``Starlette(..., middleware=[Middleware(Guard, cfg=SecurityConfig(...))])``.
"""

from __future__ import annotations

import hmac
import io
import json
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import parse_qs

LOOPBACK = ("127.0.0.1", "localhost", "::1")
OPEN_PATHS = ("/", "/favicon.ico")  # the page itself; "/static/..." too
MAX_TRACKED_CLIENTS = 4096


class SecurityError(ValueError):
    """A refused configuration (one line, for the command line)."""


@dataclass(frozen=True)
class SecurityConfig:
    token: str | None = None  # required from every client when set
    messages_per_s: float = 200.0  # WebSocket messages per client address, sustained (the page sends ~50/s)
    message_burst: int = 1000  # ... and in one burst (a client catching up after a network stall)
    connects_per_min: float = 60.0  # new sessions + uploads per client address, sustained
    connect_burst: int = 20
    max_pixels: int = 40_000_000  # an uploaded picture's width x height, read from its header before decoding


def load_token(token: str | None, token_file: str | Path | None) -> str | None:
    """``--token`` / ``--token-file`` -> the token (None when neither is given)."""
    if token is not None and token_file is not None:
        raise SecurityError("give --token or --token-file, not both")
    if token_file is not None:
        path = Path(token_file)
        if not path.is_file():
            raise SecurityError(f"--token-file {path}: no such file")
        token = path.read_text(encoding="utf-8").strip()
        if not token:
            raise SecurityError(f"--token-file {path}: the file is empty")
    if token is not None and len(token) < 16:
        raise SecurityError("the token must be at least 16 characters (e.g. from secrets.token_urlsafe())")
    return token


def check_bind(host: str, token: str | None) -> None:
    """Refuse to listen beyond this machine without a token."""
    if host not in LOOPBACK and not token:
        raise SecurityError(
            f"--host {host} makes the server reachable from other machines: give --token or --token-file "
            "(or keep the default --host 127.0.0.1)"
        )


def token_ok(given: str | None, expected: str | None) -> bool:
    """True when no token is required or ``given`` matches it (constant-time in the token's content)."""
    if expected is None:
        return True
    if given is None:
        return False
    return hmac.compare_digest(given.encode("utf-8", "replace"), expected.encode("utf-8"))


def request_token(headers: list[tuple[bytes, bytes]], query_string: bytes) -> str | None:
    """The token a request carries: ``Authorization: Bearer ...`` or ``?token=...``."""
    for k, v in headers:
        if k.lower() == b"authorization":
            value = v.decode("latin-1")
            if value.lower().startswith("bearer "):
                return value[7:].strip()
    values = parse_qs(query_string.decode("latin-1")).get("token")
    return values[0] if values else None


class TokenBucket:
    """``rate`` tokens a second up to ``burst``; ``take()`` spends one when there is one."""

    def __init__(self, rate: float, burst: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.rate, self.burst, self.clock = rate, float(burst), clock
        self.tokens, self.t = float(burst), clock()

    def take(self) -> bool:
        now = self.clock()
        self.tokens = min(self.burst, self.tokens + (now - self.t) * self.rate)
        self.t = now
        if self.tokens >= 1.0:
            self.tokens -= 1.0
            return True
        return False


class RateLimiter:
    """One token bucket per client key; the least recently seen clients are forgotten beyond ``max_clients``."""

    def __init__(self, rate: float, burst: float, max_clients: int = MAX_TRACKED_CLIENTS, clock=time.monotonic) -> None:
        self.rate, self.burst, self.max_clients, self.clock = rate, burst, max_clients, clock
        self.buckets: OrderedDict[str, TokenBucket] = OrderedDict()

    def take(self, key: str) -> bool:
        b = self.buckets.get(key)
        if b is None:
            b = self.buckets[key] = TokenBucket(self.rate, self.burst, self.clock)
            while len(self.buckets) > self.max_clients:
                self.buckets.popitem(last=False)
        else:
            self.buckets.move_to_end(key)
        return b.take()


def check_image_header(data: bytes, max_pixels: int) -> None:
    """Refuse a picture whose header declares more than ``max_pixels`` (before decoding any pixel)."""
    from PIL import Image, UnidentifiedImageError

    from ..media import MediaError

    try:
        with Image.open(io.BytesIO(data)) as img:  # reads the header only
            w, h = img.size
    except Image.DecompressionBombError:  # PIL's own (larger) limit, when in force
        raise MediaError(f"image declares more pixels than this server's limit of {max_pixels:,}") from None
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError):
        return  # not a picture: the decoder's own check names what it is
    if w * h > max_pixels:
        raise MediaError(f"image is {w}x{h}: more pixels than this server's limit of {max_pixels:,}")


def _client(scope) -> str:
    client = scope.get("client")
    return client[0] if client else "unknown"


class Guard:
    """ASGI middleware: the token, per-client connection and message rate limits."""

    def __init__(self, app, cfg: SecurityConfig) -> None:
        self.app, self.cfg = app, cfg
        self.connects = RateLimiter(cfg.connects_per_min / 60.0, cfg.connect_burst)
        self.messages = RateLimiter(cfg.messages_per_s, cfg.message_burst)
        self.refused: dict[str, int] = {"unauthorized": 0, "rate_limited": 0, "messages_dropped": 0}

    async def __call__(self, scope, receive, send) -> None:
        kind = scope["type"]
        if kind not in ("http", "websocket"):
            return await self.app(scope, receive, send)
        path = scope.get("path", "")
        if kind == "http" and (path in OPEN_PATHS or path.startswith("/static/")):
            return await self.app(scope, receive, send)
        if not token_ok(request_token(scope.get("headers", []), scope.get("query_string", b"")), self.cfg.token):
            self.refused["unauthorized"] += 1
            return await self._refuse(kind, receive, send, 401, "unauthorized", "a valid token is required")
        client = _client(scope)
        new_session = kind == "websocket" or scope.get("method") == "POST"
        if new_session and not self.connects.take(client):
            self.refused["rate_limited"] += 1
            msg = f"too many new sessions/uploads from {client} (limit {self.cfg.connects_per_min:g}/min); retry later"
            return await self._refuse(kind, receive, send, 429, "rate_limited", msg)
        if kind == "websocket":
            return await self.app(scope, self._limited_receive(client, receive, send), send)
        return await self.app(scope, receive, send)

    def _limited_receive(self, client: str, receive, send):
        told = False

        async def limited():
            nonlocal told
            while True:
                message = await receive()
                if message["type"] != "websocket.receive" or self.messages.take(client):
                    told = False
                    return message
                self.refused["messages_dropped"] += 1
                if not told:  # once per burst over the limit: the answer must not amplify a flood
                    told = True
                    text = (
                        f"over {self.cfg.messages_per_s:g} messages/s from {client}: "
                        "messages are being dropped until the rate falls"
                    )
                    await send({"type": "websocket.send", "text": json.dumps(_error("rate_limited", text))})

        return limited

    @staticmethod
    async def _refuse(kind: str, receive, send, status: int, code: str, message: str) -> None:
        if kind == "http":
            body = json.dumps({"error": message, "code": code}).encode()
            headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
            if status == 401:
                headers.append((b"www-authenticate", b"Bearer"))
            await send({"type": "http.response.start", "status": status, "headers": headers})
            await send({"type": "http.response.body", "body": body})
            return
        first = await receive()
        if first["type"] != "websocket.connect":
            return
        await send({"type": "websocket.accept"})
        await send({"type": "websocket.send", "text": json.dumps(_error(code, message, fatal=True))})
        await send({"type": "websocket.close", "code": 1008})


def _error(code: str, message: str, **extra) -> dict:
    return {"type": "error", "code": code, "message": message, **extra}


__all__ = [
    "Guard",
    "LOOPBACK",
    "RateLimiter",
    "SecurityConfig",
    "SecurityError",
    "TokenBucket",
    "check_bind",
    "check_image_header",
    "load_token",
    "request_token",
    "token_ok",
]
