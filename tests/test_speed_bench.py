"""`talkstream bench`: the engine benchmark, the ladder, the soak's frame health, and the CLI's JSON + plot
(plumbing on a tiny random model; no timing is asserted)."""

import json

import numpy as np
import pytest

from talkstream.eval.bench_cli import ladder
from talkstream.eval.soak import FrameHealth, push_live
from talkstream.eval.speed import EngineCase, engine_bench
from talkstream.models.checkpoint import save_checkpoint
from talkstream.models.config import TinyDecoderConfig, vae_config
from talkstream.models.vae import TinyDecoder


@pytest.fixture(scope="module")
def weights(tiny_weights):
    """conftest's tiny causal model + VAE (this module's own folder), with a tiny decoder beside them."""
    tiny = TinyDecoder(TinyDecoderConfig(latent_dim=vae_config("tiny").latent_dim, channels=(8, 8, 8)))
    save_checkpoint(tiny_weights / "tiny_decoder.safetensors", tiny, "tiny_decoder", tiny.cfg)
    return tiny_weights


def test_engine_bench_times_the_avatars_path_with_pacing(weights):
    case = EngineCase(steps=1, chunk=2, window=4, size=32, first_chunk=1, dtype="fp32")
    r = engine_bench(case, str(weights), chunks=4, pace=True)
    assert r["frames"] == 1 + 4 * (2 * 3) and r["chunks"] == 4
    assert r["case"] == "few_step1_tf_first1_tiny_fp32_c2w4_32px" and r["dtype_used"] == "float32"
    assert r["ttff_s"] > 0 and r["steady_fps"] > 0 and r["cpu_s_per_chunk"] > 0 and len(r["loadavg_before"]) == 3
    p = r["paced"]
    assert p["frames"] == r["frames"] and set(p["inter_frame_ms"]) == {"p50", "p95", "p99", "max"}
    assert p["inter_frame_ms"]["p50"] >= 39.0  # released no faster than 25 a second (a sleep never returns early)


FIELDS = ("sampler", "steps", "dtype", "decoder", "cache_mode", "first_chunk")


def test_the_ladder_adds_one_speed_up_per_row():
    rows = ladder()
    assert rows[0].sampler == "euler" and rows[0].dtype == "fp32" and rows[0].decoder == "vae"
    changed = [
        sum(
            getattr(a, f) != getattr(b, f)
            for f in ("sampler", "steps", "dtype", "decoder", "cache_mode", "first_chunk")
        )
        for a, b in zip(rows, rows[1:])
    ]
    assert changed[0] == 2 and all(c == 1 for c in changed[1:])  # euler 8 -> few_step 4, then one change a row
    assert len({r.name for r in rows}) == len(rows)


def test_frame_health_counts_black_blank_and_frozen_runs():
    rng = np.random.default_rng(0)
    h = FrameHealth()
    for _ in range(3):
        h.add(rng.integers(0, 255, (8, 8, 3), dtype=np.uint8))
    h.add(np.zeros((8, 8, 3), np.uint8))  # black
    h.add(np.full((8, 8, 3), 128, np.uint8))  # blank
    still = rng.integers(0, 255, (8, 8, 3), dtype=np.uint8)
    for _ in range(30):  # one frozen run, counted once
        h.add(still)
    assert h.counts() == dict(black=1, blank=1, frozen_runs=1)


def test_push_live_sends_packets_then_closes():
    from talkstream.stream.avatar import LiveAudio

    live = LiveAudio(wait=0.01)
    push_live(live, np.arange(1000, dtype=np.float32), seconds=0.3, packet=0.1)
    got = [a for a in live if len(a)]
    assert [len(a) for a in got] == [1600] * 3 and got[0][1000] == 0 and got[1][0] == 600  # looped


def test_cli_bench_writes_json_and_plot(weights, tmp_path):
    from talkstream.cli import main

    out = tmp_path / "b.json"
    args = ["bench", "--case", "--weights", str(weights), "--steps", "1", "--chunk", "2", "--window", "4"]
    assert main([*args, "--size", "32", "--chunks", "2", "--dtype", "fp32", "--out", str(out)]) == 0
    res = json.loads(out.read_text())
    assert len(res["results"]) == 1 and "machine" in res and out.with_suffix(".png").stat().st_size > 1000


def test_the_sweep_covers_sizes_and_windows_and_plots(tmp_path):
    from talkstream.eval.bench_cli import plot_sweep, sweep

    cases = sweep(EngineCase())
    assert {(c.size, c.window) for c in cases} == {(s, w) for s in (128, 256, 384) for w in (3, 6, 9)}
    fake = [dict(config=dict(size=c.size, window=c.window), steady_fps=float(c.window)) for c in cases]
    plot_sweep(fake, tmp_path / "s.png", "t")
    assert (tmp_path / "s.png").stat().st_size > 1000


def test_soak_streams_live_speech_paced_and_records_each_minute(weights, tmp_path, monkeypatch):
    """A 6-second soak of live espeak-ng speech on the tiny model: every frame released at the frame rate, the
    per-minute row with its identity distance (probed after the stream from the saved frames, which are removed),
    frame health and the emit mode recorded."""
    import tempfile

    from talkstream.eval.soak import soak

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    out = tmp_path / "soak.json"
    seen = []
    from talkstream.stream.avatar import Avatar

    orig = Avatar.from_pretrained
    monkeypatch.setattr(Avatar, "from_pretrained", lambda *a, **k: seen.append(orig(*a, **k)) or seen[-1])
    res = soak(0.1, out, weights=str(weights), steps=1, progress=False, size=64)
    assert seen[0].size == 64 and res["config"]["size"] == 64  # the stream's size, as asked
    s, rows = res["summary"], res["per_minute"]
    assert json.loads(out.read_text())["summary"] == s and out.with_suffix(".png").is_file()
    assert res["config"]["emit"] == "latency" and res["config"]["pace_delay_s"] == 1.0
    assert 6 * 25 <= s["frames"] <= 6 * 25 + 13  # 6 s of speech + the last hop's padding: no silence slipped in
    assert len(rows) == 1 and rows[0]["identity_distance"] > 0 and rows[0]["chunks_so_far"] > 0
    assert 0 < s["chunk_latency_ms"]["p50"] <= s["chunk_latency_ms"]["max"] <= rows[0]["chunk_latency_ms"]["max"]
    assert s["black_frames"] == 0 and s["inter_frame_ms"]["p50"] >= 39.0 and s["ttff_s"] > 0
    assert not list(tmp_path.glob("talkstream-soak-*"))  # the identity frames are gone
    # where the time went: each stage's wall time a chunk, CPU a chunk by thread (each with its OpenMP workers)
    assert set(s["stage_ms"]) == set(rows[0]["stage_ms"]) == {"audio", "denoise", "decode"}
    assert s["stage_ms"]["denoise"]["p50"] > 0 and s["stage_ms"]["decode"]["p50"] > 0
    by_thread = s["cpu_s_per_chunk_by_thread"]
    assert by_thread["ts-producer"] > 0 and by_thread["ts-decode"] > 0 and "ts-whisper" in by_thread
    assert 0 < sum(by_thread.values()) <= s["cpu_s_per_chunk"] * 1.05 + 0.01
    assert 0 < s["process_cores_busy"] and 0 < s["machine_busy_fraction"] <= 1
    assert 20 < s["fps_delivered"] < 30 and rows[0]["fps_delivered"] > 0  # paced at 25 (the tiny model keeps up)
    assert res["config"]["decode_nice"] == 0 and "gomp_spincount" in res["config"]
