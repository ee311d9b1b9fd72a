"""The live path's threads on a CPU: the decode worker's priority and name, the per-stage record of a stream,
per-thread CPU accounting, the decoder's pixel conversion. Behaviour only: the frames are
the same with every setting; timings live in benchmarks (docs/speed.md)."""

import os
import threading
import time

import numpy as np
import pytest
import torch

from talkstream.stream.engine import AudioFeed, ChunkDecoder, StreamConfig, StreamEngine, StreamStats
from talkstream.stream.threads import lower_thread_priority, name_thread, thread_cpu_seconds, thread_named

A = 384


def _stream(dit, vae, n_chunks=4, stats=None, **cfg):
    c = StreamConfig(chunk=2, window=4, sampler="few_step", timesteps=(1000, 500), first_chunk=1, **cfg)
    eng = StreamEngine(dit, vae, c)
    eng.start(torch.randn(1, 8, 1, 4, 4, generator=torch.Generator().manual_seed(1)))
    feed = AudioFeed(0, 0)
    feed.push(np.random.default_rng(3).standard_normal((400, A)).astype(np.float32))
    return list(eng.frames(feed.windows, n_chunks=n_chunks, stats=stats))


def _comm(tid: int) -> str:
    with open(f"/proc/self/task/{tid}/comm") as f:
        return f.read().strip()


@pytest.mark.skipif(not os.path.exists("/proc/self/task"), reason="Linux threads")
@pytest.mark.parametrize("emit", ["latency", "overlapped"])
def test_a_nicer_decode_thread_decodes_the_same_frames(stream_models, monkeypatch, emit):
    dit, vae = stream_models
    seen = []
    call = ChunkDecoder.__call__

    def spy(self, z):
        tid = threading.get_native_id()
        seen.append((threading.current_thread().name, _comm(tid), os.getpriority(os.PRIO_PROCESS, tid)))
        return call(self, z)

    monkeypatch.setattr(ChunkDecoder, "__call__", spy)
    base = os.getpriority(os.PRIO_PROCESS, threading.get_native_id())
    same = _stream(dit, vae, emit=emit, decode_nice=0)
    at_base, seen[:] = list(seen), []
    nicer = _stream(dit, vae, emit=emit, decode_nice=5)
    assert [i for i, _ in same] == [i for i, _ in nicer] == list(range(1 + 3 * 2 * 4))
    assert all((a == b).all() for (_, a), (_, b) in zip(same, nicer))  # bit-identical frames
    assert len(seen) == len(at_base) == 4
    assert {s for s in at_base} == {("ts-decode", "ts-decode", base)}  # named; 0: the denoiser's priority
    assert {s for s in seen} == {("ts-decode", "ts-decode", min(19, base + 5))}
    assert os.getpriority(os.PRIO_PROCESS, threading.get_native_id()) == base  # the caller's thread is untouched
    with pytest.raises(ValueError, match="decode_nice"):
        StreamConfig(decode_nice=20)


@pytest.mark.skipif(not os.path.exists("/proc/self/task"), reason="Linux threads")
def test_the_latency_producer_thread_is_named(stream_models, monkeypatch):
    dit, vae = stream_models
    names = []
    nxt = StreamEngine.next_chunk

    def spy(self, audio):
        names.append(_comm(threading.get_native_id()))
        return nxt(self, audio)

    monkeypatch.setattr(StreamEngine, "next_chunk", spy)
    _stream(dit, vae, n_chunks=2, emit="latency")
    assert names == ["ts-producer"] * 2


@pytest.mark.parametrize("emit", ["latency", "overlapped"])
def test_stream_stats_record_each_stage_of_each_chunk(stream_models, emit):
    dit, vae = stream_models
    stats = StreamStats()
    _stream(dit, vae, n_chunks=3, stats=stats, emit=emit)
    assert stats.chunks == 3 and set(stats.stages) == {"audio", "denoise", "decode"}
    for name, times in stats.stages.items():
        assert len(times) == 3 and all(t >= 0 for t in times), name
    assert all(t > 0 for t in stats.stages["denoise"] + stats.stages["decode"])


class _Fixed(torch.nn.Module):
    """A decoder whose output is ``y`` whatever it is given."""

    def __init__(self, y: torch.Tensor) -> None:
        super().__init__()
        self.y, self.w = y, torch.nn.Parameter(torch.zeros(1, dtype=y.dtype))

    def forward(self, z, cache):
        return self.y


def test_the_decoders_pixels_are_the_formulas_for_either_decoder_dtype():
    """The in-place conversion equals ((clamp(y, -1, 1) + 1) * 127.5).round() as uint8 [T, H, W, 3], values outside
    [-1, 1] and exact .5 roundings included, and leaves the decoder's output as it was."""
    for dtype in (torch.bfloat16, torch.float32):
        y = (torch.randn(1, 3, 5, 6, 7, generator=torch.Generator().manual_seed(0)) * 1.5).to(dtype)
        y[0, 0, 0, 0, :3] = torch.tensor([-1.0, 1.0, 1 / 255 - 1.0])  # exact ends; a value at a .5 rounding
        kept = y.clone()

        got = ChunkDecoder(_Fixed(y))(torch.zeros(1, 8, 2, 4, 4))
        want = ((y[0].permute(1, 2, 3, 0).float().clamp(-1, 1) + 1) * 127.5).round().byte().numpy()
        assert got.dtype == np.uint8 and got.shape == (5, 6, 7, 3) and got.flags["C_CONTIGUOUS"]
        assert (got == want).all() and torch.equal(y, kept)


def test_the_decoder_records_each_calls_time(stream_models):
    _, vae = stream_models
    times = []
    dec = ChunkDecoder(vae, times)
    dec(torch.randn(1, 8, 1, 4, 4))
    dec(torch.randn(1, 8, 2, 4, 4))
    assert len(times) == 2 and all(t > 0 for t in times)


@pytest.mark.skipif(not os.path.exists("/proc/self/task"), reason="Linux threads")
def test_thread_cpu_seconds_sums_by_name_and_keeps_threads_that_ended():
    seen = {}

    def busy():
        name_thread("ts-test-busy")
        t = time.process_time()
        x = 0
        while time.process_time() - t < 0.15:  # (process time: at least this much of this thread's)
            x += 1
        thread_cpu_seconds(seen)  # sampled while alive

    th = threading.Thread(target=busy)
    th.start()
    th.join()
    cpu = thread_cpu_seconds(seen)  # the thread has ended: still counted from the sample
    assert 0.0 < cpu["ts-test-busy"] and sum(cpu.values()) <= time.process_time() + 0.05


@pytest.mark.skipif(not os.path.exists("/proc/self/task"), reason="Linux threads")
def test_thread_named_restores_the_names_and_lower_priority_only_lowers():
    tid = threading.get_native_id()
    before, os_before, nice = threading.current_thread().name, _comm(tid), os.getpriority(os.PRIO_PROCESS, tid)
    with thread_named("ts-test"):
        assert threading.current_thread().name == "ts-test" and _comm(tid) == "ts-test"
    assert threading.current_thread().name == before and _comm(tid) == os_before
    assert lower_thread_priority(0) == 0

    out = []

    def nicer():
        base = os.getpriority(os.PRIO_PROCESS, threading.get_native_id())
        out.append((base, lower_thread_priority(3), os.getpriority(os.PRIO_PROCESS, threading.get_native_id())))

    th = threading.Thread(target=nicer)
    th.start()
    th.join()
    base, got, now = out[0]
    assert got == now == min(19, base + 3)
    assert os.getpriority(os.PRIO_PROCESS, tid) == nice  # this thread untouched
