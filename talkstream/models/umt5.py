"""The umT5-XXL text encoder that Wan2.1 / OmniAvatar / LiveTalk condition on, reading Wan's released file as is.

Parameter names are those of ``models_t5_umt5-xxl-enc-bf16.pth`` (``token_embedding.weight``,
``blocks.{i}.attn.{q,k,v,o}.weight``, ``blocks.{i}.ffn.{gate.0,fc1,fc2}.weight``, ``blocks.{i}.norm{1,2}.weight``,
``blocks.{i}.pos_embedding.embedding.weight``, ``norm.weight``): T5 v1.1 blocks (RMS norm, unscaled attention,
gated tanh-GELU feed-forward) with a relative position bias of its own in every block (umT5). A prompt is cleaned
(HTML entities, runs of whitespace), tokenised by the folder's tokenizer to 512 tokens, encoded with the padding
masked, and the padded positions are set to zero: ``[1, 512, 4096]``, what the DiT's cross-attention reads.
"""

from __future__ import annotations

import html
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F


@dataclass(frozen=True)
class UMT5Config:
    vocab: int = 256_384
    dim: int = 4096
    dim_ffn: int = 10_240
    num_heads: int = 64
    num_layers: int = 24
    num_buckets: int = 32
    max_distance: int = 128
    text_len: int = 512
    eps: float = 1e-6


class UMT5Error(ValueError):
    pass


class _RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(self.weight.dtype)


class _Attention(nn.Module):
    def __init__(self, dim: int, num_heads: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.q, self.k, self.v, self.o = (nn.Linear(dim, dim, bias=False) for _ in range(4))

    def forward(self, x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        B, L, D = x.shape
        q, k, v = (p(x).view(B, L, self.num_heads, -1).transpose(1, 2) for p in (self.q, self.k, self.v))
        attn = torch.einsum("bnid,bnjd->bnij", q, k).float() + bias  # T5: no 1/sqrt(d) scaling
        out = torch.einsum("bnij,bnjd->bnid", F.softmax(attn, dim=-1).to(v.dtype), v)
        return self.o(out.transpose(1, 2).reshape(B, L, D))


class _FeedForward(nn.Module):
    def __init__(self, dim: int, dim_ffn: int) -> None:
        super().__init__()
        self.gate = nn.Sequential(nn.Linear(dim, dim_ffn, bias=False), nn.GELU(approximate="tanh"))
        self.fc1 = nn.Linear(dim, dim_ffn, bias=False)
        self.fc2 = nn.Linear(dim_ffn, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.fc1(x) * self.gate(x))


class _PositionBias(nn.Module):
    def __init__(self, num_buckets: int, num_heads: int, max_distance: int) -> None:
        super().__init__()
        self.num_buckets, self.max_distance = num_buckets, max_distance
        self.embedding = nn.Embedding(num_buckets, num_heads)

    def forward(self, n: int) -> torch.Tensor:
        """[1, heads, n, n] bias of key j for query i (bidirectional buckets of j - i)."""
        pos = torch.arange(n, device=self.embedding.weight.device)
        return self.embedding(relative_buckets(pos[None] - pos[:, None], self.num_buckets, self.max_distance)).permute(
            2, 0, 1
        )[None]


def relative_buckets(rel: torch.Tensor, num_buckets: int = 32, max_distance: int = 128) -> torch.Tensor:
    """T5's bidirectional relative-position buckets: half for each sign, exact below a quarter of the buckets,
    logarithmic up to ``max_distance``."""
    half = num_buckets // 2
    out = (rel > 0).long() * half
    rel = rel.abs()
    exact = half // 2
    large = exact + (torch.log(rel.float().clamp_min(1) / exact) / math.log(max_distance / exact) * (half - exact))
    large = torch.minimum(large.long(), torch.full_like(rel, half - 1))
    return out + torch.where(rel < exact, rel, large)


class _Block(nn.Module):
    def __init__(self, cfg: UMT5Config) -> None:
        super().__init__()
        self.norm1 = _RMSNorm(cfg.dim, cfg.eps)
        self.attn = _Attention(cfg.dim, cfg.num_heads)
        self.norm2 = _RMSNorm(cfg.dim, cfg.eps)
        self.ffn = _FeedForward(cfg.dim, cfg.dim_ffn)
        self.pos_embedding = _PositionBias(cfg.num_buckets, cfg.num_heads, cfg.max_distance)

    def forward(self, x: torch.Tensor, mask_bias: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x), self.pos_embedding(x.shape[1]) + mask_bias)
        return x + self.ffn(self.norm2(x))


class UMT5Encoder(nn.Module):
    def __init__(self, cfg: UMT5Config = UMT5Config()) -> None:
        super().__init__()
        self.cfg = cfg
        self.token_embedding = nn.Embedding(cfg.vocab, cfg.dim)
        self.blocks = nn.ModuleList(_Block(cfg) for _ in range(cfg.num_layers))
        self.norm = _RMSNorm(cfg.dim, cfg.eps)

    def forward(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """ids, mask [B, L] -> [B, L, dim], padded positions (mask 0) set to zero."""
        x = self.token_embedding(ids)
        bias = torch.zeros(mask.shape, device=x.device, dtype=torch.float32)
        bias = bias.masked_fill(mask == 0, torch.finfo(torch.float32).min)[:, None, None, :]
        for block in self.blocks:
            x = block(x, bias)
        return self.norm(x) * (mask[..., None] > 0).to(x.dtype)


def clean_prompt(text: str) -> str:
    """HTML entities decoded and whitespace collapsed (Wan's 'whitespace' cleaning, without ftfy's mojibake repair)."""
    return re.sub(r"\s+", " ", html.unescape(html.unescape(text))).strip()


@dataclass
class PromptEncoder:
    """umT5 embeddings of prompts: ``encode("...")`` -> [1, text_len, dim] (padding zero)."""

    model: UMT5Encoder
    tokenizer: object  # transformers tokenizer of google/umt5-xxl

    @torch.no_grad()
    def encode(self, prompt: str) -> torch.Tensor:
        tok = self.tokenizer(
            [clean_prompt(prompt)],
            padding="max_length",
            truncation=True,
            max_length=self.model.cfg.text_len,
            add_special_tokens=True,
            return_tensors="pt",
        )
        dev = self.model.token_embedding.weight.device
        return self.model(tok.input_ids.to(dev), tok.attention_mask.to(dev))


def load_umt5(
    path: str | os.PathLike, device: str | torch.device = "cpu", dtype: torch.dtype = torch.bfloat16
) -> UMT5Encoder:
    """Wan's ``models_t5_umt5-xxl-enc-bf16.pth`` (every key and shape checked), built on the meta device."""
    from .checkpoint import CheckpointError, read_state_dict

    try:
        sd, _ = read_state_dict(path)
    except CheckpointError as e:
        raise UMT5Error(str(e)) from None
    emb = sd.get("token_embedding.weight")
    if emb is None:
        raise UMT5Error(f"{path}: not Wan's umT5 encoder (no token_embedding.weight)")
    layers = 1 + max((int(k.split(".")[1]) for k in sd if k.startswith("blocks.")), default=-1)
    heads = sd["blocks.0.pos_embedding.embedding.weight"].shape[1] if layers else 1
    cfg = UMT5Config(
        vocab=emb.shape[0],
        dim=emb.shape[1],
        dim_ffn=sd["blocks.0.ffn.fc1.weight"].shape[0] if layers else 1,
        num_heads=heads,
        num_layers=layers,
        num_buckets=sd["blocks.0.pos_embedding.embedding.weight"].shape[0] if layers else 32,
    )
    with torch.device("meta"):
        model = UMT5Encoder(cfg)
    own = model.state_dict()
    missing, unexpected = sorted(set(own) - set(sd)), sorted(set(sd) - set(own))
    wrong = [k for k in own if k in sd and sd[k].shape != own[k].shape]
    if missing or unexpected or wrong:
        raise UMT5Error(f"{path}: not Wan's umT5 encoder layout (missing {missing[:3]}, unexpected {unexpected[:3]}, "
                        f"shapes {wrong[:3]})")  # fmt: skip
    model.load_state_dict({k: v.to(device=device, dtype=dtype) for k, v in sd.items()}, strict=True, assign=True)
    return model.eval()


def load_prompt_encoder(
    path: str | os.PathLike,
    tokenizer: str | os.PathLike,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.bfloat16,
) -> PromptEncoder:
    """The encoder file and the tokenizer folder (``google/umt5-xxl`` inside Wan's release), local files only."""
    try:
        from transformers import AutoTokenizer
    except ImportError:
        raise UMT5Error("the umT5 tokenizer needs the PyPI package 'transformers'") from None
    if not Path(tokenizer).is_dir():
        raise UMT5Error(f"{tokenizer}: no tokenizer folder (expected Wan2.1-T2V-1.3B/google/umt5-xxl)")
    tok = AutoTokenizer.from_pretrained(str(tokenizer), local_files_only=True)
    return PromptEncoder(load_umt5(path, device, dtype), tok)


__all__ = [
    "PromptEncoder",
    "UMT5Config",
    "UMT5Encoder",
    "UMT5Error",
    "clean_prompt",
    "load_prompt_encoder",
    "load_umt5",
    "relative_buckets",
]
