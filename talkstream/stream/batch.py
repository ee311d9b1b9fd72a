"""Several streams' chunks denoised in one forward pass: one model shared by many sessions.

Each session keeps its own ``StreamEngine`` (its own KV cache, noise generator, prompt, anchors); for one chunk their
inputs are stacked on the batch dimension: the noisy chunks, the audio windows, the captions (padded to the longest,
masked) and, per layer, the caches' [sinks | window] keys and values. Every pass of the step schedule then runs once
for all of them, and the caches are split back afterwards. Rolling RoPE re-bases positions every chunk, so streams at
different points in time share a pass as long as their caches hold the same number of frames (after the first few
chunks all windows are full). Each session's noise comes from its own generator in its own order, so a batched chunk
is the chunk the session would have made alone (``tests/test_batch.py``: equal in fp32 to 1e-5).

    chunks = next_chunks([engine_a, engine_b], [audio_a, audio_b])     # one call, two sessions' chunks

``ChunkBatcher`` does this for streams that run in their own threads (the server's sessions): each engine is
attached to it, and an engine's ``next_chunk`` then waits a few milliseconds for the other attached engines' requests
and runs them together. Whether a batch is faster than separate passes depends on the device and the size
(``benchmarks/serve_load.py --batch``): the server measures it when it starts and batches only where it is faster.

On CUDA the batches run through one shared ``ChunkRunner`` (``batch_runner``) whose passes are CUDA graphs: a small
model's eager pass is thousands of kernel launches, which the sessions' threads slow further by contending for the
interpreter (docs/serve.md: 1 real-time session at 256x256 through the server eager, 32 graphed). Graphs need fixed
shapes, so batches are padded to ``BATCH_SIZES`` and captions to ``TEXT_STEP`` tokens.
"""

from __future__ import annotations

import math
import threading
import time
from dataclasses import dataclass, field

import torch

from ..models.kv_cache import KVCache
from .chunk import denoise_chunk, uses_runner
from .engine import Chunk, StreamEngine
from .runner import ChunkRunner


def batch_key(engine: StreamEngine) -> tuple | None:
    """What must be equal for engines to share a pass (None: this engine never batches)."""
    c, cache = engine.cfg, engine.cache
    if getattr(engine.dit.cfg, "omniavatar", False) or cache.sink_frames:  # frame-0-dependent inputs
        return None
    return (
        id(engine.dit),
        str(engine.device),
        engine.dtype,
        c.sampler,
        tuple(engine.sigmas.tolist()),
        c.cache_mode,
        c.audio_guidance,
        engine.chunk_size,
        cache.n_sink,
        cache.n_context,
        cache.window,
        tuple(engine.reference.shape),
        engine.text is None,
        engine.text is None or engine.text.shape[-1],
    )


def stack_caches(caches: list[KVCache]) -> KVCache:
    """One cache whose layers hold every cache's keys and values on the batch dimension (same frame counts)."""
    first = caches[0]

    def cat(tensors):
        return None if tensors[0] is None else torch.cat(tensors, 0)

    n = first.num_layers
    return KVCache(
        n,
        first.window,
        [cat([c.sink_k[i] for c in caches]) for i in range(n)],
        [cat([c.sink_v[i] for c in caches]) for i in range(n)],
        [cat([c.k[i] for c in caches]) for i in range(n)],
        [cat([c.v[i] for c in caches]) for i in range(n)],
        frame_ids=list(first.frame_ids),
        next_frame=first.next_frame,
        ref_tokens=cat([c.ref_tokens for c in caches]),
        reference=cat([c.reference for c in caches]),
    )


TEXT_STEP = 16  # a graphed batch's captions are padded to a multiple of this many tokens (and always masked)


def _stack_text(
    engines: list[StreamEngine], step: int | None = None
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """The engines' captions on the batch dimension, padded to the longest (``step``: to a multiple of it, with a
    mask even where nothing is padded, so that a graphed batch keeps its shapes whatever its captions are)."""
    if engines[0].text is None:
        return None, None
    L = max(e.text.shape[1] for e in engines)
    if step:
        L = -(-L // step) * step
    texts, masks = [], []
    for e in engines:
        t = e.text
        m = e.text_mask if e.text_mask is not None else torch.ones(t.shape[:2], dtype=torch.bool, device=t.device)
        texts.append(torch.nn.functional.pad(t, (0, 0, 0, L - t.shape[1])))
        masks.append(torch.nn.functional.pad(m.bool(), (0, L - m.shape[1])))
    if not step and all(e.text_mask is None for e in engines) and all(e.text.shape[1] == L for e in engines):
        return torch.cat(texts), None
    return torch.cat(texts), torch.cat(masks)


def _own_chunk(engine: StreamEngine, audio: torch.Tensor | None) -> Chunk:
    """The engine's own ``next_chunk`` (not a ``ChunkBatcher``'s routing of it, which would wait for itself)."""
    return type(engine).next_chunk(engine, audio)


BATCH_SIZES = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64)  # what a graphed runner's batches are padded to


def batch_sizes(max_batch: int) -> tuple[int, ...]:
    """The padded batch sizes for batches of at most ``max_batch`` streams: ``BATCH_SIZES`` below it, then itself."""
    if max_batch < 1:
        raise ValueError(f"max_batch must be >= 1, got {max_batch}")
    return tuple(s for s in BATCH_SIZES if s < max_batch) + (max_batch,)


def batch_runner(dit, device: str, max_batch: int) -> ChunkRunner | None:
    """The runner several streams' batched chunks share on ``device``: on CUDA their passes are replayed as CUDA
    graphs, one per padded batch size (``batch_sizes``), instead of launched kernel by kernel; elsewhere None (the
    plain passes, as measured on the CPU). Every shape is graphed: the window's filling levels recur with every
    session that joins."""
    if not str(device).startswith("cuda") or not ChunkRunner.supports(dit):
        return None
    return ChunkRunner(dit, graphs=True, max_graphs=4 * len(batch_sizes(max_batch)) + 4, every_shape=True)


@torch.no_grad()
def next_chunks(
    engines: list[StreamEngine],
    audios: list[torch.Tensor | None],
    runner: ChunkRunner | None = None,
    sizes: tuple[int, ...] | None = None,
) -> list[Chunk]:
    """Each engine's next chunk (``StreamEngine.next_chunk(audio)``), denoised in one batch. The engines must share
    ``batch_key``; engines that do not run one by one. ``runner``: one shared by the batches (``batch_runner``;
    not with audio guidance), through which even a single engine's chunk runs; with a graphed runner the batch is
    padded to the smallest of ``sizes`` that holds it (copies of its last stream, whose results are dropped) and
    its captions to a multiple of ``TEXT_STEP`` tokens, so that a few graphs serve every batch."""
    if len(engines) != len(audios):
        raise ValueError(f"{len(engines)} engines and {len(audios)} audio windows")
    for e in engines:  # a commit pass an engine deferred (StreamEngine.hand) enters its cache first
        e.finish_chunk()
    keys = {batch_key(e) for e in engines}
    shared = runner is not None and uses_runner(runner, audios[0], engines[0].cfg.audio_guidance)
    if (
        (len(engines) == 1 and not shared)
        or len(keys) != 1
        or None in keys
        or len({id(e) for e in engines}) != len(engines)
    ):
        return [_own_chunk(e, a) for e, a in zip(engines, audios)]
    if (audios[0] is None) != all(a is None for a in audios) or any(a is None for a in audios[1:]) != (
        audios[0] is None
    ):
        return [_own_chunk(e, a) for e, a in zip(engines, audios)]
    n, graphed = len(engines), shared and runner.graphs
    pad = next((s for s in sorted(sizes) if s >= n), n) - n if graphed and sizes else 0
    e0 = engines[0]
    k, dev, c = e0.chunk_size, e0.device, e0.cfg
    noise = torch.cat([e.start_noise() for e in engines])  # StreamEngine.next_chunk's draws, per engine in its order
    a = None if audios[0] is None else [x[None].to(dev, e0.dtype) for x in audios]
    text, mask = _stack_text(engines, TEXT_STEP if graphed else None)
    gens = [e.gen for e in engines]
    t0 = time.perf_counter()
    cache = stack_caches([e.cache for e in engines] + [engines[-1].cache] * pad)
    if pad:  # the padding rows: the last stream again, with noise of their own generator (dropped afterwards)
        noise = torch.cat([noise] + [noise[-1:]] * pad)
        a = None if a is None else a + [a[-1]] * pad
        text = None if text is None else torch.cat([text] + [text[-1:]] * pad)
        mask = None if mask is None else torch.cat([mask] + [mask[-1:]] * pad)
        gens = gens + [torch.Generator(device=e0.gen.device).manual_seed(0) for _ in range(pad)]
    z = denoise_chunk(
        e0.dit,
        cache,
        noise,
        e0.sigmas,
        text,
        None if a is None else torch.cat(a),
        mask,
        generator=gens,
        sampler=c.sampler,
        audio_guidance=c.audio_guidance,
        cache_mode=c.cache_mode,
        runner=runner if shared else None,
    )
    out = []
    for i, e in enumerate(engines):
        for layer in range(cache.num_layers):  # the window after the commit: this engine's row
            e.cache.k[layer], e.cache.v[layer] = cache.k[layer][i : i + 1], cache.v[layer][i : i + 1]
        e.cache.advance(k)
        zi = z[i : i + 1]
        e.last_audio, e.last_latent = None if a is None else a[i], zi[:, :, -1:]
        chunk = Chunk(e.n_chunks, zi, 0 if e.next_latent == 0 else 1 + (e.next_latent - 1) * 4)
        e.n_chunks += 1
        e.next_latent += k
        e._update_anchors(zi)
        out.append(chunk)
    elapsed = time.perf_counter() - t0
    for chunk in out:
        chunk.denoise_s, chunk.started = elapsed, t0
    return out


@dataclass(eq=False)  # compared by identity
class _Request:
    engine: StreamEngine
    audio: torch.Tensor | None
    done: threading.Event = field(default_factory=threading.Event)
    chunk: Chunk | None = None
    error: BaseException | None = None


class ChunkBatcher:
    """Batches the chunks of engines that run in their own threads. ``attach(engine)`` routes the engine's
    ``next_chunk`` through the batcher; a request waits at most ``gather_s`` for the other attached engines' requests,
    then the waiting requests run together (``max_batch`` at most, in groups that share ``batch_key``). A request
    that came while another batch ran gathers for ``gather_s`` again once it ends: that batch's streams come back
    for their next chunks then, and a late request that ran alone right after every batch would cost every stream a
    second pass a round (measured on an H100 before: 16 sessions in passes of 15 and 1, alternately)."""

    def __init__(self, max_batch: int = 4, gather_s: float = 0.05, runner: ChunkRunner | None = None) -> None:
        """``runner``: the one every batch runs through (``batch_runner``: CUDA graphs, batches padded to
        ``batch_sizes(max_batch)``); None: plain passes."""
        if max_batch < 1 or gather_s < 0:
            raise ValueError("max_batch must be >= 1 and gather_s >= 0")
        self.max_batch, self.gather_s, self.runner = max_batch, gather_s, runner
        self.sizes = batch_sizes(max_batch)
        self._epoch: float | None = None  # the first paced stream's start (pace_origin)
        self._cond = threading.Condition()
        self._waiting: list[_Request] = []
        self._attached: dict[int, StreamEngine] = {}
        self._running = False
        self.batches: list[int] = []  # the size of every batch run (bounded: the last 1,000)
        self.pass_s: list[float] = []  # ... and its wall seconds (the engines' chunk call, as the thread saw it)

    def attach(self, engine: StreamEngine) -> None:
        """Route ``engine.next_chunk`` (as its ``frames`` calls it) through this batcher until ``detach``."""
        engine.next_chunk = lambda audio: self.next_chunk(engine, audio)  # an instance attribute over the method
        with self._cond:
            self._attached[id(engine)] = engine

    def detach(self, engine: StreamEngine) -> None:
        with self._cond:
            self._attached.pop(id(engine), None)
            self._cond.notify_all()
        vars(engine).pop("next_chunk", None)  # the class's method again

    def pace_origin(self, now: float, period_s: float) -> float:
        """The wall-clock time a new paced stream counts its video from: the first stream's start moved on by whole
        chunk periods (``period_s``: a chunk's video seconds) to at most ``now``. Streams paced from it ask for
        their chunks at the same instants and share passes; each paced from its own start would ask at its own phase
        of the period, and the batcher would run their chunks one or two at a time (a round of n sessions then takes
        ~n passes). A stream starts up to one period behind its clock; at its first frame ``AvatarLoop`` moves the
        clock on by whole periods, keeping the grid."""
        if period_s <= 0:
            raise ValueError(f"period_s must be > 0, got {period_s}")
        with self._cond:
            if self._epoch is None:
                self._epoch = now
            return self._epoch + math.floor((now - self._epoch) / period_s) * period_s

    @property
    def attached(self) -> int:
        with self._cond:
            return len(self._attached)

    def next_chunk(self, engine: StreamEngine, audio: torch.Tensor | None) -> Chunk:
        req = _Request(engine, audio)
        with self._cond:
            self._waiting.append(req)
            self._cond.notify_all()
            deadline = time.perf_counter() + self.gather_s
            while not req.done.is_set():
                if self._running:  # woken when it ends, then it gathers anew (the class's docstring)
                    self._cond.wait(0.05)
                    deadline = max(deadline, time.perf_counter() + self.gather_s)
                    continue
                ready = len(self._waiting) >= min(self.max_batch, max(1, len(self._attached)))
                left = deadline - time.perf_counter()
                if ready or left <= 0:
                    batch, self._running = self._take(req), True
                    break
                self._cond.wait(left)
            else:
                batch = None
        if batch is None:  # another thread ran this request
            return self._result(req)
        try:
            groups: dict = {}
            for r in batch:
                r.engine.finish_chunk()  # (its key counts the frames its cache holds)
                groups.setdefault(batch_key(r.engine), []).append(r)
            for key, group in groups.items():
                t = time.perf_counter()
                try:
                    if key is None:
                        chunks = [_own_chunk(r.engine, r.audio) for r in group]
                    else:
                        chunks = next_chunks(
                            [r.engine for r in group], [r.audio for r in group], self.runner, self.sizes
                        )
                    for r, c in zip(group, chunks):
                        r.chunk = c
                except BaseException as e:  # every request of the group learns of the failure
                    for r in group:
                        r.error = e
                self.batches = (self.batches + [len(group)])[-1000:]
                self.pass_s = (self.pass_s + [time.perf_counter() - t])[-1000:]
        finally:
            with self._cond:
                self._running = False
                for r in batch:
                    r.done.set()
                self._cond.notify_all()
        return self._result(req)

    def _take(self, req: _Request) -> list[_Request]:
        """``req`` and the oldest other waiting requests, ``max_batch`` at most (removed from the queue)."""
        batch = [req] + [r for r in self._waiting if r is not req][: self.max_batch - 1]
        self._waiting = [r for r in self._waiting if all(r is not b for b in batch)]
        return batch

    @staticmethod
    def _result(req: _Request) -> Chunk:
        req.done.wait()
        if req.error is not None:
            raise req.error
        return req.chunk


__all__ = ["BATCH_SIZES", "ChunkBatcher", "batch_key", "batch_runner", "batch_sizes", "next_chunks", "stack_caches"]
