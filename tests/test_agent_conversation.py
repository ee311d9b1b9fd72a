"""``Conversation`` end to end with the real embedded avatar (at 64x64 and 4 steps, to keep CPU runs short), Silero
VAD, Whisper, espeak-ng and a local stand-in LLM endpoint: a spoken turn, barge-in, and stage failures (the model
down, then slow; a hum; the voice failing)."""

from __future__ import annotations

import asyncio
import time

import numpy as np
import pytest

pytest.importorskip("onnxruntime")
pytest.importorskip("faster_whisper")

from test_agent_standins import chat_app, free_port, serve_in_thread, spoken  # noqa: E402

from talkstream.agent.avatar_loop import MediaFrame  # noqa: E402
from talkstream.agent.conversation import Conversation, Event  # noqa: E402
from talkstream.agent.llm import OpenAIChatLLM  # noqa: E402
from talkstream.agent.tts import EspeakTTS  # noqa: E402

REPLY = "[smile] Hello there! I am glad you asked, it is a lovely day to talk about anything at all."


@pytest.fixture(scope="module")
def avatar():
    from talkstream.stream.avatar import Avatar

    return Avatar.from_pretrained(size=64, decoder="tiny", steps=4)


@pytest.fixture(scope="module")
def asr():
    from talkstream.agent.asr import WhisperASR

    return WhisperASR()


class Recorder:
    """Reads a conversation's output, stamping each item with the time it came out."""

    def __init__(self, conv: Conversation) -> None:
        self.conv, self.items = conv, []
        self.task = asyncio.create_task(self._read())

    async def _read(self) -> None:
        async for item in self.conv.frames():
            self.items.append((time.perf_counter(), item))

    def events(self, type: str | None = None) -> list[Event]:
        return [x for _, x in self.items if isinstance(x, Event) and (type is None or x.type == type)]

    def frames(self) -> list[MediaFrame]:
        return [x for _, x in self.items if isinstance(x, MediaFrame)]

    def states(self) -> list[str]:
        return [e.data["state"] for e in self.events("state")]

    async def until(self, cond, conv: Conversation, limit: float, push_silence: bool = True) -> None:
        """Push silence in real time (a quiet microphone) until ``cond()`` holds."""
        deadline = time.perf_counter() + limit
        while not cond():
            if time.perf_counter() > deadline:
                await conv.close()  # the avatar's thread ends before the failure is reported
                raise AssertionError(f"timed out; events: {[e.message() for e in self.events()]}")
            if push_silence:
                await conv.push_audio(np.zeros(320, np.float32))
            await asyncio.sleep(0.02)


async def say(conv: Conversation, audio: np.ndarray) -> list[float]:
    """Push audio in real time (20 ms pieces); returns the wall time each piece went in."""
    t0, sent = time.perf_counter(), []
    for k in range(0, len(audio), 320):
        sent.append(time.perf_counter())
        await conv.push_audio(audio[k : k + 320])
        await asyncio.sleep(max(0.0, t0 + (k + 320) / 16000 - time.perf_counter()))
    return sent


def test_spoken_turn_reply_and_barge_in(avatar, asr):
    question = np.concatenate([np.zeros(4000, np.float32), spoken("How are you today?")])
    interruption = spoken("Wait, stop please.")
    onset_sample = int(np.argmax(np.abs(interruption) > 0.02))  # the first audible sample of the interruption

    async def run():
        with serve_in_thread(chat_app(REPLY)) as url:
            conv = Conversation(avatar, asr, OpenAIChatLLM(url), EspeakTTS(), image=_reference())
            await conv.start()
            rec = Recorder(conv)
            await say(conv, question)
            await rec.until(lambda: any(f.speech for f in rec.frames()), conv, 240)
            await rec.until(lambda: sum(f.speech for f in rec.frames()) >= 6, conv, 240)
            reply_id = next(f.reply for f in rec.frames() if f.speech)
            sent = await say(conv, np.concatenate([np.zeros(1600, np.float32), interruption[: onset_sample + 4800]]))
            onset_wall = sent[(1600 + onset_sample) // 320]  # when the piece holding the first audible sample went in
            await rec.until(lambda: rec.events("clear"), conv, 10)
            n_clear = len(rec.frames())
            await rec.until(lambda: len(rec.frames()) > n_clear + 12, conv, 120)
            await conv.close()
            await rec.task
            return rec, reply_id, onset_wall

    rec, reply_id, onset_wall = asyncio.run(run())
    states = rec.states()
    assert states[:4] == ["idle", "listening", "thinking", "speaking"], states
    user = [e.data["text"] for e in rec.events("transcript") if e.data["role"] == "user" and e.data["final"]]
    assert "how are you" in user[0].lower()
    latency = rec.events("latency")[0].data
    assert all(v is not None and v >= 0 for v in latency.values()), latency
    speech = [f for f in rec.frames() if f.speech]
    assert speech[0].caption == "smiles and speaks calmly"  # the reply's action tag reached the prompt track
    assert all(np.abs(f.audio).max() > 0 for f in speech[:3])
    assert all(not np.abs(f.audio).any() for f in rec.frames() if not f.speech)  # the avatar is silent otherwise
    # barge-in: the clear came within 200 ms of the interruption's onset, and no reply audio after it
    clear_at, clear = next((t, x) for t, x in rec.items if isinstance(x, Event) and x.type == "clear")
    assert clear.data["reply"] == reply_id
    print(f"barge-in: onset -> clear {1000 * (clear.at - onset_wall):.0f} ms")
    assert clear.at - onset_wall <= 0.2, clear.at - onset_wall
    after = [x for t, x in rec.items if isinstance(x, MediaFrame) and t > clear_at]
    # silent after the clear, up to the answer to the interruption itself (a newer reply, which may come quickly: it
    # is prepared during the interruption's closing silence)
    assert after and all(not f.speech and not np.abs(f.audio).any() for f in after if f.reply <= reply_id)
    assert "listening" in states[states.index("speaking") :]
    idx = [f.index for f in rec.frames()]
    assert idx == sorted(idx) and len(set(idx)) == len(idx)  # video keeps flowing forward


def _reference():
    from talkstream.serve.app import REFERENCE

    return REFERENCE


def test_failures_are_spoken_or_reported_and_the_conversation_goes_on(avatar, asr):
    broken_tts = EspeakTTS()
    broken_tts.exe = "/bin/false"

    async def run():
        # the model is down: an error event, then the apology is spoken (by the fallback voice)
        conv = Conversation(
            avatar,
            asr,
            OpenAIChatLLM(f"http://127.0.0.1:{free_port()}", connect_timeout=1),
            broken_tts,
            image=_reference(),
            fallback_tts=EspeakTTS(),
        )
        await conv.start()
        rec = Recorder(conv)
        await conv.push_text("Hello?")
        await rec.until(lambda: any(f.speech for f in rec.frames()), conv, 240)
        # a hum is not a turn: the VAD hears a voice, the transcript is empty, nothing is answered
        await say(conv, np.concatenate([spoken("mmmmmmmm"), np.zeros(12000, np.float32)]))
        await rec.until(lambda: rec.events("notice"), conv, 120)
        # the model is slow (no first token within its timeout): an error event and the apology again
        with serve_in_thread(chat_app("Too late.", first_delay=5.0)) as url:
            conv.llm = OpenAIChatLLM(url, first_token_timeout=0.5)
            await conv.push_text("Are you there?")
            await rec.until(lambda: len([e for e in rec.events("error") if e.data["code"] == "llm"]) >= 2, conv, 30)
            n_final = lambda: sum(e.data["final"] and e.data["role"] == "assistant" for e in rec.events("transcript"))
            await rec.until(lambda: n_final() >= 2, conv, 60)  # the apology's turn ends before the next one
        # the synthesizer fails: an error event, the text reply still shows, the avatar keeps streaming
        with serve_in_thread(chat_app("Fine, thanks.")) as url:
            conv.llm = OpenAIChatLLM(url)
            n_before = len(rec.events("transcript"))
            await conv.push_text("How are you?")
            await rec.until(
                lambda: any(e.data["final"] and e.data["role"][0] == "a" for e in rec.events("transcript")[n_before:]),
                conv,
                60,
            )
        n = len(rec.frames())
        await rec.until(lambda: len(rec.frames()) > n + 12, conv, 120)
        await conv.close()
        await rec.task
        return rec

    rec = asyncio.run(run())
    codes = [e.data["code"] for e in rec.events("error")]
    assert codes.count("llm") == 2 and codes.count("tts") >= 3, codes  # the apologies via the broken voice, the reply
    assert "timed out" in [e.data["message"] for e in rec.events("error") if e.data["code"] == "llm"][1]
    finals = [e.data["text"] for e in rec.events("transcript") if e.data["final"] and e.data["role"] == "assistant"]
    assert finals[0].startswith("Sorry") and finals[1].startswith("Sorry") and finals[-1] == "Fine, thanks."
    assert rec.events("notice")[0].data["code"] == "empty_utterance"
    assert not any(e.data.get("fatal") for e in rec.events("error"))


def test_audio_native_model_answers_speech_with_speech(avatar, asr):
    from test_agent_standins import audio_chat_app

    from talkstream.agent.audio_chat import AudioChatLLM

    question = np.concatenate([np.zeros(4000, np.float32), spoken("Please open the window."), np.zeros(12000)])

    async def run():
        with serve_in_thread(audio_chat_app(asr, EspeakTTS())) as url:
            conv = Conversation(avatar, None, AudioChatLLM(url), None, image=_reference())  # no ASR, no TTS here
            await conv.start()
            rec = Recorder(conv)
            await say(conv, question)
            await rec.until(lambda: sum(f.speech for f in rec.frames()) >= 4, conv, 240)
            await rec.until(lambda: rec.events("latency"), conv, 60)
            await conv.close()
            await rec.task
            return rec

    rec = asyncio.run(run())
    finals = [e.data for e in rec.events("transcript") if e.data["final"]]
    assert finals[0]["role"] == "user" and finals[0]["text"].startswith("(spoken")
    assert finals[1]["role"] == "assistant" and "window" in finals[1]["text"].lower()
    assert not finals[1]["text"].startswith("[")  # the action tag went to the prompt track, not the transcript
    speech = [f for f in rec.frames() if f.speech]
    assert speech[0].caption == "speaks calmly" and all(np.abs(f.audio).max() > 0 for f in speech[:3])
    assert rec.states()[:4] == ["idle", "listening", "thinking", "speaking"]


def _ask(avatar, asr, *pieces: np.ndarray) -> tuple[Recorder, Conversation, list[dict], list[int]]:
    """Speak ``pieces`` in real time, one after another, then wait for the reply's first speech frame. Returns the
    recording, the conversation, the model's requests and the count of prepared replies after each piece."""

    async def run():
        app = chat_app(REPLY)
        with serve_in_thread(app) as url:
            conv = Conversation(avatar, asr, OpenAIChatLLM(url), EspeakTTS(), image=_reference())
            await conv.start()
            rec, prepared = Recorder(conv), []
            for piece in pieces:
                await say(conv, piece)
                prepared.append(conv.preemptive["prepared"])
            await rec.until(lambda: any(f.speech for f in rec.frames()), conv, 240)
            await conv.close()
            await rec.task
            return rec, conv, app.state.requests, prepared

    return asyncio.run(run())


def test_the_reply_is_prepared_in_the_closing_silence_and_shown_only_when_the_turn_ends(avatar, asr):
    question = np.concatenate([np.zeros(4000, np.float32), spoken("How are you today?")])
    rec, conv, requests, _ = _ask(avatar, asr, question)
    p = conv.preemptive  # (a pause between words may have started one that the next word dropped)
    assert p["released"] == 1 and p["dropped"] == p["prepared"] - 1, p
    turn = conv.turns[0]
    assert turn.preempted and turn.asr_done < turn.tts_first
    assert turn.tts_first >= turn.vad_end  # its speech went to the avatar only once the VAD had ended the turn
    assert 1 <= len(requests) <= p["prepared"] and "how are you" in requests[-1]["messages"][-1]["content"].lower()
    events = rec.events()
    thinking = next(k for k, e in enumerate(events) if e.type == "state" and e.data["state"] == "thinking")
    before = [e for e in events[:thinking] if e.type == "transcript"]  # nothing of the reply before the turn ended
    assert all(e.data["role"] == "user" and not e.data["final"] for e in before), [e.message() for e in before]
    assert [m["role"] for m in conv.history] == ["user", "assistant"]


def test_speech_after_a_pause_drops_the_prepared_reply_and_the_whole_turn_is_answered(avatar, asr):
    first, second = spoken("How are you"), spoken("on this sunny morning?")
    first = first[: np.nonzero(np.abs(first) > 0.01)[0][-1] + 320]  # without espeak-ng's closing 0.33 s of silence
    pause = np.zeros(int(0.35 * 16000), np.float32)  # longer than preemptive_silence (0.1 s), shorter than the turn's
    # end (0.5 s)
    opening = np.concatenate([np.zeros(4000, np.float32), first, pause])
    rec, conv, requests, prepared = _ask(avatar, asr, opening, second)
    prepared_in_pause = prepared[0]
    p = conv.preemptive
    assert prepared_in_pause >= 1 and p["dropped"] >= 1 and p["released"] == 1, p
    finals = [e.data["text"].lower() for e in rec.events("transcript") if e.data["role"] == "user" and e.data["final"]]
    assert len(finals) == 1 and "morning" in finals[0], finals  # one turn, both parts of it
    assert "morning" in requests[-1]["messages"][-1]["content"].lower()
    assert [m["role"] for m in conv.history] == ["user", "assistant"]
    assert "morning" in conv.history[0]["content"].lower()
    assert len({f.reply for f in rec.frames() if f.speech}) == 1
    assert rec.states().count("thinking") == 1


def test_partial_transcripts_give_way_when_the_shared_recogniser_is_busy(avatar, asr):
    """Partial transcripts re-transcribe the growing utterance; a recogniser shared with other conversations that has
    every worker busy (``WhisperASR.busy``) gets only the turn's final transcription from this one."""
    import threading

    class Saturated:  # the shared recogniser as other sessions keep it: every worker busy
        busy = True

        def __init__(self, inner) -> None:
            self.inner, self.calls = inner, 0

        def transcribe(self, audio):
            self.calls += 1
            return self.inner.transcribe(audio)

    question = np.concatenate([np.zeros(4000, np.float32), spoken("What is the weather like on this sunny morning?")])
    assert len(question) > 2.5 * 16000  # long enough for partials every 0.8 s of speech
    shared = Saturated(asr)
    rec, conv, _, _ = _ask(avatar, shared, question)
    transcripts = [e.data for e in rec.events("transcript") if e.data["role"] == "user"]
    assert [t["final"] for t in transcripts] == [True] and "weather" in transcripts[0]["text"].lower()
    assert shared.calls <= conv.preemptive["prepared"] + 1  # the turn's own transcriptions, no partials
    # the real recogniser says when it is saturated: busy while its one worker transcribes, free again after
    assert not asr.busy
    seen = []
    worker = threading.Thread(target=asr.transcribe, args=(question,))
    worker.start()
    while worker.is_alive():
        seen.append(asr.busy)
    worker.join()
    assert any(seen) and not asr.busy
