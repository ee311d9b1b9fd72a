"""The speed harness (``talkstream bench``): time-to-first-frame, steady FPS, per-chunk latency
percentiles, CPU RSS and GPU memory over a streaming run of any frame source.

A source is a callable returning an iterator of frame chunks ([n, H, W, 3] uint8 arrays). Sources
here: ``world`` (the renderer streaming a world clip) and ``dit`` (the streaming DiT with random
weights of a given config + the tiny decoder: real cost, meaningless pixels). The trained engine
plugs in the same way.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterator

import numpy as np
import torch

from ..machine import describe


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


def world_source(seconds: float = 10.0, size: int = 256, chunk_frames: int = 12, seed: int = 0):
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
):
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
