"""The audio-native option (LiveTalk pairs its avatar with an audio language model): the user's speech goes to an
endpoint that answers with speech and its transcript, so no separate ASR or TTS runs here.

Wire format: OpenAI-style audio chat, ``POST /v1/chat/completions`` with ``modalities: ["text", "audio"]``,
``audio: {voice, format: "pcm16"}``, ``stream: true``, the user's turn as ``{"type": "input_audio",
"input_audio": {"data": <base64 WAV>, "format": "wav"}}``; each streamed ``delta.audio`` carries ``transcript``
text and/or ``data`` (base64 PCM16, 24 kHz mono).
"""

from __future__ import annotations

import base64
from collections.abc import AsyncIterator
from dataclasses import dataclass

import numpy as np

from ..models.encoders import _require
from .audio import AudioFormatError, pcm16_to_float, to_16k, wav_bytes
from .llm import LLMError, chat_url, sse_data

REPLY_RATE = 24_000


@dataclass
class ReplyPart:
    text: str = ""
    audio: np.ndarray | None = None  # float32 mono 16 kHz


@dataclass
class AudioChatLLM:
    url: str
    model: str = "default"
    voice: str = "alloy"
    api_key: str | None = None
    connect_timeout: float = 3.0
    first_token_timeout: float = 15.0
    name: str = "audio-chat"

    async def respond(self, messages: list[dict], audio: np.ndarray) -> AsyncIterator[ReplyPart]:
        """History (text messages) + the user's utterance (16 kHz float) -> reply parts (text and 16 kHz audio)."""
        httpx = _require("httpx", "httpx")
        user = {
            "role": "user",
            "content": [
                {
                    "type": "input_audio",
                    "input_audio": {"data": base64.b64encode(wav_bytes(audio)).decode(), "format": "wav"},
                }
            ],
        }
        body = dict(
            model=self.model,
            modalities=["text", "audio"],
            audio={"voice": self.voice, "format": "pcm16"},
            stream=True,
            messages=[*messages, user],
        )
        headers = {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}
        timeout = httpx.Timeout(self.first_token_timeout, connect=self.connect_timeout)
        try:
            async with httpx.AsyncClient(timeout=timeout) as client:
                async with client.stream("POST", chat_url(self.url), json=body, headers=headers) as r:
                    if r.status_code != 200:
                        text = (await r.aread()).decode(errors="replace")[:200]
                        raise LLMError(f"audio chat endpoint answered HTTP {r.status_code}: {text}")
                    async for event in sse_data(r.aiter_lines()):
                        for choice in event.get("choices") or []:
                            delta = choice.get("delta") or {}
                            part = ReplyPart(text=delta.get("content") or "")
                            au = delta.get("audio") or {}
                            part.text += au.get("transcript") or ""
                            if au.get("data"):
                                try:
                                    pcm = pcm16_to_float(base64.b64decode(au["data"]))
                                except (ValueError, AudioFormatError) as e:
                                    raise LLMError(f"audio chat endpoint sent unreadable audio ({e})") from None
                                part.audio = to_16k(pcm, REPLY_RATE)
                            if part.text or part.audio is not None:
                                yield part
        except httpx.TimeoutException:
            raise LLMError(f"audio chat endpoint {self.url} timed out") from None
        except httpx.HTTPError as e:
            raise LLMError(f"audio chat endpoint {self.url} unreachable: {type(e).__name__}") from None


__all__ = ["AudioChatLLM", "REPLY_RATE", "ReplyPart"]
