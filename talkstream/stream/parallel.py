"""Timestep-forcing pipeline parallelism (TPP, Live Avatar): one denoising step per rank, the decoder on the last.

A few-step stream denoises every chunk through the same fixed list of noise levels. TPP gives step ``i`` of every
chunk to its own rank, so the stream's throughput is one DiT forward per chunk instead of ``steps`` of them:

    rank 0:      audio features, prompt changes in; step 0 of chunk c+3 ──┐
    rank 1:      step 1 of chunk c+2  <───────────────────────────────────┘ ──┐
    ...                                                                       │
    rank n-1:    step n-1 of chunk c+1 (the clean latents)  <─────────────────┘ ──┐
    rank n:      decode chunk c, emit its frames  <───────────────────────────────┘

**Timestep forcing.** Rank ``i`` keeps its own KV cache, and the keys/values it holds are those of the chunks'
inputs *at step i's noise level*, written by the step's own forward pass while it predicts (``forward_chunk(...,
commit=True)``): no clean re-encoding pass, and no KV cache ever crosses ranks; only chunk latents (plus the chunk's
audio windows) travel down the chain. ``timestep_forcing_stream`` is the same arithmetic in one process (one cache
per step); the pipeline equals it for the same seed.

Random draws are per step, so the pipeline reproduces them on any layout: the chunks' initial noise comes from the
generator of slot 0 and the few-step sampler's re-noising after step ``i`` from slot ``i + 1``
(``noise_generator``), each drawn once per chunk in chunk order.

**Layouts.** ``world`` ranks, ``steps`` denoising steps: ranks 0 .. world-2 hold contiguous groups of steps
(``split_steps``; ``world = steps + 1`` is one step per rank) and the last rank decodes. Two ranks is a DiT rank and
a decode rank; one process is ``timestep_forcing_stream``.

**Transport** (``ControlChannel`` + the process group). Small messages (a chunk's header: its index and size, a
prompt change, stop) go over the rendezvous TCP store; tensors go over the process group (NCCL between GPUs, gloo
between CPU processes), always with non-blocking ``isend``/``irecv``:

* a rank announces chunk c to the next rank *before* it computes c, so the next rank posts its ``irecv`` at once
  and the transfer runs while both compute (on GPU: on NCCL's own streams, overlapping the compute stream; on CPU:
  in gloo's threads); a sender never waits for its receiver;
* a rank only ever posts a receive for a transfer that has been announced, so a rank that waits for input (rank 0
  for the user's audio, the others for rank 0) waits in the control channel, never inside an NCCL operation: no
  NCCL time-outs however long the user is silent;
* at most ``max_in_flight`` chunks are between rank 0 starting them and the decode rank emitting them (rank 0 waits
  for the decode rank's ``done`` marks): memory stays bounded when the decoder is the slowest stage;
* every process stamps a heartbeat; a waiting rank that sees another stop stamping for ``peer_timeout_s`` (a
  crash that left no message, a hung process) stops with a message naming it. A rank that fails posts its error
  and every other rank stops with it (``PipelineError``); at the end of the input rank 0 sends ``stop`` down the
  chain and every rank returns once its last sends are through.

**Rolling Sink Frame** (``anchor="rolling_sink"``): the decode rank takes the first latent frame of the first clean
chunk (the model's own first generated frame) and sends it to every step rank (one ``isend`` each: a collective
would make the step ranks wait for one another at the switch, which a chain whose ranks are at different chunks
cannot do), and each re-prefills its caches' sinks with it from chunk ``sink_at`` on. Rolling RoPE: the caches
store keys before RoPE and re-base positions every chunk (``models/kv_cache.py``), so the sink always sits at the
same distance before the chunk (the window's length, once the window is full) however long the stream runs.
"""

from __future__ import annotations

import datetime
import os
import pickle
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from ..diffusion.flow import NUM_TRAIN_TIMESTEPS, add_noise, x0_from_velocity
from ..diffusion.samplers import guided_velocity
from ..models.dit import WanDiT
from ..models.kv_cache import KVCache
from .engine import ChunkDecoder, StreamConfig

TPP_ANCHORS = ("reference", "anchor_heavy", "rolling_sink")
SINK_TAG = 1  # the rolling sink's messages (decode rank -> each step rank), apart from the chain's (tag 0)
AudioSource = Callable[[int, int], "torch.Tensor | None"]  # (first latent, k) -> [k, Na, A] windows; StopIteration
PromptSource = Callable[[int, int], "tuple[torch.Tensor, torch.Tensor | None] | None"]  # a new prompt, or None


class PipelineError(RuntimeError):
    """The pipeline stopped: a rank failed (the message names it and its error), went silent, or the control
    channel was lost."""


class TransportError(PipelineError):
    """A send or receive with another rank failed (usually: that rank's process ended)."""


# -- configuration and layout (pure) ----------------------------------------------------------------------------
@dataclass(frozen=True)
class TPPConfig:
    stream: StreamConfig = field(default_factory=lambda: StreamConfig(sampler="few_step"))
    sink_at: int = 0  # rolling_sink: first chunk that uses the new sink (0: the pipeline's depth, the first chunk
    # rank 0 starts after the decode rank can have the sink, so the switch costs the pipeline no bubble)
    max_in_flight: int = 0  # chunks started by rank 0 and not yet emitted (0: ranks + 1)
    heartbeat_s: float = 1.0  # how often each process stamps its heartbeat
    peer_timeout_s: float = 60.0  # a process whose heartbeat stands still this long is declared dead

    def __post_init__(self) -> None:
        s = self.stream
        if s.anchor not in TPP_ANCHORS:
            raise ValueError(
                f"the TPP pipeline supports the anchors {TPP_ANCHORS}, not {s.anchor!r} (memory_bank feeds clean "
                "latents back to the first step, which would serialise the pipeline)"
            )
        if s.reference_init < 1 and s.start_from == "previous":
            raise ValueError(
                "start_from='previous' needs the last clean latent before a chunk starts: it would serialise the "
                "pipeline (use start_from='reference')"
            )
        if self.sink_at < 0 or self.max_in_flight < 0:
            raise ValueError("sink_at and max_in_flight must be >= 0 (0: automatic)")
        if self.heartbeat_s <= 0 or self.peer_timeout_s <= 2 * self.heartbeat_s:
            raise ValueError("heartbeat_s must be > 0 and peer_timeout_s more than twice heartbeat_s")

    @property
    def n_steps(self) -> int:
        return len(self.stream.sigmas()) - 1

    def sink_chunk(self, world: int) -> int:
        """The first chunk that sees the rolling sink (``sink_at``, or the pipeline's depth ``world``)."""
        return self.sink_at or max(1, world)

    def in_flight(self, world: int) -> int:
        return self.max_in_flight or world + 1


def split_steps(n_steps: int, n_stages: int) -> list[range]:
    """Contiguous groups of denoising steps, one per DiT rank, as even as possible (earlier ranks take the extra)."""
    if not 1 <= n_stages <= n_steps:
        raise ValueError(f"{n_stages} DiT ranks for {n_steps} denoising steps: need 1 .. {n_steps}")
    base, extra = divmod(n_steps, n_stages)
    out, start = [], 0
    for r in range(n_stages):
        n = base + (r < extra)
        out.append(range(start, start + n))
        start += n
    return out


def noise_generator(seed: int, slot: int, device: str | torch.device = "cpu") -> torch.Generator:
    """The generator of one random slot (0: chunks' initial noise, i + 1: re-noising after step i)."""
    return torch.Generator(device=device).manual_seed(int(seed) * 1000 + slot)


def role_name(rank: int, world: int, n_steps: int) -> str:
    if rank == world - 1:
        return "decode"
    steps = split_steps(n_steps, world - 1)[rank]
    what = f"denoising step {steps.start}" if len(steps) == 1 else f"denoising steps {steps.start}-{steps[-1]}"
    return f"{what}, audio and prompt input" if rank == 0 else what


# -- the arithmetic: one timestep-forcing step, one chunk's start (pure functions of their inputs) ----------------
def tf_step(
    dit: WanDiT,
    cache: KVCache,
    x: torch.Tensor,
    sigma: float,
    sigma_next: float,
    text: torch.Tensor | None,
    text_mask: torch.Tensor | None,
    audio: torch.Tensor | None,
    cfg: StreamConfig,
    generator: torch.Generator | None,
) -> torch.Tensor:
    """Denoising step from ``sigma`` to ``sigma_next`` on chunk ``x`` [1, C, k, h, w] with this step's own cache;
    the chunk's keys/values at this noise level enter the cache in the same pass (timestep forcing). Returns the
    chunk at ``sigma_next`` (the clean chunk when it is 0)."""
    # scalars made on the device (a fill, not a copy from the host, which would wait for the GPU)
    t = torch.full((), sigma * NUM_TRAIN_TIMESTEPS, device=x.device, dtype=torch.float32)
    guided = cfg.audio_guidance != 1.0 and audio is not None
    # the unconditional pass reads the cache before the conditional one writes this chunk into it
    v_none = dit.forward_chunk(x, t, cache, text, torch.zeros_like(audio), context_mask=text_mask) if guided else None
    v = dit.forward_chunk(x, t, cache, text, audio, context_mask=text_mask, commit=True)
    if guided:
        v = guided_velocity([v_none, v], [cfg.audio_guidance])
    if cfg.sampler == "euler":
        return x + (sigma_next - sigma) * v
    x0 = x0_from_velocity(x, v, torch.full((), sigma, device=x.device, dtype=x.dtype))
    if sigma_next > 0:
        fresh = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
        return add_noise(x0, fresh, torch.full((), sigma_next, device=x.device, dtype=x.dtype))
    return x0


def chunk_start(
    cfg: StreamConfig, reference: torch.Tensor, k: int, generator: torch.Generator, dtype: torch.dtype
) -> torch.Tensor:
    """A chunk's input at the first noise level: fresh noise, or the reference noised to ``reference_init``."""
    _, c, _, h, w = reference.shape
    noise = torch.randn(1, c, k, h, w, generator=generator, device=reference.device).to(dtype)
    if cfg.reference_init < 1:
        start = torch.full((), cfg.reference_init, device=noise.device, dtype=noise.dtype)
        noise = add_noise(reference.expand_as(noise), noise, start)
    return noise


def _sinks(cfg: StreamConfig, reference: torch.Tensor) -> torch.Tensor:
    return reference.repeat(1, 1, cfg.anchor_copies, 1, 1) if cfg.anchor == "anchor_heavy" else reference


def _prefill(dit: WanDiT, caches: list[KVCache], sinks, text, text_mask, reference) -> None:
    """The same sink keys/values in every cache of a rank: computed once (t = 0 does not depend on the step)."""
    first = caches[0]
    dit.prefill_sinks(sinks, first, text, text_mask, reference=reference)
    for c in caches[1:]:
        if getattr(first, "sink_frames", 0):  # sinks that are the stream's own first frames: per cache
            dit.prefill_sinks(sinks, c, text, text_mask, reference=reference)
        else:
            c.sink_k, c.sink_v, c.ref_tokens = list(first.sink_k), list(first.sink_v), first.ref_tokens


def _sigma_list(cfg: StreamConfig) -> list[float]:
    return [float(s) for s in cfg.sigmas()]


def _first_frame(first_latent: int) -> int:
    return 0 if first_latent == 0 else 1 + (first_latent - 1) * 4


@torch.no_grad()
def timestep_forcing_stream(
    dit: WanDiT,
    cfg: TPPConfig,
    reference: torch.Tensor,
    audio_chunks: AudioSource,
    text: torch.Tensor | None = None,
    text_mask: torch.Tensor | None = None,
    prompts: PromptSource | None = None,
    n_chunks: int | None = None,
    world: int = 1,
) -> Iterator[torch.Tensor]:
    """The single-process timestep-forcing stream: clean latent chunks [1, C, k, h, w], one per chunk.

    One KV cache per denoising step, each written by its own step; the same arithmetic, random slots and sink
    switch as the pipeline. ``world``: the pipeline size whose rolling-sink switch chunk (``sink_at`` = 0) to
    follow. ``audio_chunks(first, k)`` and ``prompts(first, k)`` as ``TPPStream.run_input``."""
    s = cfg.stream
    dev = reference.device
    dtype = next(dit.parameters()).dtype
    reference = reference.to(dev, dtype)
    text = None if text is None else text.to(dev, dtype)
    sig = _sigma_list(s)
    n = len(sig) - 1
    caches = [dit.new_cache(window=s.cache_window) for _ in range(n)]
    _prefill(dit, caches, _sinks(s, reference), text, text_mask, reference)
    gens = [noise_generator(s.seed, slot, dev) for slot in range(n + 1)]
    sink: torch.Tensor | None = None
    first, c = 0, 0
    while n_chunks is None or c < n_chunks:
        k = s.chunk_size(c)
        try:
            audio = audio_chunks(first, k)
        except StopIteration:
            return
        if prompts is not None and (p := prompts(first, k)) is not None:
            text, text_mask = p[0].to(dev, dtype), p[1]
        if sink is not None and c == cfg.sink_chunk(world):
            _prefill(dit, caches, sink, text, text_mask, reference)
        a = None if audio is None else audio[None].to(dev, dtype)
        x = chunk_start(s, reference, k, gens[0], dtype)
        for i in range(n):
            x = tf_step(dit, caches[i], x, sig[i], sig[i + 1], text, text_mask, a, s, gens[i + 1])
        if c == 0 and s.anchor == "rolling_sink":
            sink = x[:, :, :1].clone()
        yield x
        first += k
        c += 1


# -- the control channel ---------------------------------------------------------------------------------------
def _store_client(timeout_s: float = 300.0) -> dist.TCPStore:
    """A client of the rendezvous store (torchrun's agent store, or rank 0's under ``launch_local``)."""
    host, port = os.environ.get("MASTER_ADDR", "127.0.0.1"), os.environ.get("MASTER_PORT")
    if not port:
        raise PipelineError("MASTER_PORT is not set: start the pipeline with torchrun (or launch_local)")
    return dist.TCPStore(
        host, int(port), is_master=False, timeout=datetime.timedelta(seconds=timeout_s), wait_for_workers=False
    )


class Heartbeat:
    """A daemon thread that stamps ``tpp/hb/<rank>`` every ``interval`` seconds on its own store connection."""

    def __init__(self, rank: int, interval: float) -> None:
        self.rank, self.interval = rank, interval
        self.store = _store_client()
        self.stop_event = threading.Event()
        self.store.set(f"tpp/hb/{rank}", "0")
        self.thread = threading.Thread(target=self._run, name=f"tpp-heartbeat-{rank}", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        n = 0
        while not self.stop_event.wait(self.interval):
            n += 1
            try:
                self.store.set(f"tpp/hb/{self.rank}", str(n))
            except Exception:  # the store is gone: the waiting side reports it
                return

    def finish(self) -> None:
        """This process ends normally: the others stop watching it."""
        self.stop_event.set()
        try:
            self.store.set(f"tpp/finished/{self.rank}", "1")
        except Exception:
            pass


class ControlChannel:
    """Headers, marks and the abort message of one stream over the store; every wait watches for failures."""

    def __init__(self, rank: int, world: int, stream_id: int | str, cfg: TPPConfig, roles: list[str]) -> None:
        self.rank, self.world, self.cfg, self.roles = rank, world, cfg, roles
        self.store = _store_client()
        self.prefix = f"tpp/s{stream_id}/"
        self.abort_key = "tpp/abort"  # one for the process group: a failure anywhere stops every rank
        self._seen: dict[int, tuple[str, float]] = {}  # rank -> (last stamp, when it changed, by our clock)
        self._next_watch = 0.0

    def key(self, name: str) -> str:
        return self.prefix + name

    def put(self, name: str, value) -> None:
        self.store.set(self.key(name), pickle.dumps(value))

    def has(self, name: str) -> bool:
        try:
            return self.store.check([self.key(name)])
        except Exception as e:
            raise self._lost(e) from None

    def take(self, name: str) -> Any:
        """Read and delete a key that is known to be there."""
        try:
            value = self.store.get(self.key(name))
            self.store.delete_key(self.key(name))
        except Exception as e:
            raise self._lost(e) from None
        return pickle.loads(value)

    def abort(self, message: str) -> None:
        """Tell every rank to stop (the first message wins)."""
        try:
            self.store.compare_set(self.abort_key, "", message)
        except Exception:
            pass

    def _lost(self, e: Exception) -> PipelineError:
        return PipelineError(f"lost the pipeline's control store ({type(e).__name__}: {e}); a rank hosting it ended")

    def check(self) -> None:
        """Raise ``PipelineError`` if a rank posted an error or a process's heartbeat stood still too long."""
        try:
            if self.store.check([self.abort_key]):
                msg = self.store.get(self.abort_key).decode()
                raise PipelineError(f"the pipeline stopped: {msg}")
            now = time.monotonic()
            if now < self._next_watch:
                return
            self._next_watch = now + self.cfg.heartbeat_s
            for r in range(self.world):
                if r == self.rank or self.store.check([f"tpp/finished/{r}"]):
                    continue
                stamp = self.store.get(f"tpp/hb/{r}").decode() if self.store.check([f"tpp/hb/{r}"]) else ""
                last = self._seen.get(r)
                if last is None or last[0] != stamp:
                    self._seen[r] = (stamp, now)
                elif now - last[1] > self.cfg.peer_timeout_s:
                    raise PipelineError(
                        f"the pipeline stopped: rank {r} ({self.roles[r]}) has sent no heartbeat for "
                        f"{now - last[1]:.0f} s: it died or hung"
                    )
        except PipelineError:
            raise
        except Exception as e:
            raise self._lost(e) from None

    def posted(self) -> str | None:
        """The abort message a rank posted, if any."""
        try:
            return self.store.get(self.abort_key).decode() if self.store.check([self.abort_key]) else None
        except Exception:
            return None

    def verdict(self, seconds: float) -> PipelineError | None:
        """After a broken transfer: watch up to ``seconds`` for the reason (a rank's posted error, a silent
        heartbeat); None if none shows."""
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            try:
                self.check()
            except PipelineError as e:
                return e
            time.sleep(0.05)
        return None

    def wait(self, ready: Callable[[], bool], what: str) -> None:
        """Poll ``ready`` (sleeping 0.1 -> 2 ms between polls) while watching for failures."""
        nap = 1e-4
        while not ready():
            self.check()
            time.sleep(nap)
            nap = min(2 * nap, 2e-3)

    def wait_key(self, name: str) -> Any:
        self.wait(lambda: self.has(name), name)
        return self.take(name)


class Transfer:
    """Non-blocking point-to-point operations, completed without blocking the caller: NCCL works
    are polled; gloo works (whose completion only ``wait`` reveals) are waited on by a daemon thread."""

    def __init__(self, works: list, tensors: list[torch.Tensor], nccl: bool) -> None:
        self.works, self.tensors, self.nccl = works, tensors, nccl
        self.error: BaseException | None = None
        self.event: threading.Event | None = None
        if not nccl:
            self.event = threading.Event()
            threading.Thread(target=self._wait_all, daemon=True).start()

    def _wait_all(self) -> None:
        try:
            for w in self.works:
                w.wait()
        except BaseException as e:  # noqa: BLE001 - handed to the caller
            self.error = e
        self.event.set()

    def done(self) -> bool:
        if self.nccl:
            return all(w.is_completed() for w in self.works)
        if self.event.is_set() and self.error is not None:
            raise TransportError(f"a transfer failed: {type(self.error).__name__}: {self.error}")
        return self.event.is_set()

    def finish(self, channel: ControlChannel) -> list[torch.Tensor]:
        channel.wait(self.done, "transfer")
        if self.nccl:
            for w in self.works:
                w.wait()  # the compute stream waits for NCCL's stream (no host block)
        return self.tensors


# -- the pipeline ----------------------------------------------------------------------------------------------
@dataclass
class TPPStats:
    """What the decode rank saw: frames and chunks emitted, time to first frame from rank 0's start, and the
    monotonic time (one clock for all processes of a host) at which each chunk's frames were ready."""

    started: float = 0.0
    first_frame_at: float | None = None
    frames: int = 0
    chunks: int = 0
    chunk_times: list[float] = field(default_factory=list)

    @property
    def ttff(self) -> float | None:
        return None if self.first_frame_at is None else self.first_frame_at - self.started

    def steady_fps(self, frames_per_chunk: int) -> float | None:
        """Frames a second over the second half of the stream's chunks (the pipeline full)."""
        t = self.chunk_times
        if len(t) < 3:
            return None
        half = len(t) // 2
        return frames_per_chunk * half / max(t[-1] - t[-1 - half], 1e-9)


class TPPStream:
    """One stream through the pipeline, seen from one rank. Every rank builds it with the same ``stream_id`` (a new
    id for each stream of a process group) and calls its part: ``run_input`` (rank 0), ``run_steps`` (ranks 1 ..
    world-2), ``frames`` (the last rank)."""

    def __init__(self, cfg: TPPConfig, device: str = "cpu", stream_id: int = 0, sink_group=None) -> None:
        if not dist.is_initialized():
            raise PipelineError("the TPP pipeline needs torch.distributed initialised (torchrun, or launch_local)")
        self.cfg, self.device = cfg, device
        self.rank, self.world = dist.get_rank(), dist.get_world_size()
        self.n_steps = cfg.n_steps
        if not 2 <= self.world <= self.n_steps + 1:
            raise ValueError(
                f"the TPP pipeline runs {self.n_steps} denoising steps on 2 .. {self.n_steps + 1} ranks "
                f"(steps + 1: one step a rank plus the decode rank), got {self.world}"
            )
        self.layout = split_steps(self.n_steps, self.world - 1)
        self.roles = [role_name(r, self.world, self.n_steps) for r in range(self.world)]
        self.decode_rank = self.world - 1
        self.nccl = dist.get_backend() == "nccl"
        self.sink_group = sink_group  # the rolling sink's line (its own communicators: see init_pipeline)
        self.channel = ControlChannel(self.rank, self.world, stream_id, cfg, self.roles)
        self._sends: deque[Transfer] = deque()
        self._seq_in = self._seq_out = 0
        self._timings: list = []  # per chunk: this rank's compute (CUDA event pairs, or seconds)

    @property
    def role(self) -> str:
        return self.roles[self.rank]

    # -- transport --
    def _send(self, tensors: list[torch.Tensor]) -> None:
        tensors = [t.contiguous() for t in tensors]
        try:
            works = [dist.isend(t, self.rank + 1) for t in tensors]
        except RuntimeError as e:
            raise TransportError(f"sending to rank {self.rank + 1} failed: {e}") from e
        self._sends.append(Transfer(works, tensors, self.nccl))
        while self._sends and self._sends[0].done():
            self._sends.popleft()

    def _announce(self, header: dict) -> None:
        self.channel.put(f"h/{self.rank}/{self._seq_out}", header)
        self._seq_out += 1

    def _receive(self, header_now: dict | None = None) -> tuple[dict, Transfer | None]:
        """The next header from the previous rank, and the receive of its tensors, posted at once."""
        name = f"h/{self.rank - 1}/{self._seq_in}"
        header = header_now if header_now is not None else self.channel.wait_key(name)
        self._seq_in += 1
        if header["kind"] != "chunk":
            return header, None
        bufs = [torch.empty(header["shape"], dtype=self.dtype, device=self.device)]
        if header.get("audio") is not None:
            bufs.append(torch.empty(header["audio"], dtype=self.dtype, device=self.device))
        try:
            works = [dist.irecv(b, self.rank - 1) for b in bufs]
        except RuntimeError as e:
            raise TransportError(f"receiving from rank {self.rank - 1} failed: {e}") from e
        return header, Transfer(works, bufs, self.nccl)

    def _poll_next(self) -> tuple[dict, Transfer | None] | None:
        """The next header if it has been announced (its receive then posted), without waiting."""
        name = f"h/{self.rank - 1}/{self._seq_in}"
        if not self.channel.has(name):
            return None
        return self._receive(self.channel.take(name))

    def _drain(self) -> None:
        while self._sends:
            self._sends.popleft().finish(self.channel)

    def _failure(self, e: BaseException) -> BaseException:
        """What to raise for ``e``: the root cause when another rank's failure caused it (its posted message, or a
        silent heartbeat found within the time-out after a broken transfer); otherwise ``e`` posted as this rank's
        failure for every other rank to report."""
        if isinstance(e, PipelineError) and not isinstance(e, TransportError):
            return e
        if isinstance(e, TransportError):
            found = self.channel.verdict(self.cfg.peer_timeout_s + 2 * self.cfg.heartbeat_s)
            if found is not None:
                return found
        elif (posted := self.channel.posted()) is not None:
            return PipelineError(f"the pipeline stopped: {posted}")
        msg = f"rank {self.rank} ({self.role}) failed: {type(e).__name__}: {e}"
        self.channel.abort(msg)
        return PipelineError(msg)

    def _raise(self, e: BaseException) -> None:
        if isinstance(e, (KeyboardInterrupt, SystemExit)):
            self.channel.abort(f"rank {self.rank} ({self.role}) was interrupted")
            raise e
        raise self._failure(e) from e

    def _tic(self):
        if self.nccl:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            return start, end
        return time.perf_counter()

    def _toc(self, timing) -> None:
        if isinstance(timing, tuple):
            timing[1].record()
            self._timings.append(timing)
        else:
            self._timings.append(time.perf_counter() - timing)

    def compute_ms(self) -> list[float]:
        """Milliseconds of this rank's own work on each chunk (its steps, or the decode), measured on the device
        (CUDA events: the transfers around it not included); call after the stream ended."""
        if self._timings and isinstance(self._timings[0], tuple):
            torch.cuda.synchronize()
            return [a.elapsed_time(b) for a, b in self._timings]
        return [1000 * t for t in self._timings]

    # -- step ranks --
    def _setup_steps(self, dit: WanDiT, start: dict) -> None:
        s = self.cfg.stream
        self.dit = dit.eval()
        self.dtype = next(dit.parameters()).dtype
        if str(self.dtype) != start["dtype"]:
            raise ValueError(f"rank {self.rank} runs {self.dtype}, rank 0 {start['dtype']}: load the same dtype")
        self.steps = self.layout[self.rank]
        self.sig = _sigma_list(s)
        self.reference = start["reference"].to(self.device, self.dtype)
        self.text, self.text_mask = self._text(start["text"], start["text_mask"])
        self.caches = [dit.new_cache(window=s.cache_window) for _ in self.steps]
        _prefill(dit, self.caches, _sinks(s, self.reference), self.text, self.text_mask, self.reference)
        self.gens = {i: noise_generator(s.seed, i + 1, self.device) for i in self.steps}
        self.sink_chunk = self.cfg.sink_chunk(self.world)
        self._sink_taken = False

    def _text(self, text, mask):
        t = None if text is None else text.to(self.device, self.dtype)
        return t, None if mask is None else mask.to(self.device)

    def _start_payload(self) -> dict:
        return self.channel.wait_key(f"start/{self.rank}")

    def _maybe_switch_sink(self, index: int, stopping: bool = False) -> None:
        """At chunk ``sink_chunk``: receive the sink the decode rank sent every step rank and re-prefill this rank's
        caches with it. ``stopping``: the stream ended before that chunk; take the sink (so the decode rank's send
        completes) and drop it."""
        if self.cfg.stream.anchor != "rolling_sink" or self._sink_taken or not (stopping or index == self.sink_chunk):
            return
        self._sink_taken = True
        self.channel.wait(lambda: self.channel.has("sink"), "sink")
        buf = torch.empty(self.reference.shape, dtype=self.dtype, device=self.device)
        try:
            work = dist.irecv(buf, self.decode_rank, group=self.sink_group, tag=SINK_TAG)
        except RuntimeError as e:
            raise TransportError(f"receiving the rolling sink failed: {e}") from e
        (sink,) = Transfer([work], [buf], self.nccl).finish(self.channel)
        if not stopping:
            _prefill(self.dit, self.caches, sink, self.text, self.text_mask, self.reference)

    def _compute(self, x: torch.Tensor, audio: torch.Tensor | None) -> torch.Tensor:
        for j, i in enumerate(self.steps):
            x = tf_step(
                self.dit,
                self.caches[j],
                x,
                self.sig[i],
                self.sig[i + 1],
                self.text,
                self.text_mask,
                audio,
                self.cfg.stream,
                self.gens[i],
            )
        return x

    def _forward(self, header: dict, x: torch.Tensor, audio: torch.Tensor | None) -> None:
        """Announce chunk ``header`` to the next rank, compute this rank's steps, send the result."""
        last_dit = self.rank == self.decode_rank - 1
        out = dict(header, audio=None if last_dit or audio is None else list(audio.shape))
        if last_dit:
            out.pop("text", None)
        self._announce(out)
        timing = self._tic()
        y = self._compute(x, audio)
        self._toc(timing)
        self._send([y] if last_dit or audio is None else [y, audio])

    @torch.no_grad()
    def run_input(
        self,
        dit: WanDiT,
        reference: torch.Tensor,
        audio_chunks: AudioSource,
        text: torch.Tensor | None = None,
        text_mask: torch.Tensor | None = None,
        prompts: PromptSource | None = None,
        n_chunks: int | None = None,
        extra: dict | None = None,
    ) -> int:
        """Rank 0: start the stream (reference latent [1, C, 1, h, w], prompt), then for each chunk take its audio
        windows (``audio_chunks(first_latent, k)`` -> [k, Na, A] or None; StopIteration ends the stream) and any
        prompt change (``prompts(first_latent, k)`` -> (text, mask) or None), run its first step(s) and pass it on.
        ``extra``: picklable data for the other ranks' ``start`` (e.g. the audio to mux). Returns the chunks run."""
        if self.rank != 0:
            raise ValueError(f"run_input is rank 0's part, this is rank {self.rank} ({self.role})")
        try:
            dtype = next(dit.parameters()).dtype
            payload = dict(
                reference=reference.detach().to("cpu", dtype),
                text=None if text is None else text.detach().to("cpu", dtype),
                text_mask=None if text_mask is None else text_mask.detach().cpu(),
                dtype=str(dtype),
                shape=list(reference.shape),
                extra=extra or {},
            )
            for r in range(1, self.world):
                self.channel.put(f"start/{r}", payload)
            self._setup_steps(dit, payload)
            s, dev = self.cfg.stream, self.device
            gen0 = noise_generator(s.seed, 0, dev)
            limit = self.cfg.in_flight(self.world)
            c = first = 0
            t0 = time.monotonic()
            while n_chunks is None or c < n_chunks:
                if c >= limit:  # bounded chunks in flight: wait until the decode rank emitted chunk c - limit
                    self.channel.wait_key(f"done/{c - limit}")
                k = s.chunk_size(c)
                try:
                    audio = audio_chunks(first, k)
                except StopIteration:
                    break
                header = dict(
                    kind="chunk", index=c, first_latent=first, shape=[1, reference.shape[1], k, *reference.shape[3:]]
                )
                if c == 0:
                    header["t0"] = t0
                if prompts is not None and (p := prompts(first, k)) is not None:
                    self.text, self.text_mask = self._text(*p)
                    header["text"] = (p[0].detach().to("cpu", self.dtype), None if p[1] is None else p[1].cpu())
                self._maybe_switch_sink(c)
                a = None if audio is None else audio[None].to(dev, self.dtype)
                self._forward(header, chunk_start(s, self.reference, k, gen0, self.dtype), a)
                first += k
                c += 1
            self._announce(dict(kind="stop", chunks=c))
            if c:
                self._maybe_switch_sink(c, stopping=True)
            self._drain()
            return c
        except BaseException as e:
            self._raise(e)

    @torch.no_grad()
    def run_steps(self, dit: WanDiT) -> int:
        """Ranks 1 .. world-2: receive each chunk, run this rank's step(s) with its own caches, pass it on, until
        ``stop``. Returns the chunks run."""
        if not 0 < self.rank < self.decode_rank:
            raise ValueError(f"run_steps is the middle ranks' part, this is rank {self.rank} ({self.role})")
        try:
            self._setup_steps(dit, self._start_payload())
            n, pending = 0, None
            while True:
                header, transfer = pending or self._receive()
                pending = None
                if header["kind"] == "stop":
                    self._announce(header)
                    if header["chunks"]:
                        self._maybe_switch_sink(header["chunks"], stopping=True)
                    break
                if "text" in header:
                    self.text, self.text_mask = self._text(*header["text"])
                x, *audio = transfer.finish(self.channel)
                self._maybe_switch_sink(header["index"])
                pending = self._poll_next()  # the next chunk's receive runs while this one computes
                self._forward(header, x, audio[0] if audio else None)
                n += 1
            self._drain()
            return n
        except BaseException as e:
            self._raise(e)

    def latents(self, stats: TPPStats | None = None) -> Iterator[tuple[int, torch.Tensor]]:
        """The last rank: each clean chunk as (absolute index of its first video frame, latents [1, C, k, h, w]),
        in order; the rolling sink goes to every step rank after the first. A chunk counts as emitted (rank 0 may start
        another) when the caller asks for the next one."""
        if self.rank != self.decode_rank:
            raise ValueError(f"the decode rank receives the chunks, this is rank {self.rank} ({self.role})")
        stats = stats if stats is not None else TPPStats()
        try:
            start = self._start_payload()
            self.dtype = getattr(torch, start["dtype"].replace("torch.", ""))
            sink_work: Transfer | None = None
            pending = None
            while True:
                header, transfer = pending or self._receive()
                pending = None
                if header["kind"] == "stop":
                    break
                (z,) = transfer.finish(self.channel)
                pending = self._poll_next()  # the next chunk arrives while this one is decoded
                if header["index"] == 0:
                    stats.started = header["t0"]
                    if self.cfg.stream.anchor == "rolling_sink":  # the model's own first frame: every step's sink
                        # one send to each step rank, not a collective: a collective would make every step rank wait
                        # for the others at the switch chunk, which a chain whose ranks are at different chunks
                        # cannot do (rank 0 would wait for rank 1, which waits for rank 0's next chunk)
                        self.channel.put("sink", True)
                        sink = z[:, :, :1].contiguous()
                        works = [
                            dist.isend(sink, r, group=self.sink_group, tag=SINK_TAG) for r in range(self.decode_rank)
                        ]
                        sink_work = Transfer(works, [sink], self.nccl)
                yield _first_frame(header["first_latent"]), z
                stats.chunks += 1
                stats.chunk_times.append(time.monotonic())
                self.channel.put(f"done/{header['index']}", True)
            if sink_work is not None:
                sink_work.finish(self.channel)
        except GeneratorExit:
            raise
        except BaseException as e:
            self._raise(e)

    def frames(self, decoder, stats: TPPStats | None = None) -> Iterator[tuple[int, np.ndarray]]:
        """The last rank: decode each clean chunk as it arrives (one causal feature cache across chunks) and yield
        (absolute video frame index, uint8 frame [H, W, 3])."""
        stats = stats if stats is not None else TPPStats()
        decode = ChunkDecoder(decoder.eval())
        for first, z in self.latents(stats):
            try:
                t0 = time.perf_counter()
                with torch.no_grad():
                    imgs = decode(z)  # its frames on the host: the decode's whole time
                self._timings.append(time.perf_counter() - t0)
            except BaseException as e:
                self._raise(e)
            if stats.first_frame_at is None:
                stats.first_frame_at = time.monotonic()
            for j, img in enumerate(imgs):
                stats.frames += 1
                yield first + j, img

    def start_extra(self) -> dict:
        """The ``extra`` rank 0 passed with the start (the decode rank reads it before ``frames``)."""
        if self.rank == 0:
            raise ValueError("rank 0 sends the start")
        name = f"start/{self.rank}"
        self.channel.wait(lambda: self.channel.has(name), name)
        return pickle.loads(self.channel.store.get(self.channel.key(name)))["extra"]


# -- process setup ---------------------------------------------------------------------------------------------
@dataclass
class PipelineProcess:
    """This process's place in the pipeline: rank, world, device, the rolling sink's group, its heartbeat, and a
    control channel for what happens before and between streams."""

    rank: int
    world: int
    device: str
    sink_group: object
    heartbeat: Heartbeat
    channel: ControlChannel

    def stream(self, cfg: TPPConfig, stream_id: int = 0) -> TPPStream:
        return TPPStream(cfg, self.device, stream_id, self.sink_group)

    def share(self, name: str, value: Any = None) -> Any:
        """Rank 0 gives ``value`` (picklable) to every rank; the others wait for it (watching for failures)."""
        key = f"share/{name}"
        if self.rank == 0:
            self.channel.put(key, value)
            return value
        self.channel.wait(lambda: self.channel.has(key), key)
        return pickle.loads(self.channel.store.get(self.channel.key(key)))

    def fail(self, e: BaseException) -> None:
        """Raise for a failure outside a stream (loading, preparing inputs), telling every other rank first."""
        if isinstance(e, PipelineError):
            raise e
        msg = f"rank {self.rank} failed: {type(e).__name__}: {e}"
        if (posted := self.channel.posted()) is not None:
            raise PipelineError(f"the pipeline stopped: {posted}") from e
        self.channel.abort(msg)
        raise PipelineError(msg) from e

    def close(self) -> None:
        """A normal end: wait (in the control channel, not in a collective) until every rank is done, stop the
        heartbeat and leave the process group."""
        self.channel.put(f"closed/{self.rank}", True)
        for r in range(self.world):
            self.channel.wait(lambda r=r: self.channel.has(f"closed/{r}"), "close")
        self.heartbeat.finish()
        dist.destroy_process_group()


def init_pipeline(cfg: TPPConfig | None = None, device: str = "cpu", timeout_s: float = 1800.0) -> PipelineProcess:
    """Join the process group as torchrun (or ``launch_local``) set it up: NCCL on CUDA (one GPU a rank, by
    ``LOCAL_RANK``), gloo on CPU; every line the pipeline uses connected; this process's heartbeat."""
    cfg = cfg or TPPConfig()
    cuda = device.startswith("cuda")
    if cuda:
        local = int(os.environ.get("LOCAL_RANK", "0"))
        if local >= torch.cuda.device_count():
            raise PipelineError(f"LOCAL_RANK {local} but this machine has {torch.cuda.device_count()} GPUs")
        torch.cuda.set_device(local)
        device = f"cuda:{local}"
    # the launcher may end this process (a peer failed) while it still connects: report why from the start
    world_env = int(os.environ.get("WORLD_SIZE", "1"))
    setup = ControlChannel(int(os.environ.get("RANK", "0")), world_env, "setup", cfg, ["setting up"] * world_env)
    _report_termination(setup)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if cuda else "gloo", timeout=datetime.timedelta(seconds=timeout_s))
    rank, world = dist.get_rank(), dist.get_world_size()
    # the rolling sink travels decode -> step ranks in its own group: on the chain's communicator the last DiT rank's
    # pair would carry both directions, and NCCL runs a communicator's sends and receives in order on one stream, so
    # the decode rank's pending sink send would hold up its receive of the next chunks (which the last DiT rank sends
    # before it takes the sink): a deadlock
    sink_group = dist.new_group(list(range(world)))
    # set up the pairs' communicators now (NCCL creates one at a pair's first message, blocking until both sides are
    # there), in an order that cannot deadlock: the chain 0 -> 1 -> .. -> decode, then decode -> each step rank; this
    # also proves every line connected before any weights load
    probe = torch.zeros(1, device=device)
    works = [dist.irecv(torch.zeros(1, device=device), rank - 1)] if rank > 0 else []
    works += [dist.isend(probe, rank + 1)] if rank < world - 1 else []
    if rank == world - 1:
        works += [dist.isend(probe, r, group=sink_group, tag=SINK_TAG) for r in range(world - 1)]
    else:
        works.append(dist.irecv(torch.zeros(1, device=device), world - 1, group=sink_group, tag=SINK_TAG))
    for w in works:
        w.wait()
    heartbeat = Heartbeat(rank, cfg.heartbeat_s)
    return PipelineProcess(rank, world, device, sink_group, heartbeat, setup)


def _say_line(line: str) -> None:
    """One line to stderr in one write: the ranks share the launcher's pipe, and print's separate write of the newline
    lets two ranks' lines run together."""
    import sys

    sys.stderr.flush()
    os.write(sys.stderr.fileno(), (line + "\n").encode(errors="replace"))


def _report_termination(channel: ControlChannel) -> None:
    """When the launcher ends this process (torchrun sends SIGTERM to every rank once one has failed, possibly before
    this one reached a wait that would have read why), print the failing rank's posted message first."""
    import signal

    if threading.current_thread() is not threading.main_thread() or signal.getsignal(signal.SIGTERM) != signal.SIG_DFL:
        return

    def handler(signum, frame) -> None:
        posted = channel.posted()
        why = f"the pipeline stopped: {posted}" if posted else "stopped by its launcher (SIGTERM)"
        _say_line(f"talkstream: error: {why}")
        os._exit(128 + signum)

    signal.signal(signal.SIGTERM, handler)


def stop_on_failure(fn: Callable[[], int | None], prefix: str = "talkstream") -> int:
    """Run a rank's work; on a failure print one line naming it and end this process at once with status 1 (a
    process group whose peer died can hang its own teardown, so none is attempted)."""
    import sys
    import traceback

    try:
        return fn() or 0
    except PipelineError as e:
        _say_line(f"{prefix}: error: {e}")
    except BaseException as e:  # noqa: BLE001 - every failure ends the process the same way
        if os.environ.get("TALKSTREAM_TRACEBACK"):
            traceback.print_exc()
        rank = os.environ.get("RANK", "?")
        _say_line(f"{prefix}: error: rank {rank} failed: {type(e).__name__}: {e}")
    sys.stdout.flush()
    os._exit(1)


def launch_local(
    target: Callable, world: int, args: tuple = (), timeout_s: float = 600.0, preload: tuple[str, ...] = ()
) -> list[int]:
    """Start ``world`` processes on this machine as torchrun would (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT
    in their environment, the rendezvous store hosted by this process), each calling ``target(*args)``; wait for all
    and return their exit codes (a process still running after ``timeout_s`` is killed: -9). Processes fork from a
    server that has imported torch and ``preload`` (modules) once, so a launch costs no imports (the server never
    touches a GPU)."""
    import multiprocessing as mp

    # the store lives here, as torchrun's lives in its agent: it outlasts any rank, so the ranks still running can
    # read why another stopped
    store = dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False)
    port = store.port
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(["torch", "talkstream.stream.parallel", *preload])
    procs = []
    for r in range(world):
        env = dict(RANK=str(r), LOCAL_RANK=str(r), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1")
        env.update(MASTER_PORT=str(port), TORCHELASTIC_USE_AGENT_STORE="True")
        p = ctx.Process(target=_launched, args=(env, target, args), name=f"tpp-rank-{r}")
        p.start()
        procs.append(p)
    deadline = time.monotonic() + timeout_s
    codes = []
    for p in procs:
        p.join(max(0.0, deadline - time.monotonic()))
        if p.is_alive():
            p.kill()
            p.join()
            codes.append(-9)
        else:
            codes.append(p.exitcode)
    return codes


def _launched(env: dict, target: Callable, args: tuple) -> None:
    os.environ.update(env)
    target(*args)


# -- the command line: torchrun --nproc-per-node N -m talkstream generate --pipeline tpp ... ----------------------
def tpp_stream_config(cfg: StreamConfig, world: int) -> StreamConfig:
    """A checkpoint's stream settings on ``world`` ranks: the euler sampler runs one step a DiT rank
    (``world - 1``); a few-step schedule keeps its steps and needs at most one rank a step plus the decode rank."""
    if cfg.sampler == "euler":
        cfg = replace(cfg, steps=world - 1)
    n = len(cfg.sigmas()) - 1
    if cfg.sampler == "euler" and n != world - 1:
        raise ValueError(f"{world} ranks: the schedule from reference_init {cfg.reference_init} has {n} euler steps")
    if not 1 <= world - 1 <= n:
        raise ValueError(f"{world} ranks for {n} denoising steps: the pipeline runs on 2 .. {n + 1} (steps + 1) ranks")
    return cfg


def _weights_root(weights) -> tuple[Path, Path]:
    from .avatar import WEIGHTS

    root = Path(weights) if weights else WEIGHTS
    dit_file = root if root.suffix == ".safetensors" else root / "causal.safetensors"
    return dit_file, dit_file.parent


def _load_dit(weights, device: str, dtype: torch.dtype) -> WanDiT:
    from ..models.checkpoint import load_checkpoint

    dit_file, _ = _weights_root(weights)
    if not (dit_file.exists() or dit_file.with_name(dit_file.name + ".index.json").exists()):
        raise FileNotFoundError(f"no causal model at {dit_file} (train one: talkstream train causal)")
    return load_checkpoint(dit_file, device=device, dtype=dtype)


def _load_decoder(weights, decoder: str | None, device: str, dtype: torch.dtype):
    """The tiny decoder in the stream's dtype where the weights have one (or asked for), else the VAE in fp32, as
    ``Avatar.from_pretrained`` loads them."""
    from ..models.checkpoint import load_checkpoint

    _, root = _weights_root(weights)
    decoder = decoder or ("tiny" if (root / "tiny_decoder.safetensors").exists() else "vae")
    if decoder == "tiny":
        return load_checkpoint(root / "tiny_decoder.safetensors", device=device, dtype=dtype)
    return load_checkpoint(root / "vae.safetensors", device=device, dtype=torch.float32)


def generate_tpp(args) -> None:
    """``talkstream generate --pipeline tpp`` in one of the N processes torchrun started: rank 0 reads the image,
    audio and prompt and runs the first step(s), ranks 1 .. N-2 the next steps, rank N-1 decodes and writes the
    mp4 (with the audio) and prints the run's JSON. A failure anywhere ends every process with one line naming the
    failing rank."""
    from ..machine import check_device

    if "RANK" not in os.environ or int(os.environ.get("WORLD_SIZE", "1")) < 2:
        raise ValueError(
            "--pipeline tpp runs one process a denoising step plus a decode process: start it with torchrun "
            "--nproc-per-node N -m talkstream generate --pipeline tpp ... (N = steps + 1, at least 2)"
        )
    check_device(args.device)
    if Path(args.out).is_dir():
        raise ValueError(
            f"--out {args.out}: is a directory; name the file to write (e.g. {Path(args.out) / 'out.mp4'})"
        )
    proc = init_pipeline(TPPConfig(), args.device)
    stop_on_failure(lambda: _tpp_rank(args, proc))


def _tpp_rank(args, proc: PipelineProcess) -> None:
    rank, world, dev = proc.rank, proc.world, proc.device
    try:
        if rank == 0:  # the checkpoint decides the settings and the dtype; every rank loads its part in that dtype
            avatar = _tpp_model(args, dev)
            cfg = TPPConfig(tpp_stream_config(avatar.cfg, world))
            proc.share("config", (cfg, str(next(avatar.dit.parameters()).dtype)))
            job = _tpp_inputs(args, avatar, dev)
        else:
            cfg, dtype = proc.share("config")
            dtype = getattr(torch, dtype.replace("torch.", ""))
            if rank < world - 1:
                dit = _load_dit(args.weights, dev, dtype)
            else:
                decoder = _load_decoder(args.weights, args.decoder, dev, dtype)
    except BaseException as e:  # noqa: BLE001 - every rank hears of it
        proc.fail(e)
    st = proc.stream(cfg)
    if rank == 0:
        st.run_input(avatar.dit, job["reference"], job["audio"], job["text"], job["mask"], extra=job["extra"])
    elif rank < world - 1:
        st.run_steps(dit)
    else:
        _write_frames(args, st, decoder, world)
    proc.close()


def _tpp_model(args, device: str):
    """Rank 0: the model (DiT + VAE encoder, Whisper and the text encoder on first use) and its stream settings."""
    from .avatar import Avatar

    opts = dict(anchor=args.anchor, audio_guidance=args.audio_guidance, seed=args.seed)
    for name in ("sampler", "reference_init", "start_from"):
        if getattr(args, name, None) is not None:
            opts[name] = getattr(args, name)
    return Avatar.from_pretrained(args.weights, device=device, decoder="vae", size=args.size, **opts)


def _tpp_inputs(args, avatar, device: str) -> dict:
    """Rank 0: the stream's inputs (reference latent, audio windows, prompt) as ``Avatar.generate`` prepares them."""
    import sys

    from ..media import SAMPLE_RATE
    from .avatar import BUNDLED_REFERENCE, load_audio, load_reference, speak
    from .engine import FPS, AudioFeed
    from .offline import audio_span, frames_to_video

    if args.image is None:
        args.image = BUNDLED_REFERENCE
        print(f"talkstream: no --image given: using the bundled reference image {args.image}", file=sys.stderr)
    if args.say is not None and not args.say.strip():
        raise ValueError("--say text is empty")
    wav = speak(args.say) if args.say is not None else load_audio(args.audio)
    n_frames = max(1, int(round(len(wav) / SAMPLE_RATE * FPS)))
    ref = load_reference(args.image, args.size)
    features = avatar.whisper.encode(np.pad(wav, (0, SAMPLE_RATE // 2)))
    text, mask = avatar.encode_prompt(args.prompt)
    with torch.no_grad():
        z_ref = avatar.vae.encode(frames_to_video(ref[None], args.size).to(device))
    feed = AudioFeed(*audio_span(avatar.dit))
    feed.push(features)
    feed.close()

    def audio(first: int, k: int) -> torch.Tensor:
        if first * 4 - 3 >= n_frames:
            raise StopIteration
        return feed.windows(first, k)

    extra = dict(n_frames=n_frames, wav=wav[: int(n_frames * SAMPLE_RATE / FPS)])
    return dict(reference=z_ref, audio=audio, text=text, mask=mask, extra=extra)


def _write_frames(args, st: TPPStream, decoder, world: int) -> None:
    import json

    from tqdm import tqdm

    from ..media import write_video
    from .engine import FPS

    extra = st.start_extra()
    n_frames = extra["n_frames"]
    stats = TPPStats()
    bar = tqdm(total=n_frames, desc=f"generate (tpp, {world} ranks)", unit="frame", disable=args.quiet)
    written = [0]

    def frames() -> Iterator[np.ndarray]:
        for idx, img in st.frames(decoder, stats):  # every chunk, so that the pipeline runs to its stop
            if idx < n_frames:
                bar.update()
                written[0] += 1
                yield img

    try:
        write_video(args.out, frames(), FPS, audio=extra["wav"])
    finally:
        bar.close()
    elapsed = stats.chunk_times[-1] - stats.started if stats.chunk_times else 0.0
    steady = stats.steady_fps(4 * st.cfg.stream.chunk)
    res = dict(
        out=str(args.out),
        frames=written[0],
        seconds=round(n_frames / FPS, 2),
        ttff_s=round(stats.ttff or 0.0, 3),
        fps=round(written[0] / max(elapsed, 1e-9), 2),
        steady_fps=None if steady is None else round(steady, 2),
        real_time_factor=round(written[0] / max(elapsed, 1e-9) / FPS, 3),
        pipeline="tpp",
        ranks=world,
        layout=st.roles,
        device=args.device,
    )
    print(json.dumps(res))


__all__ = [
    "ControlChannel",
    "Heartbeat",
    "PipelineError",
    "PipelineProcess",
    "TPPConfig",
    "TPPStats",
    "TPPStream",
    "TPP_ANCHORS",
    "chunk_start",
    "generate_tpp",
    "init_pipeline",
    "launch_local",
    "noise_generator",
    "role_name",
    "split_steps",
    "stop_on_failure",
    "tf_step",
    "timestep_forcing_stream",
    "tpp_stream_config",
]
