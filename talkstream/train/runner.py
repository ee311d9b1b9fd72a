"""The training runner: one loop for every stage.

AdamW with warm-up, bf16 autocast on CUDA, gradient clipping, EMA weights, JSONL logs and a loss plot,
resumable checkpoints (model, EMA, optimizer, step, RNG), seed control, a progress bar, and DDP when
started by ``torchrun`` (WORLD_SIZE > 1): each rank draws its own batches, gradients are averaged.
"""

from __future__ import annotations

import copy
import json
import math
import os
import time
from pathlib import Path
from typing import Callable

import torch
import torch.distributed as dist
from tqdm import tqdm

from .config import TrainConfig

Batch = dict
LossFn = Callable[[torch.nn.Module, Batch], tuple[torch.Tensor, dict]]


def _ddp() -> tuple[int, int]:
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    return (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)


class Runner:
    def __init__(self, cfg: TrainConfig, model: torch.nn.Module, loss_fn: LossFn,
                 sample_batch: Callable[[torch.Generator], Batch], device: str) -> None:
        self.cfg, self.loss_fn, self.sample_batch = cfg, loss_fn, sample_batch
        self.rank, self.world = _ddp()
        self.device = device
        if device.startswith("cuda"):  # fixed shapes every step: let cuDNN pick its fastest kernels; TF32 matmuls
            torch.backends.cudnn.benchmark = True
            torch.backends.cuda.matmul.allow_tf32 = True
        torch.manual_seed(cfg.seed + self.rank)
        self.model = model.to(device)
        self.ema = copy.deepcopy(self.model).eval().requires_grad_(False) if cfg.ema > 0 else None
        self.train_model = (torch.nn.parallel.DistributedDataParallel(self.model) if self.world > 1 else self.model)
        params = [p for p in self.model.parameters() if p.requires_grad]
        self.opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay, betas=(0.9, 0.99))
        self.step = 0
        self.out = Path(cfg.out)
        self.gen = torch.Generator(device="cpu").manual_seed(cfg.seed * 1000 + self.rank)
        if self.rank == 0:
            self.out.mkdir(parents=True, exist_ok=True)
            (self.out / "config.json").write_text(json.dumps(cfg.to_dict(), indent=2))
        self._resume()

    # -- state --------------------------------------------------------------------------------------
    @property
    def state_file(self) -> Path:
        return self.out / "state.pt"

    def _resume(self) -> None:
        if not self.state_file.exists():
            return
        st = torch.load(self.state_file, map_location=self.device, weights_only=False)
        self.model.load_state_dict(st["model"])
        if self.ema is not None and st.get("ema") is not None:
            self.ema.load_state_dict(st["ema"])
        self.opt.load_state_dict(st["opt"])
        self.step = st["step"]
        self.gen.set_state(st["gen"].cpu())
        if self.rank == 0:
            print(f"resumed {self.out} at step {self.step}")

    def save_state(self) -> None:
        if self.rank != 0:
            return
        tmp = self.state_file.with_suffix(".tmp")
        torch.save(dict(model=self.model.state_dict(), ema=None if self.ema is None else self.ema.state_dict(),
                        opt=self.opt.state_dict(), step=self.step, gen=self.gen.get_state()), tmp)
        os.replace(tmp, self.state_file)

    def lr_at(self, step: int, time_fraction: float = 0.0) -> float:
        """Warm-up, then cosine to 10% over the steps or over the time budget, whichever runs out first."""
        c = self.cfg
        if step < c.warmup:
            return c.lr * (step + 1) / c.warmup
        p = max((step - c.warmup) / max(1, c.steps - c.warmup), time_fraction)
        return c.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(p, 1.0))))

    # -- loop ---------------------------------------------------------------------------------------
    def train(self) -> dict:
        c = self.cfg
        log_file = self.out / "log.jsonl"
        bar = tqdm(total=c.steps, initial=self.step, desc=f"train {c.stage}", disable=self.rank != 0,
                   mininterval=5)
        t0 = time.perf_counter()
        last = {}
        use_bf16 = c.bf16 and self.device.startswith("cuda")
        while self.step < c.steps:
            if c.time_budget and time.perf_counter() - t0 > c.time_budget:
                if self.rank == 0:
                    print(f"time budget of {c.time_budget:.0f}s reached at step {self.step}")
                self.save_state()
                break
            spent = (time.perf_counter() - t0) / c.time_budget if c.time_budget else 0.0
            for g in self.opt.param_groups:
                g["lr"] = self.lr_at(self.step, spent)
            batch = self.sample_batch(self.gen)
            with torch.autocast("cuda", dtype=torch.bfloat16, enabled=use_bf16):
                loss, info = self.loss_fn(self.train_model, batch)
            self.opt.zero_grad(set_to_none=True)
            loss.backward()
            gn = torch.nn.utils.clip_grad_norm_(self.model.parameters(), c.grad_clip)
            self.opt.step()
            if self.ema is not None:
                with torch.no_grad():
                    for pe, pm in zip(self.ema.parameters(), self.model.parameters()):
                        pe.lerp_(pm.detach(), 1 - c.ema)
                    for be, bm in zip(self.ema.buffers(), self.model.buffers()):
                        be.copy_(bm)
            self.step += 1
            bar.update()
            if self.step % c.log_every == 0 or self.step == c.steps:
                last = dict(step=self.step, loss=float(loss.detach()), grad_norm=float(gn), lr=self.opt.param_groups[0]["lr"],
                            seconds=round(time.perf_counter() - t0, 1), **{k: float(v) for k, v in info.items()})
                if self.rank == 0:
                    with open(log_file, "a") as f:
                        f.write(json.dumps(last) + "\n")
                    bar.set_postfix(loss=f"{float(loss):.4f}")
            if self.step % c.ckpt_every == 0 or self.step == c.steps:
                self.save_state()
        bar.close()
        if self.rank == 0:
            plot_log(log_file, self.out / "loss.png")
        return last

    def final_model(self) -> torch.nn.Module:
        return (self.ema if self.ema is not None else self.model).eval()


def plot_log(log_file: Path, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not log_file.exists():
        return
    rows = [json.loads(line) for line in log_file.read_text().splitlines() if line.strip()]
    if not rows:
        return
    keys = [k for k in rows[-1] if k not in ("step", "lr", "seconds", "grad_norm")]
    fig, ax = plt.subplots(figsize=(7, 4))
    for k in keys:
        ax.plot([r["step"] for r in rows], [r.get(k, float("nan")) for r in rows], label=k)
    ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=80)
    plt.close(fig)
