"""The speed harness (``talkstream bench``): time-to-first-frame, steady FPS, per-chunk latency
percentiles, CPU RSS and GPU memory over a streaming run of any frame source.

A source is a callable returning an iterator of frame chunks ([n, H, W, 3] uint8 arrays). Sources
here: ``world`` (the renderer streaming a world clip) and ``dit`` (the streaming DiT with random
weights of a given config + the tiny decoder: real cost, meaningless pixels). ``engine_bench`` times the
product's own path (``Avatar`` with a trained model: load, warm-up, time to first frame, steady FPS, pacing).
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass

import numpy as np
import torch

from ..machine import describe


def randomize_zeros(model: torch.nn.Module, std: float = 0.02) -> torch.nn.Module:
    """Random weights of the real shapes for speed runs: a model's zero-initialised parameters (output heads,
    adapters) get N(0, std) too, so no timing multiplies zeros. In place; returns the model."""
    with torch.no_grad():
        for p in model.parameters():
            if not p.any():
                p.normal_(0, std)
    return model


def rss_mib() -> float:
    try:
        with open(f"/proc/{os.getpid()}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def measure_stream(
    source: Callable[[], Iterator[np.ndarray]], fps: float = 25.0, max_chunks: int | None = None, device: str = "cpu"
) -> dict:
    cuda = device.startswith("cuda") and torch.cuda.is_available()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    rss, gpu, lat = [], [], []
    frames = 0
    t_start = time.perf_counter()
    t_prev = t_start
    ttff = None
    for i, chunk in enumerate(source()):
        if cuda:
            torch.cuda.synchronize()
        now = time.perf_counter()
        if ttff is None:
            ttff = now - t_start
        lat.append(now - t_prev)
        t_prev = now
        frames += len(chunk)
        rss.append(rss_mib())
        if cuda:
            gpu.append(torch.cuda.memory_allocated() / 2**20)
        if max_chunks is not None and i + 1 >= max_chunks:
            break
    if ttff is None:
        raise ValueError("the source produced no frames")
    total = time.perf_counter() - t_start
    steady = lat[1:] if len(lat) > 1 else lat
    chunk_frames = frames / len(lat)
    out = dict(
        ttff_s=round(ttff, 4),
        frames=frames,
        chunks=len(lat),
        seconds=round(total, 3),
        steady_fps=round(chunk_frames * len(steady) / sum(steady), 2) if sum(steady) > 0 else None,
        real_time_factor=round(chunk_frames * len(steady) / sum(steady) / fps, 3) if sum(steady) > 0 else None,
        chunk_latency_ms=dict(
            p50=round(1000 * float(np.percentile(steady, 50)), 2),
            p95=round(1000 * float(np.percentile(steady, 95)), 2),
            p99=round(1000 * float(np.percentile(steady, 99)), 2),
        ),
        rss_mib=dict(start=round(rss[0], 1), end=round(rss[-1], 1), max=round(max(rss), 1)),
    )
    if gpu:
        out["gpu_mib"] = dict(
            start=round(gpu[0], 1), end=round(gpu[-1], 1), peak=round(torch.cuda.max_memory_allocated() / 2**20, 1)
        )
    out["machine"] = describe()
    return out


def world_source(
    seconds: float = 10.0, size: int = 256, chunk_frames: int = 12, seed: int = 0
) -> Callable[[], Iterator[np.ndarray]]:
    from ..world.behaviour import make_clip
    from ..world.render import FrameState, Renderer

    def run():
        clip = make_clip(seed, seconds)
        r = Renderer(clip.identity, size)
        for a in range(0, clip.n_frames, chunk_frames):
            yield np.stack([r.render(FrameState.from_array(s)) for s in clip.states[a : a + chunk_frames]])

    return run


def dit_source(
    config: str = "small",
    height: int = 256,
    width: int = 256,
    chunk: int = 3,
    window: int = 9,
    steps: int = 4,
    chunks: int = 20,
    device: str = "cpu",
    dtype: torch.dtype = torch.float32,
    seed: int = 0,
) -> Callable[[], Iterator[np.ndarray]]:
    """Random-weight DiT streaming + tiny-decoder decode: the real cost of the real shapes."""
    from ..diffusion.flow import sigmas_from_timesteps
    from ..models.config import TinyDecoderConfig, dit_config
    from ..models.dit import WanDiT
    from ..models.vae import FeatureCache, TinyDecoder
    from ..stream.chunk import denoise_chunk

    def run():
        cfg = dit_config(config)
        torch.manual_seed(seed)
        model = WanDiT(cfg).to(device, dtype).eval()
        decoder = TinyDecoder(TinyDecoderConfig(latent_dim=cfg.in_dim)).to(device, dtype).eval()
        with torch.no_grad():
            for p in list(model.parameters()) + list(decoder.parameters()):
                if p.abs().sum() == 0:
                    p.normal_(0, 0.02)
        g = torch.Generator(device=device).manual_seed(seed)
        h, w = height // 8, width // 8
        sig = sigmas_from_timesteps([1000, 750, 500, 250][:steps]).to(device)
        ref = torch.randn(1, cfg.in_dim, 1, h, w, generator=g, device=device, dtype=dtype)
        ctx = torch.randn(1, 16, cfg.text_dim, generator=g, device=device, dtype=dtype)
        audio = torch.randn(
            1, chunk, cfg.audio_tokens_per_frame, cfg.audio_dim, generator=g, device=device, dtype=dtype
        )
        cache = model.new_cache(window)
        dec_cache = FeatureCache()
        with torch.no_grad():
            model.prefill_sinks(ref, cache, ctx)
            for _ in range(chunks):
                noise = torch.randn(1, cfg.in_dim, chunk, h, w, generator=g, device=device, dtype=dtype)
                z = denoise_chunk(model, cache, noise, sig, ctx, audio, generator=g)
                frames = decoder(z, dec_cache)
                yield ((frames[0].permute(1, 2, 3, 0).float().clamp(-1, 1) + 1) * 127.5).byte().cpu().numpy()

    return run


# -- the streaming engine, as the product runs it -------------------------------------------------------------------
def loadavg() -> list[float] | None:
    """The machine's 1/5/15-minute load averages (CPU timings are only valid on a quiet machine: every CPU JSON
    records them before and after)."""
    try:
        return [float(x) for x in open("/proc/loadavg").read().split()[:3]]
    except OSError:
        return None


def machine_cpu_jiffies() -> tuple[int, int] | None:
    """(busy, total) CPU time of the whole machine since boot, in clock ticks (``/proc/stat``; None elsewhere): the
    difference of two readings says how much of the cores anything used meanwhile (idle and I/O wait are not busy)."""
    try:
        with open("/proc/stat") as f:
            fields = [int(x) for x in f.readline().split()[1:]]
    except (OSError, ValueError):
        return None
    total = sum(fields[:8])  # user nice system idle iowait irq softirq steal (guest time is inside user)
    return total - fields[3] - fields[4], total


@dataclass(frozen=True)
class EngineCase:
    """One streaming configuration to time (``engine_bench``)."""

    sampler: str = "few_step"
    steps: int = 2  # few_step: the first ``steps`` of (1000, 750, 500, 250); euler: that many steps
    cache_mode: str = "timestep_forcing"
    first_chunk: int = 1
    decoder: str = "tiny"
    dtype: str = "auto"
    compile: bool = False
    runner: str = "plain"  # StreamConfig.runner
    async_decode: bool = True
    chunk: int = 3
    window: int = 9
    size: int = 256
    prompt: bool = True  # an encoded caption (16 tokens) as the text context; False: no cross-attention

    @property
    def name(self) -> str:
        parts = [
            f"{self.sampler}{self.steps}",
            "tf" if self.cache_mode == "timestep_forcing" else "commit",
            f"first{self.first_chunk or self.chunk}",
            self.decoder,
            self.dtype,
        ]
        parts += ["compiled"] * self.compile + ["sync_decode"] * (not self.async_decode)
        parts += [self.runner] * (self.runner != "plain")
        parts += [f"c{self.chunk}w{self.window}"] * ((self.chunk, self.window) != (3, 9)) + [f"{self.size}px"]
        return "_".join(parts)


def _stream_config(case: EngineCase, dit):
    from ..stream.avatar import stream_config

    steps = dict(steps=case.steps) if case.sampler == "euler" else dict(timesteps=(1000, 750, 500, 250)[: case.steps])
    return stream_config(
        dit,
        sampler=case.sampler,
        cache_mode=case.cache_mode,
        first_chunk=case.first_chunk,
        chunk=case.chunk,
        window=case.window,
        audio_guidance=1.0,
        runner=case.runner,
        **steps,
    )


def engine_bench(
    case: EngineCase,
    weights: str | None = None,
    device: str = "cpu",
    chunks: int = 12,
    pace: bool = False,
    seed: int = 0,
) -> dict:
    """Time ``Avatar``'s streaming path on ``case``: start-up (load, warm-up), time to first frame of a request
    (reference image -> its cached latent -> sink prefill -> first chunk -> first decoded frame; audio features
    ready, as after the first audio packet's encoding; the reference's VAE encode is timed apart), then ``chunks``
    chunks: steady FPS over the second half with decode included, the denoising share, and (``pace``) the
    inter-frame interval and audio-video offset delivered at 25 FPS wall-clock. ``weights``: a folder (default: the
    embedded model)."""
    from ..stream.accel import compile_dit, physical_cores, stream_dtype
    from ..stream.avatar import BUNDLED_REFERENCE, Avatar, load_reference
    from ..stream.engine import FPS, AudioFeed, StreamStats
    from ..stream.offline import audio_span
    from ..stream.pacing import PacingStats, paced, prefetch

    load_before = loadavg()
    t = time.perf_counter()
    avatar = Avatar.from_pretrained(weights, device=device, decoder=case.decoder, size=case.size, dtype=case.dtype)
    avatar.cfg = _stream_config(case, avatar.dit)
    if case.compile:
        compile_dit(avatar.dit)
    load_s = time.perf_counter() - t
    warm_s = avatar.warm_up()
    avatar._references.clear()  # the face's VAE encode, timed alone: a request for a face already seen skips it
    t = time.perf_counter()
    avatar.reference_latent(load_reference(BUNDLED_REFERENCE, case.size))
    encode_s = time.perf_counter() - t
    g = torch.Generator().manual_seed(seed)
    text = torch.randn(1, 16, avatar.dit.cfg.text_dim, generator=g) if case.prompt else None
    n_frames = 1 + 4 * (case.chunk * chunks)
    feats = torch.randn(2 * n_frames + 64, avatar.dit.cfg.audio_dim, generator=g).numpy()
    lb, la = audio_span(avatar.dit)

    def run(n: int, paced_out: PacingStats | None = None):
        stats = StreamStats()
        engine = avatar._engine(BUNDLED_REFERENCE, None, text)
        engine.async_decode = case.async_decode
        prefill_s = time.perf_counter() - stats.started
        feed = AudioFeed(lb, la)
        feed.push(feats)
        feed.close()
        stamps, cpu = [], []
        frames = engine.frames(lambda first, k: feed.windows(first, k), n_chunks=n, stats=stats)
        if paced_out is not None:
            frames = paced(prefetch(frames), FPS, 0.0, paced_out)
        for _ in frames:
            stamps.append(time.perf_counter())
            cpu.append(time.process_time())
        return stats, stamps, cpu, prefill_s

    stats, stamps, cpu, prefill_s = run(chunks)
    per_chunk = 4 * case.chunk
    half = per_chunk * (chunks // 2)
    fps = half / (stamps[-1] - stamps[-1 - half])
    cpu_s = cpu[-1] - cpu[-1 - half]  # the process's CPU seconds over the same frames (all its threads)
    res = dict(
        case=case.name,
        config=asdict(case),
        dtype_used=str(stream_dtype(device, case.dtype)).replace("torch.", ""),
        weights=str(weights or "embedded causal model"),
        device=device,
        threads=torch.get_num_threads(),
        load_s=round(load_s, 3),
        warm_up_s=round(warm_s, 3),
        ttff_s=round(stats.ttff, 3),  # the face's latent cached (encoded at start-up): add reference_encode_s if not
        reference_encode_s=round(encode_s, 3),
        prefill_s=round(prefill_s, 3),
        chunks=chunks,
        frames=stats.frames,
        steady_fps=round(fps, 2),
        real_time_factor=round(fps / FPS, 3),
        cpu_s_per_chunk=round(cpu_s / (chunks // 2), 3),
        # what the CPU work would give if the process had every core to itself and kept them all busy: on a loaded
        # machine (see loadavg) a bound on the quiet machine's figure, not a measurement of it
        fps_if_cpus_fully_used=round(half / (cpu_s / physical_cores()), 2),
        denoise_ms_per_chunk=round(1000 * stats.denoise_s / stats.chunks, 1),
        rss_mib=round(rss_mib(), 1),
    )
    if pace:
        pstats = PacingStats(FPS)
        run(chunks, pstats)
        res["paced"] = pstats.summary()
    res["loadavg_before"], res["loadavg_after"] = load_before, loadavg()
    return res
