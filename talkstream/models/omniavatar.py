"""Loading OmniAvatar / LiveTalk DiT files into ``WanDiT`` (configs ``omniavatar1.3b`` / ``omniavatar14b``).

Files read:

* **merged** checkpoints, whose keys are the model's own (``patch_embedding.weight`` [dim, 33, 1, 2, 2],
  ``audio_proj.proj.weight`` [32, 4 * 10752], ``audio_cond_projs.{i}``, the Wan2.1 blocks): the LiveTalk student
  ``LiveTalk-1.3B-V0.1/model.safetensors`` and OmniAvatar merged by LiveTalk's ``merge_lora.py``. Training wrappers
  (``model.``, ``generator.``, ``_orig_mod.``, FSDP) and peft's ``.base_layer`` are stripped;
* **LoRA-separate** releases: the Wan2.1-T2V base (``diffusion_pytorch_model*.safetensors``, 16 input channels) plus
  OmniAvatar's ``pytorch_model.pt`` (peft LoRA pairs ``<module>.lora_A[.default].weight`` / ``lora_B`` on q, k, v, o,
  ffn.0, ffn.2, and the full new tensors: the 33-channel patch embedding and the audio modules) and its
  ``config.json`` (``lora_rank``, ``lora_alpha``). The pairs are merged as peft does: W + (alpha / rank) B A.

The release tools recognise a file by an MD5 fingerprint of its sorted ``key:shape`` list (``key_fingerprint``);
``RELEASE_FINGERPRINTS`` holds the two OmniAvatar ones, which our configs reproduce exactly (tests).
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

import torch

from .checkpoint import CheckpointError, _strip_wrappers, read_state_dict, state_dict_mismatch
from .config import DiTConfig, dit_config
from .dit import WanDiT

RELEASE_FINGERPRINTS = {
    "2bf9513c7a3e908015f11a800fc9b820": "omniavatar1.3b",  # OmniAvatar-1.3B merged; the LiveTalk student
    "883a90b12576b9b8693a08cf690998dd": "omniavatar14b",  # OmniAvatar-14B merged
}
LORA_TARGETS = ("q", "k", "v", "o", "ffn.0", "ffn.2")  # OmniAvatar's lora_target_modules
_LORA = re.compile(r"^(?P<module>.+)\.(?P<kind>lora_A|lora_B|lora_down|lora_up)(?:\.default)?\.weight$")


def key_fingerprint(sd: dict) -> str:
    """MD5 of the sorted ``key:shape`` and ``key`` strings (how OmniAvatar / LiveTalk's loaders identify a file)."""
    keys = []
    for k, v in sd.items():
        keys += [k + ":" + "_".join(str(d) for d in v.shape), k]
    return hashlib.md5(",".join(sorted(keys)).encode()).hexdigest()


def normalize_omniavatar_state_dict(sd: dict) -> dict:
    """Strip training wrappers and peft's ``.base_layer``; LoRA pairs keep their names (see ``merge_lora``)."""
    return {_strip_wrappers(k).replace(".base_layer", ""): v for k, v in sd.items()}


def detect_omniavatar_config(sd: dict) -> DiTConfig:
    """The config a merged OmniAvatar-layout state dict needs: by the release fingerprint, else by its shapes."""
    name = RELEASE_FINGERPRINTS.get(key_fingerprint(sd))
    if name is not None:
        return dit_config(name)
    pe = sd.get("patch_embedding.weight")
    if pe is None or pe.ndim != 5:
        raise CheckpointError("not an OmniAvatar-layout DiT: no 5-D patch_embedding.weight")
    if "audio_proj.proj.weight" not in sd:
        raise CheckpointError(
            "not an OmniAvatar-layout DiT: no audio_proj.proj.weight (a plain Wan2.1 file? OmniAvatar's LoRA release "
            "needs both the Wan base and its pytorch_model.pt)"
        )
    dim, in_ch = pe.shape[:2]
    layers = 1 + max(int(k.split(".")[1]) for k in sd if k.startswith("blocks."))
    for name in ("omniavatar1.3b", "omniavatar14b"):
        cfg = dit_config(name)
        if (cfg.dim, cfg.in_dim + cfg.concat_dim, cfg.num_layers) == (dim, in_ch, layers):
            return cfg
    raise CheckpointError(
        f"an OmniAvatar-layout DiT of an unknown size (dim {dim}, {in_ch} input channels, {layers} blocks); "
        "known: omniavatar1.3b (1536, 33, 30), omniavatar14b (5120, 33, 40)"
    )


def merge_lora(base: dict, lora: dict, alpha: float, rank: int | None = None) -> dict:
    """Base weights + a LoRA release -> merged weights. ``lora`` holds LoRA pairs (peft names) and full tensors that
    replace or add to the base (OmniAvatar: the 33-channel patch embedding, the audio modules). ``rank`` defaults to
    each pair's own (the rows of lora_A); the scale is alpha / rank as in peft."""
    base = normalize_omniavatar_state_dict(base)
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    out = dict(base)
    for k, v in normalize_omniavatar_state_dict(lora).items():
        m = _LORA.match(k)
        if m:
            kind = "A" if m["kind"] in ("lora_A", "lora_down") else "B"
            pairs.setdefault(m["module"], {})[kind] = v
        else:
            out[k] = v
    for module, ab in sorted(pairs.items()):
        if set(ab) != {"A", "B"}:
            raise CheckpointError(f"LoRA for {module}: lora_A and lora_B must both be present, found {sorted(ab)}")
        key = module + ".weight"
        if key not in out:
            raise CheckpointError(f"LoRA for {module}, but the base has no {key}")
        a, b = ab["A"].float(), ab["B"].float()
        r = rank or a.shape[0]
        w = out[key]
        if a.shape[0] != b.shape[1] or (b.shape[0], a.shape[1]) != tuple(w.shape):
            raise CheckpointError(
                f"LoRA for {module}: A {tuple(a.shape)} and B {tuple(b.shape)} do not fit its weight {tuple(w.shape)}"
            )
        out[key] = (w.float() + (alpha / r) * (b @ a)).to(w.dtype)
    if not pairs:
        raise CheckpointError("no LoRA pairs (<module>.lora_A / lora_B weights) in the LoRA file")
    return out


def read_lora_config(path: str | Path) -> tuple[float, int | None]:
    """(lora_alpha, lora_rank) from an OmniAvatar ``config.json``."""
    path = Path(path)
    try:
        cfg = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path}: cannot read the LoRA config ({e})") from None
    if "lora_alpha" not in cfg:
        raise CheckpointError(f"{path}: no lora_alpha (the LoRA scale is lora_alpha / lora_rank)")
    rank = cfg.get("lora_rank")
    return float(cfg["lora_alpha"]), None if rank is None else int(rank)


def build_omniavatar(
    sd: dict, cfg: DiTConfig | None = None, device: str | torch.device = "cpu", dtype: torch.dtype | None = None
) -> WanDiT:
    """A ``WanDiT`` from a merged OmniAvatar-layout state dict, every key checked (names and shapes), the tensors
    taken over without a second copy (the model is built on the meta device)."""
    sd = normalize_omniavatar_state_dict(sd)
    cfg = cfg or detect_omniavatar_config(sd)
    with torch.device("meta"):
        model = WanDiT(cfg)
    if why := state_dict_mismatch(sd, model.state_dict()):
        raise CheckpointError(f"the checkpoint does not fit {cfg.name}; {why}")
    target = dtype or next(iter(sd.values())).dtype
    model.load_state_dict({k: v.to(device=device, dtype=target) for k, v in sd.items()}, strict=True, assign=True)
    return model.eval()


def load_omniavatar(
    path: str | Path,
    base: str | Path | None = None,
    lora_config: str | Path | None = None,
    device: str | torch.device = "cpu",
    dtype: torch.dtype | None = None,
) -> WanDiT:
    """Load a merged file (``path`` alone) or a LoRA release (``path`` = its ``pytorch_model.pt``, ``base`` = the
    Wan2.1-T2V DiT file or folder, ``lora_config`` = its ``config.json``, default: next to ``path``)."""
    sd, _ = read_state_dict(path)
    sd = normalize_omniavatar_state_dict(sd)
    has_lora = any(_LORA.match(k) for k in sd)
    if has_lora:
        if base is None:
            raise CheckpointError(
                f"{path} is a LoRA release: give the Wan2.1-T2V base DiT too (diffusion_pytorch_model.safetensors)"
            )
        conf = Path(lora_config) if lora_config else Path(path).parent / "config.json"
        alpha, rank = read_lora_config(conf)
        base_sd, _ = read_state_dict(base)
        sd = merge_lora(base_sd, sd, alpha, rank)
        if sd["patch_embedding.weight"].shape[1] != 33:
            raise CheckpointError(
                f"{path}: the LoRA release has no 33-channel patch_embedding.weight (found "
                f"{tuple(sd['patch_embedding.weight'].shape)} from the base): not an OmniAvatar release"
            )
    return build_omniavatar(sd, device=device, dtype=dtype)


def pack_audio_frames(
    features: torch.Tensor, first_latent: int, n_latents: int, temporal_factor: int = 4, offset: int = 0
) -> torch.Tensor:
    """Per-video-frame audio features [N, A] (wav2vec2 resampled to the video's fps) of frames ``offset`` .. -> the
    windows of latent frames ``first_latent`` .. + ``n_latents`` - 1: [n_latents, temporal_factor, A]. Latent 0 is
    video frame 0 repeated (OmniAvatar repeats the first feature 3 times before packing 4 -> 1); latent j >= 1 covers
    frames 4j-3 .. 4j. Frames past the end of ``features`` repeat its last one (the stream's tail)."""
    if features.ndim != 2 or len(features) == 0:
        raise ValueError(f"audio features must be [N >= 1, A], got {tuple(features.shape)}")
    tf = temporal_factor
    j = torch.arange(first_latent, first_latent + n_latents)[:, None]
    idx = (j * tf - (tf - 1) + torch.arange(tf)[None]).clamp(min=0)
    if (idx < offset).any():
        raise ValueError(f"frames before {offset} were dropped; latent {first_latent} needs frame {int(idx.min())}")
    return features[(idx - offset).clamp(max=len(features) - 1).to(features.device)]


__all__ = [
    "LORA_TARGETS",
    "RELEASE_FINGERPRINTS",
    "build_omniavatar",
    "detect_omniavatar_config",
    "key_fingerprint",
    "load_omniavatar",
    "merge_lora",
    "normalize_omniavatar_state_dict",
    "pack_audio_frames",
    "read_lora_config",
]
