"""Several streams' chunks in one forward pass (stream/batch.py): the same chunks and caches as streaming alone."""

import threading

import pytest
import torch

from talkstream.stream.batch import ChunkBatcher, batch_key, batch_runner, batch_sizes, next_chunks
from talkstream.stream.engine import StreamConfig, StreamEngine
from talkstream.stream.runner import ChunkRunner

CONFIGS = {
    "few_step_commit": dict(sampler="few_step", timesteps=(1000, 750, 500), reference_init=0.9),
    "few_step_forcing": dict(sampler="few_step", timesteps=(1000, 500), cache_mode="timestep_forcing"),
    "euler_guided": dict(sampler="euler", steps=2, audio_guidance=2.0),
}


def _inputs(dit, i: int, tokens: int):
    g = torch.Generator().manual_seed(100 + i)
    ref = torch.randn(1, dit.cfg.in_dim, 1, 4, 4, generator=g)
    text = torch.randn(1, tokens, dit.cfg.text_dim, generator=g)
    mask = torch.ones(1, tokens, dtype=torch.bool)
    mask[0, tokens - 1 :] = tokens < 3  # one session's caption ends in padding of its own
    return ref, text, mask


def _audio(dit, engine, chunk_index: int, i: int):
    g = torch.Generator().manual_seed(1000 * i + chunk_index)
    return torch.randn(engine.chunk_size, dit.cfg.audio_tokens_per_frame, dit.cfg.audio_dim, generator=g)


def _engines(stream_models, cfg: StreamConfig, n: int):
    dit, vae = stream_models
    out = []
    for i in range(n):
        e = StreamEngine(dit, vae, StreamConfig(**{**cfg.__dict__, "seed": i}))
        ref, text, mask = _inputs(dit, i, tokens=2 + 2 * i)  # captions of different lengths
        e.start(ref, text, mask)
        out.append(e)
    return out


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_batched_chunks_equal_separate_streams(stream_models, name):
    dit, _ = stream_models
    cfg = StreamConfig(chunk=2, window=4, **CONFIGS[name])
    alone, together = _engines(stream_models, cfg, 2), _engines(stream_models, cfg, 2)
    for c in range(3):  # past the window's filling (2 chunks of 2): the cache rolls
        want = [e.next_chunk(_audio(dit, e, c, i)) for i, e in enumerate(alone)]
        assert len({batch_key(e) for e in together}) == 1  # one pass for both
        got = next_chunks(together, [_audio(dit, e, c, i) for i, e in enumerate(together)])
        for w, g in zip(want, got):
            assert (w.index, w.first_frame) == (g.index, g.first_frame)
            torch.testing.assert_close(g.latents, w.latents, rtol=0, atol=1e-5)
    for a, b in zip(alone, together):  # each cache holds its own stream: the next chunks stay equal
        assert a.cache.frame_ids == b.cache.frame_ids and a.cache.next_frame == b.cache.next_frame
        for layer in range(a.cache.num_layers):
            torch.testing.assert_close(b.cache.k[layer], a.cache.k[layer], rtol=0, atol=1e-5)
            torch.testing.assert_close(b.cache.v[layer], a.cache.v[layer], rtol=0, atol=1e-5)
            assert b.cache.k[layer].shape[0] == 1


@pytest.mark.parametrize("graphs", [False, True])
@pytest.mark.parametrize("name", ["few_step_commit", "few_step_forcing"])
def test_batches_through_a_shared_runner_equal_separate_streams(stream_models, monkeypatch, name, graphs):
    """A runner shared by the batches (``batch_runner``: CUDA graphs on a GPU; here the prepared passes, and the
    graphs stood in for by a replay of the recorded pass): three streams padded to a batch of 4, then two, then one
    alone, each chunk the one the stream makes by itself; the padding rows are dropped, and one graph per padded
    size and shape serves every batch of that size."""
    from tests.test_stream_speed import _RecordedPass

    monkeypatch.setattr(ChunkRunner, "_record", lambda self: (g := _RecordedPass(self), g.out))
    dit, _ = stream_models
    cfg = StreamConfig(chunk=2, window=4, **CONFIGS[name])
    alone, together = _engines(stream_models, cfg, 3), _engines(stream_models, cfg, 3)
    runner = ChunkRunner(dit, graphs=graphs, max_graphs=8, every_shape=True)  # as batch_runner makes it
    plan = [3, 3, 3, 2, 3, 1]  # streams in each round: the first of them (a late one waits)
    done = [0, 0, 0]
    for n in plan:
        want = [alone[i].next_chunk(_audio(dit, alone[i], done[i], i)) for i in range(n)]
        got = next_chunks(together[:n], [_audio(dit, together[i], done[i], i) for i in range(n)], runner, (1, 4))
        for w, g in zip(want, got):
            assert (w.index, w.first_frame) == (g.index, g.first_frame)
            torch.testing.assert_close(g.latents, w.latents, rtol=0, atol=1e-5)
        for i in range(n):
            done[i] += 1
    for a, b in zip(alone, together):
        assert a.cache.frame_ids == b.cache.frame_ids
        for layer in range(a.cache.num_layers):
            torch.testing.assert_close(b.cache.k[layer], a.cache.k[layer], rtol=0, atol=1e-5)
            assert b.cache.k[layer].shape[0] == 1
    if graphs:  # batches of 3 and 2 (padded to 4) at each filling level (0, 2, 4 = full) and 1 alone, full
        shapes = sorted((key[0][0], key[1]) for key in runner._states)
        assert shapes == [(1, 5), (4, 1), (4, 3), (4, 5)] and runner.captures == 4 and runner.replays > 0
    else:
        assert runner.captures == 0 and not runner._states
    assert batch_sizes(4) == (1, 2, 3, 4) and batch_sizes(10) == (1, 2, 3, 4, 6, 8, 10)
    assert batch_runner(dit, "cpu", 4) is None  # the CPU keeps its plain passes
    with pytest.raises(ValueError, match="max_batch"):
        batch_sizes(0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU (tools/device/serve_load_gpu.sh)")
def test_graphed_batches_on_a_gpu_equal_separate_streams(stream_models):
    """The real thing on a GPU: ``batch_runner``'s CUDA graphs, batches padded to ``batch_sizes``, fp32."""
    dit, vae = (m.to("cuda") for m in stream_models)
    cfg = StreamConfig(chunk=2, window=4, **CONFIGS["few_step_commit"])

    def engines(n):
        out = []
        for i in range(n):
            e = StreamEngine(dit, vae, StreamConfig(**{**cfg.__dict__, "seed": i}), device="cuda")
            ref, text, mask = _inputs(dit, i, tokens=2 + 2 * i)
            e.start(ref, text.cuda(), mask.cuda())
            out.append(e)
        return out

    alone, together = engines(3), engines(3)
    runner = batch_runner(dit, "cuda", 4)
    for c, n in enumerate([3, 3, 3, 3, 2, 1]):
        want = [alone[i].next_chunk(_audio(dit, alone[i], c, i)) for i in range(n)]
        got = next_chunks(together[:n], [_audio(dit, together[i], c, i) for i in range(n)], runner, batch_sizes(4))
        for w, g in zip(want, got):
            torch.testing.assert_close(g.latents, w.latents, rtol=1e-4, atol=1e-4)
    assert runner.captures >= 2 and runner.replays > 0


def test_streams_at_different_fill_fall_back_to_one_by_one(stream_models):
    dit, _ = stream_models
    cfg = StreamConfig(chunk=2, window=4, sampler="few_step", timesteps=(1000, 500))
    alone, together = _engines(stream_models, cfg, 2), _engines(stream_models, cfg, 2)
    alone[0].next_chunk(_audio(dit, alone[0], 0, 0))
    together[0].next_chunk(_audio(dit, together[0], 0, 0))  # one stream a chunk ahead: its window holds more
    assert batch_key(together[0]) != batch_key(together[1])
    want = [alone[0].next_chunk(_audio(dit, alone[0], 1, 0)), alone[1].next_chunk(_audio(dit, alone[1], 0, 1))]
    got = next_chunks(together, [_audio(dit, together[0], 1, 0), _audio(dit, together[1], 0, 1)])
    for w, g in zip(want, got):
        torch.testing.assert_close(g.latents, w.latents, rtol=0, atol=1e-5)
    with pytest.raises(ValueError, match="2 engines and 1 audio"):
        next_chunks(together, [None])


def test_batcher_gathers_threads_into_one_pass(stream_models):
    dit, _ = stream_models
    cfg = StreamConfig(chunk=2, window=4, sampler="few_step", timesteps=(1000, 500), cache_mode="timestep_forcing")
    alone, threaded = _engines(stream_models, cfg, 3), _engines(stream_models, cfg, 3)
    n_chunks = 4
    want = [[e.next_chunk(_audio(dit, e, c, i)).latents for c in range(n_chunks)] for i, e in enumerate(alone)]
    batcher = ChunkBatcher(max_batch=3, gather_s=2.0)  # generous: the test's threads may start late
    for e in threaded:
        batcher.attach(e)
    got: list[list] = [[] for _ in threaded]
    errors = []

    def run(i, e):
        try:
            for c in range(n_chunks):
                got[i].append(e.next_chunk(_audio(dit, e, c, i)).latents)  # the engine's own call, routed
        except BaseException as err:  # reported below
            errors.append(err)

    threads = [threading.Thread(target=run, args=(i, e)) for i, e in enumerate(threaded)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors
    for w, g in zip(want, got):
        for a, b in zip(w, g):
            torch.testing.assert_close(b, a, rtol=0, atol=1e-5)
    assert max(batcher.batches) == 3 and sum(batcher.batches) == 3 * n_chunks
    for e in threaded:
        batcher.detach(e)
    assert batcher.attached == 0
    e = threaded[0]
    e.next_chunk(_audio(dit, e, n_chunks, 0))  # detached: its own method again
    assert sum(batcher.batches) == 3 * n_chunks


def test_batcher_reports_a_failure_to_every_request(stream_models):
    dit, _ = stream_models
    cfg = StreamConfig(chunk=2, window=4, sampler="few_step", timesteps=(1000, 500))
    engines = _engines(stream_models, cfg, 2)
    batcher = ChunkBatcher(max_batch=2, gather_s=2.0)
    for e in engines:
        batcher.attach(e)
    bad = torch.zeros(2, 1, 1)  # not an audio window: the model refuses it
    errors = []

    def run(e):
        try:
            e.next_chunk(bad)
        except ValueError as err:
            errors.append(err)

    threads = [threading.Thread(target=run, args=(e,)) for e in engines]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert len(errors) == 2


def test_a_deferred_commit_pass_enters_the_cache_before_a_batch(stream_models):
    """An engine whose last chunk's commit pass waits (``StreamEngine.hand``, the engine's decode-first order) has it
    run before its cache is stacked: the batch reads the same history as the engine alone."""
    dit, _ = stream_models
    cfg = StreamConfig(chunk=2, window=4, sampler="few_step", timesteps=(1000, 500))
    alone, together = _engines(stream_models, cfg, 2), _engines(stream_models, cfg, 2)
    for e in together:
        e.hand = lambda chunk: True  # every commit pass deferred to finish_chunk / the next chunk
    for c in range(3):
        want = [e.next_chunk(_audio(dit, e, c, i)) for i, e in enumerate(alone)]
        if c == 0:  # the first chunk alone, its commit left pending
            got = [e.next_chunk(_audio(dit, e, c, i)) for i, e in enumerate(together)]
        else:
            got = next_chunks(together, [_audio(dit, e, c, i) for i, e in enumerate(together)])
        for w, g in zip(want, got):
            torch.testing.assert_close(g.latents, w.latents, rtol=0, atol=1e-5)


def test_two_conversations_avatar_loops_share_one_batcher(tiny_weights):
    """Two sessions' AvatarLoops (the server's sessions) with one ChunkBatcher: both stream frames in order, and their
    chunks were made in batches of two once their windows matched."""
    import time

    pytest.importorskip("ctranslate2")
    from talkstream.agent.avatar_loop import AvatarLoop
    from talkstream.stream.avatar import BUNDLED_REFERENCE, Avatar

    avatar = Avatar.from_pretrained(tiny_weights, size=32, sampler="few_step", timesteps=(1000, 500), window=2)
    # (the encoders load lazily: both loops ask for them at once, and Avatar loads each once)
    batcher = ChunkBatcher(max_batch=2, gather_s=0.5)
    frames: list[list[int]] = [[], []]
    loops = [AvatarLoop(avatar, BUNDLED_REFERENCE, lead=2.0, batcher=batcher) for _ in range(2)]
    for i, loop in enumerate(loops):
        loop.start(lambda f, i=i: frames[i].append(f.index))
    deadline = time.perf_counter() + 60
    while min(len(f) for f in frames) < 40 and time.perf_counter() < deadline:
        time.sleep(0.05)
    for loop in loops:
        loop.close()
    assert all(loop.error is None for loop in loops)
    for f in frames:
        assert len(f) >= 40 and f == list(range(len(f)))
    assert 2 in batcher.batches and batcher.attached == 0


def test_paced_sessions_that_share_a_batcher_ask_for_their_chunks_together(tiny_weights):
    """Two paced sessions started 0.2 s apart (the tiny model's chunk period is 0.32 s): each paced from its own
    start, they would ask for their chunks 0.2 s apart, and a batcher that gathers for 50 ms would run every chunk
    alone; on the batcher's common grid their chunks run in batches of two."""
    import time

    pytest.importorskip("ctranslate2")
    from talkstream.agent.avatar_loop import AvatarLoop
    from talkstream.stream.avatar import BUNDLED_REFERENCE, Avatar

    avatar = Avatar.from_pretrained(tiny_weights, size=32, sampler="few_step", timesteps=(1000, 500), window=2)
    avatar.whisper, avatar.encode_prompt("warm")  # noqa: B018 (the encoders load before the clocks start)
    batcher = ChunkBatcher(max_batch=2, gather_s=0.05)
    frames: list[list[int]] = [[], []]
    loops = [AvatarLoop(avatar, BUNDLED_REFERENCE, lead=0.1, batcher=batcher) for _ in range(2)]
    loops[0].start(lambda f: frames[0].append(f.index))
    time.sleep(0.2)
    loops[1].start(lambda f: frames[1].append(f.index))
    deadline = time.perf_counter() + 60
    while min(len(f) for f in frames) < 100 and time.perf_counter() < deadline:  # 4 s of video each
        time.sleep(0.05)
    for loop in loops:
        loop.close()
    assert all(loop.error is None for loop in loops)
    period = avatar.cfg.chunk * 4 / 25
    phase = (loops[1].started_at - loops[0].started_at) % period
    assert min(phase, period - phase) == pytest.approx(0.0, abs=1e-6)
    steady = batcher.batches[4:]  # (the second session's first chunks catch up with its clock)
    assert len(steady) >= 4 and steady.count(2) >= 0.75 * len(steady), batcher.batches


def test_a_request_that_waited_through_a_batch_gathers_anew_when_it_ends(tiny_weights):
    """A request that waits while a batch runs (here: the batcher held busy by hand) is joined by a stream that asks
    just after that batch ends, instead of running alone at once because its own gathering time ran out meanwhile."""
    import threading
    import time

    from talkstream.stream.avatar import BUNDLED_REFERENCE, Avatar

    avatar = Avatar.from_pretrained(tiny_weights, size=32, sampler="few_step", timesteps=(1000, 500), window=2)
    engines = [avatar.start_engine(BUNDLED_REFERENCE) for _ in range(3)]
    dit = engines[0].dit
    batcher = ChunkBatcher(max_batch=3, gather_s=0.4)
    for e in engines:
        batcher.attach(e)
    audio = torch.zeros(engines[0].chunk_size, dit.cfg.audio_tokens_per_frame, dit.cfg.audio_dim)
    for e in engines:  # the first chunks of all three, batched (the caches then hold the same frames)
        threading.Thread(target=e.next_chunk, args=(audio,)).start()
    deadline = time.perf_counter() + 30
    while sum(batcher.batches) < 3 and time.perf_counter() < deadline:
        time.sleep(0.01)
    assert batcher.batches == [3]
    with batcher._cond:
        batcher._running = True  # another batch runs
    a = threading.Thread(target=engines[0].next_chunk, args=(audio,))
    a.start()
    time.sleep(0.6)  # longer than its gathering time
    with batcher._cond:
        batcher._running = False
        batcher._cond.notify_all()
    time.sleep(0.1)
    b = threading.Thread(target=engines[1].next_chunk, args=(audio,))
    b.start()
    a.join(30), b.join(30)
    for e in engines:
        batcher.detach(e)
    assert batcher.batches == [3, 2]
    assert len(batcher.pass_s) == 2 and all(p > 0 for p in batcher.pass_s)  # each pass's seconds beside its size


def test_a_speaking_session_runs_one_chunk_further_ahead_on_the_common_grid(tiny_weights):
    """Queued reply speech is paced too: its first chunk starts at once, and the stream then stays at most ``lead`` +
    one chunk ahead of the wall clock, asking for its chunks when the silent sessions ask for theirs (before, the
    whole reply was rendered as fast as the model went, in passes of its own)."""
    import time

    import numpy as np

    pytest.importorskip("ctranslate2")
    from talkstream.agent.avatar_loop import AvatarLoop
    from talkstream.stream.avatar import BUNDLED_REFERENCE, Avatar

    avatar = Avatar.from_pretrained(tiny_weights, size=32, sampler="few_step", timesteps=(1000, 500), window=2)
    avatar.whisper, avatar.encode_prompt("warm")  # noqa: B018 (the encoders load before the clocks start)
    period = avatar.cfg.chunk * 4 / 25
    batcher = ChunkBatcher(max_batch=2, gather_s=0.05)
    arrivals: list[list[tuple[float, int, bool]]] = [[], []]
    loops = [AvatarLoop(avatar, BUNDLED_REFERENCE, lead=0.1, batcher=batcher) for _ in range(2)]
    for i, loop in enumerate(loops):
        loop.start(lambda f, i=i: arrivals[i].append((time.perf_counter(), f.index, f.reply >= 0)))
    time.sleep(2.0)
    said = time.perf_counter()
    before = len(batcher.batches)
    speech = 0.3 * np.sin(np.arange(16000 * 4) / 16000 * 2 * np.pi * 220).astype(np.float32)  # 4 s to say
    loops[0].say(speech, "speaks", reply=1)
    time.sleep(4.5)
    for loop in loops:
        loop.close()
    assert all(loop.error is None for loop in loops)
    spoken = [a for a in arrivals[0] if a[2]]
    assert spoken and spoken[0][0] - said < 1.5  # the reply starts at once
    ahead = [idx / 25 - (t - loops[0].started_at) for t, idx, _ in arrivals[0] if t > said]
    assert max(ahead) <= 0.1 + 2 * period + 0.05  # lead + one chunk (+ the chunk a frame belongs to), not 4 s
    during = batcher.batches[before + 3 :]  # (the reply's first chunks start off the grid)
    assert len(during) >= 4 and during.count(2) >= 0.6 * len(during), batcher.batches[before:]


def test_a_streams_clock_starts_at_its_first_frame(tiny_weights):
    """A player starts its clock at the first frame it gets: the stream's clock moves there too (alone: exactly; on a
    batcher: by whole chunk periods, keeping the common grid), so the stream does not run behind it and catch up
    (every later frame would then wait that long in the player's buffer)."""
    import time

    pytest.importorskip("ctranslate2")
    from talkstream.agent.avatar_loop import AvatarLoop
    from talkstream.stream.avatar import BUNDLED_REFERENCE, Avatar

    avatar = Avatar.from_pretrained(tiny_weights, size=32, sampler="few_step", timesteps=(1000, 500), window=2)
    avatar.whisper, avatar.encode_prompt("warm")  # noqa: B018 (the encoders load before the clocks start)
    period = avatar.cfg.chunk * 4 / 25
    batcher = ChunkBatcher(max_batch=2, gather_s=0.05)
    firsts: dict[int, float] = {}
    loops = [AvatarLoop(avatar, BUNDLED_REFERENCE, lead=0.1, batcher=b) for b in (None, batcher, batcher)]
    origins = []
    for i, loop in enumerate(loops):
        loop.start(lambda f, i=i: firsts.setdefault(i, time.perf_counter()))
        time.sleep(0.05)
        while loop.started_at is None:
            time.sleep(0.005)
        origins.append(loop.started_at)
        time.sleep(0.4)
    deadline = time.perf_counter() + 30
    while len(firsts) < 3 and time.perf_counter() < deadline:
        time.sleep(0.05)
    time.sleep(1.0)
    for loop in loops:
        loop.close()
    assert all(loop.error is None for loop in loops) and len(firsts) == 3
    assert abs(loops[0].started_at - firsts[0]) < 0.05  # alone: the clock starts at the first frame
    for i in (1, 2):  # on the batcher: moved by whole periods, within a period of the first frame
        moved = (loops[i].started_at - origins[i]) / period
        assert moved == pytest.approx(round(moved), abs=1e-6)
        assert 0 <= firsts[i] - loops[i].started_at < period + 0.05
    phase = (loops[2].started_at - loops[1].started_at) % period
    assert min(phase, period - phase) == pytest.approx(0.0, abs=1e-6)
    assert max(loop.behind_s(settle_s=0) for loop in loops) < period + 0.1
