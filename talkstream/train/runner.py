"""The training runner: one loop for every stage.

AdamW with warm-up, bf16 autocast on CUDA, gradient clipping, EMA weights, JSONL logs and a loss plot,
resumable checkpoints (model, EMA, optimizer, step, RNG), seed control, a progress bar.

Started by ``torchrun`` (WORLD_SIZE > 1), each process trains on its own GPU (``train_device``) and draws its own
batches, and gradients are averaged: the model is replicated (DDP) or, for big models (``cfg.fsdp``), sharded
(FSDP: parameters, gradients, optimizer state and EMA split over the ranks, one unit per transformer block). The
ranks share rank 0's clock (one learning rate, one last step under a time budget); rank 0 writes the logs and
the state, which holds every rank's random state (an interrupted run resumes exactly).
"""

from __future__ import annotations

import copy
import json
import math
import os
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor
from tqdm import tqdm

from ..media import atomic_path
from .config import TrainConfig

Batch = dict
LossFn = Callable[[torch.nn.Module, Batch], tuple[torch.Tensor, dict]]


FSDP_AUTO_PARAMS = 2_000_000_000  # fsdp "auto": shard models from this size (wan14b); replicate smaller ones
WHOLE_ON_RANK0 = StateDictOptions(full_state_dict=True, cpu_offload=True)  # FSDP shards gathered, on rank 0's CPU
CLOCK_EVERY = 10  # steps between shares of rank 0's clock under a time budget (each share waits for the GPU)


def init_distributed() -> tuple[int, int]:
    """(rank, world size): joins the process group when started by torchrun (WORLD_SIZE > 1)."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    return (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)


def train_device() -> str:
    """This process's device: its own GPU under torchrun (cuda:LOCAL_RANK), else the GPU or the CPU."""
    if not torch.cuda.is_available():
        return "cpu"
    local = int(os.environ.get("LOCAL_RANK", "0"))
    torch.cuda.set_device(local)
    fast_kernels()  # (from here: the VAE encoding of a run's clips, before the Runner, gains too)
    return f"cuda:{local}"


def fast_kernels() -> None:
    """Fixed shapes every step: let cuDNN time and pick its fastest kernels; TF32 matmuls."""
    torch.backends.cudnn.benchmark = True
    torch.backends.cuda.matmul.allow_tf32 = True


def uses_fsdp(setting: str, model: torch.nn.Module, world: int) -> bool:
    if world == 1 or setting == "off":
        return False
    return setting == "on" or sum(p.numel() for p in model.parameters()) >= FSDP_AUTO_PARAMS


def shard(model: torch.nn.Module) -> None:
    """FSDP in place: each transformer block (``model.blocks``, where there are any) one unit, then the rest."""
    for block in getattr(model, "blocks", []):
        fully_shard(block)
    fully_shard(model)


def meta_copy(model: torch.nn.Module) -> torch.nn.Module:
    """The module with every parameter and buffer on the meta device (no memory): a shape to gather shards into."""
    memo = {id(p): torch.nn.Parameter(torch.empty_like(p, device="meta"), p.requires_grad) for p in model.parameters()}
    memo.update({id(b): torch.empty_like(b, device="meta") for b in model.buffers()})
    return copy.deepcopy(model, memo)


def param_groups(model: torch.nn.Module, lr_mult: dict) -> list[dict]:
    """The trainable parameters as optimiser groups: one per ``lr_mult`` prefix (its parameters' names start with
    it; the longest matching prefix wins) and the rest at multiplier 1. A prefix that names no parameter is an
    error (a misspelt name would otherwise train at the base rate unnoticed)."""
    prefixes = sorted(lr_mult, key=len, reverse=True)
    groups: dict[str | None, list] = {None: [], **{k: [] for k in prefixes}}
    for name, p in model.named_parameters():
        if p.requires_grad:
            groups[next((k for k in prefixes if name.startswith(k)), None)].append(p)
    empty = [k for k in prefixes if not groups[k]]
    if empty:
        raise ValueError(f"lr_mult names no trainable parameter: {empty}")
    return [dict(params=ps, lr_mult=float(lr_mult[k]) if k else 1.0) for k, ps in groups.items() if ps]


class Runner:
    def __init__(
        self,
        cfg: TrainConfig,
        model: torch.nn.Module,
        loss_fn: LossFn,
        sample_batch: Callable[[torch.Generator], Batch],
        device: str,
        started: float | None = None,
        on_checkpoint: Callable[[Runner], None] | None = None,
    ) -> None:
        """``started``: the stage's ``time.perf_counter()`` at its start, so ``cfg.time_budget`` bounds the whole
        stage (data, latents, lip reader, compile: all before the first step) and not only the training loop.
        ``on_checkpoint``: called on every rank after each periodic state save (e.g. a stage's weights export)."""
        self.cfg, self.loss_fn, self.sample_batch, self.started = cfg, loss_fn, sample_batch, started
        self.on_checkpoint = on_checkpoint
        self.rank, self.world = init_distributed()
        self.device = device
        torch.manual_seed(cfg.seed + self.rank)
        self.fsdp = uses_fsdp(cfg.fsdp, model, self.world)
        if self.world > 1:  # every rank starts from rank 0's weights (DDP does this itself; FSDP does not)
            for t in (*model.parameters(), *model.buffers()):
                on = t.data.to(device)  # (one tensor at a time: a model bigger than a GPU passes too)
                dist.broadcast(on, 0)
                t.data.copy_(on)
        if self.fsdp:  # sharded block by block: only one block's whole weights ever sit on the GPU
            self.whole = meta_copy(model)  # what final_model gathers the shards into
            self.ema = meta_copy(model) if cfg.ema > 0 else None
            shard(model)
            self.model = self.train_model = model
            if self.ema is not None:  # the EMA's shards, materialised beside the model's and copied from them
                shard(self.ema)
                self.ema.to_empty(device=device).eval().requires_grad_(False)
                with torch.no_grad():
                    for e, m in zip(
                        (*self.ema.parameters(), *self.ema.buffers()), (*model.parameters(), *model.buffers())
                    ):
                        e.copy_(m)
        else:
            self.model = model.to(device)
            self.ema = copy.deepcopy(self.model).eval().requires_grad_(False) if cfg.ema > 0 else None
            ids = [torch.device(device).index] if device.startswith("cuda") else None
            self.train_model = (
                torch.nn.parallel.DistributedDataParallel(self.model, device_ids=ids) if self.world > 1 else self.model
            )
        self.opt = torch.optim.AdamW(
            param_groups(self.model, cfg.lr_mult),
            lr=cfg.lr,
            weight_decay=cfg.weight_decay,
            betas=tuple(float(b) for b in cfg.betas),
        )
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
        st = torch.load(self.state_file, map_location="cpu" if self.fsdp else self.device, weights_only=False)
        if self.fsdp:  # every rank reads the whole state and keeps its shards
            full = StateDictOptions(full_state_dict=True)
            set_model_state_dict(self.model, st["model"], options=full)
            if self.ema is not None and st.get("ema") is not None:
                set_model_state_dict(self.ema, st["ema"], options=full)
            set_optimizer_state_dict(self.model, self.opt, st["opt"], options=full)
        else:
            self.model.load_state_dict(st["model"])
            if self.ema is not None and st.get("ema") is not None:
                self.ema.load_state_dict(st["ema"])
            self.opt.load_state_dict(st["opt"])
        self.step = st["step"]
        rngs = st["rng"] if "rng" in st else [dict(gen=st["gen"])]  # (states written before "rng": rank 0's batches)
        if len(rngs) == self.world:
            self._set_rng(rngs[self.rank])
        else:  # another number of ranks: fresh, distinct draws (the saved ones would repeat across ranks)
            self.gen.manual_seed(self.cfg.seed * 1000 + self.rank + 7919 * self.step)
        if self.rank == 0:
            print(f"resumed {self.out} at step {self.step}")

    def save_state(self) -> None:
        """Model, EMA, optimizer, step and each rank's random state, written by rank 0 (under FSDP every rank
        must call it: the shards are gathered)."""
        if self.fsdp:
            model = get_model_state_dict(self.model, options=WHOLE_ON_RANK0)
            opt = get_optimizer_state_dict(self.model, self.opt, options=WHOLE_ON_RANK0)
            ema = None if self.ema is None else get_model_state_dict(self.ema, options=WHOLE_ON_RANK0)
        elif self.rank == 0:
            model, opt = self.model.state_dict(), self.opt.state_dict()
            ema = None if self.ema is None else self.ema.state_dict()
        rngs = [self._rng()]
        if self.world > 1:
            rngs = [None] * self.world
            dist.all_gather_object(rngs, self._rng())
        if self.rank != 0:
            return
        with atomic_path(self.state_file) as tmp:
            torch.save(dict(model=model, ema=ema, opt=opt, step=self.step, rng=rngs), tmp)

    def _rng(self) -> dict:
        """This rank's random state: its batch generator and torch's own (noise, timesteps, dropout in the loss)."""
        rng = dict(gen=self.gen.get_state(), cpu=torch.get_rng_state())
        if self.device.startswith("cuda"):
            rng["cuda"] = torch.cuda.get_rng_state(self.device)
        return rng

    def _set_rng(self, rng: dict) -> None:
        self.gen.set_state(rng["gen"].cpu())
        if "cpu" in rng:
            torch.set_rng_state(rng["cpu"].cpu())
        if "cuda" in rng and self.device.startswith("cuda"):
            torch.cuda.set_rng_state(rng["cuda"].cpu(), self.device)

    def lr_at(self, step: int, time_fraction: float = 0.0) -> float:
        """Warm-up, then cosine to 10% over the steps or over the time budget, whichever runs out first."""
        c = self.cfg
        if step < c.warmup:
            return c.lr * (step + 1) / c.warmup
        p = max((step - c.warmup) / max(1, c.steps - c.warmup), time_fraction)
        return c.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(p, 1.0))))

    # -- loop ---------------------------------------------------------------------------------------
    def loop_budget(self, now: float) -> float | None:
        """Seconds the training loop may run (None: no time budget): ``cfg.time_budget`` less what the stage spent
        before its first step (rank 0's figure on every rank). The learning rate's cosine runs over these seconds."""
        c = self.cfg
        if not c.time_budget:
            return None
        before = 0.0 if self.started is None else now - self.started
        if self.world > 1:
            t = torch.tensor([before], dtype=torch.float64, device=self.device)
            dist.broadcast(t, 0)
            before = float(t)
        left = max(0.0, c.time_budget - before)
        if self.rank == 0 and self.started is not None:
            print(
                f"time budget {c.time_budget:.0f}s: {before:.0f}s spent before the first step, {left:.0f}s to train"
                + ("" if left else " (none: the run exports the weights it started from)")
            )
        return left

    def train(self) -> dict:
        c = self.cfg
        log_file = self.out / "log.jsonl"
        bar = tqdm(total=c.steps, initial=self.step, desc=f"train {c.stage}", disable=self.rank != 0, mininterval=5)
        t0 = time.perf_counter()
        budget = self.loop_budget(t0)
        last = {}
        use_bf16 = c.bf16 and self.device.startswith("cuda")
        shared = 0.0
        while self.step < c.steps:
            elapsed = time.perf_counter() - t0
            if self.world > 1 and budget is not None:  # rank 0's clock for all: one learning rate, one last step
                if self.step % CLOCK_EVERY == 0:
                    clock = torch.tensor([elapsed], dtype=torch.float64, device=self.device)
                    dist.broadcast(clock, 0)
                    shared = float(clock)
                elapsed = shared
            if budget is not None and elapsed >= budget:
                if self.rank == 0:
                    print(f"time budget of {c.time_budget:.0f}s reached at step {self.step}")
                self.save_state()
                break
            spent = elapsed / budget if budget else 0.0
            for g in self.opt.param_groups:
                g["lr"] = self.lr_at(self.step, spent) * g.get("lr_mult", 1.0)
            batch = self.sample_batch(self.gen)
            with torch.autocast("cuda", dtype=torch.bfloat16, enabled=use_bf16):
                loss, info = self.loss_fn(self.train_model, batch)
            self.opt.zero_grad(set_to_none=True)
            loss.backward()
            gn = torch.nn.utils.clip_grad_norm_(self.model.parameters(), c.grad_clip)
            gn = gn.full_tensor() if isinstance(gn, DTensor) else gn
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
                last = dict(
                    step=self.step,
                    loss=float(loss.detach()),
                    grad_norm=float(gn),
                    lr=self.opt.param_groups[0]["lr"],
                    seconds=round(time.perf_counter() - t0, 1),
                    **{k: float(v) for k, v in info.items()},
                )
                if self.rank == 0:
                    with open(log_file, "a") as f:
                        f.write(json.dumps(last) + "\n")
                    bar.set_postfix(loss=f"{float(loss.detach()):.4f}")
            if self.step % c.ckpt_every == 0 or self.step == c.steps:
                self.save_state()
                if self.on_checkpoint is not None:
                    self.on_checkpoint(self)
        bar.close()
        if self.rank == 0:
            plot_log(log_file, self.out / "loss.png")
        return last

    def final_model(self) -> torch.nn.Module | None:
        """The trained model (its EMA when kept), whole, on rank 0; None on the other ranks (under FSDP every rank
        must call it: the shards are gathered)."""
        src = self.ema if self.ema is not None else self.model
        if not self.fsdp:
            return src.eval() if self.rank == 0 else None
        state = get_model_state_dict(src, options=WHOLE_ON_RANK0)
        if self.rank != 0:
            return None
        whole = self.whole.to_empty(device=self.device)
        whole.load_state_dict(state)
        for name, buf in src.named_buffers():  # (FSDP leaves buffers whole; non-persistent ones are not in state)
            whole.get_buffer(name).copy_(buf)
        return whole.eval()


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
