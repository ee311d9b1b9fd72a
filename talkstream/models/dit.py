"""The Wan2.1-style video diffusion transformer, with an audio adapter and a reference frame.

Wan2.1 block design (module names match the original checkpoints): (1,2,2) Conv3d patch embedding,
sinusoidal time embedding -> AdaLN modulation (6 vectors per block, 2 for the head), self-attention
with RMSNorm on q/k and 3D RoPE, text cross-attention, GELU(tanh) FFN. Our additions:

* per-frame timesteps ``t [B, F]`` (diffusion forcing: every chunk has its own noise level);
* a clean **reference latent** frame (timestep 0) placed before the video as a sink every frame sees, and
  optionally (``ref_concat``) added to every frame's input tokens through its own zero-initialised patch
  embedding, pixel-aligned (OmniAvatar / Wan-I2V's channel concatenation);
* an **audio adapter** per block (IP-adapter style cross-attention, zero-initialised output) in which
  each latent frame attends only to the audio tokens of its own time window;
* the **OmniAvatar / LiveTalk layout** (``concat_dim`` / ``audio_pack_dim``, see ``DiTConfig``): the reference latent
  repeated over the frames plus a mask channel concatenated to the input channels, the stream's first latent frame
  held as the clean reference, and packed wav2vec2 features projected and added to the hidden states of blocks
  2 .. L/2 (``AudioPack`` / ``audio_cond_projs``, named as in the released files);
* three attention modes from one code path: full bidirectional, block-causal (chunks), and
  KV-cached streaming with a bounded window and rolling RoPE. All three run ``_attend``: one attention
  call per run of query frames over exactly the key frames they may see, with positions re-based so
  the first visible frame is at 0.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from .config import DiTConfig
from .kv_cache import KVCache
from .masks import attention_groups, block_causal_mask, full_mask
from .rope import apply_rope, rope_cos_sin


def sinusoidal_embedding(t: torch.Tensor, dim: int) -> torch.Tensor:
    """Wan's timestep embedding: [cos, sin] of t * 10000^(-i / half), computed in float64."""
    half = dim // 2
    freqs = torch.pow(10000.0, -torch.arange(half, dtype=torch.float64, device=t.device) / half)
    x = t.to(torch.float64)[:, None] * freqs[None, :]
    return torch.cat([torch.cos(x), torch.sin(x)], dim=1).float()


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)).type_as(x) * self.weight


class LayerNorm(nn.LayerNorm):
    """LayerNorm computed in float32 (as Wan does), returned in the input's dtype."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = None if self.weight is None else self.weight.float()
        b = None if self.bias is None else self.bias.float()
        return F.layer_norm(x.float(), self.normalized_shape, w, b, self.eps).type_as(x)


def _sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """[B, L, H, D] layout in and out."""
    return F.scaled_dot_product_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask
    ).transpose(1, 2)


class SelfAttention(nn.Module):
    def __init__(self, dim: int, num_heads: int, qk_norm: bool = True, eps: float = 1e-6) -> None:
        super().__init__()
        self.num_heads, self.head_dim = num_heads, dim // num_heads
        self.q, self.k, self.v, self.o = (nn.Linear(dim, dim) for _ in range(4))
        self.norm_q = RMSNorm(dim, eps) if qk_norm else nn.Identity()
        self.norm_k = RMSNorm(dim, eps) if qk_norm else nn.Identity()

    def qkv(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        shape = (*x.shape[:-1], self.num_heads, self.head_dim)
        return (self.norm_q(self.q(x)).view(shape), self.norm_k(self.k(x)).view(shape), self.v(x).view(shape))


class CrossAttention(SelfAttention):
    """Queries from the video tokens, keys/values from a context sequence (text or audio)."""

    def forward(self, x: torch.Tensor, context: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        B = x.shape[0]
        q = self.norm_q(self.q(x)).view(B, -1, self.num_heads, self.head_dim)
        k = self.norm_k(self.k(context)).view(B, -1, self.num_heads, self.head_dim)
        v = self.v(context).view(B, -1, self.num_heads, self.head_dim)
        attn_mask = None if mask is None else mask[:, None, None, :]
        return self.o(_sdpa(q, k, v, attn_mask).flatten(2))


class AudioAdapter(nn.Module):
    """Per-frame audio cross-attention: the tokens of latent frame f attend only to audio window f.

    The output projection starts at zero, so adding the adapter to a pretrained model changes nothing
    until it is trained.
    """

    def __init__(self, dim: int, num_heads: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.norm = LayerNorm(dim, eps, elementwise_affine=True)
        self.attn = CrossAttention(dim, num_heads, True, eps)
        nn.init.zeros_(self.attn.o.weight)
        nn.init.zeros_(self.attn.o.bias)

    def forward(self, x: torch.Tensor, audio: torch.Tensor) -> torch.Tensor:
        """x [B, F, S, D], audio [B, F, Na, D] -> [B, F, S, D]."""
        B, Fr, S, D = x.shape
        out = self.attn(self.norm(x).reshape(B * Fr, S, D), audio.reshape(B * Fr, -1, D))
        return out.view(B, Fr, S, D)


class AudioPack(nn.Module):
    """OmniAvatar's audio packing: one latent frame's audio features [..., t, A] (t = 4 video frames, in time order)
    -> one vector [..., dim]: a linear map of the concatenated features, then LayerNorm."""

    def __init__(self, in_features: int, dim: int) -> None:
        super().__init__()
        self.proj = nn.Linear(in_features, dim)
        self.norm_out = nn.LayerNorm(dim)

    def forward(self, audio: torch.Tensor) -> torch.Tensor:
        return self.norm_out(self.proj(audio.flatten(-2)))


class Block(nn.Module):
    def __init__(self, cfg: DiTConfig, audio: bool) -> None:
        super().__init__()
        d = cfg.dim
        self.norm1 = LayerNorm(d, cfg.eps, elementwise_affine=False)
        self.self_attn = SelfAttention(d, cfg.num_heads, cfg.qk_norm, cfg.eps)
        self.norm3 = LayerNorm(d, cfg.eps, elementwise_affine=True) if cfg.cross_attn_norm else nn.Identity()
        self.cross_attn = CrossAttention(d, cfg.num_heads, cfg.qk_norm, cfg.eps)
        self.norm2 = LayerNorm(d, cfg.eps, elementwise_affine=False)
        self.ffn = nn.Sequential(nn.Linear(d, cfg.ffn_dim), nn.GELU(approximate="tanh"), nn.Linear(cfg.ffn_dim, d))
        self.modulation = nn.Parameter(torch.randn(1, 6, d) / d**0.5)
        self.audio_attn = AudioAdapter(d, cfg.num_heads, cfg.eps) if audio else None

    def forward(
        self,
        x: torch.Tensor,
        e0: torch.Tensor,
        context: torch.Tensor | None,
        context_mask: torch.Tensor | None,
        audio: torch.Tensor | None,
        attend: Callable[[int, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor],
        layer: int,
        n_sink: int,
    ) -> torch.Tensor:
        """x [B, F, S, D] (sinks first), e0 [B, F, 6, D]; ``attend`` runs self-attention for the mode."""
        mods = (self.modulation[None].float() + e0.float()).chunk(6, dim=2)
        q, k, v = self.pre_attention(x, mods[0], mods[1])
        return self.post_attention(x, attend(layer, q, k, v), mods, context, context_mask, audio, n_sink)

    def pre_attention(
        self, x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        h = (self.norm1(x).float() * (1 + scale) + shift).type_as(x)
        return self.self_attn.qkv(h)

    def post_attention(
        self,
        x: torch.Tensor,
        y: torch.Tensor,
        mods: tuple[torch.Tensor, ...],
        context: torch.Tensor | None,
        context_mask: torch.Tensor | None,
        audio: torch.Tensor | None,
        n_sink: int,
    ) -> torch.Tensor:
        B, Fr, S, D = x.shape
        _, _, gate, c_shift, c_scale, c_gate = mods
        x = (x.float() + self.self_attn.o(y.flatten(-2)).float() * gate).type_as(x)
        if context is not None:
            x = x + self.cross_attn(self.norm3(x).flatten(1, 2), context, context_mask).view(B, Fr, S, D)
        if audio is not None and self.audio_attn is not None and Fr > n_sink:
            x = torch.cat([x[:, :n_sink], x[:, n_sink:] + self.audio_attn(x[:, n_sink:], audio)], dim=1)
        h = (self.norm2(x).float() * (1 + c_scale) + c_shift).type_as(x)
        return (x.float() + self.ffn(h).float() * c_gate).type_as(x)

    def compile_parts(self, **kwargs) -> None:
        """torch.compile the dense parts around attention (attention itself stays on SDPA)."""
        self.pre_attention = torch.compile(self.pre_attention, **kwargs)
        self.post_attention = torch.compile(self.post_attention, **kwargs)


class Head(nn.Module):
    def __init__(self, cfg: DiTConfig) -> None:
        super().__init__()
        self.norm = LayerNorm(cfg.dim, cfg.eps, elementwise_affine=False)
        self.head = nn.Linear(cfg.dim, math.prod(cfg.patch_size) * cfg.out_dim)
        self.modulation = nn.Parameter(torch.randn(1, 2, cfg.dim) / cfg.dim**0.5)

    def forward(self, x: torch.Tensor, e: torch.Tensor) -> torch.Tensor:
        """x [B, F, S, D], e [B, F, D]."""
        shift, scale = (self.modulation[None].float() + e[:, :, None].float()).chunk(2, dim=2)
        return self.head((self.norm(x).float() * (1 + scale) + shift).type_as(x))


@dataclass
class _Grid:
    h: int  # tokens per frame along height and width
    w: int

    @property
    def tokens(self) -> int:
        return self.h * self.w


class _GroupAttention:
    """Attention over in-batch frames following a frame visibility matrix (full or block-causal)."""

    def __init__(self, visible: torch.Tensor, grid: _Grid, head_dim: int, device) -> None:
        self.groups = attention_groups(visible)
        self.rope = []
        for qs, qe, keys in self.groups:  # positions re-based: the first visible frame is at 0
            pos = torch.arange(len(keys), device=device)
            cos, sin = rope_cos_sin(pos, grid.h, grid.w, head_dim)
            q_off = keys.index(qs)
            S = grid.tokens
            self.rope.append((cos[q_off * S : (q_off + qe - qs) * S], sin[q_off * S : (q_off + qe - qs) * S], cos, sin))

    def __call__(self, layer: int, q, k, v):
        out = []
        for (qs, qe, keys), (qc, qsn, kc, ksn) in zip(self.groups, self.rope):
            idx = keys if keys != list(range(keys[0], keys[-1] + 1)) else slice(keys[0], keys[-1] + 1)
            qg = apply_rope(q[:, qs:qe].flatten(1, 2), qc, qsn)
            kg = apply_rope(k[:, idx].flatten(1, 2), kc, ksn)
            out.append(_sdpa(qg, kg, v[:, idx].flatten(1, 2)).unflatten(1, (qe - qs, -1)))
        return torch.cat(out, dim=1) if len(out) > 1 else out[0]


class _CachedAttention:
    """A chunk attends [sinks | cached window | itself]; with ``commit`` its keys/values join the cache."""

    def __init__(self, cache: KVCache, n_query: int, grid: _Grid, head_dim: int, device, mode: str) -> None:
        self.cache, self.mode = cache, mode  # mode: "sink" (prefill sinks), "commit", "read"
        n_prev = 0 if mode == "sink" else cache.n_sink + cache.n_context
        cos, sin = rope_cos_sin(torch.arange(n_prev + n_query, device=device), grid.h, grid.w, head_dim)
        S = grid.tokens
        self.q_rope = (cos[n_prev * S :], sin[n_prev * S :])
        self.k_rope = (cos, sin)

    def __call__(self, layer: int, q, k, v):
        prev_k, prev_v = (None, None) if self.mode == "sink" else self.cache.context(layer)
        keys = k if prev_k is None else torch.cat([prev_k, k], dim=1)
        vals = v if prev_v is None else torch.cat([prev_v, v], dim=1)
        if self.mode == "sink":
            self.cache.set_sinks(layer, k, v)
        elif self.mode == "commit":
            self.cache.append(layer, k, v)
        nq = q.shape[1]
        out = _sdpa(
            apply_rope(q.flatten(1, 2), *self.q_rope), apply_rope(keys.flatten(1, 2), *self.k_rope), vals.flatten(1, 2)
        )
        return out.unflatten(1, (nq, -1))


class WanDiT(nn.Module):
    def __init__(self, cfg: DiTConfig) -> None:
        super().__init__()
        cfg = cfg.validate()
        if cfg.patch_size[0] != 1:
            raise ValueError("temporal patch size must be 1 (one latent frame per token group)")
        self.cfg = cfg
        d = cfg.dim
        in_channels = cfg.in_dim + cfg.concat_dim
        self.patch_embedding = nn.Conv3d(in_channels, d, kernel_size=cfg.patch_size, stride=cfg.patch_size)
        self.text_embedding = nn.Sequential(nn.Linear(cfg.text_dim, d), nn.GELU(approximate="tanh"), nn.Linear(d, d))
        self.time_embedding = nn.Sequential(nn.Linear(cfg.freq_dim, d), nn.SiLU(), nn.Linear(d, d))
        self.time_projection = nn.Sequential(nn.SiLU(), nn.Linear(d, d * 6))
        audio_layers = set(range(cfg.num_layers)) if cfg.audio_layers is None else set(cfg.audio_layers)
        if cfg.audio_pack_dim:  # OmniAvatar's audio path instead of our adapter
            audio_layers = set()
        self.blocks = nn.ModuleList([Block(cfg, i in audio_layers) for i in range(cfg.num_layers)])
        self.head = Head(cfg)
        self.audio_cond_projs = None
        if cfg.audio_pack_dim:
            self.audio_proj = AudioPack(cfg.audio_tokens_per_frame * cfg.audio_dim, cfg.audio_pack_dim)
            self.audio_cond_projs = nn.ModuleList(
                nn.Linear(cfg.audio_pack_dim, d) for _ in range(len(self.audio_blocks))
            )
            self.audio_pos = None
        else:
            self.audio_proj = nn.Sequential(nn.Linear(cfg.audio_dim, d), nn.GELU(approximate="tanh"), nn.Linear(d, d))
            self.audio_pos = nn.Parameter(torch.zeros(cfg.audio_tokens_per_frame, d))
        self.audio_embedding = (
            nn.Sequential(nn.Linear(cfg.audio_tokens_per_frame * cfg.audio_dim, d), nn.SiLU(), nn.Linear(d, d))
            if cfg.audio_adaln and not cfg.audio_pack_dim
            else None
        )
        self.ref_embedding = (
            nn.Conv3d(cfg.in_dim, d, kernel_size=cfg.patch_size, stride=cfg.patch_size, bias=False)
            if cfg.ref_concat
            else None
        )
        self.gradient_checkpointing = False
        self._init_weights()

    def _init_weights(self) -> None:
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
        nn.init.xavier_uniform_(self.patch_embedding.weight.flatten(1))
        for b in self.blocks:
            if b.audio_attn is not None:
                nn.init.zeros_(b.audio_attn.attn.o.weight)
                nn.init.zeros_(b.audio_attn.attn.o.bias)
        if self.audio_embedding is not None:
            nn.init.zeros_(self.audio_embedding[2].weight)
            nn.init.zeros_(self.audio_embedding[2].bias)
        if self.ref_embedding is not None:  # a model without it, loaded, is unchanged
            nn.init.zeros_(self.ref_embedding.weight)
        nn.init.zeros_(self.head.head.weight)  # start by predicting zero velocity offsets
        nn.init.zeros_(self.head.head.bias)

    # -- pieces ------------------------------------------------------------------------------------
    @property
    def audio_blocks(self) -> range:
        """OmniAvatar layout: the blocks whose input gets the packed audio added (2 .. num_layers / 2)."""
        return range(2, self.cfg.num_layers // 2 + 1)

    @property
    def fps(self) -> int:
        """Video frames per second the model makes (Wan family 16, our own models 25)."""
        return self.cfg.fps

    def base_parameter_count(self) -> int:
        """Parameters of the Wan2.1 architecture alone (without our audio adapter)."""
        return sum(p.numel() for n, p in self.named_parameters() if not _is_addition(n))

    def _check(self, x: torch.Tensor, name: str, channels: int) -> None:
        if not torch.is_tensor(x) or x.ndim != 5 or x.shape[1] != channels:
            shape = tuple(x.shape) if torch.is_tensor(x) else type(x).__name__
            raise ValueError(f"{name} must be [B, {channels}, F, H, W], got {shape}")
        ph, pw = self.cfg.patch_size[1:]
        if x.shape[3] % ph or x.shape[4] % pw:
            raise ValueError(f"{name}: height/width {tuple(x.shape[3:])} must be divisible by the patch size {ph}x{pw}")
        if not x.is_floating_point():
            raise ValueError(f"{name} must be a floating-point tensor, got {x.dtype}")

    def condition(self, x: torch.Tensor, reference: torch.Tensor | None, first_frame: int) -> torch.Tensor:
        """OmniAvatar layout: noisy latents [B, C, F, H, W] (absolute frames ``first_frame`` ..) -> the patch
        embedding's input [B, C + concat_dim, F, H, W]: the latents (the stream's frame 0 replaced by the clean
        reference), the reference latent repeated over the frames, and the mask channel (0 on frame 0, else 1)."""
        if reference is None:
            raise ValueError("the OmniAvatar layout needs the reference latent (ref=, or prefill_sinks first)")
        B, _, Fr, H, W = x.shape
        if reference.shape[0] != B or reference.shape[1] != x.shape[1] or reference.shape[3:] != x.shape[3:]:
            raise ValueError(f"reference {tuple(reference.shape)} does not match the latents {tuple(x.shape)}")
        ref = reference[:, :, :1].to(x.dtype)
        mask = x.new_ones(B, 1, Fr, H, W)
        if first_frame == 0:
            x = torch.cat([ref, x[:, :, 1:]], dim=2)
            mask[:, :, 0] = 0
        return torch.cat([x, ref.expand(B, -1, Fr, H, W), mask], dim=1)

    @staticmethod
    def _hold_first_frame(v: torch.Tensor, x: torch.Tensor, reference: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """The stream's frame 0 is the reference: its velocity is the one that takes the noisy input ``x`` there
        (x0 = x - sigma v = reference, for any sampler that predicts x0 or integrates the flow)."""
        sigma = (t[:, :1].to(torch.float32) / 1000).view(-1, 1, 1, 1, 1)
        v0 = (x[:, :, :1].float() - reference[:, :, :1].float()) / sigma.clamp_min(1e-6)
        v0 = torch.where(sigma > 0, v0, torch.zeros_like(v0))
        return torch.cat([v0.to(v.dtype), v[:, :, 1:]], dim=2)

    def chunk_input(self, x: torch.Tensor, reference: torch.Tensor | None, first_frame: int) -> torch.Tensor:
        """The patch embedding's input for a streamed chunk whose first frame is the stream's ``first_frame``: ``x``
        itself, or in the OmniAvatar layout ``x`` conditioned on the reference (``condition``)."""
        return self.condition(x, reference, first_frame) if self.cfg.omniavatar else x

    def chunk_velocity(
        self, v: torch.Tensor, x: torch.Tensor, t: torch.Tensor, reference: torch.Tensor | None, first_frame: int
    ) -> torch.Tensor:
        """A streamed chunk's velocity as the sampler takes it (OmniAvatar layout: the stream's frame 0 held)."""
        if self.cfg.omniavatar and first_frame == 0:
            return self._hold_first_frame(v, x, reference, t)
        return v

    def embed_frames(self, x: torch.Tensor) -> tuple[torch.Tensor, _Grid]:
        """[B, C, F, H, W] latents -> [B, F, S, D] tokens."""
        h = self.patch_embedding(x.to(self.patch_embedding.weight.dtype))  # [B, D, F, H', W']
        grid = _Grid(h.shape[3], h.shape[4])
        return h.flatten(3).permute(0, 2, 3, 1).contiguous(), grid

    def embed_reference(self, ref: torch.Tensor | None) -> torch.Tensor | None:
        """``ref_concat``: reference latent frame(s) [B, C, R, H, W] -> the tokens [B, 1, S, D] added to every video
        frame's (the mean over R frames); None without ``ref_concat`` or without a reference."""
        if self.ref_embedding is None or ref is None:
            return None
        h = self.ref_embedding(ref.to(self.ref_embedding.weight.dtype)).mean(2, keepdim=True)
        return h.flatten(3).permute(0, 2, 3, 1)

    def embed_time(self, t: torch.Tensor, audio_emb: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """t [B, F] -> e [B, F, D] (head) and e0 [B, F, 6, D] (blocks); ``audio_emb`` [B, F', D] (audio AdaLN)
        is added to the last F' frames' embeddings (the video frames, after any sinks)."""
        B, Fr = t.shape
        e = self.time_embedding(sinusoidal_embedding(t.flatten(), self.cfg.freq_dim).to(self.head.head.weight.dtype))
        if audio_emb is not None:
            e = e.view(B, Fr, -1)
            e = torch.cat([e[:, : Fr - audio_emb.shape[1]], e[:, Fr - audio_emb.shape[1] :] + audio_emb.to(e.dtype)], 1)
            e = e.flatten(0, 1)
        e0 = self.time_projection(e).unflatten(1, (6, self.cfg.dim))
        return e.view(B, Fr, -1).float(), e0.view(B, Fr, 6, -1).float()

    def embed_text(self, context: torch.Tensor | None) -> torch.Tensor | None:
        if context is None:
            return None
        if context.ndim != 3 or context.shape[-1] != self.cfg.text_dim:
            raise ValueError(f"text context must be [B, L, {self.cfg.text_dim}], got {tuple(context.shape)}")
        return self.text_embedding(context.to(self.head.head.weight.dtype))

    def embed_audio(self, audio: torch.Tensor | None, n_frames: int) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """audio [B, F, Na, audio_dim] (one window of audio features per latent frame) -> the adapter's tokens
        [B, F, Na, D] and the audio AdaLN embedding [B, F, D] (None without ``audio_adaln``)."""
        if audio is None:
            return None, None
        na = self.cfg.audio_tokens_per_frame
        if audio.ndim != 4 or audio.shape[1] != n_frames or audio.shape[2:] != (na, self.cfg.audio_dim):
            raise ValueError(
                f"audio must be [B, {n_frames}, {na}, {self.cfg.audio_dim}] (one window per latent "
                f"frame), got {tuple(audio.shape)}"
            )
        a = audio.to(self.head.head.weight.dtype)
        if self.audio_cond_projs is not None:  # OmniAvatar: one packed vector per frame, one projection per block
            packed = self.audio_proj(a)  # [B, F, pack]
            return torch.stack([p(packed) for p in self.audio_cond_projs]), None  # [n_blocks, B, F, D]
        emb = None if self.audio_embedding is None else self.audio_embedding(a.flatten(2))
        return self.audio_proj(a) + self.audio_pos.to(a.dtype), emb

    def _timesteps(self, t: torch.Tensor | float, B: int, Fr: int, device) -> torch.Tensor:
        t = torch.as_tensor(t, device=device, dtype=torch.float32)
        if t.ndim == 0:
            t = t.expand(B, Fr)
        elif t.ndim == 1:
            t = t[:, None].expand(B, Fr) if t.shape[0] == B else t
        if t.shape != (B, Fr):
            raise ValueError(f"timesteps must be a scalar, [B] or [B, F] = [{B}, {Fr}], got {tuple(t.shape)}")
        return t

    def _run(self, tokens, grid, t_all, context, context_mask, audio, attend, n_sink):
        audio, audio_emb = audio
        added = None
        if self.audio_cond_projs is not None:  # OmniAvatar: added to the hidden states, no adapter
            added, audio = audio, None
        e, e0 = self.embed_time(t_all, audio_emb)
        x = tokens
        first_audio = self.audio_blocks.start
        for i, block in enumerate(self.blocks):
            if added is not None and i in self.audio_blocks:
                a = added[i - first_audio][:, :, None].to(x.dtype)  # [B, F, 1, D] over the frame's tokens
                x = torch.cat([x[:, :n_sink], x[:, n_sink:] + a], dim=1) if n_sink else x + a
            if self.gradient_checkpointing and torch.is_grad_enabled():
                x = checkpoint(block, x, e0, context, context_mask, audio, attend, i, n_sink, use_reentrant=False)
            else:
                x = block(x, e0, context, context_mask, audio, attend, i, n_sink)
        return self.head(x[:, n_sink:], e[:, n_sink:])

    def unpatchify(self, out: torch.Tensor, grid: _Grid) -> torch.Tensor:
        """[B, F, S, p_h * p_w * C] -> [B, C, F, H, W]."""
        B, Fr = out.shape[:2]
        _, ph, pw = self.cfg.patch_size
        C = self.cfg.out_dim
        out = out.view(B, Fr, grid.h, grid.w, ph, pw, C)
        return out.permute(0, 6, 1, 2, 4, 3, 5).reshape(B, C, Fr, grid.h * ph, grid.w * pw)

    # -- the three modes ---------------------------------------------------------------------------
    def forward(
        self,
        x: torch.Tensor,
        t,
        context: torch.Tensor | None = None,
        audio: torch.Tensor | None = None,
        ref: torch.Tensor | None = None,
        *,
        chunk: int | None = None,
        window: int | None = None,
        context_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Predict the flow velocity of noisy latents ``x`` [B, C, F, H, W] at timesteps ``t`` (0..1000).

        ``ref`` [B, C, R, H, W]: clean reference latent frame(s), prepended as sinks at timestep 0.
        ``chunk=None``: full bidirectional attention (the teacher). ``chunk=k``: block-causal over chunks
        of k frames (each seeing the last ``window`` frames before it, if given).
        """
        self._check(x, "x", self.cfg.in_dim)
        B, _, Fr = x.shape[:3]
        t = self._timesteps(t, B, Fr, x.device)
        if self.cfg.omniavatar:  # the reference enters through the input channels and holds frame 0
            if ref is not None:
                self._check(ref, "ref", self.cfg.in_dim)
            tokens, grid = self.embed_frames(self.condition(x, ref, 0))
            visible = full_mask(0, Fr) if chunk is None else block_causal_mask(0, Fr, chunk, window)
            attend = _GroupAttention(visible, grid, self.cfg.head_dim, x.device)
            out = self._run(
                tokens, grid, t, self.embed_text(context), context_mask, self.embed_audio(audio, Fr), attend, 0
            )
            return self._hold_first_frame(self.unpatchify(out, grid), x, ref, t).to(x.dtype)
        tokens, grid = self.embed_frames(x)
        n_sink = 0
        if ref is not None:
            self._check(ref, "ref", self.cfg.in_dim)
            if ref.shape[0] != B or ref.shape[3:] != x.shape[3:]:
                raise ValueError(f"ref {tuple(ref.shape)} does not match x {tuple(x.shape)}")
            if self.ref_embedding is not None:
                tokens = tokens + self.embed_reference(ref)
            sink_tokens, _ = self.embed_frames(ref)
            n_sink = ref.shape[2]
            tokens = torch.cat([sink_tokens, tokens], dim=1)
            t = torch.cat([t.new_zeros(B, n_sink), t], dim=1)
        visible = full_mask(n_sink, Fr) if chunk is None else block_causal_mask(n_sink, Fr, chunk, window)
        attend = _GroupAttention(visible, grid, self.cfg.head_dim, x.device)
        out = self._run(
            tokens, grid, t, self.embed_text(context), context_mask, self.embed_audio(audio, Fr), attend, n_sink
        )
        return self.unpatchify(out, grid).to(x.dtype)

    def new_cache(self, window: int) -> KVCache:
        return KVCache(self.cfg.num_layers, window)

    @torch.no_grad()
    def prefill_sinks(
        self,
        sinks: torch.Tensor,
        cache: KVCache,
        context: torch.Tensor | None = None,
        context_mask: torch.Tensor | None = None,
        reference: torch.Tensor | None = None,
    ) -> None:
        """Run clean sink frames (the reference) at timestep 0 and store their keys/values as the sinks.
        ``reference`` (default: the first sink): the identity latent that ``ref_concat`` adds to every chunk's
        frames (sinks may change during a stream; the reference does not)."""
        self._check(sinks, "sinks", self.cfg.in_dim)
        if reference is not None:
            self._check(reference, "reference", self.cfg.in_dim)
        if self.cfg.omniavatar:  # LiveTalk: the stream's first len(sinks) latent frames become the sinks
            if cache.next_frame:
                raise ValueError(
                    "the OmniAvatar layout's sinks are the stream's first latent frames: they cannot be replaced "
                    "mid-stream (use the reference or anchor_heavy anchor)"
                )
            cache.reference = sinks[:, :, :1] if reference is None else reference
            cache.sink_frames = sinks.shape[2]
            return
        cache.ref_tokens = self.embed_reference(sinks[:, :, :1] if reference is None else reference)
        tokens, grid = self.embed_frames(sinks)
        B, R = tokens.shape[:2]
        attend = _CachedAttention(cache, R, grid, self.cfg.head_dim, sinks.device, "sink")
        e, e0 = self.embed_time(tokens.new_zeros(B, R, dtype=torch.float32))
        ctx = self.embed_text(context)
        x = tokens
        for i, block in enumerate(self.blocks):
            x = block(x, e0, ctx, context_mask, None, attend, i, R)

    def forward_chunk(
        self,
        x: torch.Tensor,
        t,
        cache: KVCache,
        context: torch.Tensor | None = None,
        audio: torch.Tensor | None = None,
        *,
        commit: bool = False,
        context_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Streaming: one chunk [B, C, k, H, W] attends [sinks | cached window | itself].

        With ``commit=True`` the chunk's keys/values enter the cache (use it for the pass on the clean,
        denoised chunk, as Self-Forcing / CausVid do); denoising steps read without writing.
        """
        self._check(x, "x", self.cfg.in_dim)
        B, _, Fr = x.shape[:3]
        t = self._timesteps(t, B, Fr, x.device)
        first = cache.next_frame
        tokens, grid = self.embed_frames(self.chunk_input(x, cache.reference, first))
        if cache.ref_tokens is not None:
            tokens = tokens + cache.ref_tokens
        attend = _CachedAttention(cache, Fr, grid, self.cfg.head_dim, x.device, "commit" if commit else "read")
        out = self._run(tokens, grid, t, self.embed_text(context), context_mask, self.embed_audio(audio, Fr), attend, 0)
        if commit:
            cache.advance(Fr)
        return self.chunk_velocity(self.unpatchify(out, grid), x, t, cache.reference, first).to(x.dtype)


_ADDITIONS = ("audio_attn.", "audio_proj.", "audio_pos", "audio_embedding.", "ref_embedding.")


def _is_addition(name: str) -> bool:
    return any(a in name for a in _ADDITIONS)
