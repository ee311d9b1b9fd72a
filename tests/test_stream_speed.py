"""The streaming path's speed options: timestep-forcing cache, a one-latent first chunk, warm-up, wall-clock pacing,
the compute dtype choice. Behaviour only (what is computed, what enters the cache); timings live in benchmarks."""

import numpy as np
import pytest
import torch

from talkstream.stream.accel import cpu_has_bf16, set_threads, stream_dtype
from talkstream.stream.chunk import denoise_chunk
from talkstream.stream.engine import AudioFeed, ChunkDecoder, StreamConfig, StreamEngine, StreamStats
from talkstream.stream.pacing import PacingStats, paced, percentiles, prefetch
from talkstream.stream.runner import ChunkRunner

A = 384


def _ref(seed=1):
    return torch.randn(1, 8, 1, 4, 4, generator=torch.Generator().manual_seed(seed))


def _audio(k, seed=0):
    return torch.randn(1, k, 8, A, generator=torch.Generator().manual_seed(seed))  # tiny: 8 audio tokens a latent


def _spy(dit):
    calls = []
    orig = dit.forward_chunk

    def spy(x, t, cache, *a, commit=False, **kw):
        calls.append((x.clone(), float(torch.as_tensor(t).flatten()[0]), commit))
        return orig(x, t, cache, *a, commit=commit, **kw)

    return calls, spy


@pytest.mark.parametrize("sampler", ["few_step", "euler"])
def test_timestep_forcing_caches_the_last_steps_own_keys_instead_of_a_commit_pass(stream_models, monkeypatch, sampler):
    dit, _ = stream_models
    sig = StreamConfig(sampler=sampler, steps=3, timesteps=(1000, 750, 500)).sigmas()
    out, caches, calls = {}, {}, {}
    for mode in ("commit", "timestep_forcing"):
        cache = dit.new_cache(window=4)
        dit.prefill_sinks(_ref(), cache)
        calls[mode], spy = _spy(dit)
        monkeypatch.setattr(dit, "forward_chunk", spy)
        g = torch.Generator().manual_seed(0)
        noise = torch.randn(1, 8, 2, 4, 4, generator=g)
        a = _audio(2)
        out[mode] = denoise_chunk(dit, cache, noise, sig, None, a, generator=g, sampler=sampler, cache_mode=mode)
        monkeypatch.undo()
        caches[mode] = cache
    # the same chunk comes out (what a chunk writes never changes its own output) ...
    torch.testing.assert_close(out["commit"], out["timestep_forcing"])
    # ... from one pass fewer: commit = 3 steps + a clean pass at t=0; forcing = 3 steps, the last one writing
    assert [c[2] for c in calls["commit"]] == [False, False, False, True] and calls["commit"][-1][1] == 0.0
    assert [c[2] for c in calls["timestep_forcing"]] == [False, False, True]
    last_x, last_t, _ = calls["timestep_forcing"][-1]
    assert last_t == pytest.approx(float(sig[-2]) * 1000, rel=1e-5) and last_t > 0
    # the forcing cache holds exactly the keys/values of the last step's noisy input at its own timestep
    ref_cache = dit.new_cache(window=4)
    dit.prefill_sinks(_ref(), ref_cache)
    dit.forward_chunk(last_x, last_t, ref_cache, None, _audio(2), commit=True)
    for layer in (0, len(dit.blocks) - 1):
        torch.testing.assert_close(caches["timestep_forcing"].k[layer], ref_cache.k[layer])
        torch.testing.assert_close(caches["timestep_forcing"].v[layer], ref_cache.v[layer])
        assert (caches["timestep_forcing"].k[layer] - caches["commit"].k[layer]).abs().max() > 1e-4
    assert caches["timestep_forcing"].next_frame == caches["commit"].next_frame == 2


def test_timestep_forcing_with_audio_guidance_reads_the_cache_before_writing(stream_models, monkeypatch):
    dit, _ = stream_models
    sig = StreamConfig(sampler="few_step", timesteps=(1000, 500)).sigmas()
    cache = dit.new_cache(window=4)
    dit.prefill_sinks(_ref(), cache)
    calls, spy = _spy(dit)
    monkeypatch.setattr(dit, "forward_chunk", spy)
    g = torch.Generator().manual_seed(0)
    noise = torch.randn(1, 8, 2, 4, 4, generator=g)
    mode = "timestep_forcing"
    denoise_chunk(dit, cache, noise, sig, None, _audio(2), generator=g, audio_guidance=2.0, cache_mode=mode)
    # 2 steps x (unconditional, conditional); only the last conditional pass writes, after its unconditional twin
    assert [c[2] for c in calls] == [False, False, False, True]
    assert cache.n_context == 2


def test_cache_mode_and_first_chunk_errors():
    with pytest.raises(ValueError, match="cache_mode"):
        StreamConfig(cache_mode="clean")
    with pytest.raises(ValueError, match="first_chunk"):
        StreamConfig(first_chunk=-1)
    with pytest.raises(ValueError, match="cache_mode"):
        denoise_chunk(None, None, torch.zeros(1), torch.tensor([1.0, 0.0]), cache_mode="x")


def _stream(dit, vae, cfg, n_chunks, warm=False):
    eng = StreamEngine(dit, vae, cfg)
    eng.start(_ref())
    if warm:
        eng.warm_up()
    feed = AudioFeed(0, 0)
    feed.push(np.random.default_rng(3).standard_normal((400, A)).astype(np.float32))
    asked, sizes = [], []
    orig = eng.next_chunk

    def spy(audio):
        c = orig(audio)
        sizes.append(c.latents.shape[2])
        return c

    eng.next_chunk = spy

    def audio_for(first, k):
        asked.append((first, k))
        return feed.windows(first, k)

    frames = list(eng.frames(audio_for, n_chunks=n_chunks))
    return eng, frames, asked, sizes


def test_a_first_chunk_of_one_latent_shows_one_frame_first(stream_models):
    dit, vae = stream_models
    eng, frames, asked, sizes = _stream(dit, vae, StreamConfig(chunk=2, window=4, steps=2, first_chunk=1), 3)
    assert sizes == [1, 2, 2] and asked == [(0, 1), (1, 2), (3, 2)]
    idx = [i for i, _ in frames]
    assert idx == list(range(1 + 4 * 4))  # latent 0 is frame 0 alone, each later latent 4 frames
    assert eng.cache.next_frame == 5 and eng.cache.n_context == 4


def test_warm_up_leaves_the_stream_as_started(stream_models):
    dit, vae = stream_models
    cfg = StreamConfig(chunk=2, window=4, steps=2, first_chunk=1, cache_mode="timestep_forcing")
    _, cold, *_ = _stream(dit, vae, cfg, 3)
    eng, warm, *_ = _stream(dit, vae, cfg, 3, warm=True)
    assert len(cold) == len(warm) and all(a[0] == b[0] and (a[1] == b[1]).all() for a, b in zip(cold, warm))
    assert eng.n_chunks == 3


class FakeClock:
    def __init__(self):
        self.t = 100.0

    def __call__(self):
        return self.t

    def sleep(self, s):
        assert s > 0
        self.t += s


def _bursty(clock, chunks, per_chunk, gap):
    """``per_chunk`` frames at once every ``gap`` seconds, made on their own thread (``prefetch``): chunk c is ready
    at start + (c + 1) gap whatever the consumer sleeps meanwhile."""
    start = clock.t
    for c in range(chunks):
        clock.t = max(clock.t, start + (c + 1) * gap)
        yield from (c * per_chunk + j for j in range(per_chunk))


def test_pacing_spreads_bursts_to_the_frame_rate():
    clock = FakeClock()
    stats = PacingStats(25.0)
    out = list(paced(_bursty(clock, 5, 12, 0.4), 25.0, stats=stats, clock=clock, sleep=clock.sleep))
    assert out == list(range(60))
    assert np.allclose(stats.intervals, 0.04) and stats.late == 0  # faster than real time: every frame on its slot
    s = stats.summary()
    assert s["inter_frame_ms"]["p99"] == pytest.approx(40.0) and s["av_offset_ms"]["max"] == pytest.approx(0.0)
    assert s["fps_delivered"] == pytest.approx(25.0)


def test_pacing_counts_late_frames_and_keeps_the_clock():
    clock = FakeClock()
    stats = PacingStats(25.0)
    list(paced(_bursty(clock, 4, 12, 0.6), 25.0, stats=stats, clock=clock, sleep=clock.sleep))
    # 12 frames every 0.6 s is 20 FPS: each later chunk falls 0.12 s further behind its slots
    assert stats.late == 3 + 6 + 9 and stats.summary()["av_offset_ms"]["max"] == pytest.approx(360.0)
    clock2 = FakeClock()
    buffered = PacingStats(25.0)
    list(paced(_bursty(clock2, 4, 12, 0.6), 25.0, delay=0.4, stats=buffered, clock=clock2, sleep=clock2.sleep))
    assert buffered.late == 0 and np.allclose(buffered.intervals, 0.04)  # a playout buffer absorbs the deficit
    with pytest.raises(ValueError, match="fps"):
        list(paced([1], 0))


def test_prefetch_runs_the_source_ahead_on_its_own_thread_and_passes_errors():
    import threading

    seen = []

    def source():
        for i in range(5):
            seen.append(threading.current_thread().name)
            yield i

    assert list(prefetch(source(), 2)) == list(range(5))
    assert set(seen) == {"ts-prefetch"}  # (the name top -H shows, and the soak's per-thread CPU)

    def broken():
        yield 1
        raise ValueError("bad audio")

    with pytest.raises(ValueError, match="bad audio"):
        list(prefetch(broken(), 2))


def test_percentiles_of_nothing():
    assert percentiles([]) == {"p50": None, "p95": None, "p99": None, "max": None}


def test_stream_dtype_follows_the_device_and_the_cpu():
    assert stream_dtype("cuda") == torch.bfloat16
    assert stream_dtype("cpu", "fp32") == torch.float32 and stream_dtype("cpu", torch.float16) == torch.float16
    assert stream_dtype("cpu") == (torch.bfloat16 if cpu_has_bf16() else torch.float32)
    assert not cpu_has_bf16(frozenset({"avx2", "avx512f"}))  # no native bf16: emulated bf16 is slower than fp32
    with pytest.raises(ValueError, match="dtype"):
        stream_dtype("cpu", "int8")
    n = torch.get_num_threads()
    try:
        assert set_threads(1) == 1 and torch.get_num_threads() == 1
        with pytest.raises(ValueError, match="threads"):
            set_threads(0)
    finally:
        torch.set_num_threads(n)


@pytest.mark.parametrize("anchor", ["reference", "anchor_heavy", "rolling_sink"])
@pytest.mark.parametrize("cache_mode", ["commit", "timestep_forcing"])
def test_the_prepared_runner_streams_what_the_plain_passes_stream(stream_models, anchor, cache_mode):
    dit, vae = stream_models
    cfg = StreamConfig(chunk=2, window=4, sampler="few_step", timesteps=(1000, 500), anchor=anchor)
    cfg = StreamConfig(**{**cfg.__dict__, "cache_mode": cache_mode, "first_chunk": 1})
    plain, frames_plain, *_ = _stream(dit, vae, cfg, 5)
    fast, frames_fast, *_ = _stream(dit, vae, StreamConfig(**{**cfg.__dict__, "runner": "prepared"}), 5)
    assert fast.runner is not None and plain.runner is None
    for layer in (0, len(dit.blocks) - 1):  # the caches match ...
        torch.testing.assert_close(fast.cache.k[layer], plain.cache.k[layer], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(fast.cache.v[layer], plain.cache.v[layer], atol=1e-5, rtol=1e-5)
    # ... and so do the frames (uint8: at most one level apart where a float lands on a rounding edge)
    a = np.stack([f for _, f in frames_plain]).astype(int)
    b = np.stack([f for _, f in frames_fast]).astype(int)
    assert a.shape == b.shape and np.abs(a - b).max() <= 1
    with pytest.raises(ValueError, match="runner"):
        StreamConfig(runner="turbo")


class _RecordedPass:
    """Stands in for a CUDA graph on a CPU: replays the pass over the buffers it was recorded with (a graph reads and
    writes fixed addresses, whatever the runner holds at replay time)."""

    def __init__(self, runner):
        self.runner = runner
        self.state = {n: getattr(runner, n) for n in (*ChunkRunner._STATE[:-2], "first_frame")}
        self.out = runner._pass()

    def replay(self):
        r = self.runner
        now = {n: getattr(r, n) for n in self.state}
        r.__dict__.update(self.state)
        try:
            self.out.copy_(r._pass())
        finally:
            r.__dict__.update(now)


@pytest.mark.parametrize("anchor", ["reference", "anchor_heavy"])
@pytest.mark.parametrize("cache_mode", ["commit", "timestep_forcing"])
def test_graphed_shapes_first_chunk_and_full_window_are_kept_across_streams(
    stream_models, monkeypatch, anchor, cache_mode
):
    """runner="graphs": the first chunk (sinks only) and the full window have the same shapes in every stream; each
    gets one graph, recorded by the first stream and replayed by the next (a restart keeps the runner), over its own
    buffers. Replayed as recorded, three streams give the plain passes' frames and caches."""
    monkeypatch.setattr(ChunkRunner, "_record", lambda self: (g := _RecordedPass(self), g.out))
    dit, vae = stream_models
    cfg = StreamConfig(chunk=2, window=4, sampler="few_step", timesteps=(1000, 500), anchor=anchor, first_chunk=1)
    cfg = StreamConfig(**{**cfg.__dict__, "cache_mode": cache_mode})
    plain, frames_plain, *_ = _stream(dit, vae, cfg, 5)
    eng = StreamEngine(dit, vae, StreamConfig(**{**cfg.__dict__, "runner": "prepared"}))
    eng.runner = ChunkRunner(dit, graphs=True)  # (the engine graphs on CUDA only)
    feed_audio = np.random.default_rng(3).standard_normal((400, A)).astype(np.float32)
    captures = []
    for _ in range(3):
        eng.start(_ref())
        feed = AudioFeed(0, 0)
        feed.push(feed_audio)
        frames = list(eng.frames(feed.windows, n_chunks=5))
        captures.append(eng.runner.captures)
        a = np.stack([f for _, f in frames_plain]).astype(int)
        b = np.stack([f for _, f in frames]).astype(int)
        assert a.shape == b.shape and np.abs(a - b).max() <= 1
        for layer in (0, len(dit.blocks) - 1):
            torch.testing.assert_close(eng.cache.k[layer], plain.cache.k[layer], atol=1e-5, rtol=1e-5)
    assert captures == [2, 2, 2]  # the first chunk's graph and the full window's, recorded once
    assert eng.runner.replays > 0 and len(eng.runner._states) == 2


def _emit_stream(dit, vae, emit, n_chunks=4, audio_for=None, async_decode=True):
    cfg = StreamConfig(chunk=2, window=4, steps=2, first_chunk=1, cache_mode="timestep_forcing", emit=emit)
    eng = StreamEngine(dit, vae, cfg, async_decode=async_decode)
    eng.start(_ref())
    feed = AudioFeed(0, 0)
    feed.push(np.random.default_rng(3).standard_normal((400, A)).astype(np.float32))
    return eng, eng.frames(audio_for or feed.windows, n_chunks=n_chunks), feed


def test_latency_emit_streams_the_same_frames_in_the_same_order(stream_models):
    dit, vae = stream_models
    out = {}
    for emit, sync in (("overlapped", False), ("latency", False), ("latency", True)):
        _, frames, _ = _emit_stream(dit, vae, emit, async_decode=not sync)
        out[emit, sync] = list(frames)
    ref = out["overlapped", False]
    assert [i for i, _ in ref] == list(range(1 + 3 * 2 * 4))
    stats = StreamStats()
    eng, _, _ = _emit_stream(dit, vae, "latency")  # (its own frames() call below, with a StreamStats)
    for _ in eng.frames(lambda f, k: torch.zeros(k, 8, A), n_chunks=4, stats=stats):
        pass
    assert len(stats.chunk_latency_s) == stats.chunks == 4 and min(stats.chunk_latency_s) > 0
    for other in out.values():
        assert [i for i, _ in other] == [i for i, _ in ref]
        assert all((a[1] == b[1]).all() for a, b in zip(ref, other))
    with pytest.raises(ValueError, match="emit"):
        StreamConfig(emit="soon")


@pytest.mark.parametrize("emit", ["overlapped", "latency"])
def test_latency_emit_shows_a_chunk_while_the_next_chunks_audio_is_still_coming(stream_models, emit):
    """Live audio: chunk 2's audio arrives only after the viewer has seen chunk 1 (or after 1 s). With
    ``emit="latency"`` chunk 1's frames leave as soon as they are decoded, without waiting for chunk 2; the
    overlapped mode holds them until chunk 2 has been denoised, so its audio wait runs out first."""
    import threading

    dit, vae = stream_models
    seen_chunk1 = threading.Event()
    waited_out = []
    feed = AudioFeed(0, 0)
    feed.push(np.random.default_rng(3).standard_normal((400, A)).astype(np.float32))

    def audio_for(first, k):
        if first == 3:  # chunk 2 (latents 3-4): its audio "arrives" once chunk 1 has been shown
            waited_out.append(not seen_chunk1.wait(1.0))
        return feed.windows(first, k)

    _, frames, _ = _emit_stream(dit, vae, emit, n_chunks=3, audio_for=audio_for)
    got = []
    for idx, _ in frames:
        got.append(idx)
        if idx == 1:  # chunk 1's first frame (chunk 0 is frame 0 alone)
            seen_chunk1.set()
    assert got == list(range(1 + 2 * 2 * 4))
    assert waited_out == [emit == "overlapped"]


def test_latency_emit_raises_the_producers_error_and_stops_when_closed(stream_models):
    import threading

    dit, vae = stream_models

    def broken(first, k):
        if first > 0:
            raise RuntimeError("microphone unplugged")
        return torch.zeros(k, 8, A)

    _, frames, _ = _emit_stream(dit, vae, "latency", n_chunks=None, audio_for=broken)
    with pytest.raises(RuntimeError, match="unplugged"):
        list(frames)
    asked = []

    def endless(first, k):
        asked.append(first)
        return torch.zeros(k, 8, A)

    before = threading.active_count()
    _, frames, _ = _emit_stream(dit, vae, "latency", n_chunks=None, audio_for=endless)
    assert next(frames)[0] == 0
    frames.close()  # the producer stops at its next chunk; no thread is left behind
    n = len(asked)
    assert threading.active_count() == before and n <= 4


def _reference_frames(dit, vae, cfg, audio, n_chunks):
    """Today's order: each chunk denoised and committed (and its anchors updated), then decoded."""
    eng = StreamEngine(dit, vae, cfg)
    eng.start(_ref())
    decode = ChunkDecoder(vae)
    out = []
    for _ in range(n_chunks):
        chunk = eng.next_chunk(audio(eng.next_latent, eng.chunk_size))
        out += [(chunk.first_frame + j, f) for j, f in enumerate(decode(chunk.latents))]
    return eng, out


@pytest.mark.parametrize(
    "emit, extra",
    [
        ("overlapped", dict()),
        ("latency", dict(anchor="anchor_heavy", runner="prepared")),
        ("sync", dict(anchor="rolling_sink")),
        ("overlapped", dict(anchor="memory_bank", long_term_every=1, short_term=2, refine_every=2)),
        ("latency", dict(sampler="euler", steps=2, audio_guidance=2.0)),
    ],
)
def test_the_commit_pass_runs_after_the_chunk_is_handed_to_the_decoder_with_the_same_frames(
    stream_models, monkeypatch, emit, extra
):
    """cache_mode="commit": a chunk's commit pass writes keys/values only the next chunk reads, so the engine hands
    the clean chunk to its decoder first. Every commit pass here waits until that chunk has been decoded (it would
    wait forever if the decode came after it), and the frames are bit-identical to denoise -> commit -> decode, over
    a window that rolls (chunk 2, window 4, 5 chunks) and with the anchors that read the committed chunk."""
    import threading

    from talkstream.stream import engine as engine_mod

    dit, vae = stream_models
    kw = dict(sampler="few_step", timesteps=(1000, 500), chunk=2, window=4, first_chunk=1, cache_mode="commit")
    cfg = StreamConfig(**{**kw, **extra, "emit": "latency" if emit == "latency" else "overlapped"})
    feed_audio = np.random.default_rng(3).standard_normal((600, A)).astype(np.float32)

    def audio_for(feed):
        return lambda first, k: feed.windows(first, k)

    feed = AudioFeed(0, 0)
    feed.push(feed_audio)
    ref_eng, want = _reference_frames(dit, vae, cfg, audio_for(feed), 5)
    decoded, commits, first_seen = [], [], []
    done = threading.Condition()
    orig_decode, orig_commit = ChunkDecoder.__call__, engine_mod.commit_chunk

    def spy_decode(self, z):
        out = orig_decode(self, z)
        with done:
            decoded.append(z.shape[2])
            done.notify_all()
        return out

    def spy_commit(*a, **kw):
        with done:  # the chunk being committed has been decoded
            assert done.wait_for(lambda: len(decoded) > len(commits), timeout=60), "commit pass before its decode"
            commits.append(len(decoded))
        return orig_commit(*a, **kw)

    monkeypatch.setattr(ChunkDecoder, "__call__", spy_decode)
    monkeypatch.setattr(engine_mod, "commit_chunk", spy_commit)
    eng = StreamEngine(dit, vae, cfg, async_decode=emit != "sync")
    eng.start(_ref())
    feed = AudioFeed(0, 0)
    feed.push(feed_audio)
    got = []
    for i, f in eng.frames(audio_for(feed), n_chunks=5):
        if not got and emit != "latency":  # on a CPU the first chunk is shown before its commit pass
            first_seen.append(len(commits))
        got.append((i, f))
    assert len(commits) == 5 and len(decoded) == 5
    assert first_seen in ([], [0])
    if emit != "latency":
        assert first_seen == [0]
    assert [i for i, _ in got] == [i for i, _ in want] == list(range(1 + 4 * 2 * 4))
    assert all((a[1] == b[1]).all() for a, b in zip(want, got))
    # the engine is left as after committing everything: its next chunk is the reference run's next chunk
    monkeypatch.undo()
    assert eng.next_latent == ref_eng.next_latent
    audio = feed.windows(eng.next_latent, 2)
    torch.testing.assert_close(eng.next_chunk(audio).latents, ref_eng.next_chunk(audio).latents, atol=0, rtol=0)


def test_defer_commit_first_decodes_only_the_first_chunk_before_its_commit_pass_with_the_same_frames(
    stream_models, monkeypatch
):
    """defer_commit="first" (what "auto" means on CUDA with the overlapped emit): the first chunk goes to the decoder
    before its commit pass (the time to the first frame), every later chunk is committed first (the order before);
    the frames are those of denoise -> commit -> decode. "auto" resolves per device and emit mode."""
    from talkstream.stream import engine as engine_mod
    from talkstream.stream.engine import defer_mode

    assert defer_mode("auto", "cuda:0", "overlapped") == "first"
    assert defer_mode("auto", "cuda", "latency") == defer_mode("auto", "cpu", "overlapped") == "all"
    assert defer_mode("off", "cuda", "overlapped") == "off"
    with pytest.raises(ValueError, match="defer_commit"):
        StreamConfig(defer_commit=True)
    dit, vae = stream_models
    kw = dict(sampler="few_step", timesteps=(1000, 500), chunk=2, window=4, first_chunk=1, cache_mode="commit")
    cfg = StreamConfig(**kw, defer_commit="first")
    feed_audio = np.random.default_rng(3).standard_normal((600, A)).astype(np.float32)
    feed = AudioFeed(0, 0)
    feed.push(feed_audio)
    _, want = _reference_frames(dit, vae, cfg, lambda first, k: feed.windows(first, k), 4)
    events = []
    orig_decode, orig_commit = ChunkDecoder.__call__, engine_mod.commit_chunk

    def spy_decode(self, z):
        events.append("decode")
        return orig_decode(self, z)

    def spy_commit(*a, **kw):
        events.append("commit")
        return orig_commit(*a, **kw)

    monkeypatch.setattr(ChunkDecoder, "__call__", spy_decode)
    monkeypatch.setattr(engine_mod, "commit_chunk", spy_commit)
    eng = StreamEngine(dit, vae, cfg, async_decode=False)
    eng.start(_ref())
    feed = AudioFeed(0, 0)
    feed.push(feed_audio)
    got = list(eng.frames(lambda first, k: feed.windows(first, k), n_chunks=4))
    assert events == ["decode", "commit"] + ["commit", "decode"] * 3
    assert [i for i, _ in got] == [i for i, _ in want]
    assert all((a[1] == b[1]).all() for a, b in zip(want, got))


def test_a_busy_caller_does_not_hold_up_the_commit_pass_in_latency_emit(stream_models, monkeypatch):
    """emit="latency", cache_mode="commit": while the caller is still busy with chunk 0's frames, the producer
    denoises chunk 1 (handed at once), then chunk 2, whose hand-off finds the caller busy: chunk 2's commit pass
    runs anyway and only the hand-off waits."""
    import threading

    from talkstream.stream import engine as engine_mod

    dit, vae = stream_models
    commits = []
    three = threading.Event()
    orig = engine_mod.commit_chunk

    def spy_commit(*a, **kw):
        orig(*a, **kw)
        commits.append(1)
        if len(commits) == 3:
            three.set()

    monkeypatch.setattr(engine_mod, "commit_chunk", spy_commit)
    cfg = StreamConfig(chunk=2, window=4, sampler="few_step", timesteps=(1000, 500), first_chunk=1, emit="latency")
    eng = StreamEngine(dit, vae, cfg)
    eng.start(_ref())
    feed = AudioFeed(0, 0)
    feed.push(np.random.default_rng(3).standard_normal((400, A)).astype(np.float32))
    frames = eng.frames(feed.windows, n_chunks=4)
    next(frames)  # the caller holds chunk 0's frames
    assert three.wait(60), f"{len(commits)} commit passes while the caller was busy"
    rest = list(frames)
    assert len(rest) == 1 + 2 * 4 * 3 - 1 and len(commits) == 4
