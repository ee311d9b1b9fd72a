"""Which file of a weights folder is what (``talkstream generate/serve --weights DIR``).

A folder holds either talkstream's own checkpoints (``causal.safetensors`` + ``vae.safetensors``, optionally
``tiny_decoder.safetensors``: the embedded model's layout) or the published LiveTalk student with the parts it runs
with, as their releases name them:

    DIR/
      LiveTalk-1.3B-V0.1/model.safetensors          the distilled student (GAIR/LiveTalk-1.3B-V0.1)
      Wan2.1-T2V-1.3B/Wan2.1_VAE.pth                 the Wan2.1 VAE (Wan-AI/Wan2.1-T2V-1.3B)
      Wan2.1-T2V-1.3B/models_t5_umt5-xxl-enc-bf16.pth + Wan2.1-T2V-1.3B/google/umt5-xxl/   umT5 text encoder
      wav2vec2-base-960h/                            the audio encoder (facebook/wav2vec2-base-960h)
      taew2_1.pth                                    optional: the tiny decoder (madebyollin/taehv), --decoder tiny

Instead of the merged student, OmniAvatar's LoRA release loads too: ``OmniAvatar-1.3B/pytorch_model.pt`` + its
``config.json`` on the base ``Wan2.1-T2V-1.3B/diffusion_pytorch_model.safetensors``. A ``manifest.json`` in the
folder may name any file differently (``{"dit": "my/student.safetensors", "wav2vec2": "/models/w2v", ...}``, paths
relative to the folder or absolute); its keys are ``ROLES``. Instead of the umT5 encoder, ``text_embeddings`` may
name a file of precomputed umT5 embeddings ([L, 4096] in a .safetensors / .pt).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

# role -> (what it is, where it comes from, default paths tried in order)
ROLES: dict[str, tuple[str, str, tuple[str, ...]]] = {
    "dit": (
        "the distilled LiveTalk student DiT (merged)",
        "GAIR/LiveTalk-1.3B-V0.1",
        ("LiveTalk-1.3B-V0.1/model.safetensors", "model.safetensors"),
    ),
    "lora": (
        "OmniAvatar's LoRA and audio weights (instead of a merged DiT)",
        "OmniAvatar/OmniAvatar-1.3B",
        ("OmniAvatar-1.3B/pytorch_model.pt",),
    ),
    "lora_config": (
        "OmniAvatar's config.json (lora_rank, lora_alpha)",
        "OmniAvatar/OmniAvatar-1.3B",
        ("OmniAvatar-1.3B/config.json",),
    ),
    "base": (
        "the Wan2.1-T2V-1.3B DiT the LoRA applies to",
        "Wan-AI/Wan2.1-T2V-1.3B",
        ("Wan2.1-T2V-1.3B/diffusion_pytorch_model.safetensors",),
    ),
    "vae": ("the Wan2.1 VAE", "Wan-AI/Wan2.1-T2V-1.3B", ("Wan2.1-T2V-1.3B/Wan2.1_VAE.pth", "Wan2.1_VAE.pth")),
    "text_encoder": (
        "the umT5-XXL text encoder",
        "Wan-AI/Wan2.1-T2V-1.3B",
        ("Wan2.1-T2V-1.3B/models_t5_umt5-xxl-enc-bf16.pth", "models_t5_umt5-xxl-enc-bf16.pth"),
    ),
    "tokenizer": (
        "the umT5 tokenizer folder",
        "Wan-AI/Wan2.1-T2V-1.3B (google/umt5-xxl)",
        ("Wan2.1-T2V-1.3B/google/umt5-xxl", "google/umt5-xxl"),
    ),
    "text_embeddings": ("precomputed umT5 embeddings of the prompt ([L, 4096])", "made by you", ()),
    "wav2vec2": (
        "the wav2vec2 audio encoder folder",
        "facebook/wav2vec2-base-960h",
        ("wav2vec2-base-960h", "wav2vec2"),
    ),
    "tiny_decoder": (
        "the tiny Wan decoder, for --decoder tiny",
        "madebyollin/taehv",
        ("taew2_1.pth", "taew2_1.safetensors"),
    ),
}
OWN_FILES = ("causal.safetensors", "vae.safetensors")


class ManifestError(ValueError):
    pass


@dataclass(frozen=True)
class WeightsManifest:
    root: Path
    kind: str  # "talkstream" (our own checkpoints) or "livetalk" (the published student and its parts)
    files: dict[str, Path] = field(default_factory=dict)  # role -> existing path

    def has(self, role: str) -> bool:
        return role in self.files

    def path(self, role: str) -> Path:
        if role not in self.files:
            raise ManifestError(f"{self.root}: no {_describe(role)}")
        return self.files[role]

    @property
    def dit_source(self) -> str:
        """'merged' (one DiT file) or 'lora' (OmniAvatar's LoRA on the Wan base)."""
        return "merged" if "dit" in self.files else "lora"


def _describe(role: str) -> str:
    what, origin, defaults = ROLES[role]
    where = " or ".join(defaults) if defaults else "name it in manifest.json"
    return f"{role} = {what} ({where}; from {origin})"


def _own_checkpoint(root: Path, name: str) -> bool:
    stem = name[: -len(".safetensors")]
    return (root / name).exists() or (root / f"{stem}.safetensors.index.json").exists()


def read_manifest(root: str | Path, decoder: str = "vae", need_text_encoder: bool = False) -> WeightsManifest:
    """Resolve a weights folder. Every file the run needs that is missing is named in one error: the student (or the
    LoRA + its config + the base), the VAE, wav2vec2, the tiny decoder for ``decoder='tiny'``, and the umT5 encoder +
    tokenizer when ``need_text_encoder`` (a prompt without precomputed ``text_embeddings``)."""
    root = Path(root)
    if not root.is_dir():
        raise ManifestError(f"{root}: not a folder (--weights takes the folder holding the downloaded weights)")
    if all(_own_checkpoint(root, n) for n in OWN_FILES):
        files = {"dit": root / "causal.safetensors", "vae": root / "vae.safetensors"}
        if (root / "tiny_decoder.safetensors").exists():
            files["tiny_decoder"] = root / "tiny_decoder.safetensors"
        elif decoder == "tiny":
            raise ManifestError(f"{root}: --decoder tiny, but no tiny_decoder.safetensors in this talkstream folder")
        return WeightsManifest(root, "talkstream", files)
    named: dict[str, str] = {}
    mf = root / "manifest.json"
    if mf.exists():
        try:
            named = json.loads(mf.read_text())
        except json.JSONDecodeError as e:
            raise ManifestError(f"{mf}: not JSON ({e})") from None
        if not isinstance(named, dict) or not all(isinstance(v, str) for v in named.values()):
            raise ManifestError(
                f'{mf}: must map roles to paths, e.g. {{"dit": "LiveTalk-1.3B-V0.1/model.safetensors"}}'
            )
        unknown = sorted(set(named) - set(ROLES))
        if unknown:
            raise ManifestError(f"{mf}: unknown roles {unknown}; known: {sorted(ROLES)}")
    files: dict[str, Path] = {}
    named_missing: list[str] = []
    for role, (_, _, defaults) in ROLES.items():
        if role in named:
            p = Path(named[role])
            p = p if p.is_absolute() else root / p
            if p.exists():
                files[role] = p
            else:
                named_missing.append(f"{role} = {p} (named in manifest.json: no such file)")
            continue
        for d in defaults:
            if (root / d).exists():
                files[role] = root / d
                break
    missing = list(named_missing)
    if "dit" not in files and not any(m.startswith("dit =") for m in missing):
        lora_parts = [r for r in ("lora", "lora_config", "base") if r not in files]
        if len(lora_parts) == 3:
            lora = " + ".join(_describe(r) for r in ("lora", "lora_config", "base"))
            missing.append(f"{_describe('dit')}, or OmniAvatar's LoRA release: {lora}")
        else:
            missing += [_describe(r) for r in lora_parts]
    need = ["vae", "wav2vec2"] + (["tiny_decoder"] if decoder == "tiny" else [])
    if need_text_encoder and "text_embeddings" not in files:
        need += ["text_encoder", "tokenizer"]
    missing += [_describe(r) for r in need if r not in files and not any(m.startswith(r + " =") for m in missing)]
    if missing:
        raise ManifestError(f"{root}: not a complete weights folder; missing " + "; ".join(missing))
    return WeightsManifest(root, "livetalk", files)


def weights_kind(weights: str | Path | None, decoder: str = "vae") -> str:
    """'talkstream' (the embedded model: ``None``; a talkstream folder or checkpoint file) or 'livetalk' (a folder of
    published weights, checked by ``read_manifest``: a missing file is an error here, before any work)."""
    if weights is None:
        return "talkstream"
    p = Path(weights)
    if p.is_file() or p.name.endswith((".safetensors", ".index.json")):
        return "talkstream"
    return read_manifest(p, decoder).kind


__all__ = ["ManifestError", "ROLES", "WeightsManifest", "read_manifest", "weights_kind"]
