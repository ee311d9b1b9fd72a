"""A TAEHV-style tiny autoencoder for Wan2.1 latents, loading the public ``taew2_1`` weights' layout.

Layout (module indices are the state-dict names: ``decoder.3.conv.0.weight``, ``encoder.17.bias``, ...):

* decoder: Clamp, conv(16 -> 256), ReLU, then three stages of 3 memory blocks, a 2x nearest upsample, a
  temporal grow (1x1 conv making ``stride`` frames of each input frame; stride 1, 2, 2) and a conv to the
  next width (256 -> 128 -> 64 -> 64), then ReLU and conv(64 -> 3). 8x space, 4x time, 2D convolutions only.
* encoder: conv(3 -> 64), ReLU, then three stages of a temporal pool (1x1 conv over ``stride`` stacked
  frames; stride 2, 2, 1), a stride-2 conv and 3 memory blocks, then conv(64 -> 16).

A memory block sees its own input one frame back (zeros before the stream's start), so a whole clip runs in
parallel over time and a stream carries, per memory block, its last input frame in a ``FeatureCache``:
chunked decoding equals decoding the whole clip (to float rounding). Each latent gives 4 frames; the first
3 of a stream are dropped so n latents give 1 + 4(n - 1) frames, as Wan's VAE does.

Latents in and out are Wan2.1's normalised latents, ``(mu - mean) / std``: what the DiT works in and what the
published weights were trained on (TAEHV applies no latent scale or shift; raw VAE latents are converted with
``normalized=False``). Frames are in [-1, 1] here; the published weights make [0, 1] pixels, converted here.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from .vae import FeatureCache
from .wan_vae import WAN21_LATENT_MEAN, WAN21_LATENT_STD


class TAEHVError(ValueError):
    pass


def _conv(cin: int, cout: int, **kw) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, 3, padding=1, **kw)


class Clamp(nn.Module):
    """A soft clamp of the latents to (-3, 3)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(x / 3) * 3


class MemBlock(nn.Module):
    """relu(convs([x, x one frame back]) + x): a residual block with a one-frame causal memory."""

    def __init__(self, cin: int, cout: int) -> None:
        super().__init__()
        self.conv = nn.Sequential(_conv(2 * cin, cout), nn.ReLU(), _conv(cout, cout), nn.ReLU(), _conv(cout, cout))
        self.skip = nn.Conv2d(cin, cout, 1, bias=False) if cin != cout else nn.Identity()

    def forward(self, x: torch.Tensor, past: torch.Tensor) -> torch.Tensor:
        return F.relu(self.conv(torch.cat([x, past], 1)) + self.skip(x))


class TPool(nn.Module):
    """``stride`` consecutive frames -> one (a 1x1 conv over their stacked channels)."""

    def __init__(self, channels: int, stride: int) -> None:
        super().__init__()
        self.stride = stride
        self.conv = nn.Conv2d(channels * stride, channels, 1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, c, h, w = x.shape
        return self.conv(x.reshape(n // self.stride, self.stride * c, h, w))


class TGrow(nn.Module):
    """One frame -> ``stride`` consecutive frames (a 1x1 conv; output channel group k is frame k)."""

    def __init__(self, channels: int, stride: int) -> None:
        super().__init__()
        self.stride = stride
        self.conv = nn.Conv2d(channels, channels * stride, 1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, c, h, w = x.shape
        return self.conv(x).reshape(n * self.stride, c, h, w)


class TAEHV(nn.Module):
    """The tiny Wan2.1 autoencoder. ``decode(z, cache)`` streams; calling the module decodes."""

    def __init__(
        self,
        latent_channels: int = 16,
        encoder_time_downscale: tuple[bool, bool, bool] = (True, True, False),
        decoder_time_upscale: tuple[bool, bool, bool] = (False, True, True),
        decoder_space_upscale: tuple[bool, bool, bool] = (True, True, True),
        latents_mean: tuple[float, ...] = WAN21_LATENT_MEAN,
        latents_std: tuple[float, ...] = WAN21_LATENT_STD,
    ) -> None:
        super().__init__()
        self.latent_channels = latent_channels
        e, n_f = 64, (256, 128, 64, 64)
        enc: list[nn.Module] = [_conv(3, e), nn.ReLU()]
        for down in encoder_time_downscale:
            enc += [TPool(e, 2 if down else 1), _conv(e, e, stride=2, bias=False)]
            enc += [MemBlock(e, e) for _ in range(3)]
        enc.append(_conv(e, latent_channels))
        self.encoder = nn.Sequential(*enc)
        dec: list[nn.Module] = [Clamp(), _conv(latent_channels, n_f[0]), nn.ReLU()]
        for i, (t_up, s_up) in enumerate(zip(decoder_time_upscale, decoder_space_upscale)):
            dec += [MemBlock(n_f[i], n_f[i]) for _ in range(3)]
            dec += [nn.Upsample(scale_factor=2 if s_up else 1), TGrow(n_f[i], 2 if t_up else 1)]
            dec.append(_conv(n_f[i], n_f[i + 1], bias=False))
        dec += [nn.ReLU(), _conv(n_f[3], 3)]
        self.decoder = nn.Sequential(*dec)
        self.t_downscale = 2 ** sum(encoder_time_downscale)
        self.t_upscale = 2 ** sum(decoder_time_upscale)
        self.space_factor = 2 ** sum(decoder_space_upscale)
        self.frames_to_trim = self.t_upscale - 1
        self.register_buffer("latents_mean", torch.tensor(latents_mean), persistent=False)
        self.register_buffer("latents_std", torch.tensor(latents_std), persistent=False)

    # -- the one loop: all frames in parallel, memory blocks fed their input one frame back --
    @staticmethod
    def _run(seq: nn.Sequential, x: torch.Tensor, cache: FeatureCache) -> torch.Tensor:
        """x [N, T, C, H, W] -> [N, T', C', H', W'] through ``seq``, carrying memory in ``cache``."""
        N, T = x.shape[:2]
        h = x.reshape(N * T, *x.shape[2:])
        for block in seq:
            if isinstance(block, MemBlock):
                xt = h.view(N, T, *h.shape[1:])
                prev = cache.get(id(block))
                prev = torch.zeros_like(xt[:, :1]) if prev is None else prev.to(xt.dtype)
                past = torch.cat([prev, xt[:, :-1]], 1)
                cache[id(block)] = xt[:, -1:].detach()
                h = block(h, past.reshape(h.shape))
            elif isinstance(block, TPool):
                if T % block.stride:
                    raise TAEHVError(f"the encoder needs frames in multiples of {block.stride} here, got {T}")
                h, T = block(h), T // block.stride
            elif isinstance(block, TGrow):
                h, T = block(h), T * block.stride
            else:
                h = block(h)
        return h.view(N, T, *h.shape[1:])

    def decode(
        self, z: torch.Tensor, cache: FeatureCache | None = None, normalized: bool = True, clamp: bool = True
    ) -> torch.Tensor:
        """Latents [B, 16, T, h, w] -> frames [B, 3, T', 8h, 8w] in [-1, 1] (T' = 1 + 4(T - 1) for a stream's
        first call, 4T later)."""
        if z.ndim != 5 or z.shape[1] != self.latent_channels:
            raise TAEHVError(f"latents must be [B, {self.latent_channels}, T, h, w], got {tuple(z.shape)}")
        if z.shape[2] == 0:
            raise TAEHVError("no latent frames to decode")
        cache = FeatureCache() if cache is None else cache
        first = not cache.get(id(self), False)
        cache[id(self)] = True
        if not normalized:  # raw VAE latents -> the normalised ones the network takes
            z = (z - self.latents_mean.to(z).view(1, -1, 1, 1, 1)) / self.latents_std.to(z).view(1, -1, 1, 1, 1)
        y = self._run(self.decoder, z.transpose(1, 2), cache)  # [B, T', 3, H, W] in ~[0, 1]
        if first:
            y = y[:, self.frames_to_trim :]
        y = y.transpose(1, 2) * 2 - 1
        return y.clamp(-1.0, 1.0) if clamp else y

    def encode(self, x: torch.Tensor, cache: FeatureCache | None = None, normalize: bool = True) -> torch.Tensor:
        """Frames [B, 3, T, H, W] in [-1, 1] -> latents [B, 16, T / 4, H / 8, W / 8]. A whole clip (no cache)
        whose length is not a multiple of 4 is padded at its end with its last frame; a stream's chunks must be
        multiples of 4."""
        if x.ndim != 5 or x.shape[1] != 3:
            raise TAEHVError(f"video must be [B, 3, T, H, W], got {tuple(x.shape)}")
        if x.shape[3] % self.space_factor or x.shape[4] % self.space_factor:
            raise TAEHVError(f"video height/width {tuple(x.shape[3:])} must be multiples of {self.space_factor}")
        T, k = x.shape[2], self.t_downscale
        if T % k:
            if cache is not None:
                raise TAEHVError(f"streamed chunks need a multiple of {k} frames, got {T}")
            x = torch.cat([x, x[:, :, -1:].expand(-1, -1, k - T % k, -1, -1)], 2)
        z = self._run(self.encoder, ((x + 1) / 2).transpose(1, 2), FeatureCache() if cache is None else cache)
        z = z.transpose(1, 2)
        if not normalize:  # the network's (normalised) latents -> raw VAE latents
            z = z * self.latents_std.to(z).view(1, -1, 1, 1, 1) + self.latents_mean.to(z).view(1, -1, 1, 1, 1)
        return z

    def forward(self, z: torch.Tensor, cache: FeatureCache | None = None, normalized: bool = True) -> torch.Tensor:
        return self.decode(z, cache, normalized)


def load_taehv_state(model: TAEHV, sd: dict, where: str = "state dict") -> None:
    """Load a ``taew2_1`` state dict strictly (clear errors). A temporal-grow layer stored with more frames than
    the model makes (a checkpoint with time upscaling into a preview model without) keeps its last frame."""
    own = model.state_dict()
    sd = {k: v for k, v in sd.items() if torch.is_tensor(v)}
    for i, layer in enumerate(model.decoder):
        key = f"decoder.{i}.conv.weight"
        if isinstance(layer, TGrow) and key in sd and sd[key].shape[0] > own[key].shape[0]:
            sd[key] = sd[key][-own[key].shape[0] :]
    from .checkpoint import state_dict_mismatch

    if why := state_dict_mismatch(sd, own):
        kind = f"a TAEHV checkpoint for {model.latent_channels}-channel latents (taew2_1)"
        raise TAEHVError(f"{where}: not {kind}; {why}")
    model.load_state_dict(sd, strict=True)


def load_taehv(
    path: str | os.PathLike, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32, **options
) -> TAEHV:
    """The tiny decoder from ``taew2_1.pth`` or ``taew2_1.safetensors`` (options: TAEHV's constructor's)."""
    from .checkpoint import CheckpointError, read_state_dict

    path = Path(path)
    if not path.exists():
        raise TAEHVError(f"{path}: no such file (expected taew2_1.pth or taew2_1.safetensors)")
    try:
        sd, _ = read_state_dict(path)
    except CheckpointError as e:
        raise TAEHVError(str(e)) from None
    model = TAEHV(**options)
    load_taehv_state(model, sd, str(path))
    return model.to(device=device, dtype=dtype).eval()
