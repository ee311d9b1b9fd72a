"""``Conversation``: the live loop of one user and one avatar (VAD -> ASR -> LLM -> TTS -> avatar), for any front-end.

    conv = Conversation(avatar, WhisperASR(), LlamaCppLLM(), PiperTTS(), image="me.png")
    await conv.start()
    await conv.push_audio(pcm16k)           # the microphone, as it arrives
    async for item in conv.frames():        # MediaFrame (image + its 40 ms of audio + pts) or Event (JSON-able)
        ...
    await conv.close()

States: ``idle`` -> ``listening`` (the user speaks; partial transcripts) -> ``thinking`` (transcribing, waiting for
the model) -> ``speaking`` (reply frames carry speech) -> ``idle``. The reply is streamed: the model's text is cut
into sentences, each synthesised and queued to the avatar as soon as it is complete. Barge-in: speech onset while the
avatar talks (or thinks) cancels the reply, drops its queued speech and frames, and mutes its audio already in flight;
a ``clear`` event tells the player to drop what it has scheduled. Preemptive reply: once the user has been silent for
``preemptive_silence`` (shorter than the VAD's end-of-turn silence) the reply is prepared (transcript, the model's
first sentence, its speech) and held; the VAD's end of the turn releases it, speech before that drops it unseen.
Failures of a stage become ``error`` events (the
model down or slow: a spoken apology; a synthesis failure: the text reply still shows) and the session goes on.
Queues are bounded: a reader that falls behind loses video images first (their audio is kept).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import time
from collections import deque
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import numpy as np

from .actions import caption_for, split_action
from .audio import SAMPLE_RATE, AudioFormatError, check_rate, to_16k
from .avatar_loop import AvatarLoop, MediaFrame
from .llm import SYSTEM_PROMPT, LLMError, sentences
from .tts import TTSError
from .vad import WINDOW, SileroVAD, TurnSegmenter, VADConfig


@dataclass
class Event:
    type: str  # state | transcript | latency | clear | error | notice
    data: dict = field(default_factory=dict)
    at: float = field(default_factory=time.perf_counter)

    def message(self) -> dict:
        return {"type": self.type, **self.data}


@dataclass(frozen=True)
class ConversationConfig:
    system_prompt: str = SYSTEM_PROMPT
    apology: str = "Sorry, I cannot reach my language model right now. Please try again in a moment."
    partial_every: float = 0.8  # seconds of new speech between partial transcripts
    history_turns: int = 6  # user + assistant pairs kept as context
    max_reply_chars: int = 400  # a reply is cut after this much text
    max_reply_sentences: int = 3  # or after this many sentences (small models ignore "one or two sentences")
    max_queue: int = 200  # items waiting for the reader; beyond it video images are dropped (audio kept)
    preemptive_silence: float | None = 0.1  # seconds of silence in a turn before its reply is prepared (None: off)
    vad: VADConfig = field(default_factory=VADConfig)


@dataclass
class TurnTimes:
    """perf_counter stamps of one turn (None until reached)."""

    speech_end: float | None = None  # the user's last voiced sample arrived
    vad_end: float | None = None  # the VAD declared the turn over
    asr_done: float | None = None
    llm_first: float | None = None  # first token
    first_sentence: float | None = None
    tts_first: float | None = None  # first reply audio synthesised and queued to the avatar
    first_frame: float | None = None  # first frame carrying reply speech left the engine
    preempted: bool = False  # prepared during the closing silence: stages done before the VAD's end count 0

    def breakdown(self) -> dict:
        def d(a, b):
            return None if a is None or b is None else round(max(0.0, b - a), 3)

        return dict(
            vad_s=d(self.speech_end, self.vad_end),
            asr_s=d(self.vad_end, self.asr_done),
            llm_first_token_s=d(self.asr_done, self.llm_first),
            first_sentence_s=d(self.asr_done, self.first_sentence),
            tts_first_audio_s=d(self.first_sentence, self.tts_first),
            avatar_first_frame_s=d(self.tts_first, self.first_frame),
            reply_audio_s=d(self.speech_end, self.tts_first),
            reply_frame_s=d(self.speech_end, self.first_frame),
        )


@dataclass
class _Preemptive:
    """A reply prepared for the speech up to ``end`` (a sample index), held until the VAD ends the turn there."""

    end: int
    task: asyncio.Task
    gate: asyncio.Event
    turn: TurnTimes


class Conversation:
    def __init__(
        self,
        avatar,
        asr=None,
        llm=None,
        tts=None,
        *,
        image=None,
        vad: SileroVAD | None = None,
        cfg: ConversationConfig | None = None,
        fallback_tts=None,
    ) -> None:
        """``avatar``: an ``Avatar`` (with ``image``, the reference) or a ready ``AvatarLoop``. ``llm``: a text model
        (``stream(messages)``) used with ``asr`` and ``tts``, or an audio chat model (``respond(messages, audio)``),
        which needs neither. ``fallback_tts`` speaks the apology when ``tts`` itself fails."""
        self.cfg = cfg or ConversationConfig()
        self.loop_avatar = avatar if isinstance(avatar, AvatarLoop) else AvatarLoop(avatar, image)
        self.asr, self.llm, self.tts, self.fallback_tts = asr, llm, tts, fallback_tts
        self.audio_native = hasattr(llm, "respond")
        if llm is None:
            raise ValueError("a conversation needs a language model (llm=)")
        if not self.audio_native and (asr is None or tts is None):
            raise ValueError("a text language model needs asr= and tts= (an audio chat model needs neither)")
        self.segmenter = TurnSegmenter(vad or SileroVAD(), self.cfg.vad)
        self.state = "idle"
        self.history: list[dict] = []
        self.turns: list[TurnTimes] = []
        self._out: deque = deque()
        self._wake = asyncio.Event()
        self._reply_task: asyncio.Task | None = None
        self._partial_task: asyncio.Task | None = None
        self._pre: _Preemptive | None = None
        self.preemptive = dict(prepared=0, released=0, dropped=0)  # replies prepared in a closing silence
        self._reply_ids = itertools.count()
        self._reply = -1  # the reply being spoken (or prepared)
        self._turn: TurnTimes | None = None
        self._since_partial = 0
        self._asr_lock = asyncio.Lock()  # one transcription at a time: a cancelled turn's never starts
        self._closed = False
        self.dropped_images = 0
        self.frames_sent = 0

    # -- life cycle ---------------------------------------------------------------------------------
    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self.loop_avatar.on_error = lambda e: self._loop.call_soon_threadsafe(self._avatar_failed, e)
        self.loop_avatar.start(lambda f: self._loop.call_soon_threadsafe(self._on_frame, f))
        self._set_state("idle")

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        for t in (self._reply_task, self._partial_task):
            if t is not None:
                t.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await t
        await asyncio.to_thread(self.loop_avatar.close)
        self._out.clear()
        self._wake.set()

    # -- output -------------------------------------------------------------------------------------
    def _emit(self, item) -> None:
        if self._closed:
            return
        self._out.append(item)
        if len(self._out) > self.cfg.max_queue:  # a slow reader: drop the oldest video image, keep its audio
            for x in self._out:
                if isinstance(x, MediaFrame) and x.image is not None:
                    x.image = None
                    self.dropped_images += 1
                    break
            else:
                if isinstance(self._out[0], MediaFrame):
                    self._out.popleft()  # only images-free frames left: the oldest goes
        if len(self._out) > 4 * self.cfg.max_queue:  # a reader that never reads: its oldest audio goes too (bounded)
            i = next((i for i, x in enumerate(self._out) if isinstance(x, MediaFrame)), None)
            if i is not None:
                del self._out[i]
        self._wake.set()

    def _event(self, type: str, **data) -> None:
        self._emit(Event(type, data))

    async def frames(self) -> AsyncIterator[MediaFrame | Event]:
        """Frames (with their audio) and events, in order, until the conversation is closed."""
        while not self._closed:
            while self._out:
                yield self._out.popleft()
            self._wake.clear()
            if not self._out and not self._closed:
                await self._wake.wait()
        while self._out:  # what came with the end (a failed stream's fatal error); close() empties it first
            yield self._out.popleft()

    def _set_state(self, state: str) -> None:
        if state != self.state or state == "idle" and not self.frames_sent:
            self.state = state
            if state != "speaking":
                self.loop_avatar.set_state(state)
            self._event("state", state=state)

    def _on_frame(self, f: MediaFrame) -> None:
        if self._closed:
            return
        if f.speech and f.reply == self._reply:
            if self.state != "speaking":
                self._set_state("speaking")
            t = self._turn
            if t is not None and t.first_frame is None:
                t.first_frame = f.made_at
                self._event("latency", **t.breakdown())
        elif self.state == "speaking" and not self.loop_avatar.pending_speech(self._reply):
            if self._reply_task is None or self._reply_task.done():
                self._set_state("idle")
        self.frames_sent += 1
        self._emit(f)

    def _avatar_failed(self, e: BaseException) -> None:
        self._event("error", code="avatar", message=f"the avatar stream stopped: {type(e).__name__}: {e}", fatal=True)
        self._closed = True
        self._wake.set()

    # -- input --------------------------------------------------------------------------------------
    async def push_audio(self, audio: np.ndarray, sample_rate: int = SAMPLE_RATE) -> None:
        """Microphone audio (float mono at ``sample_rate``) as it arrives. Raises ``AudioFormatError`` for audio
        that cannot be used (nothing of it is kept)."""
        check_rate(sample_rate)
        a = np.asarray(audio, np.float32)
        if a.ndim != 1:
            raise AudioFormatError(f"audio must be mono [samples], got shape {a.shape}")
        if not np.isfinite(a).all():
            raise AudioFormatError("audio contains NaN or infinite samples")
        if self._closed or not len(a):
            return
        a = to_16k(a, sample_rate)
        now = time.perf_counter()
        for ev in self.segmenter.push(a):
            if ev.kind == "start":
                self._user_started()
            else:
                lag = (self.segmenter.received - ev.sample) / SAMPLE_RATE
                turn = TurnTimes(speech_end=now - lag, vad_end=now)
                if ev.cut:
                    self._event("notice", code="utterance_cut", message="over the turn limit: answering so far")
                self._end_of_turn(ev.audio, turn, ev.sample)
        if self.segmenter.speaking:
            self._preempt(now)
            self._since_partial += len(a)
            if (
                not self.audio_native
                and self._since_partial >= self.cfg.partial_every * SAMPLE_RATE
                and (self._partial_task is None or self._partial_task.done())
            ):
                self._since_partial = 0
                utterance = np.concatenate(self.segmenter.utterance) if self.segmenter.utterance else None
                if utterance is not None:
                    self._partial_task = asyncio.create_task(self._partial(utterance))

    async def push_text(self, text: str) -> None:
        """A typed user turn (no speech): answered like a transcribed one."""
        text = text.strip()
        if not text:
            raise ValueError("empty text")
        if self.audio_native:
            raise ValueError("this conversation's model takes audio only")
        self._user_started()
        now = time.perf_counter()
        self._start_reply(self._reply_text(text, TurnTimes(speech_end=now, vad_end=now, asr_done=now)))

    def _user_started(self) -> None:
        busy = self._reply_task is not None and not self._reply_task.done()
        if busy or self.state == "speaking":  # barge-in
            self._interrupt()
        self._since_partial = 0
        self._set_state("listening")

    def interrupt(self) -> None:
        """Stop the avatar's reply now (as a barge-in does)."""
        self._interrupt()
        self._set_state("idle")

    def _interrupt(self) -> None:
        self._pre = None
        if self._reply_task is not None and not self._reply_task.done():
            self._reply_task.cancel()
        self.loop_avatar.interrupt(self._reply)
        kept = deque(x for x in self._out if not (isinstance(x, MediaFrame) and x.reply == self._reply))
        dropped, self._out = len(self._out) - len(kept), kept
        self._event("clear", reply=self._reply, dropped_frames=dropped)

    async def _partial(self, utterance: np.ndarray) -> None:
        """A partial transcript of the speech so far (best effort): skipped while this conversation transcribes, or
        while a recogniser shared with other conversations has every worker busy (the turns' final transcripts go
        first: partials re-transcribe the growing utterance and were most of a talking turn's recognition)."""
        if self._asr_lock.locked() or getattr(self.asr, "busy", False):
            return
        with contextlib.suppress(Exception):  # a partial transcript is best effort; the final one reports errors
            async with self._asr_lock:
                text = await asyncio.to_thread(self.asr.transcribe, utterance)
            if text and self.state == "listening":
                self._event("transcript", role="user", text=text, final=False)

    def _preempt(self, now: float) -> None:
        """While the user speaks: after ``preemptive_silence`` of silence, prepare the reply to the speech so far;
        drop a prepared one as soon as speech resumes."""
        s, pre = self.segmenter, self._pre
        if pre is not None and pre.end != s.last_speech:  # the user spoke again: that reply answers too little
            self._pre = None
            pre.task.cancel()
            self.preemptive["dropped"] += 1
        wait = self.cfg.preemptive_silence
        if self.audio_native or wait is None or self._pre is not None or s.run * WINDOW < wait * SAMPLE_RATE:
            return
        speech = s.speech_so_far()
        if not len(speech):
            return
        turn = TurnTimes(speech_end=now - (s.received - s.last_speech) / SAMPLE_RATE, preempted=True)
        gate = asyncio.Event()
        self._start_reply(self._transcribe_then_reply(speech, turn, gate))
        self._pre = _Preemptive(s.last_speech, self._reply_task, gate, turn)
        self.preemptive["prepared"] += 1

    def _end_of_turn(self, audio: np.ndarray, turn: TurnTimes, end: int) -> None:
        self._set_state("thinking")
        pre, self._pre = self._pre, None
        if pre is not None:
            if pre.end == end and not pre.task.done():  # prepared for exactly this speech: release it
                pre.turn.vad_end = turn.vad_end
                pre.gate.set()
                self.preemptive["released"] += 1
                return
            pre.task.cancel()
            self.preemptive["dropped"] += 1
        if self.audio_native:
            self._start_reply(self._reply_audio(audio, turn))
        else:
            self._start_reply(self._transcribe_then_reply(audio, turn))

    def _start_reply(self, coro) -> None:
        self._reply = next(self._reply_ids)
        self._reply_task = asyncio.create_task(coro)
        self._reply_task.add_done_callback(self._reply_done)

    def _reply_done(self, task: asyncio.Task) -> None:
        if task.cancelled():
            return
        if task.exception() is not None:
            e = task.exception()
            self._event("error", code="internal", message=f"reply failed: {type(e).__name__}: {e}")
        if self.state in ("thinking", "listening") and not self.loop_avatar.pending_speech(self._reply):
            if not self.segmenter.speaking:
                self._set_state("idle")

    # -- the reply ----------------------------------------------------------------------------------
    async def _transcribe_then_reply(
        self, audio: np.ndarray, turn: TurnTimes, gate: asyncio.Event | None = None
    ) -> None:
        """``gate``: a preemptive reply, which shows nothing until the turn's end opens it."""
        async with self._asr_lock:
            text = await asyncio.to_thread(self.asr.transcribe, audio)
        turn.asr_done = time.perf_counter()
        if not text:
            if gate is not None:
                await gate.wait()
            self._event("notice", code="empty_utterance", message="heard no words in that; still listening")
            self._set_state("idle")
            return
        await self._reply_text(text, turn, gate)

    def _messages(self) -> list[dict]:
        del self.history[: -2 * self.cfg.history_turns], self.turns[:-100]  # per-session memory stays bounded
        return [{"role": "system", "content": self.cfg.system_prompt}, *self.history]

    async def _speak(self, tts, text: str, caption: str, turn: TurnTimes) -> None:
        self._say(await asyncio.to_thread(tts.synthesize, text), caption, turn)

    def _say(self, audio: np.ndarray, caption: str, turn: TurnTimes) -> None:
        if turn.tts_first is None and len(audio):
            turn.tts_first = time.perf_counter()  # queued to the avatar (a preemptive reply's: once released)
        self.loop_avatar.say(audio, caption, self._reply)

    async def _confirm(self, text: str, turn: TurnTimes, gate: asyncio.Event | None) -> None:
        """The user's turn becomes part of the conversation (its transcript shown, the history extended): at once, or
        for a preemptive reply when the turn's end opens its gate."""
        if gate is not None:
            await gate.wait()
        self._turn = turn
        self.turns.append(turn)
        self.history.append({"role": "user", "content": text})
        self._event("transcript", role="user", text=text, final=True)

    async def _reply_text(self, text: str, turn: TurnTimes, gate: asyncio.Event | None = None) -> None:
        said: list[str] = []
        messages = [*self._messages(), {"role": "user", "content": text}]
        confirmation = asyncio.ensure_future(self._confirm(text, turn, gate))  # (at once without a gate)

        async def tokens():
            stream = self.llm.stream(messages)
            try:
                async for piece in stream:
                    if turn.llm_first is None:
                        turn.llm_first = time.perf_counter()
                    yield piece
            finally:
                if hasattr(stream, "aclose"):
                    await stream.aclose()

        cut = sentences(tokens())
        try:
            async for sentence in cut:
                action, clean = split_action(sentence)
                if not clean:
                    continue
                if turn.first_sentence is None:
                    turn.first_sentence = time.perf_counter()
                try:
                    audio, failed = await asyncio.to_thread(self.tts.synthesize, clean), None
                except TTSError as e:
                    audio, failed = None, e
                await confirmation
                said.append(clean)
                self._event("transcript", role="assistant", text=" ".join(said), final=False, action=action)
                if failed is not None:
                    self._event("error", code="tts", message=str(failed))
                else:
                    self._say(audio, caption_for(action), turn)
                if sum(len(s) for s in said) >= self.cfg.max_reply_chars or len(said) >= self.cfg.max_reply_sentences:
                    break
        except LLMError as e:
            await confirmation
            self._event("error", code="llm", message=str(e))
            said.append(self.cfg.apology)
            self._event("transcript", role="assistant", text=" ".join(said), final=False, action=None)
            for tts in (self.tts, self.fallback_tts):
                if tts is None:
                    continue
                try:
                    await self._speak(tts, self.cfg.apology, caption_for(None), turn)
                    break
                except TTSError as e2:
                    self._event("error", code="tts", message=str(e2))
        except BaseException:  # cancelled: a barge-in, or speech resuming before the turn ended
            confirmation.cancel()
            raise
        finally:  # cut short or cancelled: the model stops generating
            await cut.aclose()
        await confirmation
        reply = " ".join(said)
        self._event("transcript", role="assistant", text=reply, final=True)
        self.history.append({"role": "assistant", "content": reply})

    async def _reply_audio(self, audio: np.ndarray, turn: TurnTimes) -> None:
        turn.asr_done = time.perf_counter()  # no separate ASR
        self._turn = turn
        self.turns.append(turn)
        self._event("transcript", role="user", text=f"(spoken, {len(audio) / SAMPLE_RATE:.1f} s)", final=True)
        text, caption = "", None
        try:
            async for part in self.llm.respond(self._messages(), audio):
                if turn.llm_first is None:
                    turn.llm_first = time.perf_counter()
                if part.text:
                    action, clean = split_action(text + part.text)
                    caption = caption if caption is not None or action is None else caption_for(action)
                    text = text + part.text
                    self._event("transcript", role="assistant", text=split_action(text)[1], final=False)
                if part.audio is not None and len(part.audio):
                    if turn.first_sentence is None:
                        turn.first_sentence = turn.tts_first = time.perf_counter()
                    self.loop_avatar.say(part.audio, caption or caption_for(None), self._reply)
        except LLMError as e:
            self._event("error", code="llm", message=str(e))
            text = self.cfg.apology
            if self.fallback_tts is not None:
                with contextlib.suppress(TTSError):
                    await self._speak(self.fallback_tts, text, caption_for(None), turn)
        reply = split_action(text)[1]
        self._event("transcript", role="assistant", text=reply, final=True)
        self.history.append({"role": "user", "content": "(spoken)"})
        self.history.append({"role": "assistant", "content": reply})


__all__ = ["Conversation", "ConversationConfig", "Event", "TurnTimes"]
