"""The WebSocket session protocol, version 1: JSON control messages (text frames) and binary media.

Client -> server
- ``{"type": "hello", "version": 1, "sample_rate": 16000, "image": "reference", "voice": "piper"}``: first message;
  ``image`` is a bundled image's name or ``"upload:<id>"`` from ``POST /api/images``.
- binary: microphone audio, PCM signed 16-bit little-endian mono at the hello's ``sample_rate``, at most
  ``MAX_AUDIO_BYTES`` per message.
- ``{"type": "text", "text": "..."}``: a typed turn; ``{"type": "interrupt"}``: stop the reply;
  ``{"type": "ping"}``: answered by ``{"type": "pong"}``; ``{"type": "bye"}``: end the session.

Server -> client
- ``{"type": "ready", "version": 1, "session", "fps", "sample_rate", "size", "voice", "llm", ...}``
- ``state`` (``state``: idle | listening | thinking | speaking), ``transcript`` (``role``, ``text``, ``final``),
  ``latency`` (seconds per stage of the last turn), ``clear`` (drop scheduled audio: barge-in), ``notice``,
  ``error`` (``code``, ``message``; ``fatal`` when the session ends), ``pong``, ``busy``.
- binary: one video frame with its audio: the header ``FRAME_HEADER`` (little-endian: magic ``b"TSF1"``,
  uint32 frame index, float64 pts in seconds, uint32 JPEG byte count, uint32 audio sample count), then the JPEG
  (0 bytes: the image was dropped for a slow reader), then that many PCM int16 samples at 16 kHz.
"""

from __future__ import annotations

import io
import json
import struct
from dataclasses import dataclass

import numpy as np
from PIL import Image

from ..agent.audio import AudioFormatError, check_rate, float_to_pcm16, pcm16_to_float

VERSION = 1
FRAME_MAGIC = b"TSF1"
FRAME_HEADER = struct.Struct("<4sIdII")
MAX_AUDIO_BYTES = 96_000  # 1 s at 48 kHz: a browser sends ~20-100 ms per message
MAX_TEXT_BYTES = 4_096
MAX_TYPED_CHARS = 500
CLIENT_TYPES = ("hello", "text", "interrupt", "ping", "bye")

# files people send by mistake instead of PCM: named in the error
_MAGIC = {
    b"\x89PNG": "a PNG image",
    b"\xff\xd8\xff": "a JPEG image",
    b"GIF8": "a GIF image",
    b"RIFF": "a RIFF (WAV/WebP) file: send raw PCM samples without the header",
    b"OggS": "an Ogg file",
    b"\x1aE\xdf\xa3": "a WebM/Matroska file",
    b"ID3": "an MP3 file",
    b"fLaC": "a FLAC file",
    b"%PDF": "a PDF file",
    b"PK\x03\x04": "a ZIP file",
}


class ProtocolError(ValueError):
    """A message that breaks the protocol: answered with an ``error`` message, the session goes on."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


@dataclass(frozen=True)
class Hello:
    sample_rate: int
    image: str
    voice: str | None


def parse_control(text: str) -> dict:
    """A text frame -> its JSON object, checked for a known ``type``."""
    if len(text.encode("utf-8", errors="replace")) > MAX_TEXT_BYTES:
        raise ProtocolError("too_large", f"control messages are limited to {MAX_TEXT_BYTES} bytes")
    try:
        msg = json.loads(text)
    except json.JSONDecodeError as e:
        raise ProtocolError("bad_json", f"not JSON ({e.msg} at {e.pos})") from None
    if not isinstance(msg, dict):
        raise ProtocolError("bad_message", f"a control message is a JSON object, got {type(msg).__name__}")
    kind = msg.get("type")
    if kind not in CLIENT_TYPES:
        raise ProtocolError("unknown_type", f"unknown message type {kind!r}; expected one of {list(CLIENT_TYPES)}")
    return msg


def parse_hello(msg: dict, voices: tuple[str, ...]) -> Hello:
    version = msg.get("version", VERSION)
    if version != VERSION:
        raise ProtocolError("version", f"protocol version {version!r} is not supported; this server speaks {VERSION}")
    rate = msg.get("sample_rate", 16_000)
    try:
        check_rate(rate)
    except AudioFormatError as e:
        raise ProtocolError("sample_rate", str(e)) from None
    image = msg.get("image", "reference")
    if not isinstance(image, str) or not image or len(image) > 64:
        raise ProtocolError("image", "image must be a bundled image's name or 'upload:<id>'")
    voice = msg.get("voice")
    if voice is not None and voice not in voices:
        raise ProtocolError("voice", f"unknown voice {voice!r}; this server has {list(voices)}")
    return Hello(rate, image, voice)


def _is_json_object(data: bytes) -> bool:
    if not data.startswith(b"{"):
        return False
    try:
        return isinstance(json.loads(data.decode("utf-8")), dict)
    except (UnicodeDecodeError, ValueError):
        return False


def decode_audio(data: bytes) -> np.ndarray:
    """A binary client message -> float32 samples, or ``ProtocolError`` naming what it is instead."""
    if not data:
        raise ProtocolError("empty_audio", "empty binary message (no audio samples)")
    if len(data) > MAX_AUDIO_BYTES:
        raise ProtocolError("too_large", f"audio messages are limited to {MAX_AUDIO_BYTES} bytes, got {len(data)}")
    for magic, what in _MAGIC.items():
        if data.startswith(magic):
            raise ProtocolError("not_audio", f"binary message looks like {what}, not PCM int16 audio")
    if _is_json_object(data):  # not by its first byte alone: 1 in 256 PCM messages starts with b"{"
        what = "JSON sent as a binary frame (send control messages as text frames)"
        raise ProtocolError("not_audio", f"binary message looks like {what}, not PCM int16 audio")
    try:
        return pcm16_to_float(data)
    except AudioFormatError as e:
        raise ProtocolError("not_audio", str(e)) from None


def encode_frame(index: int, pts: float, image: np.ndarray | None, audio: np.ndarray, quality: int = 80) -> bytes:
    jpeg = b""
    if image is not None:
        buf = io.BytesIO()
        Image.fromarray(image).save(buf, format="JPEG", quality=quality)
        jpeg = buf.getvalue()
    pcm = float_to_pcm16(audio)
    return FRAME_HEADER.pack(FRAME_MAGIC, index, pts, len(jpeg), len(pcm) // 2) + jpeg + pcm


def decode_frame(data: bytes) -> tuple[int, float, bytes, np.ndarray]:
    """A server frame message -> (index, pts, JPEG bytes, float32 audio) (clients and tests)."""
    if len(data) < FRAME_HEADER.size:
        raise ProtocolError("bad_frame", f"frame message shorter than its {FRAME_HEADER.size}-byte header")
    magic, index, pts, n_jpeg, n_pcm = FRAME_HEADER.unpack_from(data)
    if magic != FRAME_MAGIC or len(data) != FRAME_HEADER.size + n_jpeg + 2 * n_pcm:
        raise ProtocolError("bad_frame", "frame message does not match its header")
    jpeg = data[FRAME_HEADER.size : FRAME_HEADER.size + n_jpeg]
    return index, pts, jpeg, pcm16_to_float(data[FRAME_HEADER.size + n_jpeg :])


__all__ = [
    "CLIENT_TYPES",
    "FRAME_HEADER",
    "FRAME_MAGIC",
    "Hello",
    "MAX_AUDIO_BYTES",
    "ProtocolError",
    "VERSION",
    "decode_audio",
    "decode_frame",
    "encode_frame",
    "parse_control",
    "parse_hello",
]
