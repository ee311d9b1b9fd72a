"""Typed model configurations, one per size.

``wan1.3b`` and ``wan14b`` mirror Wan2.1-T2V's shapes exactly (so their checkpoints load); ``tiny``
runs on a CPU in tests; ``small`` is the size we train and ship.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass


@dataclass(frozen=True)
class DiTConfig:
    name: str
    dim: int
    num_layers: int
    num_heads: int
    ffn_dim: int
    in_dim: int = 16  # latent channels
    out_dim: int = 16
    text_dim: int = 4096  # umT5 for Wan; 384 (MiniLM) for our own sizes
    freq_dim: int = 256
    patch_size: tuple[int, int, int] = (1, 2, 2)
    eps: float = 1e-6
    qk_norm: bool = True
    cross_attn_norm: bool = True
    rope_max_len: int = 1024
    # our additions (absent from Wan checkpoints; zero-initialised so a loaded Wan model is unchanged)
    audio_dim: int = 384  # Whisper tiny.en encoder features
    audio_tokens_per_frame: int = 16  # audio tokens each latent frame attends to (its window, see encoders)
    audio_layers: tuple[int, ...] | None = None  # blocks with an audio adapter (None: every block)
    # frame-aligned audio AdaLN: an MLP of each latent frame's whole audio window (its tokens in order) is added to
    # that frame's timestep embedding, so every block's modulation follows the speech (zero-initialised)
    audio_adaln: bool = False
    # the reference latent, repeated over the frames, joins every frame's input channels (OmniAvatar's channel
    # concatenation; here its own zero-initialised patch embedding added to the frame's, the same linear map): a
    # pixel-aligned identity prior besides the reference sink frame that attention reads
    ref_concat: bool = False
    # OmniAvatar / LiveTalk layout (the files of OmniAvatar-1.3B / -14B and the LiveTalk student load as they are):
    # ``concat_dim`` channels join the noisy latent before the patch embedding (17: the reference latent repeated
    # over the frames + a mask channel, 0 on the stream's first latent frame, which is held as the clean reference);
    # ``audio_pack_dim`` > 0 replaces our audio adapter by OmniAvatar's audio path: each latent frame's
    # ``audio_tokens_per_frame`` wav2vec2 features (``audio_dim``: all hidden states concatenated) packed by a linear
    # map + LayerNorm to this size, then one linear projection per block added to the hidden states of blocks
    # 2 .. num_layers / 2
    concat_dim: int = 0
    audio_pack_dim: int = 0
    fps: int = 25  # video frames per second the model was trained on (Wan family: 16)

    @property
    def head_dim(self) -> int:
        return self.dim // self.num_heads

    def validate(self) -> DiTConfig:
        if self.dim % self.num_heads:
            raise ValueError(f"{self.name}: dim {self.dim} is not divisible by num_heads {self.num_heads}")
        if self.head_dim % 2 or self.head_dim < 6:
            raise ValueError(f"{self.name}: head_dim {self.head_dim} must be even and >= 6 for 3D RoPE")
        if self.audio_pack_dim and (self.num_layers < 4 or self.audio_layers or self.audio_adaln):
            raise ValueError(
                f"{self.name}: the OmniAvatar audio path (audio_pack_dim) needs >= 4 blocks and no audio adapter "
                "(audio_layers) or audio AdaLN"
            )
        if self.fps < 1:
            raise ValueError(f"{self.name}: fps must be >= 1, got {self.fps}")
        return self

    @property
    def omniavatar(self) -> bool:
        """The OmniAvatar / LiveTalk layout (reference channels concatenated to the input, packed audio added)."""
        return self.concat_dim > 0

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @staticmethod
    def from_dict(d: dict) -> DiTConfig:
        d = dict(d)
        d["patch_size"] = tuple(d["patch_size"])
        if d.get("audio_layers") is not None:
            d["audio_layers"] = tuple(d["audio_layers"])
        known = {f.name for f in dataclasses.fields(DiTConfig)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown DiT config fields: {sorted(unknown)}")
        return DiTConfig(**d).validate()


# OmniAvatar's conditioning: 16 latent + 17 (reference latent, mask) input channels, wav2vec2-base hidden states of
# all 14 outputs (13 layers + the last, 768 each) packed 4 -> 1 per latent frame to 32 dimensions
_OMNIAVATAR = dict(concat_dim=17, audio_dim=14 * 768, audio_tokens_per_frame=4, audio_pack_dim=32)

DIT_CONFIGS: dict[str, DiTConfig] = {
    "tiny": DiTConfig(
        "tiny",
        dim=64,
        num_layers=2,
        num_heads=4,
        ffn_dim=128,
        in_dim=8,
        out_dim=8,
        text_dim=384,
        freq_dim=64,
        audio_tokens_per_frame=8,
        audio_adaln=True,
    ),
    "small": DiTConfig(
        "small", dim=384, num_layers=8, num_heads=6, ffn_dim=1536, in_dim=16, out_dim=16, text_dim=384, freq_dim=256
    ),
    "wan1.3b": DiTConfig("wan1.3b", dim=1536, num_layers=30, num_heads=12, ffn_dim=8960, fps=16),
    "wan14b": DiTConfig("wan14b", dim=5120, num_layers=40, num_heads=40, ffn_dim=13824, fps=16),
    # OmniAvatar-1.3B (LoRA merged) and the LiveTalk student GAIR/LiveTalk-1.3B-V0.1; OmniAvatar-14B (the teacher)
    "omniavatar1.3b": DiTConfig(
        "omniavatar1.3b", dim=1536, num_layers=30, num_heads=12, ffn_dim=8960, fps=16, **_OMNIAVATAR
    ),
    "omniavatar14b": DiTConfig(
        "omniavatar14b", dim=5120, num_layers=40, num_heads=40, ffn_dim=13824, fps=16, **_OMNIAVATAR
    ),
    # the same layout at a size a CPU runs in tests
    "omniavatar-tiny": DiTConfig(
        "omniavatar-tiny",
        dim=64,
        num_layers=4,
        num_heads=4,
        ffn_dim=128,
        text_dim=32,
        freq_dim=64,
        fps=16,
        **{**_OMNIAVATAR, "audio_dim": 48, "audio_pack_dim": 8},
    ),
}


def dit_config(name: str) -> DiTConfig:
    try:
        return DIT_CONFIGS[name].validate()
    except KeyError:
        raise ValueError(f"unknown model size {name!r}; choose one of {sorted(DIT_CONFIGS)}") from None


@dataclass(frozen=True)
class VAEConfig:
    name: str
    latent_dim: int = 16
    base_channels: int = 64
    channel_mult: tuple[int, ...] = (1, 2, 4)  # one spatial 2x downsampling between consecutive stages
    temporal_down: tuple[bool, ...] = (False, True, True)  # 2x in time at those transitions (4x in all)
    num_res_blocks: int = 1
    image_channels: int = 3
    # causal temporal kernel of the latent-rate convolutions (encoder mid/out, decoder in/mid); with
    # temporal_everywhere=False every other convolution works per frame, so the whole model sees only a few
    # latents of the past and short training clips cover its steady state (Wan-VAE: True, kernel 3)
    temporal_kernel: int = 2
    temporal_everywhere: bool = False

    def __post_init__(self) -> None:
        if len(self.temporal_down) != len(self.channel_mult) - 1:
            raise ValueError(
                f"VAE {self.name}: temporal_down needs one entry per stage transition "
                f"({len(self.channel_mult) - 1}), got {len(self.temporal_down)}"
            )

    def receptive_latents(self) -> int:
        """How many latents (this one included) one decoded latent depends on, through the latent-rate convs."""
        return 1 + 3 * (self.temporal_kernel - 1)

    @property
    def spatial_factor(self) -> int:
        return 2 ** (len(self.channel_mult) - 1)

    @property
    def temporal_factor(self) -> int:
        return 2 ** sum(self.temporal_down)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @staticmethod
    def from_dict(d: dict) -> VAEConfig:
        d = dict(d)
        d["channel_mult"] = tuple(d["channel_mult"])
        d["temporal_down"] = tuple(d["temporal_down"])
        d.setdefault("temporal_kernel", 3)  # checkpoints from before these fields: Wan-style everywhere
        d.setdefault("temporal_everywhere", True)
        return VAEConfig(**d)


VAE_CONFIGS: dict[str, VAEConfig] = {
    "tiny": VAEConfig("tiny", latent_dim=8, base_channels=16, channel_mult=(1, 2, 2, 2)),  # 8x spatial
    "small": VAEConfig("small", latent_dim=16, base_channels=48, channel_mult=(1, 2, 4, 4)),  # 8x spatial
    "wanlike": VAEConfig(
        "wanlike",
        latent_dim=16,
        base_channels=32,
        channel_mult=(1, 2, 4, 4),
        temporal_kernel=3,
        temporal_everywhere=True,
    ),
    "small16": VAEConfig(
        "small16",
        latent_dim=16,
        base_channels=32,
        channel_mult=(1, 2, 4, 4, 4),
        temporal_down=(False, False, True, True),
    ),  # 16x spatial
}


@dataclass(frozen=True)
class TinyDecoderConfig:
    latent_dim: int = 16
    channels: int | tuple[int, ...] = (96, 64, 48)  # per stage, latent resolution first (an int: all stages)
    spatial_factor: int = 8
    temporal_factor: int = 4
    blocks_per_stage: int = 1
    image_channels: int = 3

    def __post_init__(self) -> None:
        if isinstance(self.channels, list):
            object.__setattr__(self, "channels", tuple(self.channels))
        n = len(self.stage_channels())
        if 2**n != self.spatial_factor:
            raise ValueError(
                f"tiny decoder: {n} stages (x2 each, then a x2 pixel shuffle) give "
                f"{2**n}x, not spatial_factor {self.spatial_factor}"
            )

    def stage_channels(self) -> tuple[int, ...]:
        """Channels of the stages at 1x, 2x, ... the latent resolution (the last one at half the output's)."""
        if isinstance(self.channels, int):
            return (self.channels,) * int(round(math.log2(self.spatial_factor)))
        return tuple(self.channels)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def vae_config(name: str) -> VAEConfig:
    try:
        return VAE_CONFIGS[name]
    except KeyError:
        raise ValueError(f"unknown VAE size {name!r}; choose one of {sorted(VAE_CONFIGS)}") from None


__all__ = ["DiTConfig", "DIT_CONFIGS", "dit_config", "VAEConfig", "VAE_CONFIGS", "vae_config", "TinyDecoderConfig"]
