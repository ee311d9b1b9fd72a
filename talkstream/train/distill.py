"""Few-step on-policy distillation (LiveTalk's recipe): ODE initialisation, then DMD with Self-Forcing rollouts.

``ode_init``: the causal student (block-causal chunks, initialised from the shipped causal model) regresses the
teacher's clean window from the teacher's own trajectory at a random student level per chunk (``ode_pairs``);
half the samples get clean context chunks before the noisy ones, as the stream's cache holds them.

``dmd``: per generator update, ``critic_ratio`` critic updates, each on a fresh rollout (no gradient) with the
flow loss; then one generator update on a rollout that keeps the gradient of its random exit step
(``rollout.rollout``; only the chunks of the scored window keep activations), scored on a random teacher-sized
window (``score_window`` latents: the bidirectional teacher was trained on 9-latent windows only, so a 21-latent
rollout is scored where the teacher is defined, and the random position puts the student's late chunks, which see
their own earlier output, under the loss as often as its first). AdamW with ``betas`` ((0, 0.999) in the DMD
configs), gradient clipping, EMA of the generator. Under torchrun every rank rolls out its own batch with the same
exit step and the gradients are averaged.

Both write ``OUT/student.safetensors``: the student with its ``sampling`` dict (few_step, the step list, pure noise,
no CFG, the anchor mode it was trained with), which the stream engine reads.
"""

from __future__ import annotations

import copy
import json
import random
import time
from pathlib import Path

import torch
import torch.distributed as dist
from tqdm import tqdm

from ..diffusion.flow import add_noise, student_sigmas, x0_from_velocity
from ..media import atomic_path
from ..models.checkpoint import load_checkpoint, save_checkpoint
from ..models.dit import WanDiT
from .config import TrainConfig
from .dmd import critic_loss, dmd_loss, guided_x0, score_sigmas, score_windows, take_window
from .ode_pairs import check_audio_span, condition_bank, load_pairs
from .rollout import ROLLOUT_ANCHORS, rollout
from .runner import LossFn, Runner, init_distributed, plot_log, train_device

STUDENT_FILE = "student.safetensors"


def student_sampling(cfg: TrainConfig) -> dict:
    """The ``sampling`` dict a student checkpoint carries: its step list from pure noise, one pass per step."""
    return dict(
        sampler="few_step",
        timesteps=[float(t) for t in cfg.student_timesteps],
        timestep_shift=float(cfg.student_shift),
        reference_init=1.0,
        audio_guidance=1.0,
        anchor=cfg.anchor,
    )


def load_student(cfg: TrainConfig, device: str) -> WanDiT:
    """The generator's starting point: a causal checkpoint (the shipped causal model, or an ODE-initialised
    student), in float32, with the chunk the config asks for."""
    if not cfg.init:
        raise ValueError(f"{cfg.stage} starts the student from a causal checkpoint: set init")
    if cfg.anchor not in ROLLOUT_ANCHORS:
        raise ValueError(f"anchor must be one of {ROLLOUT_ANCHORS}, got {cfg.anchor!r}")
    student = load_checkpoint(cfg.init, device=device, dtype=torch.float32)
    chunk = (student.checkpoint_info or {}).get("chunk")
    if not chunk:
        raise ValueError(f"{cfg.init} is not a causal model (no chunk in its metadata)")
    if int(chunk) != cfg.chunk:
        raise ValueError(f"{cfg.init} was trained with chunks of {chunk} latents, the config asks for {cfg.chunk}")
    check_audio_span(cfg, student, cfg.init)
    return student.train().requires_grad_(True)


def _write_student(path: Path, cfg: TrainConfig, model: WanDiT, init_info: dict, **fields) -> list[Path]:
    """A student checkpoint (bf16, with its sampling settings and the stage's config) at ``path``; ``fields`` (the
    final metrics, or an export's step and seconds trained) join its metadata."""
    extra = dict(
        stage=cfg.stage,
        **fields,
        config=cfg.to_dict(),
        look_back=cfg.look_back,
        look_ahead=cfg.look_ahead,
        chunk=cfg.chunk,
        window_latents=init_info.get("window_latents", cfg.score_window),
        motion_latents=0,
        init=str(cfg.init),
    )
    return save_checkpoint(
        path, model, "dit", model.cfg, extra=extra, dtype=torch.bfloat16, sampling=student_sampling(cfg)
    )


def save_student(cfg: TrainConfig, model: WanDiT, metrics: dict, init_info: dict) -> list[Path]:
    return _write_student(Path(cfg.out) / STUDENT_FILE, cfg, model.cpu(), init_info, **metrics)


LATEST_FILE = "latest.txt"  # a run's newest periodic export: the name of its ckpt_NNNNNN folder


def export_latest(cfg: TrainConfig, model: WanDiT, step: int, seconds: float, init_info: dict, keep: int = 2) -> Path:
    """A training run's newest weights as a student checkpoint in ``OUT/ckpt_<step>/`` (bf16, with its sampling
    settings, the step and the seconds trained), named in ``OUT/latest.txt`` once whole; the ``keep`` newest such
    folders stay. What a GPU machine hands back while the stage runs, and what a stage started again on another
    machine resumes from (``init``): a machine taken back loses the time since the last export, not the run."""
    out = Path(cfg.out)
    folder = out / f"ckpt_{step:06d}"
    _write_student(folder / STUDENT_FILE, cfg, model, init_info, step=step, seconds_trained=round(seconds, 1))
    with atomic_path(out / LATEST_FILE) as tmp:
        Path(tmp).write_text(folder.name + "\n")
    for old in sorted(out.glob("ckpt_*"))[:-keep]:
        for f in old.iterdir():
            f.unlink()
        old.rmdir()
    return folder


def _anchor_refs(cfg: TrainConfig, ref: torch.Tensor) -> torch.Tensor:
    """The sink frames the student sees in a block-causal forward: those the engine streams with."""
    return ref.repeat(1, 1, cfg.anchor_copies, 1, 1) if cfg.anchor == "anchor_heavy" else ref


# -- ODE initialisation ------------------------------------------------------------------------------------------
def pair_levels(meta: dict, timesteps, shift: float) -> tuple[list[int], torch.Tensor]:
    """Which of the pairs' kept trajectory points are the student's levels (the pairs of the 4-step list hold the
    2-step list's too). Returns their indices and the student's sigmas (without the final 0)."""
    want = student_sigmas(timesteps, shift)[:-1]
    have = torch.tensor(meta["sigmas"])
    idx = []
    for s in want:
        hit = (have - s).abs() < 1e-6
        if not hit.any():
            raise ValueError(
                f"the ODE pairs hold sigmas {[round(float(x), 4) for x in have]}, not the student's level "
                f"{float(s):.4f} (timesteps {list(timesteps)}, shift {shift}): make pairs for this step list"
            )
        idx.append(int(hit.nonzero()[0]))
    return idx, want


def ode_regression_loss(cfg: TrainConfig, levels: list[int], sigmas: torch.Tensor) -> LossFn:
    """Per chunk a random student level: the input is the teacher's trajectory there, the target its clean window
    (x0 regression, lips weighted ``1 + mouth_weight``); half the samples see clean context chunks first."""

    def loss_fn(model, b):
        traj, x0 = b["traj"].float(), b["x0"].float()  # [B, K, C, W, h, w], [B, C, W, h, w]
        B, W = x0.shape[0], x0.shape[2]
        dev = x0.device
        n_chunks = -(-W // cfg.chunk)
        k = torch.randint(len(levels), (B, n_chunks), device=dev).repeat_interleave(cfg.chunk, 1)[:, :W]
        which = torch.tensor(levels, device=dev)[k]  # [B, W] index into the kept points
        per_frame = traj.permute(0, 3, 1, 2, 4, 5)  # [B, W, K, C, h, w]
        xin = per_frame[torch.arange(B, device=dev)[:, None], torch.arange(W, device=dev)[None], which]
        xin = xin.permute(0, 2, 1, 3, 4)  # [B, C, W, h, w]
        sigma = sigmas.to(dev)[k]  # [B, W]
        frame = torch.arange(W, device=dev)[None]
        streaming = torch.rand(B, device=dev) < 0.5
        first = torch.randint(1, max(2, n_chunks), (B,), device=dev) * cfg.chunk
        ctx = (frame < first[:, None]) & streaming[:, None] & (n_chunks > 1)
        sigma = torch.where(ctx, torch.zeros_like(sigma), sigma)
        xin = torch.where(ctx[:, None, :, None, None], x0, xin)
        v = model(
            xin,
            sigma * 1000,
            b["text"].float(),
            b["audio"].float(),
            _anchor_refs(cfg, b["ref"].float()),
            chunk=cfg.chunk,
            context_mask=b["text_mask"],
        )
        err = (x0_from_velocity(xin, v.float(), sigma) - x0).pow(2).mean(1)  # [B, W, h, w]
        pix = 1 + cfg.mouth_weight * b["mouth"].float()
        per = (err * pix).sum((2, 3)) / pix.sum((2, 3))  # [B, W]
        weight = (~ctx).float()
        loss = (per * weight).sum() / weight.sum().clamp_min(1)
        plain = (err.mean((2, 3)) * weight).sum() / weight.sum().clamp_min(1)
        return loss, dict(x0_mse=plain.detach())

    return loss_fn


def train_ode_init(cfg: TrainConfig, log=print, started: float | None = None) -> dict:
    if not cfg.pairs:
        raise ValueError("ode_init regresses ODE pairs: set pairs (the ode_pairs run's folder or pairs.pt)")
    device = train_device()
    pairs = load_pairs(cfg.pairs, device)
    levels, sigmas = pair_levels(pairs["meta"], cfg.student_timesteps, cfg.student_shift)
    n = pairs["x0"].shape[0]
    log(f"{n} ODE pairs, student levels {[round(float(s), 4) for s in sigmas]} (kept points {levels})")
    student = load_student(cfg, device)
    init_info = dict(student.checkpoint_info or {})

    def sample(g):
        i = torch.randint(n, (cfg.batch,), generator=g).to(device)
        return {k: v[i] for k, v in pairs.items() if k != "meta"}

    t0 = time.perf_counter()

    def export(r: Runner) -> None:
        if r.rank == 0:
            export_latest(cfg, r.ema if r.ema is not None else r.model, r.step, time.perf_counter() - t0, init_info)

    runner = Runner(cfg, student, ode_regression_loss(cfg, levels, sigmas), sample, device, started, export)
    last = runner.train()
    final = runner.final_model()
    if final is None:
        return dict(train=last)
    metrics = dict(train=last, pairs=n, pair_meta=pairs["meta"])
    (Path(cfg.out) / "metrics.json").write_text(json.dumps(metrics, indent=2, default=str))
    save_student(cfg, final, metrics, init_info)
    return metrics


# -- DMD with Self-Forcing rollouts -------------------------------------------------------------------------------
def average_gradients(model: torch.nn.Module, world: int) -> None:
    """Gradients averaged over torchrun's ranks (the rollouts call the model's streaming method, which DDP's
    forward hook does not see, so the reduction is done here; a parameter without a gradient counts as zero)."""
    if world == 1:
        return
    for p in model.parameters():
        if not p.requires_grad:
            continue
        if p.grad is None:
            p.grad = torch.zeros_like(p)
        dist.all_reduce(p.grad)
        p.grad /= world


class DMDTrainer:
    """The generator (student), the critic (fake score, from the teacher) and the frozen teacher (real score)."""

    def __init__(self, cfg: TrainConfig, bank, device: str, started: float | None = None, log=print) -> None:
        self.cfg, self.bank, self.device, self.started, self.log = cfg, bank, device, started, log
        self.rank, self.world = init_distributed()
        torch.manual_seed(cfg.seed * 1000 + self.rank)
        if not cfg.teacher:
            raise ValueError("dmd needs the teacher (real score and the critic's init): set teacher")
        self.student = load_student(cfg, device)
        self.init_info = dict(self.student.checkpoint_info or {})
        self.teacher = load_checkpoint(cfg.teacher, device=device, dtype=torch.float32).requires_grad_(False)
        if (self.teacher.checkpoint_info or {}).get("chunk"):
            raise ValueError(f"{cfg.teacher} is a causal model: the real score is the bidirectional teacher")
        check_audio_span(cfg, self.teacher, cfg.teacher)
        self.critic = copy.deepcopy(self.teacher).train().requires_grad_(True)
        if cfg.rollout_latents > bank.L:
            raise ValueError(f"rollouts of {cfg.rollout_latents} latents need clips of as many (these have {bank.L})")
        if cfg.rollout_latents % cfg.chunk:
            raise ValueError(f"rollout_latents ({cfg.rollout_latents}) must be a multiple of chunk ({cfg.chunk})")
        self.sigmas = student_sigmas(cfg.student_timesteps, cfg.student_shift).to(device)
        betas = tuple(float(b) for b in cfg.betas)
        self.opt_g = torch.optim.AdamW(self.student.parameters(), lr=cfg.lr, betas=betas, weight_decay=cfg.weight_decay)
        self.opt_c = torch.optim.AdamW(
            self.critic.parameters(), lr=cfg.lr_critic, betas=betas, weight_decay=cfg.weight_decay
        )
        self.ema = copy.deepcopy(self.student).eval().requires_grad_(False) if cfg.ema > 0 else None
        self.step = 0
        self.out = Path(cfg.out)
        self.gen = torch.Generator().manual_seed(cfg.seed * 1000 + self.rank)
        self.bf16 = cfg.bf16 and device.startswith("cuda")
        if self.rank == 0:
            self.out.mkdir(parents=True, exist_ok=True)
            (self.out / "config.json").write_text(json.dumps(cfg.to_dict(), indent=2))
        self._resume()

    # -- state ------------------------------------------------------------------------------------------------
    @property
    def state_file(self) -> Path:
        return self.out / "state.pt"

    def _resume(self) -> None:
        if not self.state_file.exists():
            return
        st = torch.load(self.state_file, map_location=self.device, weights_only=False)
        self.student.load_state_dict(st["student"])
        self.critic.load_state_dict(st["critic"])
        if self.ema is not None and st.get("ema") is not None:
            self.ema.load_state_dict(st["ema"])
        self.opt_g.load_state_dict(st["opt_g"])
        self.opt_c.load_state_dict(st["opt_c"])
        self.step = int(st["step"])
        self.gen.manual_seed(self.cfg.seed * 1000 + self.rank + 7919 * self.step)
        if self.rank == 0:
            print(f"resumed {self.out} at generator update {self.step}")

    def save_state(self) -> None:
        if self.rank != 0:
            return
        st = dict(
            student=self.student.state_dict(),
            critic=self.critic.state_dict(),
            ema=None if self.ema is None else self.ema.state_dict(),
            opt_g=self.opt_g.state_dict(),
            opt_c=self.opt_c.state_dict(),
            step=self.step,
        )
        with atomic_path(self.state_file) as tmp:
            torch.save(st, tmp)

    # -- pieces -----------------------------------------------------------------------------------------------
    def _batch(self) -> dict:
        return self.bank.sample(self.gen, self.cfg.batch, self.cfg.rollout_latents)

    def _rollout(self, b: dict, exit_step: int, grad_latents: tuple[int, int] | None = None) -> torch.Tensor:
        c = self.cfg
        noise = torch.randn(b["x0"].shape, generator=self.gen).to(self.device)
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=self.bf16):
            x = rollout(
                self.student,
                noise,
                self.sigmas,
                exit_step,
                b["audio"].float(),
                b["ref"].float(),
                b["text"].float(),
                b["text_mask"],
                chunk=c.chunk,
                cache_window=c.cache_window,
                anchor=c.anchor,
                anchor_copies=c.anchor_copies,
                context_noise=c.context_noise,
                grad_latents=grad_latents,
            )
        return x.float()

    def _window(
        self, x: torch.Tensor, b: dict, start: int | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The scored window of each rollout (a random start per sample, or ``start`` for all) with its audio, and
        the score's noise levels."""
        c = self.cfg
        if start is None:
            starts = score_windows(x.shape[2], c.score_window, x.shape[0], self.gen, self.device)
        else:
            starts = torch.full((x.shape[0],), start, device=self.device)
        sigma = score_sigmas(
            x.shape[0], c.timestep_shift, c.score_sigma_min, c.score_sigma_max, self.gen, self.device
        ).to(self.device)
        return take_window(x, starts, c.score_window, 2), take_window(b["audio"], starts, c.score_window, 1), sigma

    def _exit_step(self, salt: int) -> int:
        """One exit step for all chunks of a rollout and for all ranks (Self-Forcing broadcasts rank 0's)."""
        return random.Random(self.cfg.seed * 1_000_003 + self.step * 101 + salt).randrange(len(self.sigmas) - 1)

    def _lr(self, base: float, step: int | None = None) -> float:
        """``base`` ramped over ``warmup`` updates (the generator's count, or ``step``)."""
        step = self.step if step is None else step
        return base * min(1.0, (step + 1) / max(1, self.cfg.warmup))

    def critic_update(self, salt: int, lr: float | None = None) -> dict:
        c = self.cfg
        b = self._batch()
        exit_step = self._exit_step(salt)
        with torch.no_grad():
            x = self._rollout(b, exit_step)
        xw, audio, sigma = self._window(x, b)
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=self.bf16):
            loss = critic_loss(
                self.critic, xw, sigma, b["text"].float(), audio.float(), b["ref"].float(), b["text_mask"]
            )
        self.opt_c.zero_grad(set_to_none=True)
        loss.backward()
        average_gradients(self.critic, self.world)
        gn = torch.nn.utils.clip_grad_norm_(self.critic.parameters(), c.grad_clip)
        for g in self.opt_c.param_groups:
            g["lr"] = self._lr(c.lr_critic) if lr is None else lr
        self.opt_c.step()
        return dict(critic_loss=float(loss.detach()), critic_grad_norm=float(gn))

    def generator_update(self) -> dict:
        c = self.cfg
        b = self._batch()
        exit_step = self._exit_step(-1)
        # one scored window for the batch, drawn first: only its chunks keep activations for the backward pass
        start = int(score_windows(c.rollout_latents, c.score_window, 1, self.gen)[0])
        x = self._rollout(b, exit_step, (start, start + c.score_window))
        xw, audio, sigma = self._window(x, b, start)
        text, ref = b["text"].float(), b["ref"].float()
        with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16, enabled=self.bf16):
            xt = add_noise(xw.detach(), torch.randn_like(xw), sigma)
            fake = guided_x0(self.critic, xt, sigma, text, audio.float(), ref, b["text_mask"])
            real = guided_x0(
                self.teacher,
                xt,
                sigma,
                text,
                audio.float(),
                ref,
                b["text_mask"],
                c.real_text_guidance,
                c.real_audio_guidance,
            )
        loss, info = dmd_loss(xw, fake.float(), real.float())
        self.opt_g.zero_grad(set_to_none=True)
        loss.backward()
        average_gradients(self.student, self.world)
        gn = torch.nn.utils.clip_grad_norm_(self.student.parameters(), c.grad_clip)
        for g in self.opt_g.param_groups:
            g["lr"] = self._lr(c.lr)
        self.opt_g.step()
        if self.ema is not None:
            with torch.no_grad():
                decay = c.ema if self.step >= c.ema_start else 0.0  # before ema_start the EMA copies the generator
                for pe, pm in zip(self.ema.parameters(), self.student.parameters()):
                    pe.lerp_(pm.detach(), 1 - decay)
        return dict(
            dmd_loss=float(loss.detach()),
            dmd_grad=float(info["dmd_grad"]),
            real_gap=float((xw.detach() - real).abs().mean()),
            fake_real_gap=float((fake - real).abs().mean()),
            exit_step=exit_step,
            grad_norm=float(gn),
        )

    def warm_critic(self, log_file: Path) -> list[float]:
        """``critic_warmup`` critic updates on the initial generator's rollouts, before its first update: the critic
        starts as the teacher, and a generator that follows it from the first update follows the teacher's score of
        its own samples, not the fake score (its lr ramps over ``warmup`` of these updates, then stays)."""
        c = self.cfg
        losses = []
        for k in tqdm(range(c.critic_warmup), desc="critic warm-up", disable=self.rank != 0, mininterval=5):
            r = self.critic_update(100_000 + k, lr=self._lr(c.lr_critic, k))
            losses.append(r["critic_loss"])
            if self.rank == 0 and ((k + 1) % (c.log_every * c.critic_ratio) == 0 or k + 1 == c.critic_warmup):
                with open(log_file, "a") as f:
                    f.write(json.dumps(dict(step=0, critic_warmup=k + 1, **r)) + "\n")
        return losses

    # -- loop -------------------------------------------------------------------------------------------------
    def _elapsed(self, t0: float) -> float:
        e = torch.tensor([time.perf_counter() - t0], dtype=torch.float64, device=self.device)
        if self.world > 1:
            dist.broadcast(e, 0)
        return float(e)

    def train(self) -> dict:
        c = self.cfg
        t0 = time.perf_counter()
        budget = None
        if c.time_budget:
            before = 0.0 if self.started is None else t0 - self.started
            budget = max(0.0, c.time_budget - before)
            if self.rank == 0:
                print(
                    f"time budget {c.time_budget:.0f}s: {before:.0f}s spent before the first step, {budget:.0f}s left"
                )
        log_file = self.out / "log.jsonl"
        if self.step == 0 and c.critic_warmup:
            self.warm_critic(log_file)
        bar = tqdm(total=c.steps, initial=self.step, desc="dmd", disable=self.rank != 0, mininterval=5)
        last: dict = {}
        while self.step < c.steps:
            if budget is not None and self._elapsed(t0) >= budget:
                if self.rank == 0:
                    print(f"time budget of {c.time_budget:.0f}s reached at generator update {self.step}")
                break
            crit = [self.critic_update(j) for j in range(c.critic_ratio)]
            info = self.generator_update()
            self.step += 1
            bar.update()
            if self.step % c.log_every == 0 or self.step == c.steps:
                last = dict(
                    step=self.step,
                    critic_updates=self.step * c.critic_ratio,
                    lr=self.opt_g.param_groups[0]["lr"],
                    seconds=round(time.perf_counter() - t0, 1),
                    **info,
                    critic_loss=sum(r["critic_loss"] for r in crit) / len(crit),
                    critic_grad_norm=sum(r["critic_grad_norm"] for r in crit) / len(crit),
                )
                if self.rank == 0:
                    with open(log_file, "a") as f:
                        f.write(json.dumps(last) + "\n")
                    bar.set_postfix(dmd=f"{info['dmd_grad']:.3f}", critic=f"{last['critic_loss']:.4f}")
            if self.step % c.ckpt_every == 0:
                self.save_state()
                if self.rank == 0:
                    model = self.ema if self.ema is not None else self.student
                    export_latest(c, model, self.step, time.perf_counter() - t0, self.init_info)
        bar.close()
        self.save_state()
        if self.rank == 0:
            plot_log(log_file, self.out / "loss.png")
        return last

    def final_model(self) -> WanDiT | None:
        if self.rank != 0:
            return None
        return (self.ema if self.ema is not None else self.student).eval()


def train_dmd(cfg: TrainConfig, log=print, started: float | None = None) -> dict:
    device = train_device()
    bank = condition_bank(cfg, device, log)
    trainer = DMDTrainer(cfg, bank, device, started, log)
    last = trainer.train()
    final = trainer.final_model()
    if final is None:
        return dict(train=last)
    metrics = dict(train=last, generator_updates=trainer.step, critic_updates=trainer.step * cfg.critic_ratio)
    (Path(cfg.out) / "metrics.json").write_text(json.dumps(metrics, indent=2, default=str))
    save_student(cfg, final, metrics, trainer.init_info)
    return metrics


def nfe_per_second(steps: int, audio_guidance: float = 1.0, chunk: int = 3) -> float:
    """Network passes per second of video for a sampler of ``steps`` steps per chunk of ``chunk`` latents (4
    ``chunk`` video frames at 25 fps): two passes per step under audio CFG, one otherwise, plus the cache pass."""
    return (steps * (2 if audio_guidance != 1 else 1) + 1) / (chunk * 4 / 25)
