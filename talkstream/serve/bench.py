"""``talkstream bench-conversation``: spoken questions pushed in real time through the whole loop (VAD -> ASR -> LLM ->
TTS -> avatar) exactly as the server runs it, timing each stage from the end of the user's speech."""

from __future__ import annotations

import asyncio
import os
import statistics
import time

import numpy as np

QUESTIONS = ("Hello, how are you today?", "What is your favourite colour?", "Can you tell me a short joke?")


def _median(xs):
    xs = [x for x in xs if x is not None]
    return None if not xs else round(statistics.median(xs), 3)


async def _run(models, turns: int, progress: bool, reply_timeout: float) -> dict:
    from ..agent.avatar_loop import MediaFrame
    from ..agent.conversation import Conversation, Event
    from ..world.speech import synthesize

    conv = Conversation(
        models.avatar_loop(models.images["reference"]),
        models.asr,
        models.llm,
        None if models.asr is None else models.tts(None),
        cfg=models.conversation_config(),
        fallback_tts=models.fallback_tts,
    )
    await conv.start()
    frames = speech_frames = 0
    events: list[dict] = []
    done = asyncio.Event()

    async def reader():
        nonlocal frames, speech_frames
        async for item in conv.frames():
            if isinstance(item, MediaFrame):
                frames += 1
                speech_frames += item.speech
            elif isinstance(item, Event):
                events.append(item.message())
                if progress:
                    print(f"  {time.perf_counter() - t0:7.2f}s {item.message()}", flush=True)
                if item.type == "state" and item.data["state"] == "idle" and conv.turns:
                    done.set()

    t0 = time.perf_counter()
    task = asyncio.create_task(reader())
    piece = 320  # 20 ms, as the page sends
    for i in range(turns):
        q = QUESTIONS[i % len(QUESTIONS)]
        audio = np.concatenate([np.zeros(8000, np.float32), synthesize(q).audio, np.zeros(16000, np.float32)])
        done.clear()
        start = time.perf_counter()
        for k in range(0, len(audio), piece):  # real time: a microphone cannot speak faster
            await conv.push_audio(audio[k : k + piece])
            await asyncio.sleep(max(0.0, start + (k + piece) / 16000 - time.perf_counter()))
        silence = np.zeros(piece, np.float32)
        deadline = time.perf_counter() + reply_timeout
        while not done.is_set() and time.perf_counter() < deadline:
            await conv.push_audio(silence)
            await asyncio.sleep(piece / 16000)
    elapsed = time.perf_counter() - t0
    await conv.close()
    task.cancel()
    rows = [t.breakdown() for t in conv.turns]
    keys = rows[0].keys() if rows else []
    return dict(
        turns=rows,
        median={k: _median([r[k] for r in rows]) for k in keys},
        transcripts=[e for e in events if e["type"] == "transcript" and e.get("final")],
        errors=[e for e in events if e["type"] == "error"],
        frames=frames,
        speech_frames=speech_frames,
        preemptive=dict(conv.preemptive),
        engine_fps=round(frames / elapsed, 2),
        seconds=round(elapsed, 1),
    )


def run_bench(cfg, turns: int = 3, progress: bool = True, reply_timeout: float = 240.0) -> dict:
    from ..machine import describe
    from .app import Models, stream_options

    t = time.perf_counter()
    load_before = os.getloadavg()[0]  # the machine may be shared: its load is part of the measurement
    models = Models(cfg)
    load_s = time.perf_counter() - t
    res = asyncio.run(_run(models, turns, progress, reply_timeout))
    res["load_average_1min"] = dict(start=round(load_before, 2), end=round(os.getloadavg()[0], 2))
    return dict(
        what="end of the user's speech -> first reply audio (reply_audio_s) and first reply frame (reply_frame_s), "
        "by stage; questions spoken by espeak-ng pushed in real time in 20 ms pieces",
        device=cfg.device,
        size=cfg.size,
        decoder=cfg.decoder,
        speed=models.speed,
        avatar_nice=cfg.avatar_nice,
        preemptive_silence=cfg.preemptive_silence,
        avatar_decode="sync" if cfg.device == "cpu" else "latency",  # AvatarLoop's decode="auto"
        stream_options={k: list(v) if isinstance(v, tuple) else v for k, v in stream_options(cfg).items()},
        stream_config=str(models.avatar.cfg),
        dtype=str(next(models.avatar.dit.parameters()).dtype),
        llm=models.llm.name if cfg.llm_url is None else f"{models.llm.name} {cfg.llm_url}",
        voice=None if models.asr is None else cfg.voice,
        models_load_s=round(load_s, 1),
        **res,
        machine=describe(),
    )


__all__ = ["QUESTIONS", "run_bench"]
