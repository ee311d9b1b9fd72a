"""Checkpoints: safetensors with the config inside, sharding, and loading other projects' Wan2.1 files.

Formats read into ``WanDiT`` (whose parameter names are the original Wan2.1 ones):

* original Wan2.1 DiT checkpoints (``blocks.0.self_attn.q.weight``, ...) - identity mapping;
* diffusers ``WanTransformer3DModel`` state dicts (``blocks.0.attn1.to_q.weight``, ...);
* Self-Forcing / CausVid training files: ``{"generator": sd, "generator_ema": sd}`` with ``model.``
  (and FSDP / compile) prefixes;
* any of these sharded: a ``*.safetensors.index.json`` with a ``weight_map``, or a folder of shards.

Our additions (audio adapter) are absent from those files; they stay at their zero-initialised
output, so a loaded Wan model computes exactly what Wan computes.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from .config import DiTConfig, TinyDecoderConfig, VAEConfig

if TYPE_CHECKING:
    from collections.abc import Callable

    from .dit import WanDiT
    from .vae import CausalVAE, TinyDecoder

MAX_SHARD_BYTES = 15 * 2**20  # every file we commit stays under 16 MiB


class CheckpointError(ValueError):
    pass


# original Wan2.1 name <-> diffusers name; {n} is a block index, {x} one of q/k/v
_NAME_PAIRS = [
    ("time_embedding.0.", "condition_embedder.time_embedder.linear_1."),
    ("time_embedding.2.", "condition_embedder.time_embedder.linear_2."),
    ("time_projection.1.", "condition_embedder.time_proj."),
    ("text_embedding.0.", "condition_embedder.text_embedder.linear_1."),
    ("text_embedding.2.", "condition_embedder.text_embedder.linear_2."),
    ("blocks.{n}.self_attn.o.", "blocks.{n}.attn1.to_out.0."),
    ("blocks.{n}.self_attn.{x}.", "blocks.{n}.attn1.to_{x}."),
    ("blocks.{n}.self_attn.norm_{x}.", "blocks.{n}.attn1.norm_{x}."),
    ("blocks.{n}.cross_attn.o.", "blocks.{n}.attn2.to_out.0."),
    ("blocks.{n}.cross_attn.{x}.", "blocks.{n}.attn2.to_{x}."),
    ("blocks.{n}.cross_attn.norm_{x}.", "blocks.{n}.attn2.norm_{x}."),
    ("blocks.{n}.norm3.", "blocks.{n}.norm2."),  # diffusers' norm2 is Wan's cross-attention norm3
    ("blocks.{n}.ffn.0.", "blocks.{n}.ffn.net.0.proj."),
    ("blocks.{n}.ffn.2.", "blocks.{n}.ffn.net.2."),
    ("blocks.{n}.modulation", "blocks.{n}.scale_shift_table"),
    ("head.head.", "proj_out."),
    ("head.modulation", "scale_shift_table"),
]


def _rule(src: str, dst: str) -> tuple[str, str]:
    """A name template -> (regex, replacement), capturing {n} and {x} in order."""
    groups = re.findall(r"\{[nx]\}", src)
    pat = re.escape(src).replace(r"\{n\}", r"(\d+)").replace(r"\{x\}", "([qkv])")
    rep = dst
    for i, g in enumerate(groups, 1):
        rep = rep.replace(g, f"\\{i}", 1)
    return "^" + pat + ("$" if not src.endswith(".") else ""), rep


_DIFFUSERS_TO_WAN = [_rule(d, w) for w, d in _NAME_PAIRS]
_WAN_TO_DIFFUSERS = [_rule(w, d) for w, d in _NAME_PAIRS]
_WRAPPER_PREFIXES = ("module.", "_orig_mod.", "_fsdp_wrapped_module.", "model.", "generator.", "generator_ema.")


def _rename(key: str, rules) -> str:
    for pat, rep in rules:
        new, n = re.subn(pat, rep, key)
        if n:
            return new
    return key


def diffusers_to_wan(sd: dict) -> dict:
    return {_rename(k, _DIFFUSERS_TO_WAN): v for k, v in sd.items()}


def wan_to_diffusers(sd: dict) -> dict:
    return {_rename(k, _WAN_TO_DIFFUSERS): v for k, v in sd.items()}


def _strip_wrappers(key: str) -> str:
    changed = True
    while changed:
        changed = False
        for p in _WRAPPER_PREFIXES:
            if key.startswith(p):
                key, changed = key[len(p) :], True
    return key.replace("._fsdp_wrapped_module", "").replace("._checkpoint_wrapped_module", "")


def detect_format(keys) -> str:
    keys = list(keys)
    if any(".attn1." in k or k.startswith("condition_embedder.") for k in keys):
        return "diffusers"
    if any(".self_attn." in k for k in keys):
        return "wan"
    raise CheckpointError(f"not a Wan DiT state dict (first keys: {keys[:4]})")


# -- reading files -------------------------------------------------------------------------------------
def _read_safetensors(path: Path) -> tuple[dict, dict]:
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            return {k: f.get_tensor(k) for k in f.keys()}, meta
    except (SafetensorError, OSError, RuntimeError) as e:
        raise CheckpointError(f"{path}: not a readable safetensors file (truncated or corrupted?): {e}") from None


def read_state_dict(path: str | os.PathLike, ema: bool = True) -> tuple[dict, dict]:
    """A state dict (and our metadata, if any) from a file, an index json or a folder of shards."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path}: no such checkpoint")
    if path.is_dir():
        index = sorted(path.glob("*.safetensors.index.json"))
        if index:
            return read_state_dict(index[0], ema)
        files = sorted(path.glob("*.safetensors"))
        if not files:
            raise CheckpointError(f"{path}: no .safetensors files in this folder")
        return _merge([_read_safetensors(f) for f in files], path)
    if path.name.endswith(".index.json"):
        try:
            wmap = json.loads(path.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError) as e:
            raise CheckpointError(f"{path}: not a shard index ({e})") from None
        files = sorted(set(wmap.values()))
        return _merge([_read_safetensors(path.parent / f) for f in files], path)
    if path.suffix in (".pt", ".pth", ".bin", ".ckpt"):
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # noqa: BLE001 - torch raises many kinds for a bad file
            raise CheckpointError(f"{path}: not a readable torch checkpoint: {e}") from None
        if isinstance(obj, dict) and ("generator" in obj or "generator_ema" in obj):
            obj = obj["generator_ema" if ema and "generator_ema" in obj else "generator"]
        elif isinstance(obj, dict) and "state_dict" in obj:
            obj = obj["state_dict"]
        return {k: v for k, v in obj.items() if torch.is_tensor(v)}, {}
    return _read_safetensors(path)


def _merge(parts: list[tuple[dict, dict]], where: Path) -> tuple[dict, dict]:
    sd, meta = {}, {}
    for s, m in parts:
        dup = sd.keys() & s.keys()
        if dup:
            raise CheckpointError(f"{where}: tensors appear in two shards: {sorted(dup)[:3]}")
        sd.update(s)
        meta = meta or m
    return sd, meta


def normalize_dit_state_dict(sd: dict) -> dict:
    """Any supported layout -> our (original Wan2.1) parameter names."""
    sd = {_strip_wrappers(k): v for k, v in sd.items()}
    return diffusers_to_wan(sd) if detect_format(sd) == "diffusers" else sd


def state_dict_mismatch(sd: dict, own: dict, optional: Callable[[str], bool] | None = None) -> str | None:
    """What keeps ``sd`` from loading into a model whose state dict is ``own``: shape mismatches, missing keys (those
    ``optional`` accepts excepted) and unexpected ones, a few of each named; None when it fits."""
    missing = [k for k in own if k not in sd and not (optional and optional(k))]
    unexpected = [k for k in sd if k not in own]
    mismatched = [(k, tuple(sd[k].shape), tuple(own[k].shape)) for k in sd if k in own and sd[k].shape != own[k].shape]
    lines = []
    if mismatched:
        lines.append(
            "shape mismatch: "
            + "; ".join(f"{k} {a} in file vs {b} in model" for k, a, b in mismatched[:4])
            + (f" (+{len(mismatched) - 4} more)" if len(mismatched) > 4 else "")
        )
    if missing:
        lines.append(f"missing {len(missing)}: {missing[:4]}")
    if unexpected:
        lines.append(f"unexpected {len(unexpected)}: {unexpected[:4]}")
    return "; ".join(lines) or None


def load_dit_weights(model: torch.nn.Module, sd: dict, strict_additions: bool = False) -> dict:
    """Load a (normalised) state dict into ``model`` with clear errors. Returns what was missing/extra."""
    from .dit import _is_addition

    own = model.state_dict()
    if why := state_dict_mismatch(sd, own, None if strict_additions else _is_addition):
        cfg = getattr(model, "cfg", None)
        raise CheckpointError(f"checkpoint does not fit the {getattr(cfg, 'name', 'model')} config; {why}")
    with torch.no_grad():
        for k, v in sd.items():
            own[k].copy_(v.to(own[k].dtype))
    return dict(missing_additions=[k for k in own if k not in sd])


# a block's output projections: zero, the block adds nothing to its input (x + 0)
BLOCK_OUTPUTS = (
    "self_attn.o.weight",
    "self_attn.o.bias",
    "cross_attn.o.weight",
    "cross_attn.o.bias",
    "ffn.2.weight",
    "ffn.2.bias",
    "audio_attn.attn.o.weight",
    "audio_attn.attn.o.bias",
)


def deepen_dit_state(sd: dict, num_layers: int) -> dict:
    """A DiT's weights for ``num_layers`` blocks from weights with fewer (depth growth): the file's block i becomes
    block i r (r = num_layers / its blocks) and is followed by r - 1 copies of itself whose output projections
    (``BLOCK_OUTPUTS``) are zero, so each copy passes its input through: the deeper DiT computes exactly what the
    file's did, and training makes the copies useful."""
    ids = {int(k.split(".")[1]) for k in sd if k.startswith("blocks.")}
    if not ids or ids != set(range(len(ids))):
        raise CheckpointError(f"no blocks 0..n-1 to grow from (found {sorted(ids)[:8]})")
    if num_layers % len(ids):
        raise CheckpointError(f"cannot grow {len(ids)} blocks to {num_layers}: use a multiple of {len(ids)}")
    r = num_layers // len(ids)
    out = {k: v for k, v in sd.items() if not k.startswith("blocks.")}
    for k, v in sd.items():
        if k.startswith("blocks."):
            _, i, rest = k.split(".", 2)
            for j in range(r):
                out[f"blocks.{int(i) * r + j}.{rest}"] = (
                    torch.zeros_like(v) if j and rest in BLOCK_OUTPUTS else v.clone()
                )
    return out


# -- a distilled student's sampling settings ----------------------------------------------------------------
SAMPLERS = ("euler", "few_step")
SAMPLING_ANCHORS = ("reference", "anchor_heavy", "rolling_sink", "memory_bank")


def validate_sampling(sampling: dict) -> dict:
    """A student checkpoint's ``sampling`` dict, checked and normalised: ``sampler`` (few_step | euler),
    ``timesteps`` (its step list, decreasing in (0, 1000]), ``timestep_shift``, ``reference_init`` (1: pure noise),
    ``audio_guidance`` (1: one pass per step, no CFG) and ``anchor`` (the engine's anchor mode). The stream engine
    samples the checkpoint with exactly these."""
    if not isinstance(sampling, dict):
        raise CheckpointError(f"sampling must be a dict, got {type(sampling).__name__}")
    need = {"sampler", "timesteps", "timestep_shift", "reference_init", "audio_guidance", "anchor"}
    if missing := need - set(sampling):
        raise CheckpointError(f"sampling lacks {sorted(missing)}")
    if unknown := set(sampling) - need:
        raise CheckpointError(f"sampling has unknown keys {sorted(unknown)}")
    if sampling["sampler"] not in SAMPLERS:
        raise CheckpointError(f"sampling: sampler must be one of {SAMPLERS}, got {sampling['sampler']!r}")
    if sampling["anchor"] not in SAMPLING_ANCHORS:
        raise CheckpointError(f"sampling: anchor must be one of {SAMPLING_ANCHORS}, got {sampling['anchor']!r}")
    ts = [float(t) for t in sampling["timesteps"]]
    if not ts or any(t <= 0 or t > 1000 for t in ts) or any(b >= a for a, b in zip(ts, ts[1:])):
        raise CheckpointError(f"sampling: timesteps must be a decreasing list in (0, 1000], got {ts}")
    out = dict(
        sampler=str(sampling["sampler"]),
        timesteps=ts,
        timestep_shift=float(sampling["timestep_shift"]),
        reference_init=float(sampling["reference_init"]),
        audio_guidance=float(sampling["audio_guidance"]),
        anchor=str(sampling["anchor"]),
    )
    if not 0 < out["reference_init"] <= 1 or out["timestep_shift"] <= 0:
        raise CheckpointError(f"sampling: reference_init must be in (0, 1] and timestep_shift > 0, got {out}")
    return out


def sampling_of(model: torch.nn.Module) -> dict | None:
    """The ``sampling`` dict a loaded checkpoint carries (a distilled student), None for any other model."""
    info = getattr(model, "checkpoint_info", None) or {}
    return None if info.get("sampling") is None else validate_sampling(info["sampling"])


# -- our own files -------------------------------------------------------------------------------------
def save_checkpoint(
    path: str | os.PathLike,
    model: torch.nn.Module,
    kind: str,
    config,
    extra: dict | None = None,
    dtype: torch.dtype | None = None,
    max_shard_bytes: int = MAX_SHARD_BYTES,
    sampling: dict | None = None,
) -> list[Path]:
    """Write ``model`` to ``path`` (.safetensors), sharded into ``path-00001-of-0000N.safetensors`` plus an
    index when larger than ``max_shard_bytes``. The config and ``extra`` travel in the metadata; ``sampling`` (a
    distilled student's step list and settings, ``validate_sampling``) goes into ``extra`` as ``sampling``."""
    if sampling is not None:
        extra = {**(extra or {}), "sampling": validate_sampling(sampling)}
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    sd = {
        k: (v.to(dtype) if dtype is not None and v.is_floating_point() else v).detach().cpu().contiguous()
        for k, v in model.state_dict().items()
    }
    meta = {"talkstream": json.dumps(dict(kind=kind, config=config.to_dict(), extra=extra or {}))}
    shards: list[dict] = [{}]
    size = 0
    for k, v in sd.items():
        n = v.numel() * v.element_size()
        if shards[-1] and size + n > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][k] = v
        size += n
    if len(shards) == 1:
        tmp = path.with_suffix(".tmp")
        save_file(shards[0], str(tmp), metadata=meta)
        os.replace(tmp, path)
        return [path]
    stem = path.name[: -len(".safetensors")] if path.name.endswith(".safetensors") else path.name
    names = [f"{stem}-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    for name, shard in zip(names, shards):
        save_file(shard, str(path.parent / name), metadata=meta)
    index = path.parent / f"{stem}.safetensors.index.json"
    index.write_text(
        json.dumps({"metadata": meta, "weight_map": {k: n for n, s in zip(names, shards) for k in s}}, indent=1)
    )
    return [path.parent / n for n in names] + [index]


def load_checkpoint(
    path: str | os.PathLike, device: str | torch.device = "cpu", dtype: torch.dtype | None = None
) -> WanDiT | CausalVAE | TinyDecoder:
    """Build and load a model saved by ``save_checkpoint`` (the config comes from the file)."""
    from .dit import WanDiT
    from .vae import CausalVAE, TinyDecoder

    path = Path(path)
    if not path.exists() and path.suffix == ".safetensors":
        stem = path.name[: -len(".safetensors")]
        idx = path.parent / f"{stem}.safetensors.index.json"
        if idx.exists():
            path = idx
    sd, meta = read_state_dict(path)
    if path.name.endswith(".index.json") and not meta:
        meta = json.loads(path.read_text()).get("metadata", {})
    if "talkstream" not in meta:
        raise CheckpointError(
            f"{path}: not a talkstream checkpoint (no config in its metadata); "
            "use normalize_dit_state_dict + load_dit_weights for Wan files"
        )
    info = json.loads(meta["talkstream"])
    kind, cfgd = info["kind"], info["config"]
    if kind == "dit":
        model = WanDiT(DiTConfig.from_dict(cfgd))
        load_dit_weights(model, sd, strict_additions=True)
    elif kind == "vae":
        model = CausalVAE(VAEConfig.from_dict(cfgd))
        _load_strict(model, sd, path)
    elif kind == "tiny_decoder":
        model = TinyDecoder(TinyDecoderConfig(**cfgd))
        _load_strict(model, sd, path)
    else:
        raise CheckpointError(f"{path}: unknown checkpoint kind {kind!r}")
    model.checkpoint_info = info.get("extra", {})
    if model.checkpoint_info.get("sampling") is not None:  # a student: its sampling settings must be usable
        try:
            model.checkpoint_info["sampling"] = validate_sampling(model.checkpoint_info["sampling"])
        except CheckpointError as e:
            raise CheckpointError(f"{path}: {e}") from None
    return model.to(device=device, dtype=dtype).eval()


def _load_strict(model: torch.nn.Module, sd: dict, path: Path) -> None:
    try:
        model.load_state_dict(sd, strict=True)
    except RuntimeError as e:
        raise CheckpointError(f"{path}: does not fit its own config: {str(e)[:400]}") from None
