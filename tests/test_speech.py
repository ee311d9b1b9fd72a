import ctypes

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from talkstream.world import speech
from talkstream.world.speech import SentenceGenerator, Voice, synthesize
from talkstream.world.visemes import MOUTH_PARAMS, mouth_track, viseme_for


def _rms(a):
    return float(np.sqrt(np.mean(a.astype(np.float64) ** 2))) if len(a) else 0.0


def test_synthesize_shapes_and_timeline():
    s = synthesize("Hello there, how are you today?")
    assert s.sample_rate == 16000 and s.audio.dtype == np.float32 and s.audio.ndim == 1
    assert 1.0 < s.duration < 4.0
    starts = [p.start for p in s.phonemes]
    assert starts == sorted(starts)
    assert s.phonemes[0].start == 0.0 and abs(s.phonemes[-1].end - s.duration) < 1e-6
    for a, b in zip(s.phonemes, s.phonemes[1:]):
        assert abs(a.end - b.start) < 1e-9  # contiguous
    assert sum(not p.is_pause for p in s.phonemes) >= 12


def test_voiced_phonemes_carry_energy_and_pauses_are_quiet():
    s = synthesize("Many morning meals, and then a long pause. Another lovely evening.")
    a, sr = s.audio, s.sample_rate
    vowels = [p for p in s.phonemes if p.symbol[:1] in "aAeEiIoOuV@3" and p.end - p.start > 0.04]
    pauses = [p for p in s.phonemes if p.is_pause and p.end - p.start > 0.08]
    assert vowels and pauses
    vowel_rms = np.median([_rms(a[int(p.start * sr) : int(p.end * sr)]) for p in vowels])
    pause_rms = np.median([_rms(a[int((p.start + 0.02) * sr) : int((p.end - 0.02) * sr)]) for p in pauses])
    assert vowel_rms > 8 * pause_rms, (vowel_rms, pause_rms)


def test_voice_parameters_change_the_audio():
    text = "The quick brown fox jumps over the lazy dog."
    slow = synthesize(text, Voice(rate=120))
    fast = synthesize(text, Voice(rate=220))
    assert fast.duration < 0.8 * slow.duration
    low, high = synthesize(text, Voice(pitch=10)), synthesize(text, Voice(pitch=90))
    assert not np.allclose(low.audio[:4000], high.audio[:4000])


def test_same_text_and_voice_give_the_same_samples_whatever_was_spoken_before():
    """espeak-ng carries state from utterance to utterance (the same text came out 35 ms shorter the first
    time in a process); each utterance now starts from a fresh engine, so world clips are a function of their seed."""
    voice = Voice(rate=198, pitch=72, range=43)
    a = synthesize("Nobody painted the heavy library last week.", voice)
    synthesize("Something else, said in between, at another pitch.", Voice(pitch=20))
    b = synthesize("Nobody painted the heavy library last week.", voice)
    assert np.array_equal(a.audio, b.audio) and a.phonemes == b.phonemes


def test_speech_errors_come_back_from_the_child_process():
    with pytest.raises(speech.EspeakError, match="no voice named"):
        synthesize("Hello there.", Voice(name="no-such-voice"))
    assert synthesize("Still speaking afterwards.").duration > 0.5


def test_non_ascii_text_is_spoken():
    s = synthesize("Grüße aus München, café au lait.")
    assert s.duration > 0.5


@pytest.mark.parametrize("text", ["", "   \n", "\u200b", "-- --"])
def test_empty_or_unspeakable_text_is_a_clear_error(text):
    with pytest.raises(ValueError, match="empty|nothing speakable"):
        synthesize(text)


def test_missing_espeak_library_is_a_clear_error(monkeypatch):
    def no_lib(*a, **k):
        raise OSError("not found")

    monkeypatch.setattr(ctypes, "CDLL", no_lib)
    speech._find_library.cache_clear()  # the path is resolved once per process
    with pytest.raises(speech.EspeakError, match="apt-get install -y espeak-ng"):
        speech._find_library()


def test_sentence_generator_is_unbounded_and_seeded():
    g = SentenceGenerator(1)
    sents = {g.sentence() for _ in range(300)}
    assert len(sents) > 200
    assert SentenceGenerator(5).utterance() == SentenceGenerator(5).utterance()
    assert any(s.endswith("?") for s in sents) and any(s.endswith(".") for s in sents)


def test_mouth_track_closes_for_bilabials_and_opens_for_vowels():
    s = synthesize("Papa, mama, baby.")
    track = mouth_track(s.phonemes, int(s.duration * 25) + 1)
    assert track.shape[1] == len(MOUTH_PARAMS)
    assert track[:, 0].max() > 0.5  # open vowels
    # inside each long-enough /m/ or /p/ the jaw is nearly closed
    for p in s.phonemes:
        if p.symbol in ("m", "p", "b") and p.end - p.start >= 0.06:
            f = int((p.start + p.end) / 2 * 25)
            assert track[f, 0] < 0.3, (p, track[f])
    # before and after speech: rest
    assert np.allclose(mouth_track(s.phonemes, 10, offset=5.0)[:, 0], 0.0, atol=1e-3)


@given(st.text(max_size=6))
@settings(max_examples=200, deadline=None)
def test_viseme_for_any_symbol(symbol):
    v = viseme_for(symbol)
    assert len(v.target) == 5 and all(0 <= x <= 1 for x in v.target)
