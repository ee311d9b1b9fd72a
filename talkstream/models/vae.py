"""A causal 3D convolutional VAE (Wan-VAE style) and a tiny fast decoder.

Time is causal everywhere: convolutions pad only on the past, normalisation is per position (RMS over
channels), and temporal down/up-sampling keeps the first frame alone and then groups frames by the
temporal factor (1 + 4m frames <-> 1 + m latents). A ``FeatureCache`` carries each causal layer's last
input frames from one call to the next, so encoding or decoding chunk by chunk equals doing the whole
clip at once (to float rounding).
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from .config import TinyDecoderConfig, VAEConfig


class FeatureCache(dict):
    """State of a chunked encode/decode: per causal layer, its last input frames (and 'started' flags)."""


class ChannelRMSNorm(nn.Module):
    """RMS norm over channels at every (t, h, w): causal and independent of chunking."""

    def __init__(self, channels: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight.view(1, -1, *([1] * (x.ndim - 2)))
        return x * torch.rsqrt(x.pow(2).mean(1, keepdim=True) + self.eps) * w


def conv3d_as_2d(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, time_stride: int = 1, padding: int = 0
) -> torch.Tensor:
    """A 3D convolution without time padding, computed as one 2D convolution over stacked time windows.

    x [B, C, T, H, W], weight [O, C, k, kh, kw] -> [B, O, T', H', W'] with T' = (T - k) // time_stride + 1.
    cuDNN's 2D kernels are far faster than its 3D ones for the thin time kernels used here (1-3 frames).
    """
    B, C, T, H, W = x.shape
    O, _, k = weight.shape[:3]
    n = (T - k) // time_stride + 1
    win = torch.stack([x[:, :, j : j + time_stride * (n - 1) + 1 : time_stride] for j in range(k)], dim=2)
    win = win.permute(0, 3, 1, 2, 4, 5).reshape(B * n, C * k, H, W)  # [B n, C k, H, W]: C major, k minor
    y = F.conv2d(win, weight.reshape(O, C * k, *weight.shape[3:]), bias, padding=padding)
    return y.view(B, n, O, *y.shape[2:]).transpose(1, 2)


class CausalConv3d(nn.Conv3d):
    """3x3 spatial convolution over ``time_kernel`` frames: the current one and the ones before it."""

    def __init__(self, cin: int, cout: int, kernel: int = 3, time_kernel: int | None = None) -> None:
        tk = kernel if time_kernel is None else time_kernel
        super().__init__(cin, cout, (tk, kernel, kernel), padding=(0, kernel // 2, kernel // 2))
        self.time_pad = tk - 1

    def forward(self, x: torch.Tensor, cache: FeatureCache | None = None) -> torch.Tensor:
        if self.time_pad:
            prev = None if cache is None else cache.get(id(self))
            if prev is None:  # a clip's start: its first frame replicated (as if the video had been still)
                prev = x[:, :, :1].expand(-1, -1, self.time_pad, -1, -1)
            x = torch.cat([prev, x], dim=2)
            if cache is not None:
                cache[id(self)] = x[:, :, -self.time_pad :].detach()
        return conv3d_as_2d(x, self.weight, self.bias, padding=self.padding[1])


class ResBlock(nn.Module):
    def __init__(self, cin: int, cout: int, time_kernel: int = 3) -> None:
        super().__init__()
        self.norm1, self.conv1 = ChannelRMSNorm(cin), CausalConv3d(cin, cout, time_kernel=time_kernel)
        self.norm2, self.conv2 = ChannelRMSNorm(cout), CausalConv3d(cout, cout, time_kernel=time_kernel)
        self.skip = nn.Conv3d(cin, cout, 1) if cin != cout else nn.Identity()

    def forward(self, x: torch.Tensor, cache: FeatureCache | None) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)), cache)
        h = self.conv2(F.silu(self.norm2(h)), cache)
        return self.skip(x) + h


def _per_frame(fn, x: torch.Tensor) -> torch.Tensor:
    B, C, T = x.shape[:3]
    y = fn(x.transpose(1, 2).flatten(0, 1))
    return y.view(B, T, *y.shape[1:]).transpose(1, 2)


class Downsample(nn.Module):
    """2x spatial (per frame), optionally 2x in time: frame 0 alone, then pairs (1,2), (3,4), ..."""

    def __init__(self, channels: int, temporal: bool) -> None:
        super().__init__()
        self.spatial = nn.Conv2d(channels, channels, 3, stride=2, padding=1)
        self.temporal = nn.Conv3d(channels, channels, (2, 1, 1), stride=(2, 1, 1)) if temporal else None

    def forward(self, x: torch.Tensor, cache: FeatureCache | None) -> torch.Tensor:
        x = _per_frame(self.spatial, x)
        if self.temporal is None:
            return x
        first = cache is None or not cache.get(id(self))
        if first:  # the clip's first frame stands alone: pair it with itself
            x = torch.cat([x[:, :, :1], x], dim=2)
        if cache is not None:
            cache[id(self)] = True
        if x.shape[2] % 2:
            raise ValueError("chunked encoding needs 1 + 4m frames in the first chunk and 4m in later ones")
        return conv3d_as_2d(x, self.temporal.weight, self.temporal.bias, time_stride=2)


class Upsample(nn.Module):
    """2x spatial (nearest + conv), optionally 2x in time (the clip's first latent gives one frame)."""

    def __init__(self, channels: int, temporal: bool) -> None:
        super().__init__()
        self.spatial = nn.Conv2d(channels, channels, 3, padding=1)
        self.temporal = nn.Conv3d(channels, 2 * channels, 1) if temporal else None

    def forward(self, x: torch.Tensor, cache: FeatureCache | None) -> torch.Tensor:
        if self.temporal is not None:
            B, C, T, H, W = x.shape
            y = (
                conv3d_as_2d(x, self.temporal.weight, self.temporal.bias)
                .view(B, 2, C, T, H, W)
                .permute(0, 2, 3, 1, 4, 5)
                .reshape(B, C, 2 * T, H, W)
            )
            first = cache is None or not cache.get(id(self))
            x = y[:, :, 1:] if first else y
            if cache is not None:
                cache[id(self)] = True
        return _per_frame(lambda f: self.spatial(F.interpolate(f, scale_factor=2.0, mode="nearest")), x)


class Encoder(nn.Module):
    def __init__(self, cfg: VAEConfig) -> None:
        super().__init__()
        ch = [cfg.base_channels * m for m in cfg.channel_mult]
        tk, tk_hi = cfg.temporal_kernel, cfg.temporal_kernel if cfg.temporal_everywhere else 1
        self.conv_in = CausalConv3d(cfg.image_channels, ch[0], time_kernel=tk_hi)
        self.stages = nn.ModuleList()
        for i in range(len(ch)):
            blocks = nn.ModuleList(
                [ResBlock(ch[max(i - 1, 0)] if j == 0 else ch[i], ch[i], tk_hi) for j in range(cfg.num_res_blocks)]
            )
            down = Downsample(ch[i], cfg.temporal_down[i]) if i < len(ch) - 1 else None
            self.stages.append(nn.ModuleDict(dict(blocks=blocks, down=down) if down else dict(blocks=blocks)))
        self.mid = ResBlock(ch[-1], ch[-1], tk)
        self.norm_out = ChannelRMSNorm(ch[-1])
        self.conv_out = CausalConv3d(ch[-1], 2 * cfg.latent_dim, time_kernel=tk)

    def forward(self, x: torch.Tensor, cache: FeatureCache | None) -> torch.Tensor:
        h = self.conv_in(x, cache)
        for stage in self.stages:
            for blk in stage["blocks"]:
                h = blk(h, cache)
            if "down" in stage:
                h = stage["down"](h, cache)
        h = self.mid(h, cache)
        return self.conv_out(F.silu(self.norm_out(h)), cache)


class Decoder(nn.Module):
    def __init__(self, cfg: VAEConfig) -> None:
        super().__init__()
        ch = [cfg.base_channels * m for m in cfg.channel_mult][::-1]
        tdown = list(cfg.temporal_down)[::-1]
        tk, tk_hi = cfg.temporal_kernel, cfg.temporal_kernel if cfg.temporal_everywhere else 1
        self.conv_in = CausalConv3d(cfg.latent_dim, ch[0], time_kernel=tk)
        self.mid = ResBlock(ch[0], ch[0], tk)
        self.stages = nn.ModuleList()
        for i in range(len(ch)):
            blocks = nn.ModuleList(
                [ResBlock(ch[max(i - 1, 0)] if j == 0 else ch[i], ch[i], tk_hi) for j in range(cfg.num_res_blocks + 1)]
            )
            up = Upsample(ch[i], tdown[i]) if i < len(ch) - 1 else None
            self.stages.append(nn.ModuleDict(dict(blocks=blocks, up=up) if up else dict(blocks=blocks)))
        self.norm_out = ChannelRMSNorm(ch[-1])
        self.conv_out = CausalConv3d(ch[-1], cfg.image_channels, time_kernel=tk_hi)

    def forward(self, z: torch.Tensor, cache: FeatureCache | None) -> torch.Tensor:
        h = self.mid(self.conv_in(z, cache), cache)
        for stage in self.stages:
            for blk in stage["blocks"]:
                h = blk(h, cache)
            if "up" in stage:
                h = stage["up"](h, cache)
        return self.conv_out(F.silu(self.norm_out(h)), cache)


class CausalVAE(nn.Module):
    """Video [B, 3, 1 + 4m, H, W] in [-1, 1] <-> latents [B, C, 1 + m, H / s, W / s]."""

    def __init__(self, cfg: VAEConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.encoder = Encoder(cfg)
        self.decoder = Decoder(cfg)
        # per-channel latent statistics, set after training so the DiT sees ~unit-variance latents
        self.register_buffer("latent_mean", torch.zeros(cfg.latent_dim))
        self.register_buffer("latent_std", torch.ones(cfg.latent_dim))

    def _check_video(self, x: torch.Tensor, first_chunk: bool) -> None:
        s, tf = self.cfg.spatial_factor, self.cfg.temporal_factor
        if x.ndim != 5 or x.shape[1] != self.cfg.image_channels:
            raise ValueError(f"video must be [B, {self.cfg.image_channels}, T, H, W], got {tuple(x.shape)}")
        if x.shape[3] % s or x.shape[4] % s:
            raise ValueError(f"video height/width {tuple(x.shape[3:])} must be multiples of {s}")
        T = x.shape[2]
        if (first_chunk and (T - 1) % tf) or (not first_chunk and T % tf):
            raise ValueError(f"video needs 1 + {tf}m frames (then {tf}m per later chunk), got {T}")

    def encode_moments(self, x: torch.Tensor, cache: FeatureCache | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        self._check_video(x, cache is None or not cache)
        mean, logvar = self.encoder(x, cache).chunk(2, dim=1)
        return mean, logvar.clamp(-30.0, 20.0)

    def encode(
        self, x: torch.Tensor, cache: FeatureCache | None = None, sample: bool = False, normalize: bool = True
    ) -> torch.Tensor:
        mean, logvar = self.encode_moments(x, cache)
        z = mean + torch.randn_like(mean) * (0.5 * logvar).exp() if sample else mean
        return self.normalize(z) if normalize else z

    def normalize(self, z: torch.Tensor) -> torch.Tensor:
        return (z - self.latent_mean.view(1, -1, 1, 1, 1)) / self.latent_std.view(1, -1, 1, 1, 1)

    def denormalize(self, z: torch.Tensor) -> torch.Tensor:
        return z * self.latent_std.view(1, -1, 1, 1, 1) + self.latent_mean.view(1, -1, 1, 1, 1)

    def decode(self, z: torch.Tensor, cache: FeatureCache | None = None, normalized: bool = True) -> torch.Tensor:
        if z.ndim != 5 or z.shape[1] != self.cfg.latent_dim:
            raise ValueError(f"latents must be [B, {self.cfg.latent_dim}, T, h, w], got {tuple(z.shape)}")
        return self.decoder(self.denormalize(z) if normalized else z, cache)


class _MemBlock(nn.Module):
    """A residual block that also sees the previous latent frame's input (causal memory, TAEHV-style): the
    memory is the stage's input one latent back, so every latent of a clip runs in parallel."""

    def __init__(self, c: int) -> None:
        super().__init__()
        self.conv = nn.Sequential(nn.Conv2d(2 * c, c, 3, padding=1), nn.ReLU(), nn.Conv2d(c, c, 3, padding=1))

    def forward(self, x: torch.Tensor, prev: torch.Tensor) -> torch.Tensor:
        return F.relu(x + self.conv(torch.cat([x, prev], 1)))


class TinyDecoder(nn.Module):
    """A small streaming decoder (TAEHV-like) for the VAE's latents (``train decoder``: true frames, optionally
    the VAE decoder's output too).

    Works in 2D on all latents at once: a stack of stages at 1x, 2x, 4x the latent resolution, each with
    memory blocks that see the previous latent's features, then one convolution that emits
    ``temporal_factor`` frames at half the output resolution and a pixel shuffle to full resolution (no
    full-resolution convolution at all). Each latent becomes ``temporal_factor`` frames (a clip's first
    latent one). Chunked decoding carries each memory block's last input in a ``FeatureCache``.
    """

    def __init__(self, cfg: TinyDecoderConfig) -> None:
        super().__init__()
        self.cfg = cfg
        chans = cfg.stage_channels()
        self.conv_in = nn.Conv2d(cfg.latent_dim, chans[0], 3, padding=1)
        self.stages = nn.ModuleList([nn.ModuleList([_MemBlock(c) for _ in range(cfg.blocks_per_stage)]) for c in chans])
        self.ups = nn.ModuleList(
            [
                nn.Sequential(nn.Upsample(scale_factor=2, mode="nearest"), nn.Conv2d(a, b, 3, padding=1), nn.ReLU())
                for a, b in zip(chans[:-1], chans[1:])
            ]
        )
        self.conv_out = nn.Conv2d(chans[-1], cfg.image_channels * cfg.temporal_factor * 4, 3, padding=1)
        self.register_buffer("latent_mean", torch.zeros(cfg.latent_dim))
        self.register_buffer("latent_std", torch.ones(cfg.latent_dim))

    def forward(self, z: torch.Tensor, cache: FeatureCache | None = None, normalized: bool = True) -> torch.Tensor:
        """z [B, C, T, h, w] -> frames [B, 3, T', H, W] (T' = 1 + tf (T - 1) for a whole clip)."""
        if z.ndim != 5 or z.shape[1] != self.cfg.latent_dim:
            raise ValueError(f"latents must be [B, {self.cfg.latent_dim}, T, h, w], got {tuple(z.shape)}")
        if normalized:
            z = z * self.latent_std.view(1, -1, 1, 1, 1) + self.latent_mean.view(1, -1, 1, 1, 1)
        B, _, T = z.shape[:3]
        first = cache is None or "tiny_prev" not in cache
        last = []
        h = F.relu(self.conv_in(z.transpose(1, 2).flatten(0, 1)))  # [B*T, c, h, w]
        k = 0
        for i, stage in enumerate(self.stages):
            for block in stage:
                x = h.unflatten(0, (B, T))
                before = torch.zeros_like(x[:, :1]) if first else cache["tiny_prev"][k].to(x)
                prev = torch.cat([before, x[:, :-1]], 1)  # each latent's previous latent, at this block's input
                last.append(x[:, -1:].detach())
                h = block(h, prev.flatten(0, 1))
                k += 1
            if i < len(self.ups):
                h = self.ups[i](h)
        if cache is not None:
            cache["tiny_prev"] = last
        y = F.pixel_shuffle(self.conv_out(h), 2)  # [B*T, 3 * tf, H, W]
        tf = self.cfg.temporal_factor
        y = y.view(B, T, tf, self.cfg.image_channels, *y.shape[2:]).permute(0, 3, 1, 2, 4, 5)
        y = y.reshape(B, self.cfg.image_channels, T * tf, *y.shape[4:])
        return y[:, :, tf - 1 :] if first else y
