"""Admission by capacity: the server times what this machine holds in real time, refuses beyond it, and bounds each
session's memory; the CPU's fast path; ``talkstream bench conversation``."""

from __future__ import annotations

import pytest
import torch

from talkstream.serve.app import FAST, ServeConfig, speed_path, stream_options
from talkstream.serve.capacity import (
    Capacity,
    calibrate,
    fewer_sessions,
    given,
    memory_ok,
    session_memory_bound_mb,
    verify_sessions,
)


@pytest.fixture(scope="module")
def avatar(tiny_weights):
    from talkstream.stream.avatar import Avatar

    return Avatar.from_pretrained(tiny_weights, size=32, sampler="few_step", timesteps=(1000, 500), window=2)


@pytest.fixture(scope="module")
def ref():
    from talkstream.stream.avatar import BUNDLED_REFERENCE, load_reference

    return load_reference(BUNDLED_REFERENCE, 32)


def test_calibration_times_rounds_both_ways_and_admits_what_fits(avatar, ref):
    cap = calibrate(avatar, ref, max_sessions=2, rounds=1, measure_all=True)
    assert set(cap.round_s) == {"separate", "batched"}
    assert set(cap.round_s["separate"]) == set(cap.round_s["batched"]) == {1, 2}
    assert all(s > 0 for w in cap.round_s.values() for s in w.values())
    budget = cap.headroom * cap.chunk_video_s
    assert cap.chunk_video_s == pytest.approx(avatar.cfg.chunk * 4 / 25)

    def fits(way):  # the largest n whose round and every smaller one fit the budget
        n = 0
        while n + 1 in cap.round_s[way] and cap.round_s[way][n + 1] <= budget:
            n += 1
        return n

    best = max(fits("separate"), fits("batched"))
    assert cap.sessions == max(1, best) and cap.real_time == (best >= 1)
    if cap.batch:  # batching is chosen only where it measured at least as many sessions, and faster at that n
        assert fits("batched") == best >= 2
    assert cap.memory_per_session_mb > 0
    assert "holds" in cap.busy_message() and str(cap.sessions) in cap.busy_message()


def test_live_sessions_are_counted_as_the_server_runs_them(avatar, ref):
    """Two paced sessions on one batcher stream at 25 frames/s each, not faster (the pacing is real) and not slower
    (the tiny model keeps up); what a count that fell short tries next."""
    pytest.importorskip("ctranslate2")
    v = verify_sessions(avatar, ref, 2, batch=True, seconds=2.0)
    assert v["sessions"] == 2 and v["batch"] and len(v["fps"]) == 2
    assert 0.95 * 25 <= v["min_fps"] <= max(v["fps"]) <= 25 * 1.1, v
    assert fewer_sessions(8, 14.4) == 4 and fewer_sessions(2, 24.0) == 1 and fewer_sessions(24, 24.9) == 23
    with pytest.raises(ValueError):
        verify_sessions(avatar, ref, 0, batch=False)


def test_calibration_checks_the_admitted_count_with_live_sessions(avatar, ref):
    pytest.importorskip("ctranslate2")
    cap = calibrate(avatar, ref, max_sessions=2, rounds=1, verify_s=1.0)
    if cap.sessions == 2:  # (the rounds admitted two here: they were run live, and held)
        assert cap.verified_fps[2] >= 0.95 * 25 and "live sessions" in cap.how
    else:
        assert cap.verified_fps == {} or min(cap.verified_fps.values()) < 0.95 * 25
    assert calibrate(avatar, ref, max_sessions=2, rounds=1).verified_fps == {}  # (off unless asked)


def test_a_machine_too_slow_for_one_session_still_serves_one_and_says_so(avatar, ref):
    cap = calibrate(avatar, ref, max_sessions=4, rounds=1, headroom=1e-9)
    assert cap.sessions == 1 and not cap.real_time and not cap.batch
    assert list(cap.round_s["separate"]) == [1]  # it stops as soon as nothing fits
    with pytest.raises(ValueError):
        calibrate(avatar, ref, headroom=0)
    with pytest.raises(ValueError, match="max sessions"):
        given(0)


def test_a_sessions_memory_stays_under_its_bound(avatar, ref):
    from talkstream.stream.engine import ChunkDecoder

    e, d = avatar.start_engine(ref, *avatar.encode_prompt("listens")), ChunkDecoder(avatar.decoder)
    audio = torch.zeros(avatar.cfg.chunk, avatar.dit.cfg.audio_tokens_per_frame, avatar.dit.cfg.audio_dim)
    sizes = []
    for _ in range(5):  # past the window (2 latents)
        d(e.next_chunk(audio).latents)
        sizes.append(e.cache.nbytes())
    bound = session_memory_bound_mb(e, d.cache, avatar.size)
    assert max(sizes) == sizes[-1] == sizes[-3]  # the cache stops growing once its window is full
    assert max(sizes) / 2**20 < bound
    cap = given(2)
    cap.memory_per_session_mb = 1e9  # more than any machine has: a new session would not fit
    assert memory_ok(cap)[0] is False
    cap.memory_per_session_mb = 1.0
    assert memory_ok(cap)[0] is True


def test_the_cpu_gets_the_fast_path_unless_asked_otherwise():
    assert speed_path(ServeConfig(device="cpu")) == "fast"
    assert speed_path(ServeConfig(device="cuda")) == "quality"
    assert speed_path(ServeConfig(device="cpu", stream_options={"steps": 4})) == "quality"  # --steps: the user's
    assert speed_path(ServeConfig(device="cuda", speed="fast")) == "fast"
    assert stream_options(ServeConfig(device="cpu")) == FAST
    assert stream_options(ServeConfig(device="cpu", speed="quality")) == {}
    with pytest.raises(ValueError, match="speed must be one of"):
        speed_path(ServeConfig(speed="fastest"))


def test_bench_conversation_has_the_issues_spelling(capsys):
    from talkstream.cli import main

    for argv in (["bench", "conversation", "--help"], ["bench-conversation", "--help"]):
        with pytest.raises(SystemExit) as e:
            main(argv)
        assert e.value.code == 0
        assert "talkstream bench-conversation" in capsys.readouterr().out


def test_capacity_is_plain_data():
    cap = Capacity(2, True, True, 0.48, 0.75, {"separate": {1: 0.2}}, 12.5)
    d = cap.as_dict()
    assert d["sessions"] == 2 and d["round_s"]["separate"][1] == 0.2 and d["how"] == "measured at start-up"


def test_calibration_times_only_the_points_asked_and_stops_each_way_at_its_first_miss(avatar, ref):
    cap = calibrate(avatar, ref, max_sessions=4, rounds=1, points=[1, 3, 4])
    for way in cap.round_s.values():
        assert set(way) <= {1, 3, 4} and 1 in way
    budget = cap.headroom * cap.chunk_video_s
    for way in cap.round_s.values():  # a way is timed past a point only while every earlier point fitted
        ns = sorted(way)
        assert all(way[n] <= budget for n in ns[:-1])
    over = calibrate(avatar, ref, max_sessions=4, rounds=1, headroom=1e-9, points=[2, 4])
    assert over.sessions == 1 and not over.real_time
    assert all(list(w) == [2] for w in over.round_s.values())  # nothing fitted at 2: 4 is never timed
    with pytest.raises(ValueError, match="no point"):
        calibrate(avatar, ref, max_sessions=2, points=[5])


def test_the_load_tests_plot_lands_where_it_is_asked_and_skips_failed_levels(tmp_path, monkeypatch):
    import json
    import runpy
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    monkeypatch.chdir(tmp_path)  # (a plot written anywhere but its path would land here)
    plot = runpy.run_path(str(root / "benchmarks" / "serve_load.py"))["plot"]
    res = json.loads((root / "benchmarks" / "results" / "serve_load_512_h100.json").read_text())
    res["levels"].append(dict(sessions=8, error="RuntimeError: sessions did not start within 180 s"))
    (tmp_path / "out").mkdir()
    plot(res, str(tmp_path / "out" / "load.png"))
    assert [p.name for p in tmp_path.rglob("*.png")] == ["load.png"]


def test_the_load_tests_session_measures():
    """serve_load's per-session numbers from arrival times: frames lost, the playout delay a player started at the
    first frame needs, and a turn's reply time at the client and as heard."""
    import runpy
    from pathlib import Path

    stats = runpy.run_path(str(Path(__file__).resolve().parents[1] / "benchmarks" / "serve_load.py"))["session_stats"]
    # 50 frames at 25 fps arriving a chunk (12) at a time, 0.1 s before their timestamps; frame 30 is missing
    frames = [(10.0 + (i // 12) * 0.48 + 0.01 * (i % 12), i, 100, 20 <= i < 40, i / 25) for i in range(50) if i != 30]
    s = stats(frames, [], 10.0, 12.0, said=[10.5])
    assert s["frames_lost"] == 1 and s["frames"] == len([f for f in frames if f[0] <= 12.0])
    assert s["playout_delay_s"] == 0.0  # nothing arrives later than the first frame's pace
    assert s["turns"] == s["replied"] == 1
    assert s["reply_s"] == [round(frames[20][0] - 10.5, 3)]  # frame 20 (the first voiced) arrived at 10.78
    assert s["reply_heard_s"] == [round(10.0 + 20 / 25 - 10.5, 3)]  # ... and is shown at 10.8
    late = [f if f[1] != 45 else (f[0] + 0.5, *f[1:]) for f in frames]  # one frame half a second late
    assert stats(late, [], 10.0, 13.0)["playout_delay_s"] == round(late[44][0] - 45 / 25 - 10.0, 3)
    assert "turns" not in stats(frames, [], 10.0, 12.0)  # (no talking, no turns)
