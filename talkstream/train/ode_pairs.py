"""ODE pairs: the teacher's sampling trajectories kept at exactly the student's noise levels (Self-Forcing's and
CausVid's ``generate_ode_pairs``; LiveTalk's ODE initialisation data).

The shipped bidirectional teacher samples windows of its training length (9 latents) from pure noise with its own
guidance (``real_text_guidance`` / ``real_audio_guidance``: the suite's audio CFG 2 by default), on an Euler
schedule that passes through every level of the student's step list (``diffusion.flow.trajectory_schedule``);
the latents at those levels and the final clean window are kept with the window's conditions (audio windows,
caption, reference latent, the lips' maps). The 4-step list's levels contain the 2-step list's, so one set of
pairs initialises both students.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from tqdm import tqdm

from ..diffusion.flow import trajectory_schedule
from ..media import atomic_path
from ..models.checkpoint import load_checkpoint
from ..models.dit import WanDiT
from .config import TrainConfig
from .data import load_pack
from .dmd import guided_flow
from .runner import init_distributed, train_device

if TYPE_CHECKING:
    from .stages import LatentBank

PAIRS_FILE = "pairs.pt"


def condition_bank(cfg: TrainConfig, device: str, log: Callable[[str], None] = print) -> LatentBank:
    """The distillation stages' conditions: a ``stages.LatentBank`` of the pack's training clips (the held-out
    split is left out as in every DiT stage): audio windows, captions, reference latents (4 frames per clip),
    lips' maps; rendered and VAE-encoded, or read back from ``cfg.latent_cache``."""
    from .stages import LatentBank, _split

    if not cfg.vae:
        raise ValueError("the distillation stages need the VAE (set vae)")
    vae = load_checkpoint(cfg.vae, device=device, dtype=torch.float32).requires_grad_(False)
    pack = load_pack(cfg.data)
    t0 = time.perf_counter()
    tr, _ = _split(pack.n_clips)
    bank = LatentBank(cfg, vae, device, tr, pack, encode_clips=8 if device.startswith("cuda") else 1)
    log(f"conditions of {bank.n} clips ({bank.L} latents each) in {time.perf_counter() - t0:.1f}s")
    return bank


def check_audio_span(cfg: TrainConfig, model: WanDiT, what: str) -> None:
    """The bank's audio windows must be the ones the model was trained with."""
    info = getattr(model, "checkpoint_info", {}) or {}
    want = (info.get("look_back", cfg.look_back), info.get("look_ahead", cfg.look_ahead))
    if want != (cfg.look_back, cfg.look_ahead):
        raise ValueError(
            f"{what} was trained with audio look_back/look_ahead {want}, the config gives "
            f"{(cfg.look_back, cfg.look_ahead)}: set them to match"
        )


@torch.no_grad()
def teacher_trajectory(
    teacher: WanDiT,
    noise: torch.Tensor,
    sigmas: torch.Tensor,
    keep: list[int],
    text: torch.Tensor | None,
    audio: torch.Tensor | None,
    ref: torch.Tensor | None,
    text_mask: torch.Tensor | None = None,
    text_scale: float = 1.0,
    audio_scale: float = 2.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Euler integration of the teacher's guided flow from ``noise`` along ``sigmas`` (ending at 0). Returns the
    latents at the schedule indices ``keep`` [B, K, C, F, h, w] and the final clean latents [B, C, F, h, w]."""
    x = noise
    kept = []
    B = noise.shape[0]
    for i in range(len(sigmas) - 1):
        if i in keep:
            kept.append(x.float().clone())
        t = torch.full((B,), float(sigmas[i]) * 1000, device=x.device)
        c = guided_flow(teacher, x, t, text, audio, ref, text_mask, text_scale, audio_scale)
        x = x + (sigmas[i + 1] - sigmas[i]) * c
    return torch.stack(kept, dim=1), x.float()


def make_ode_pairs(cfg: TrainConfig, log=print, started: float | None = None) -> dict:
    """The ``ode_pairs`` stage: ``n_pairs`` teacher trajectories (split over torchrun's ranks) into
    ``OUT/pairs.pt`` (``pairs-rankR.pt`` for R > 0)."""
    if not cfg.teacher:
        raise ValueError("ode_pairs samples the teacher: set teacher")
    rank, world = init_distributed()
    device = train_device()
    bank = condition_bank(cfg, device, log)
    teacher = load_checkpoint(cfg.teacher, device=device, dtype=torch.float32).requires_grad_(False)
    check_audio_span(cfg, teacher, cfg.teacher)
    info = teacher.checkpoint_info or {}
    if info.get("chunk"):
        raise ValueError(f"{cfg.teacher} is a causal model: ODE pairs come from the bidirectional teacher")
    window = int(info.get("window_latents", cfg.score_window))
    if window > bank.L:
        raise ValueError(f"the teacher's window ({window} latents) is longer than the pack's clips ({bank.L})")
    sigmas, keep = trajectory_schedule(cfg.student_timesteps, cfg.student_shift, cfg.ode_substeps)
    sigmas = sigmas.to(device)
    gen = torch.Generator().manual_seed(cfg.seed * 1000 + rank)
    torch.manual_seed(cfg.seed * 1000 + rank)
    mine = cfg.n_pairs // world + (rank < cfg.n_pairs % world)
    parts: dict[str, list] = {k: [] for k in ("traj", "x0", "audio", "ref", "text", "text_mask", "mouth")}
    t0 = time.perf_counter()
    bar = tqdm(total=mine, desc="ode pairs", disable=rank != 0, mininterval=5)
    done = 0
    use_bf16 = cfg.bf16 and device.startswith("cuda")
    while done < mine:
        n = min(cfg.batch, mine - done)
        b = bank.sample(gen, n, window)
        noise = torch.randn(b["x0"].shape, generator=gen).to(device)
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=use_bf16):
            traj, x0 = teacher_trajectory(
                teacher,
                noise,
                sigmas,
                keep,
                b["text"].float(),
                b["audio"].float(),
                b["ref"].float(),
                b["text_mask"],
                cfg.real_text_guidance,
                cfg.real_audio_guidance,
            )
        for k, val in (("traj", traj), ("x0", x0), ("audio", b["audio"]), ("ref", b["ref"]), ("text", b["text"])):
            parts[k].append(val.to(torch.bfloat16).cpu())
        parts["text_mask"].append(b["text_mask"].cpu())
        parts["mouth"].append(b["mouth"].to(torch.bfloat16).cpu())
        done += n
        bar.update(n)
    bar.close()
    seconds = time.perf_counter() - t0
    texts = parts.pop("text")
    masks = parts.pop("text_mask")
    out = {k: torch.cat(v) for k, v in parts.items()}
    L = max(t.shape[1] for t in texts)  # captions of different lengths: padded (mask False) to the longest
    out["text"] = torch.cat([torch.nn.functional.pad(t, (0, 0, 0, L - t.shape[1])) for t in texts])
    out["text_mask"] = torch.cat([torch.nn.functional.pad(m, (0, L - m.shape[1])) for m in masks])
    meta = dict(
        timesteps=[float(t) for t in cfg.student_timesteps],
        shift=cfg.student_shift,
        sigmas=[float(s) for s in sigmas[keep]],
        schedule_steps=len(sigmas) - 1,
        text_guidance=cfg.real_text_guidance,
        audio_guidance=cfg.real_audio_guidance,
        teacher=str(cfg.teacher),
        window=window,
        seconds=round(seconds, 1),
    )
    out["meta"] = meta
    path = Path(cfg.out) / (PAIRS_FILE if rank == 0 else f"pairs-rank{rank}.pt")
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        torch.save(out, tmp)
    metrics = dict(pairs=int(out["x0"].shape[0]) * world, pairs_per_second=round(mine / max(seconds, 1e-9), 2), **meta)
    if rank == 0:
        (Path(cfg.out) / "metrics.json").write_text(json.dumps(metrics, indent=2))
        log(f"{mine} ODE pairs on this rank in {seconds:.1f}s ({len(sigmas) - 1} teacher steps each) -> {path}")
    return metrics


def load_pairs(path: str | os.PathLike, device: str = "cpu") -> dict:
    """An ODE pairs file (or a run folder: its ``pairs.pt`` and every rank's ``pairs-rankR.pt``) joined."""
    path = Path(path)
    files = [path] if path.is_file() else sorted(path.glob("pairs*.pt"))
    if not files:
        raise FileNotFoundError(f"{path}: no ODE pairs (write them with `talkstream train ode_pairs`)")
    parts = [torch.load(f, map_location="cpu", weights_only=False) for f in files]
    meta = parts[0]["meta"]
    out: dict = {"meta": meta}
    L = max(p["text"].shape[1] for p in parts)
    for k in parts[0]:
        if k == "meta":
            continue
        ts = [p[k] for p in parts]
        if k == "text":
            ts = [torch.nn.functional.pad(t, (0, 0, 0, L - t.shape[1])) for t in ts]
        elif k == "text_mask":
            ts = [torch.nn.functional.pad(t, (0, L - t.shape[1])) for t in ts]
        out[k] = torch.cat(ts).to(device)
    return out
