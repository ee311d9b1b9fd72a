"""The Wan2.1 video VAE (encoder + decoder), streaming, with the published weights' key layouts.

Parameter names are the original ``Wan2.1_VAE.pth`` ones (``encoder.downsamples.0.residual.2.weight``, ...), so
that file loads as is; diffusers' ``AutoencoderKLWan`` state dicts are renamed 1:1 (``diffusers_to_wan_vae``).

Wan encodes a clip chunk by chunk (its first frame alone, then 4 frames at a time) and decodes it latent by
latent, each layer carrying a feature cache. Here every layer computes the same function of the whole stream
in one pass over however many frames it is given, and keeps in a ``FeatureCache`` only what the next call
needs, so one call on the whole clip, Wan's latent-by-latent loop and any chunking agree (to float rounding):

* a causal 3x3x3 convolution sees its input padded with two zero frames before the stream's start;
* temporal upsampling passes the stream's first frame through alone and turns each later frame into two
  through a causal (3, 1, 1) convolution over the later frames only (zero-padded: the first frame never
  enters it, as in Wan);
* temporal downsampling keeps the first frame and maps frames (2j - 2, 2j - 1, 2j) to output j >= 1.

So a clip of 1 + 4m frames <-> 1 + m latents; a later chunk of 4m frames <-> m latents. Latents are normalised
per channel as Wan's pipelines use them: ``(mu - mean) / std`` with Wan2.1's published statistics.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from .vae import FeatureCache, conv3d_as_2d

# Wan2.1's latent statistics (wan/modules/vae.py, diffusers' AutoencoderKLWan defaults)
WAN21_LATENT_MEAN = (
    -0.7571, -0.7089, -0.9113, 0.1075, -0.1745, 0.9653, -0.1517, 1.5508,
    0.4134, -0.0715, 0.5517, -0.3632, -0.1922, -0.9497, 0.2503, -0.2921,
)  # fmt: skip
WAN21_LATENT_STD = (
    2.8184, 1.4541, 2.3275, 2.6558, 1.2196, 1.7708, 2.6052, 2.0743,
    3.2687, 2.1526, 2.8652, 1.5579, 1.6382, 1.1253, 2.8251, 1.9160,
)  # fmt: skip


class WanVAEError(ValueError):
    pass


@dataclass(frozen=True)
class WanVAEConfig:
    """Wan2.1's VAE shape (the defaults are the released ``Wan2.1_VAE.pth``); smaller widths for tests."""

    dim: int = 96
    z_dim: int = 16
    dim_mult: tuple[int, ...] = (1, 2, 4, 4)
    num_res_blocks: int = 2
    temperal_downsample: tuple[bool, ...] = (False, True, True)  # Wan's spelling
    latents_mean: tuple[float, ...] = WAN21_LATENT_MEAN
    latents_std: tuple[float, ...] = WAN21_LATENT_STD

    def __post_init__(self) -> None:
        if len(self.temperal_downsample) != len(self.dim_mult) - 1:
            n = len(self.dim_mult) - 1
            raise WanVAEError(f"temperal_downsample needs {n} entries, got {self.temperal_downsample}")
        if len(self.latents_mean) != self.z_dim or len(self.latents_std) != self.z_dim:
            raise WanVAEError(f"latents_mean / latents_std need {self.z_dim} entries each")

    @property
    def spatial_factor(self) -> int:
        return 2 ** (len(self.dim_mult) - 1)

    @property
    def temporal_factor(self) -> int:
        return 2 ** sum(self.temperal_downsample)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @staticmethod
    def from_diffusers(cfg: dict) -> WanVAEConfig:
        """From an ``AutoencoderKLWan`` config.json (Wan2.1 layout only: no residual blocks, no patching)."""
        if cfg.get("is_residual") or cfg.get("patch_size") not in (None, 1) or cfg.get("attn_scales"):
            raise WanVAEError("this is not a Wan2.1 VAE config (Wan2.2's residual / patched VAE is not supported)")
        if cfg.get("decoder_base_dim") not in (None, cfg.get("base_dim", 96)):
            raise WanVAEError("a decoder wider than the encoder (decoder_base_dim) is not supported")
        d = WanVAEConfig()
        return WanVAEConfig(
            dim=int(cfg.get("base_dim", d.dim)),
            z_dim=int(cfg.get("z_dim", d.z_dim)),
            dim_mult=tuple(cfg.get("dim_mult", d.dim_mult)),
            num_res_blocks=int(cfg.get("num_res_blocks", d.num_res_blocks)),
            temperal_downsample=tuple(bool(b) for b in cfg.get("temperal_downsample", d.temperal_downsample)),
            latents_mean=tuple(cfg.get("latents_mean", d.latents_mean)),
            latents_std=tuple(cfg.get("latents_std", d.latents_std)),
        )


# -- layers (Wan's module names) -------------------------------------------------------------------------
def _conv3d(x: torch.Tensor, conv: nn.Conv3d, space_pad: tuple[int, int], as_2d: bool) -> torch.Tensor:
    """``conv`` over x without time padding; optionally as one 2D convolution over stacked time windows (the same
    sum; cuDNN's 2D kernels can be much faster than its 3D ones for kernels 1-3 frames deep; on CPU it is slower)."""
    if as_2d and conv.stride[1:] == (1, 1) and space_pad[0] == space_pad[1]:
        return conv3d_as_2d(x, conv.weight, conv.bias, time_stride=conv.stride[0], padding=space_pad[0])
    return F.conv3d(x, conv.weight, conv.bias, conv.stride, (0, *space_pad))


class CausalConv3d(nn.Conv3d):
    """A 3D convolution whose time padding is all in the past (zeros before the stream's start)."""

    def __init__(self, cin: int, cout: int, kernel, stride=1, padding=0) -> None:
        super().__init__(cin, cout, kernel, stride=stride, padding=padding)
        self.time_pad = 2 * self.padding[0]
        self.space_pad = (self.padding[1], self.padding[2])
        self.as_2d = False  # WanVAE.set_conv_mode

    def forward(self, x: torch.Tensor, cache: FeatureCache | None = None) -> torch.Tensor:
        if self.time_pad:
            prev = None if cache is None else cache.get(id(self))
            if prev is None:
                prev = x.new_zeros(*x.shape[:2], self.time_pad, *x.shape[3:])
            x = torch.cat([prev.to(x.dtype), x], dim=2)
            if cache is not None:
                cache[id(self)] = x[:, :, -self.time_pad :].detach()
        return _conv3d(x, self, self.space_pad, self.as_2d)


class RMS_norm(nn.Module):  # noqa: N801 - Wan's name
    """L2 normalisation over channels times sqrt(C) and a learned gain (``gamma``)."""

    def __init__(self, dim: int, images: bool = True) -> None:
        super().__init__()
        self.scale = dim**0.5
        self.gamma = nn.Parameter(torch.ones(dim, 1, 1) if images else torch.ones(dim, 1, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float() if x.dtype in (torch.float16, torch.bfloat16) else x
        return F.normalize(xf, dim=1).to(x.dtype) * self.scale * self.gamma


def _per_frame(fn, x: torch.Tensor) -> torch.Tensor:
    B, C, T = x.shape[:3]
    y = fn(x.transpose(1, 2).reshape(B * T, C, *x.shape[3:]))
    return y.view(B, T, *y.shape[1:]).transpose(1, 2)


class _NearestUp2x(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.interpolate(x.float(), scale_factor=2.0, mode="nearest").to(x.dtype)


class Resample(nn.Module):
    """2x spatial up/down sampling, optionally 2x in time (``mode`` as Wan names it)."""

    def __init__(self, dim: int, mode: str) -> None:
        super().__init__()
        self.mode = mode
        if mode in ("upsample2d", "upsample3d"):
            self.resample = nn.Sequential(_NearestUp2x(), nn.Conv2d(dim, dim // 2, 3, padding=1))
        elif mode in ("downsample2d", "downsample3d"):
            self.resample = nn.Sequential(nn.ZeroPad2d((0, 1, 0, 1)), nn.Conv2d(dim, dim, 3, stride=2))
        else:
            raise WanVAEError(f"unknown resample mode {mode!r}")
        if mode == "upsample3d":
            self.time_conv = CausalConv3d(dim, dim * 2, (3, 1, 1), padding=(1, 0, 0))
        elif mode == "downsample3d":
            self.time_conv = CausalConv3d(dim, dim, (3, 1, 1), stride=(2, 1, 1))

    def forward(self, x: torch.Tensor, cache: FeatureCache) -> torch.Tensor:
        if self.mode == "upsample3d":
            x = self._time_up(x, cache)
        x = _per_frame(self.resample, x)
        if self.mode == "downsample3d":
            x = self._time_down(x, cache)
        return x

    def _time_up(self, x: torch.Tensor, cache: FeatureCache) -> torch.Tensor:
        started = cache.get(id(self), False)
        cache[id(self)] = True
        first, rest = (x[:, :, :0], x) if started else (x[:, :, :1], x[:, :, 1:])
        if rest.shape[2] == 0:
            return first
        B, C, n = rest.shape[:3]
        y = self.time_conv(rest, cache).view(B, 2, C, n, *rest.shape[3:])  # channels [0:C] = the earlier frame
        y = y.permute(0, 2, 3, 1, 4, 5).reshape(B, C, 2 * n, *rest.shape[3:])
        return torch.cat([first, y], dim=2)

    def _time_down(self, x: torch.Tensor, cache: FeatureCache) -> torch.Tensor:
        last = cache.get(id(self))
        tc = self.time_conv
        if last is None:  # the stream's first frame stands alone, then (0, 1, 2), (2, 3, 4), ...
            if x.shape[2] % 2 == 0:
                raise WanVAEError("the first chunk must have 1 + 4m frames")
            y = x[:, :, :1]
            if x.shape[2] > 1:
                y = torch.cat([y, _conv3d(x, tc, (0, 0), tc.as_2d)], dim=2)
        else:
            if x.shape[2] % 2:
                raise WanVAEError("a later chunk must have 4m frames")
            y = _conv3d(torch.cat([last.to(x.dtype), x], dim=2), tc, (0, 0), tc.as_2d)
        cache[id(self)] = x[:, :, -1:].detach()
        return y


class ResidualBlock(nn.Module):
    def __init__(self, in_dim: int, out_dim: int) -> None:
        super().__init__()
        self.residual = nn.Sequential(
            RMS_norm(in_dim, images=False),
            nn.SiLU(),
            CausalConv3d(in_dim, out_dim, 3, padding=1),
            RMS_norm(out_dim, images=False),
            nn.SiLU(),
            nn.Dropout(0.0),
            CausalConv3d(out_dim, out_dim, 3, padding=1),
        )
        self.shortcut = CausalConv3d(in_dim, out_dim, 1) if in_dim != out_dim else nn.Identity()

    def forward(self, x: torch.Tensor, cache: FeatureCache) -> torch.Tensor:
        h = self.shortcut(x)
        for layer in self.residual:
            x = layer(x, cache) if isinstance(layer, CausalConv3d) else layer(x)
        return x + h


class AttentionBlock(nn.Module):
    """Single-head self-attention over each frame's pixels."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.norm = RMS_norm(dim)
        self.to_qkv = nn.Conv2d(dim, dim * 3, 1)
        self.proj = nn.Conv2d(dim, dim, 1)

    def forward(self, x: torch.Tensor, cache: FeatureCache | None = None) -> torch.Tensor:
        def attend(f: torch.Tensor) -> torch.Tensor:
            n, c, h, w = f.shape
            qkv = self.to_qkv(self.norm(f)).reshape(n, 1, 3 * c, h * w).transpose(2, 3)
            q, k, v = qkv.chunk(3, dim=-1)
            o = F.scaled_dot_product_attention(q, k, v)  # [n, 1, hw, c]
            return f + self.proj(o.squeeze(1).transpose(1, 2).reshape(n, c, h, w))

        return _per_frame(attend, x)


class _Head(nn.Sequential):
    def __init__(self, dim: int, cout: int) -> None:
        super().__init__(RMS_norm(dim, images=False), nn.SiLU(), CausalConv3d(dim, cout, 3, padding=1))

    def forward(self, x: torch.Tensor, cache: FeatureCache) -> torch.Tensor:  # type: ignore[override]
        return self[2](self[1](self[0](x)), cache)


class _Stack(nn.Sequential):
    def forward(self, x: torch.Tensor, cache: FeatureCache) -> torch.Tensor:  # type: ignore[override]
        for layer in self:
            x = layer(x, cache)
        return x


def _middle(dim: int) -> _Stack:
    return _Stack(ResidualBlock(dim, dim), AttentionBlock(dim), ResidualBlock(dim, dim))


class Encoder3d(nn.Module):
    def __init__(self, cfg: WanVAEConfig) -> None:
        super().__init__()
        dims = [cfg.dim * u for u in (1, *cfg.dim_mult)]
        self.conv1 = CausalConv3d(3, dims[0], 3, padding=1)
        layers: list[nn.Module] = []
        for i, (din, dout) in enumerate(zip(dims[:-1], dims[1:])):
            for _ in range(cfg.num_res_blocks):
                layers.append(ResidualBlock(din, dout))
                din = dout
            if i != len(cfg.dim_mult) - 1:
                layers.append(Resample(dout, "downsample3d" if cfg.temperal_downsample[i] else "downsample2d"))
        self.downsamples = _Stack(*layers)
        self.middle = _middle(dims[-1])
        self.head = _Head(dims[-1], 2 * cfg.z_dim)

    def forward(self, x: torch.Tensor, cache: FeatureCache) -> torch.Tensor:
        x = self.conv1(x, cache)
        return self.head(self.middle(self.downsamples(x, cache), cache), cache)


class Decoder3d(nn.Module):
    def __init__(self, cfg: WanVAEConfig) -> None:
        super().__init__()
        dims = [cfg.dim * u for u in (cfg.dim_mult[-1], *cfg.dim_mult[::-1])]
        up = tuple(cfg.temperal_downsample[::-1])
        self.conv1 = CausalConv3d(cfg.z_dim, dims[0], 3, padding=1)
        self.middle = _middle(dims[0])
        layers: list[nn.Module] = []
        for i, (din, dout) in enumerate(zip(dims[:-1], dims[1:])):
            if i > 0:
                din = din // 2  # the previous stage's upsampling halved its channels
            for _ in range(cfg.num_res_blocks + 1):
                layers.append(ResidualBlock(din, dout))
                din = dout
            if i != len(cfg.dim_mult) - 1:
                layers.append(Resample(dout, "upsample3d" if up[i] else "upsample2d"))
        self.upsamples = _Stack(*layers)
        self.head = _Head(dims[-1], 3)

    def forward(self, x: torch.Tensor, cache: FeatureCache) -> torch.Tensor:
        x = self.middle(self.conv1(x, cache), cache)
        return self.head(self.upsamples(x, cache), cache)


class WanVAE(nn.Module):
    """Video [B, 3, 1 + 4m, H, W] in [-1, 1] <-> normalised latents [B, 16, 1 + m, H / 8, W / 8].

    ``encode`` / ``decode`` take an optional ``FeatureCache``: pass the same one for each later chunk of a
    stream (a fresh one per stream; one for encoding, another for decoding). Calling the module decodes,
    so it drops in wherever a streaming decoder is called as ``decoder(z, cache)``.
    """

    def __init__(self, cfg: WanVAEConfig = WanVAEConfig()) -> None:
        super().__init__()
        self.cfg = cfg
        self.encoder = Encoder3d(cfg)
        self.conv1 = CausalConv3d(2 * cfg.z_dim, 2 * cfg.z_dim, 1)
        self.conv2 = CausalConv3d(cfg.z_dim, cfg.z_dim, 1)
        self.decoder = Decoder3d(cfg)
        # not in the state dict: the released files carry no statistics (they live in the pipelines' code)
        self.register_buffer("latents_mean", torch.tensor(cfg.latents_mean), persistent=False)
        self.register_buffer("latents_std", torch.tensor(cfg.latents_std), persistent=False)

    def set_conv_mode(self, as_2d: bool) -> WanVAE:
        """Compute the 3D convolutions as 2D ones over stacked frames (same result; for CUDA, see ``_conv3d``)."""
        for m in self.modules():
            if isinstance(m, CausalConv3d):
                m.as_2d = as_2d
        return self

    def _stat(self, name: str, like: torch.Tensor) -> torch.Tensor:
        return getattr(self, name).to(like).view(1, -1, 1, 1, 1)

    def normalize(self, mu: torch.Tensor) -> torch.Tensor:
        return (mu - self._stat("latents_mean", mu)) / self._stat("latents_std", mu)

    def denormalize(self, z: torch.Tensor) -> torch.Tensor:
        return z * self._stat("latents_std", z) + self._stat("latents_mean", z)

    def encode_moments(self, x: torch.Tensor, cache: FeatureCache | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Raw (unnormalised) posterior mean and log-variance."""
        first = cache is None or not cache
        tf, s = self.cfg.temporal_factor, self.cfg.spatial_factor
        if x.ndim != 5 or x.shape[1] != 3:
            raise WanVAEError(f"video must be [B, 3, T, H, W], got {tuple(x.shape)}")
        if x.shape[3] % s or x.shape[4] % s:
            raise WanVAEError(f"video height/width {tuple(x.shape[3:])} must be multiples of {s}")
        T = x.shape[2]
        if (first and (T - 1) % tf) or (not first and (T % tf or T == 0)):
            raise WanVAEError(f"video needs 1 + {tf}m frames in its first chunk and {tf}m in later ones, got {T}")
        cache = FeatureCache() if cache is None else cache
        mu, logvar = self.conv1(self.encoder(x, cache)).chunk(2, dim=1)
        return mu, logvar

    def encode(self, x: torch.Tensor, cache: FeatureCache | None = None, normalize: bool = True) -> torch.Tensor:
        """The posterior mean (Wan uses it, never a sample), normalised unless ``normalize=False``."""
        mu, _ = self.encode_moments(x, cache)
        return self.normalize(mu) if normalize else mu

    def decode(
        self, z: torch.Tensor, cache: FeatureCache | None = None, normalized: bool = True, clamp: bool = True
    ) -> torch.Tensor:
        """Latents -> frames in [-1, 1]: 1 + 4(n - 1) frames for a stream's first n latents, 4n later."""
        if z.ndim != 5 or z.shape[1] != self.cfg.z_dim:
            raise WanVAEError(f"latents must be [B, {self.cfg.z_dim}, T, h, w], got {tuple(z.shape)}")
        if z.shape[2] == 0:
            raise WanVAEError("no latent frames to decode")
        cache = FeatureCache() if cache is None else cache
        x = self.decoder(self.conv2(self.denormalize(z) if normalized else z), cache)
        return x.clamp(-1.0, 1.0) if clamp else x

    def forward(self, z: torch.Tensor, cache: FeatureCache | None = None, normalized: bool = True) -> torch.Tensor:
        return self.decode(z, cache, normalized)


# -- key layouts -------------------------------------------------------------------------------------------
_RES_LEAVES = (
    ("residual.0.gamma", "norm1.gamma"),
    ("residual.2.", "conv1."),
    ("residual.3.gamma", "norm2.gamma"),
    ("residual.6.", "conv2."),
    ("shortcut.", "conv_shortcut."),
)


def _module_pairs(cfg: WanVAEConfig) -> list[tuple[str, str, bool]]:
    """(original prefix, diffusers prefix, is a residual block) for every module of the VAE."""
    pairs: list[tuple[str, str, bool]] = [
        ("encoder.conv1.", "encoder.conv_in.", False),
        ("decoder.conv1.", "decoder.conv_in.", False),
        ("conv1.", "quant_conv.", False),
        ("conv2.", "post_quant_conv.", False),
    ]
    for part in ("encoder", "decoder"):
        pairs += [
            (f"{part}.middle.0.", f"{part}.mid_block.resnets.0.", True),
            (f"{part}.middle.1.", f"{part}.mid_block.attentions.0.", False),
            (f"{part}.middle.2.", f"{part}.mid_block.resnets.1.", True),
            (f"{part}.head.0.", f"{part}.norm_out.", False),
            (f"{part}.head.2.", f"{part}.conv_out.", False),
        ]
    n_stages = len(cfg.dim_mult)
    i = 0
    for stage in range(n_stages):  # encoder: the same flat list in both layouts
        for _ in range(cfg.num_res_blocks):
            pairs.append((f"encoder.downsamples.{i}.", f"encoder.down_blocks.{i}.", True))
            i += 1
        if stage != n_stages - 1:
            pairs.append((f"encoder.downsamples.{i}.", f"encoder.down_blocks.{i}.", False))
            i += 1
    i = 0
    for stage in range(n_stages):  # decoder: a flat list vs up_blocks.{stage}.resnets / upsamplers
        for j in range(cfg.num_res_blocks + 1):
            pairs.append((f"decoder.upsamples.{i}.", f"decoder.up_blocks.{stage}.resnets.{j}.", True))
            i += 1
        if stage != n_stages - 1:
            pairs.append((f"decoder.upsamples.{i}.", f"decoder.up_blocks.{stage}.upsamplers.0.", False))
            i += 1
    return pairs


def _rename(sd: dict, cfg: WanVAEConfig, to_diffusers: bool) -> dict:
    # longest source prefix first: "encoder.conv1." must not be taken for the top-level "conv1."
    pairs = sorted(_module_pairs(cfg), key=lambda p: -len(p[1 if not to_diffusers else 0]))
    out = {}
    for key, value in sd.items():
        for orig, diff, res in pairs:
            src, dst = (orig, diff) if to_diffusers else (diff, orig)
            if not key.startswith(src):
                continue
            leaf = key[len(src) :]
            if res:
                for a, b in _RES_LEAVES:
                    fa, fb = (a, b) if to_diffusers else (b, a)
                    if leaf.startswith(fa):
                        leaf = fb + leaf[len(fa) :]
                        break
            out[dst + leaf] = value
            break
        else:
            raise WanVAEError(f"not a Wan2.1 VAE key: {key!r}")
    return out


def diffusers_to_wan_vae(sd: dict, cfg: WanVAEConfig = WanVAEConfig()) -> dict:
    """``AutoencoderKLWan`` names -> the original ``Wan2.1_VAE.pth`` names (ours)."""
    return _rename(sd, cfg, to_diffusers=False)


def wan_vae_to_diffusers(sd: dict, cfg: WanVAEConfig = WanVAEConfig()) -> dict:
    return _rename(sd, cfg, to_diffusers=True)


def detect_vae_format(keys) -> str:
    keys = list(keys)
    if any(k.startswith(("encoder.down_blocks.", "decoder.up_blocks.", "quant_conv.")) for k in keys):
        return "diffusers"
    if any(k.startswith(("encoder.downsamples.", "decoder.upsamples.")) for k in keys):
        return "wan"
    raise WanVAEError(f"not a Wan2.1 VAE state dict (first keys: {keys[:4]})")


def load_wan_vae_state(model: WanVAE, sd: dict, where: str = "state dict") -> None:
    """Load either layout strictly, naming what is missing, extra or of the wrong shape."""
    sd = {k.removeprefix("vae.").removeprefix("model."): v for k, v in sd.items() if torch.is_tensor(v)}
    if detect_vae_format(sd) == "diffusers":
        sd = diffusers_to_wan_vae(sd, model.cfg)
    own = model.state_dict()
    from .checkpoint import state_dict_mismatch

    if why := state_dict_mismatch(sd, own):
        raise WanVAEError(f"{where}: does not fit the Wan2.1 VAE (dim {model.cfg.dim}, z_dim {model.cfg.z_dim}); {why}")
    with torch.no_grad():
        for k, v in sd.items():
            own[k].copy_(v.to(own[k].dtype))


def load_wan_vae(
    path: str | os.PathLike, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32
) -> WanVAE:
    """A Wan2.1 VAE from ``Wan2.1_VAE.pth`` (original layout), a diffusers ``vae/`` folder
    (``config.json`` + ``diffusion_pytorch_model.safetensors``) or any .safetensors / .pth of either layout."""
    from .checkpoint import CheckpointError, read_state_dict

    path = Path(path)
    if not path.exists():
        raise WanVAEError(f"{path}: no such file or folder (expected Wan2.1_VAE.pth or a diffusers vae/ folder)")
    cfg = WanVAEConfig()
    if path.is_dir() and (path / "config.json").exists():
        try:
            cfg = WanVAEConfig.from_diffusers(json.loads((path / "config.json").read_text()))
        except json.JSONDecodeError as e:
            raise WanVAEError(f"{path / 'config.json'}: not JSON ({e})") from None
    try:
        sd, _ = read_state_dict(path)
    except CheckpointError as e:
        raise WanVAEError(str(e)) from None
    with torch.device("meta"):
        model = WanVAE(cfg)
    model = model.to_empty(device="cpu")
    model.latents_mean.copy_(torch.tensor(cfg.latents_mean))
    model.latents_std.copy_(torch.tensor(cfg.latents_std))
    load_wan_vae_state(model, sd, str(path))
    return model.to(device=device, dtype=dtype).eval()


# -- speed ---------------------------------------------------------------------------------------------------
@torch.no_grad()
def bench_decoders(
    device: str | torch.device = "cuda",
    size: int = 512,
    latents: int = 3,
    dtype: torch.dtype | None = None,
    repeats: int = 3,
    vae: WanVAE | None = None,
    tiny=None,
    include_vae: bool = True,
    warmup: bool = True,
) -> dict:
    """Per-frame decode cost of the Wan2.1 VAE and the TAEHV tiny decoder (random weights of the real shapes,
    or the models given) on ``device``, at ``size`` x ``size``, streaming ``latents`` latents per call (one
    LiveTalk chunk: 3 latents = 12 frames) after a first call that primes the caches; the best of ``repeats``
    (after an uncounted round if ``warmup``). Returns a dict of measured numbers (seconds and frames per second
    per decoder, the load average around each measurement); nothing is asserted."""
    from .taehv import TAEHV

    device = torch.device(device)
    dtype = dtype or (torch.bfloat16 if device.type == "cuda" else torch.float32)
    h = size // 8
    gen = torch.Generator().manual_seed(0)
    z_first = torch.randn(1, 16, 1, h, h, generator=gen).to(device, dtype)
    z_chunk = torch.randn(1, 16, latents, h, h, generator=gen).to(device, dtype)

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    def measure(decode) -> dict:
        times, cpu, frames, load = [], [], 0, os.getloadavg()[0]
        for r in range(repeats + int(warmup)):  # a warm-up round (kernels, allocator) is not counted
            cache = FeatureCache()
            decode(z_first, cache)
            sync()
            t0, c0 = time.perf_counter(), time.process_time()
            y = decode(z_chunk, cache)
            sync()
            if r or not warmup:
                times.append(time.perf_counter() - t0)
                cpu.append(time.process_time() - c0)
            frames = y.shape[2]
        best = min(times)
        res = dict(chunk_s=best, frames_per_chunk=frames, per_frame_ms=1000 * best / frames, fps=frames / best)
        res.update(runs_s=times, load_avg_1min=[round(load, 2), round(os.getloadavg()[0], 2)])
        if device.type == "cpu":  # this process's CPU seconds: on a shared machine, what the work itself cost
            res.update(runs_cpu_s=cpu, per_frame_cpu_ms=1000 * min(cpu) / frames, threads=torch.get_num_threads())
        return res

    out: dict = dict(device=str(device), dtype=str(dtype).removeprefix("torch."), size=size, latents_per_chunk=latents)
    out["weights"] = "given" if (vae is not None or tiny is not None) else "random, real shapes"
    if include_vae:
        vae = (vae or WanVAE()).to(device, dtype).eval()
        out["wan_vae"] = measure(lambda z, c: vae.decode(z, c))
        if device.type == "cuda":  # the same decode with its 3D convolutions as 2D ones over stacked frames
            out["wan_vae_conv_as_2d"] = measure(lambda z, c: vae.set_conv_mode(True).decode(z, c))
            vae.set_conv_mode(False)
        del vae
    tiny = (tiny or TAEHV()).to(device, dtype).eval()
    out["taehv"] = measure(lambda z, c: tiny.decode(z, c))
    if include_vae:
        out["taehv_speedup"] = out["wan_vae"]["per_frame_ms"] / out["taehv"]["per_frame_ms"]
    return out
