"""The streaming engine: chunk after chunk of latent frames with a bounded KV cache, anchors, async decode.

Per chunk (``k`` latent frames): fresh noise is denoised against [sinks | window] of the cache, the clean
chunk is handed to the decode worker, then committed (its keys/values enter the window, the oldest leave: only
the next chunk's denoising reads them, so the decode does not wait for that pass), so that decoding chunk i
overlaps committing it and denoising chunk i+1. Positions are re-based every chunk (rolling
RoPE, see ``models/kv_cache.py``), so memory and positions stay bounded for any stream length.

Anchor modes (``StreamConfig.anchor``), each a different content of the cache's sink slots:
- ``reference``: the clean reference latent is the one sink, always visible;
- ``anchor_heavy`` (LiveTalk's Anchor-Heavy Identity Sinks): ``anchor_copies`` reference entries, so a larger
  share of every query's attention goes to identity;
- ``rolling_sink`` (Live Avatar's Rolling Sink Frame + Adaptive Attention Sink): after the first chunk the
  sink is replaced by the model's own first generated frame (inside the model's learned distribution), and
  rolling RoPE keeps it just before the window however far the stream has gone;
- ``memory_bank`` (FlowAct-R1): sinks = reference + a long-term queue of up to ``long_term_size`` denoised
  latents (one pushed every ``long_term_every`` chunks); the window is the short-term memory (the latest
  ``short_term`` latents). ``refine_every`` > 0 adds memory refinement: at that interval the short-term
  memory is re-noised to ``refine_sigma`` and repaired by denoising it against reference + long-term memory
  only, then it replaces the window.
"""

from __future__ import annotations

import queue
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np
import torch

from ..diffusion.flow import add_noise, euler_sigmas, reference_sigmas, sigmas_from_timesteps
from ..models.dit import WanDiT
from ..models.vae import CausalVAE, FeatureCache, TinyDecoder
from .chunk import CACHE_MODES, SAMPLERS, commit_chunk, denoise_chunk, uses_runner
from .runner import RUNNERS, ChunkRunner
from .threads import lower_thread_priority, name_thread

FPS = 25
FEATURE_RATE = 50  # Whisper encoder frames per second
ANCHORS = ("reference", "anchor_heavy", "rolling_sink", "memory_bank")
START_FROM = ("reference", "previous")  # what a chunk starts from under reference_init < 1
EMIT = ("overlapped", "latency")  # when a chunk's frames leave the engine (StreamConfig.emit)
DEFER_COMMIT = ("auto", "all", "first", "off")  # which chunks are decoded before their commit pass
ENDED = object()  # StreamEngine._audio: the audio source has ended


@dataclass(frozen=True)
class StreamConfig:
    chunk: int = 3  # latent frames per chunk (12 video frames, 0.48 s)
    window: int = 9  # cached context latents (reference/anchor/memory_bank); memory_bank uses short_term
    sampler: str = "euler"
    steps: int = 16  # euler steps per chunk
    timesteps: tuple[float, ...] = (1000, 750, 500, 250)  # few_step schedule
    timestep_shift: float = 3.0
    audio_guidance: float = 1.0
    anchor: str = "reference"
    anchor_copies: int = 3
    long_term_size: int = 3
    long_term_every: int = 4
    short_term: int = 3
    refine_every: int = 0
    refine_sigma: float = 0.3
    refine_steps: int = 3
    reference_init: float = 1.0  # < 1: each chunk starts at this sigma from the reference latent noised to it
    start_from: str = "reference"  # what a chunk starts from when reference_init < 1: "reference" (the identity frame,
    # every chunk) or "previous" (the first from the reference, then each from the last committed latent: the pose
    # carries on from chunk to chunk instead of returning to the reference's)
    cache_mode: str = "commit"  # what enters the KV cache: "commit" (the clean chunk, one extra pass) or
    # "timestep_forcing" (the last denoising step's own keys/values, no extra pass): stream.chunk's docstring
    runner: str = "plain"  # "prepared": each chunk's context keys rotated once into per-layer buffers (no per-pass
    # concatenation); "graphs" (CUDA): that, replayed as a CUDA graph once the window is full (stream.runner)
    first_chunk: int = 0  # latent frames of the first chunk (0: ``chunk``); 1 shows the first frame after one
    # latent's work (the VAE's first latent is one video frame alone)
    emit: str = "overlapped"  # "overlapped": chunk i is decoded on a worker while chunk i+1 is denoised and its frames
    # leave after that denoising (the first chunk's at once): most frames a second when audio is all there (files);
    # "latency": each chunk is decoded as soon as it is denoised and its frames leave before the next chunk is asked
    # for: a live stream, whose next chunk's audio has not arrived yet, shows every frame one chunk sooner
    # cache_mode "commit": which chunks go to the decoder before their commit pass (frames one pass sooner, same
    # frames): "all", "first" (the first chunk only: the time to the first frame), "off" (after it: the order before,
    # kept to measure the difference); "auto": "first" on CUDA with the overlapped emit (where deferring every chunk
    # cost the plain runner 19% of its rate: docs/real-weights.md), "all" elsewhere
    defer_commit: str = "auto"
    # CPU: the decode worker (and the OpenMP workers it starts) runs this much nicer than the denoiser; same frames.
    # Off: on 2 cores it did not raise the live stream's rate and doubled a chunk's decode time (docs/speed.md)
    decode_nice: int = 0
    seed: int = 0

    def __post_init__(self) -> None:
        if self.anchor not in ANCHORS:
            raise ValueError(f"unknown anchor mode {self.anchor!r}; choose one of {ANCHORS}")
        if self.sampler not in SAMPLERS:
            raise ValueError(f"unknown sampler {self.sampler!r}; choose one of {SAMPLERS}")
        if self.chunk < 1 or self.window < 0 or self.anchor_copies < 1 or self.short_term < 1:
            raise ValueError("chunk, anchor_copies and short_term must be >= 1 and window >= 0")
        if not 0 < self.refine_sigma < 1:
            raise ValueError(f"refine_sigma must be in (0, 1), got {self.refine_sigma}")
        if not 0 < self.reference_init <= 1:
            raise ValueError(f"reference_init must be in (0, 1], got {self.reference_init}")
        if self.defer_commit not in DEFER_COMMIT:
            raise ValueError(f"unknown defer_commit {self.defer_commit!r}; choose one of {DEFER_COMMIT}")
        if self.cache_mode not in CACHE_MODES:
            raise ValueError(f"unknown cache_mode {self.cache_mode!r}; choose one of {CACHE_MODES}")
        if self.runner not in RUNNERS:
            raise ValueError(f"unknown runner {self.runner!r}; choose one of {RUNNERS}")
        if self.first_chunk < 0:
            raise ValueError(f"first_chunk must be >= 0 (0: the chunk size), got {self.first_chunk}")
        if self.start_from not in START_FROM:
            raise ValueError(f"unknown start_from {self.start_from!r}; choose one of {START_FROM}")
        if self.emit not in EMIT:
            raise ValueError(f"unknown emit {self.emit!r}; choose one of {EMIT}")
        if not 0 <= self.decode_nice <= 19:
            raise ValueError(f"decode_nice must be in 0..19, got {self.decode_nice}")

    def sigmas(self) -> torch.Tensor:
        if self.sampler == "euler":
            sig = euler_sigmas(self.steps, self.timestep_shift)
        else:
            sig = sigmas_from_timesteps(list(self.timesteps), self.timestep_shift)
        return reference_sigmas(sig, self.reference_init)

    def chunk_size(self, index: int) -> int:
        """Latent frames of chunk ``index`` (the first may be shorter: ``first_chunk``)."""
        return self.first_chunk if index == 0 and self.first_chunk else self.chunk

    @property
    def cache_window(self) -> int:
        return self.short_term if self.anchor == "memory_bank" else self.window


class AudioFeed:
    """50 Hz audio features arriving over time -> the per-latent windows a chunk needs (bounded memory).

    Latent j >= 1 covers video frames 4j-3 .. 4j (latent 0: frame 0); its window is widened by
    ``look_back`` / ``look_ahead`` video frames. Features older than any window still to come are dropped.
    """

    def __init__(self, look_back: int, look_ahead: int, temporal_factor: int = 4, dim: int = 384) -> None:
        self.lb, self.la, self.tf = look_back, look_ahead, temporal_factor
        self.buf = np.zeros((0, dim), np.float32)
        self.offset = 0  # absolute feature index of buf[0]
        self.closed = False

    @property
    def received(self) -> int:
        return self.offset + len(self.buf)

    def push(self, features: np.ndarray) -> None:
        f = np.asarray(features, np.float32)
        if f.ndim != 2 or f.shape[1] != self.buf.shape[1]:
            raise ValueError(f"audio features must be [N, {self.buf.shape[1]}], got {f.shape}")
        self.buf = np.concatenate([self.buf, f])

    def close(self) -> None:
        self.closed = True

    def _needed_end(self, first: int, k: int) -> int:  # features needed for latents first..first+k-1
        return 2 * ((first + k - 1) * self.tf + self.la + 1)

    def ready(self, first: int, k: int) -> bool:
        return self.received >= self._needed_end(first, k) or (self.closed and self.received // 2 > self.offset_frame)

    @property
    def offset_frame(self) -> int:
        return self.offset // 2

    def windows(self, first: int, k: int) -> torch.Tensor:
        """[k, 2 (tf + lb + la), A] for latents first .. first + k - 1 (the end clamps to what has arrived)."""
        n_video = self.received // 2
        if n_video <= self.offset_frame:
            raise ValueError("no audio features for this chunk")
        rows = []
        for j in range(first, first + k):
            last = j * self.tf
            rows.append(np.arange(last - self.tf + 1 - self.lb, last + self.la + 1))
        idx = np.clip(np.stack(rows), self.offset_frame, n_video - 1) - self.offset_frame
        vf = self.buf[: (n_video - self.offset_frame) * 2].reshape(-1, 2, self.buf.shape[1])
        out = torch.from_numpy(vf[idx].reshape(k, -1, self.buf.shape[1]))
        keep_from = max(0, (first + k) * self.tf - self.tf + 1 - self.lb)  # first video frame still needed
        drop = max(0, keep_from - self.offset_frame) * 2
        if drop:
            self.buf, self.offset = self.buf[drop:], self.offset + drop
        return out


def defer_mode(mode: str, device: str, emit: str) -> str:
    """``StreamConfig.defer_commit`` with "auto" resolved: "first" on CUDA with the overlapped emit (there a later
    chunk's frames leave after the next chunk's denoising either way, and deferring every chunk cost the plain runner
    throughput), "all" elsewhere (a CPU shares its cores between the pass and the decode; the latency emit shows each
    chunk one pass sooner)."""
    if mode == "auto":
        return "first" if device.startswith("cuda") and emit == "overlapped" else "all"
    return mode


class ChunkDecoder:
    """Latent chunks -> uint8 frames, chunk by chunk with a causal feature cache (VAE or tiny decoder). ``times``: a
    list that gets each call's wall seconds (on CUDA the host's side of it)."""

    def __init__(self, decoder: CausalVAE | TinyDecoder, times: list[float] | None = None) -> None:
        self.decoder, self.cache, self.times = decoder, FeatureCache(), times

    @torch.no_grad()
    def __call__(self, z: torch.Tensor) -> np.ndarray:
        t0 = time.perf_counter()
        dec = self.decoder
        z = z.to(next(dec.parameters()).dtype)
        y = dec.decode(z, self.cache) if isinstance(dec, CausalVAE) else dec(z, self.cache)
        # ((y + 1) * 127.5).round() of y clamped to [-1, 1], in place on one fp32 copy, permuted once as uint8
        x = y[0].to(torch.float32, copy=True).clamp_(-1, 1).add_(1).mul_(127.5).round_()
        out = x.to(torch.uint8).permute(1, 2, 3, 0).contiguous().cpu().numpy()
        if self.times is not None:
            self.times.append(time.perf_counter() - t0)
        return out


def submit_decode(
    pool: ThreadPoolExecutor, decode: ChunkDecoder, side: torch.cuda.Stream | None, z: torch.Tensor
) -> Future:
    """``decode(z)`` on the worker ``pool``; with a CUDA ``side`` stream it runs there, after the work queued so far
    on the current stream (an event), and ``z`` is kept alive for that stream."""
    if side is None:
        return pool.submit(decode, z)
    ready = torch.cuda.Event()
    ready.record()
    z.record_stream(side)

    def run() -> np.ndarray:
        with torch.cuda.stream(side):
            side.wait_event(ready)
            return decode(z)

    return pool.submit(run)


@dataclass
class Chunk:
    index: int
    latents: torch.Tensor  # [1, C, k, h, w]
    first_frame: int  # absolute index of its first video frame
    denoise_s: float = 0.0  # wall time of its denoising (and commit pass and anchor updates)
    started: float = 0.0  # perf_counter when its denoising began
    handed: bool = False  # its latents went to the engine's ``hand`` callback before its commit pass


@dataclass
class StreamStats:
    started: float = field(default_factory=time.perf_counter)
    first_frame_at: float | None = None
    frames: int = 0
    chunks: int = 0
    denoise_s: float = 0.0
    chunk_latency_s: list[float] = field(default_factory=list)  # per chunk: start of its denoising -> its first
    # frame leaving the engine (denoise + decode + any hold): what a live stream's playout delay must cover
    # per chunk, wall seconds of each stage: "audio" (waiting for and encoding its audio: the audio_chunks call),
    # "denoise" (next_chunk), "decode" (the decoder's call)
    stages: dict[str, list[float]] = field(default_factory=lambda: {"audio": [], "denoise": [], "decode": []})

    @property
    def ttff(self) -> float | None:
        return None if self.first_frame_at is None else self.first_frame_at - self.started

    @property
    def fps(self) -> float:
        return self.frames / max(time.perf_counter() - self.started, 1e-9)


class StreamEngine:
    """Generates latent chunks for one stream; ``frames()`` turns them into decoded frames asynchronously."""

    def __init__(
        self,
        dit: WanDiT,
        decoder: CausalVAE | TinyDecoder,
        cfg: StreamConfig = StreamConfig(),
        device: str = "cpu",
        async_decode: bool = True,
    ) -> None:
        self.dit, self.decoder, self.cfg, self.device = dit.eval(), decoder.eval(), cfg, device
        self.async_decode = async_decode
        self.dtype = next(dit.parameters()).dtype  # bf16 weights: run the stream in bf16
        # called by ``next_chunk`` with each clean chunk before its commit pass; True defers that pass (and the anchor
        # updates) to ``finish_chunk``. ``frames`` sets it to hand the latents to the decoder one pass sooner.
        self.hand: Callable[[Chunk], bool] | None = None
        self._pending: Callable[[], None] | None = None

    # -- state ----------------------------------------------------------------------------------------
    def start(
        self, reference: torch.Tensor, text: torch.Tensor | None = None, text_mask: torch.Tensor | None = None
    ) -> None:
        """reference: the clean reference latent [1, C, 1, h, w] (normalised VAE latent)."""
        c = self.cfg
        self.reference = reference.to(self.device, self.dtype)
        self.set_prompt(text, text_mask)
        self.cache = self.dit.new_cache(window=c.cache_window)
        self.gen = torch.Generator(device=self.device).manual_seed(c.seed)
        self.sigmas = c.sigmas().to(self.device, torch.float32)
        self.n_chunks = 0
        self.next_latent = 0
        self.long_term: deque[torch.Tensor] = deque(maxlen=c.long_term_size)
        self.short_term: torch.Tensor | None = None
        self.last_audio: torch.Tensor | None = None
        self.last_latent: torch.Tensor | None = None
        self.refinements = 0
        self._pending = None
        if getattr(self, "runner", None) is None:  # kept across restarts: a warm-up's captured graph stays valid
            graphs = c.runner == "graphs" and str(self.device).startswith("cuda")
            use = c.runner != "plain" and ChunkRunner.supports(self.dit)
            self.runner = ChunkRunner(self.dit, graphs=graphs) if use else None
        sinks = self.reference.repeat(1, 1, c.anchor_copies, 1, 1) if c.anchor == "anchor_heavy" else self.reference
        self._set_sinks(sinks)

    def set_prompt(self, text: torch.Tensor | None, text_mask: torch.Tensor | None = None) -> None:
        """The encoded caption [1, L, D] for the chunks from the next one on (a behaviour change mid-stream:
        speaking -> listening); committed frames keep the keys and values they were made with."""
        self.text = None if text is None else text.to(self.device, self.dtype)
        self.text_mask = None if text_mask is None else text_mask.to(self.device)

    def _set_sinks(self, sinks: torch.Tensor) -> None:
        self.sinks = sinks
        self.dit.prefill_sinks(sinks, self.cache, self.text, self.text_mask, reference=self.reference)

    @property
    def chunk_size(self) -> int:
        """Latent frames of the next chunk."""
        return self.cfg.chunk_size(self.n_chunks)

    @torch.no_grad()
    def warm_up(self, chunks: int | None = None) -> float:
        """Run ``chunks`` throw-away chunks (and their decode) so that kernels, allocators, compiled code and CUDA
        graphs are ready before the first request; the stream then starts again from scratch (same seed, same state
        as after ``start``). Default: a first chunk and a full one, or with CUDA graphs until the window is full
        and one more. Call after ``start``; returns the seconds spent."""
        t0 = time.perf_counter()
        state = (self.reference, self.text, self.text_mask, self.sinks)
        decode = ChunkDecoder(self.decoder)
        if chunks is None:
            full = self.runner is not None and self.runner.graphs
            chunks = 2 + -(-self.cfg.cache_window // self.cfg.chunk) if full else 2
        for _ in range(chunks):
            k = self.chunk_size
            audio = torch.zeros(k, self.dit.cfg.audio_tokens_per_frame, self.dit.cfg.audio_dim)
            decode(self.next_chunk(audio).latents)
        ref, text, mask, _ = state
        self.start(ref, text, mask)
        return time.perf_counter() - t0

    @torch.no_grad()
    def start_noise(self) -> torch.Tensor:
        """The next chunk's starting latents at the first sigma, drawn from this stream's generator: pure noise, or
        (``reference_init`` < 1) the reference (or the last latent) noised to that sigma."""
        c, k = self.cfg, self.chunk_size
        h, w = self.reference.shape[-2:]
        noise = torch.randn(1, self.dit.cfg.in_dim, k, h, w, generator=self.gen, device=self.device).to(self.dtype)
        if c.reference_init < 1:
            start = self.last_latent if c.start_from == "previous" and self.last_latent is not None else self.reference
            noise = add_noise(start.expand_as(noise), noise, c.reference_init)
        return noise

    def next_chunk(self, audio: torch.Tensor | None) -> Chunk:
        """Denoise and commit the next chunk's latents (``chunk_size``); ``audio`` [k, Na, A] windows (None: no
        audio input). With ``hand`` set, the clean chunk goes to it before its commit pass; if it returns True the
        pass (and the anchor updates) wait for ``finish_chunk`` (at the latest the next call)."""
        self.finish_chunk()
        c, dev = self.cfg, self.device
        k = self.chunk_size
        noise = self.start_noise()
        a = None if audio is None else audio[None].to(dev, self.dtype)
        t0 = time.perf_counter()
        deferred = c.cache_mode == "commit"  # the commit pass runs after the hand-off (timestep forcing has none)
        z = denoise_chunk(
            self.dit,
            self.cache,
            noise,
            self.sigmas,
            self.text,
            a,
            self.text_mask,
            generator=self.gen,
            sampler=c.sampler,
            audio_guidance=c.audio_guidance,
            commit=not deferred,
            cache_mode=c.cache_mode,
            runner=self.runner,
        )
        self.last_audio, self.last_latent = a, z[:, :, -1:]
        chunk = Chunk(self.n_chunks, z, 0 if self.next_latent == 0 else 1 + (self.next_latent - 1) * 4)
        self.n_chunks += 1
        self.next_latent += k
        chunk.denoise_s, chunk.started = time.perf_counter() - t0, t0
        runner = self.runner if uses_runner(self.runner, a, c.audio_guidance) else None
        text, mask = self.text, self.text_mask

        def finish() -> None:
            t1 = time.perf_counter()
            if deferred:
                commit_chunk(self.dit, self.cache, z, text, a, mask, runner)
            self._update_anchors(z)
            chunk.denoise_s += time.perf_counter() - t1

        hand = self.hand if self._defers(chunk.index) else None
        later = False
        if hand is not None:
            chunk.handed = True
            later = bool(hand(chunk))
        self._pending = finish
        if not later:
            self.finish_chunk()
        return chunk

    def _defers(self, index: int) -> bool:
        mode = defer_mode(self.cfg.defer_commit, self.device, self.cfg.emit)
        return mode == "all" or (mode == "first" and index == 0)

    @torch.no_grad()
    def finish_chunk(self) -> None:
        """Run the last chunk's deferred commit pass and anchor updates, if any (``next_chunk``'s ``hand``)."""
        pending, self._pending = self._pending, None
        if pending is not None:
            pending()

    def _update_anchors(self, z: torch.Tensor) -> None:
        c = self.cfg
        if c.anchor == "rolling_sink" and self.n_chunks == 1:  # adaptive sink: the model's own first frame
            self._set_sinks(z[:, :, :1])
        elif c.anchor == "memory_bank":
            self.short_term = z[:, :, -c.short_term :]
            if self.n_chunks % c.long_term_every == 0:
                self.long_term.append(z[:, :, -1:])
                self._set_sinks(torch.cat([self.reference, *self.long_term], dim=2))
            if c.refine_every and self.n_chunks % c.refine_every == 0:
                self._refine_short_term()

    def _refine_short_term(self) -> None:
        """FlowAct-R1 memory refinement: re-noise the short-term memory and repair it against reference +
        long-term memory only (a copy of the sinks, empty window), then make the repaired latents the window."""
        c = self.cfg
        x0 = self.short_term
        noise = torch.randn(x0.shape, generator=self.gen, device=x0.device).to(x0.dtype)
        sig = torch.linspace(c.refine_sigma, 0.0, c.refine_steps + 1, device=x0.device)
        audio = None if self.last_audio is None else self.last_audio[:, -x0.shape[2] :]
        repaired = denoise_chunk(
            self.dit,
            self.cache.sinks_only(),
            add_noise(x0, noise, sig[0]),
            sig,
            self.text,
            audio,
            self.text_mask,
            generator=self.gen,
            commit=False,
            sampler="euler",
        )
        self.cache.clear_window()
        self.cache.next_frame -= repaired.shape[2]  # the repaired latents take their old frame ids back
        self.dit.forward_chunk(repaired, 0.0, self.cache, self.text, audio, commit=True, context_mask=self.text_mask)
        self.short_term = repaired
        self.refinements += 1

    # -- frames ---------------------------------------------------------------------------------------
    def frames(
        self,
        audio_chunks: Callable[[int, int], torch.Tensor | None],
        n_chunks: int | None = None,
        stats: StreamStats | None = None,
    ) -> Iterator[tuple[int, np.ndarray]]:
        """Yield (absolute frame index, uint8 frame) for chunk after chunk.

        ``audio_chunks(first_latent, k)`` returns that chunk's audio windows, or raises StopIteration when
        the stream is closed. ``cfg.emit == "overlapped"`` (with ``async_decode``): decoding of a chunk overlaps the
        denoising of the next one, and its frames leave after it; ``"latency"``: a chunk's frames leave as soon as it
        is decoded, before the next chunk's audio is asked for (same frames, one chunk sooner).
        """
        stats = stats or StreamStats()
        if self.async_decode and self.cfg.emit == "latency":
            yield from self._frames_latency(audio_chunks, n_chunks, stats)
            return
        decode = ChunkDecoder(self.decoder, stats.stages["decode"])
        cuda = self.device.startswith("cuda")
        side = torch.cuda.Stream() if cuda and self.async_decode else None
        pool = self._decode_pool() if self.async_decode else None

        pending: deque[tuple[Chunk, Future | np.ndarray]] = deque()

        def start_decode(chunk: Chunk) -> bool:
            if pool is None:
                pending.append((chunk, decode(chunk.latents)))
                return True  # shown before its commit pass
            pending.append((chunk, submit_decode(pool, decode, side, chunk.latents)))
            # the first chunk on a CPU: shown before its commit pass, which would share the cores with its decode (on
            # CUDA the pass runs meanwhile, the decode on its own stream)
            return side is None and stats.first_frame_at is None and len(pending) == 1

        self.hand = start_decode
        try:
            i = 0
            while n_chunks is None or i < n_chunks:
                audio = self._audio(audio_chunks, stats)
                if audio is ENDED:
                    break
                chunk = self._next(audio, stats)
                if not chunk.handed:  # a next_chunk that did not call ``hand`` (e.g. a batch of streams' chunks)
                    start_decode(chunk)
                # the first chunk is shown as soon as it is decoded (not after the next chunk's denoising): the time
                # to the first frame is one chunk's denoising + its decode; later chunks overlap decode with denoising
                first = stats.first_frame_at is None
                while pending and (pool is None or first or pending[0][1].done() or len(pending) > 1):
                    yield from self._emit(pending.popleft(), stats)
                    first = False
                self.finish_chunk()  # a deferred commit pass, before the next chunk's audio is asked for
                stats.denoise_s += chunk.denoise_s
                i += 1
            while pending:
                yield from self._emit(pending.popleft(), stats)
        finally:
            self.hand = None
            self.finish_chunk()
            if pool is not None:
                pool.shutdown(wait=True, cancel_futures=True)

    def _frames_latency(
        self, audio_chunks: Callable[[int, int], torch.Tensor | None], n_chunks: int | None, stats: StreamStats
    ) -> Iterator[tuple[int, np.ndarray]]:
        """``emit="latency"``: a producer thread asks for audio, denoises and hands each chunk to the decode worker;
        the caller gets a chunk's frames as soon as that decode is done, while the producer denoises the next chunk
        (or waits for its audio). At most one decoded chunk waits for the caller (bounded memory); an error on either
        thread is raised here; closing this generator stops the producer at its next chunk."""
        decode = ChunkDecoder(self.decoder, stats.stages["decode"])
        side = torch.cuda.Stream() if self.device.startswith("cuda") else None
        pool = self._decode_pool()
        handed: queue.Queue = queue.Queue(1)
        stop = threading.Event()
        end = object()

        def hand(item) -> bool:
            while not stop.is_set():
                try:
                    handed.put(item, timeout=0.05)
                    return True
                except queue.Full:
                    continue
            return False

        late: list = []  # a decoded-chunk hand-off that found the caller busy: made after the commit pass

        def start_decode(chunk: Chunk) -> bool:
            """To the decoder and on to the caller before the chunk's commit pass (which runs meanwhile; a caller
            still busy with the chunk before does not hold the pass up)."""
            item = (chunk, submit_decode(pool, decode, side, chunk.latents))
            try:
                handed.put_nowait(item)
            except queue.Full:
                late.append(item)
            return False

        def produce() -> None:
            name_thread("ts-producer")  # (its OpenMP workers, started by its first kernel, carry the name)
            try:
                i = 0
                while (n_chunks is None or i < n_chunks) and not stop.is_set():
                    audio = self._audio(audio_chunks, stats)
                    if audio is ENDED:
                        break
                    chunk = self._next(audio, stats)
                    stats.denoise_s += chunk.denoise_s
                    if not chunk.handed:  # a next_chunk that did not call ``hand`` (e.g. a batch of streams' chunks)
                        start_decode(chunk)
                    if late and not hand(late.pop()):
                        return
                    i += 1
                hand((end, None))
            except BaseException as e:  # handed to the caller
                hand((end, e))

        self.hand = start_decode

        producer = threading.Thread(target=produce, name="ts-producer", daemon=True)
        producer.start()
        try:
            while True:
                chunk, res = handed.get()
                if chunk is end:
                    if res is not None:
                        raise res
                    return
                yield from self._emit((chunk, res), stats)
        finally:
            stop.set()
            producer.join()
            self.hand = None
            pool.shutdown(wait=True, cancel_futures=True)

    def _decode_pool(self) -> ThreadPoolExecutor:
        """The decode worker: named ``ts-decode``; on a CPU ``cfg.decode_nice`` nicer than the denoiser."""
        nice = 0 if self.device.startswith("cuda") else self.cfg.decode_nice

        def init() -> None:
            name_thread("ts-decode")
            lower_thread_priority(nice)

        return ThreadPoolExecutor(1, thread_name_prefix="ts-decode", initializer=init)

    def _audio(self, audio_chunks: Callable[[int, int], torch.Tensor | None], stats: StreamStats):
        """The next chunk's audio windows, or ``ENDED`` when the source has ended; its wall time into ``stats``."""
        t0 = time.perf_counter()
        try:
            audio = audio_chunks(self.next_latent, self.chunk_size)
        except StopIteration:
            return ENDED
        stats.stages["audio"].append(time.perf_counter() - t0)
        return audio

    def _next(self, audio: torch.Tensor | None, stats: StreamStats) -> Chunk:
        """``next_chunk`` counted in ``stats`` (its wall time: denoising, a commit pass not deferred, the hand-off)."""
        t0 = time.perf_counter()
        chunk = self.next_chunk(audio)
        stats.chunks += 1
        stats.stages["denoise"].append(time.perf_counter() - t0)
        return chunk

    @staticmethod
    def _emit(item, stats: StreamStats) -> Iterator[tuple[int, np.ndarray]]:
        chunk, res = item
        frames = res.result() if isinstance(res, Future) else res
        for j, f in enumerate(frames):
            if stats.first_frame_at is None:
                stats.first_frame_at = time.perf_counter()
            if j == 0:
                stats.chunk_latency_s.append(time.perf_counter() - chunk.started)
            stats.frames += 1
            yield chunk.first_frame + j, f


__all__ = [
    "ANCHORS",
    "EMIT",
    "AudioFeed",
    "ChunkDecoder",
    "Chunk",
    "FPS",
    "StreamConfig",
    "StreamEngine",
    "StreamStats",
]
