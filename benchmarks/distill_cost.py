"""The distillation stages' cost at the shipped sizes: one ODE-initialisation step and one DMD update (its critic
updates and its generator update), their seconds and the memory each rollout sample needs.

The shipped causal model c6 is the student, the shipped teacher t3 the real score and the critic's start: the
real config, the real weights. The conditions are random tensors of the pack's shapes (a 3.5-s clip: 22 latents
of 16 x 32 x 32, audio windows of 16 x 384, a 9-token caption): the cost does not depend on their values, and the
pack's rendering and VAE encoding (~5 min here) are not part of a step.

Memory per sample is counted, not sampled: every tensor autograd keeps for the backward pass (a
``saved_tensors_hooks`` pack hook; parameters left out, each storage once) during a critic update, a generator
update and an ODE-init step, at each batch size. With ``--autocast`` (the default) the CPU runs under bf16 autocast
as the GPU runs under CUDA's, so the kept tensors have the GPU run's dtypes. The GPU's footprint is then
``fixed + batch x per_sample`` (fixed: weights, gradients, AdamW states, the EMA copy, the condition bank, the CUDA
context), calibrated against the one GPU figure measured (four runs at batch 8 with every chunk keeping
activations: 73 GB on an H100) by measuring that older rollout too (``--calibrate``).

    python benchmarks/distill_cost.py --batches 1 2 --calibrate --out benchmarks/results/distill_cost_small_cpu.json
    python benchmarks/distill_cost.py --device cuda --batches 1 8 --ode-batches 64 --out \
        benchmarks/results/distill_cost_small_h100.json      # the footprint measured, on a GPU machine
"""

from __future__ import annotations

import argparse
import contextlib
import json
import resource
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from talkstream.eval.speed import loadavg  # noqa: E402
from talkstream.machine import describe  # noqa: E402
from talkstream.train import distill  # noqa: E402
from talkstream.train.config import TrainConfig  # noqa: E402
from talkstream.train.distill import DMDTrainer, ode_regression_loss, pair_levels  # noqa: E402

GIB = 1024**3
WEIGHTS = Path(__file__).resolve().parents[1] / "talkstream" / "weights"


class SyntheticBank:
    """A ``stages.LatentBank`` stand-in of the pack's shapes with random values (``sample`` as the bank's)."""

    def __init__(
        self, model, device: str = "cpu", n_latent: int = 22, grid: int = 32, text_len: int = 9, audio_tokens: int = 16
    ) -> None:
        self.L, self.n, self.cfg, self.device = n_latent, 8, model.cfg, device
        self.grid, self.text_len, self.audio_tokens = grid, text_len, audio_tokens

    def sample(self, gen: torch.Generator, batch: int, n_latent: int) -> dict:
        c, g = self.cfg, self.grid
        out = dict(
            x0=torch.randn(batch, c.in_dim, n_latent, g, g, generator=gen),
            audio=torch.randn(batch, n_latent, self.audio_tokens, c.audio_dim, generator=gen).bfloat16(),
            mouth=torch.rand(batch, n_latent, g, g, generator=gen),
            ref=torch.randn(batch, c.in_dim, 1, g, g, generator=gen).bfloat16(),
            text=torch.randn(batch, self.text_len, c.text_dim, generator=gen).bfloat16(),
            text_mask=torch.ones(batch, self.text_len, dtype=torch.bool),
        )
        return {k: v.to(self.device) for k, v in out.items()}


class SavedBytes:
    """Bytes of the tensors autograd saves for backward inside the context (each storage once, parameters out)."""

    def __init__(self, *models: torch.nn.Module) -> None:
        self.params = {p.untyped_storage().data_ptr() for m in models for p in m.parameters()}
        self.storages: dict[int, int] = {}
        self.kinds: dict[int, str] = {}

    def _pack(self, t: torch.Tensor) -> torch.Tensor:
        s = t.untyped_storage()
        if s.data_ptr() not in self.params and s.device.type != "meta":
            self.storages[s.data_ptr()] = s.nbytes()
            self.kinds[s.data_ptr()] = f"{tuple(t.shape)} {str(t.dtype).removeprefix('torch.')}"
        return t

    @contextlib.contextmanager
    def count(self):
        self.storages = {}
        with torch.autograd.graph.saved_tensors_hooks(self._pack, lambda t: t):
            yield self

    @property
    def gib(self) -> float:
        return sum(self.storages.values()) / GIB

    def by_kind(self, n: int = 6) -> list[str]:
        """The ``n`` (shape, dtype) kinds that hold the most bytes, with their share: what the memory is."""
        tot: dict[str, list] = {}
        for ptr, nb in self.storages.items():
            tot.setdefault(self.kinds[ptr], [0, 0])
            tot[self.kinds[ptr]][0] += nb
            tot[self.kinds[ptr]][1] += 1
        top = sorted(tot.items(), key=lambda kv: -kv[1][0])[:n]
        return [f"{k} x{c}: {b / GIB:.3f} GiB" for k, (b, c) in top]


def peak_rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2


def _timed(fn, autocast: bool, device: str = "cpu"):
    """``fn()``, its seconds; on a GPU also the phase's peak allocated memory (GiB) in ``PEAKS``. ``autocast``: bf16
    on the device (the DMD trainer turns it on for CUDA itself)."""
    cuda = device.startswith("cuda")
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    t0, c0 = time.perf_counter(), time.process_time()
    with torch.autocast("cuda" if cuda else "cpu", dtype=torch.bfloat16, enabled=autocast):
        out = fn()
    if cuda:
        torch.cuda.synchronize()
        PEAKS.append(torch.cuda.max_memory_allocated() / GIB)
    CPU_SECONDS.append(time.process_time() - c0)
    return out, time.perf_counter() - t0


PEAKS: list[float] = []
CPU_SECONDS: list[float] = []  # the process's CPU time of each phase (all threads): less sensitive to others' load


def dmd_trainer(config: str, batch: int, out: str, device: str = "cpu") -> DMDTrainer:
    cfg = TrainConfig.load(
        config,
        dict(
            out=out,
            batch=batch,
            critic_ratio=1,
            teacher=str(WEIGHTS / "teacher.safetensors"),
            init=str(WEIGHTS / "causal.safetensors"),
            vae="",
            latent_cache="",
        ),
    )
    trainer = DMDTrainer.__new__(DMDTrainer)  # the bank is built from the student's shapes, after it loads
    student = distill.load_student(cfg, "cpu")
    bank = SyntheticBank(student, device)
    DMDTrainer.__init__(trainer, cfg, bank, device, None, lambda *_: None)
    return trainer


def measure_dmd(
    config: str, batch: int, exit_steps: list[int], autocast: bool, calibrate: bool, device: str = "cpu"
) -> dict:
    cuda = device.startswith("cuda")
    autocast = autocast and not cuda  # (on a GPU the trainer runs under CUDA's bf16 autocast itself)
    with tempfile.TemporaryDirectory() as tmp:
        tr = dmd_trainer(config, batch, tmp, device)
        saved = SavedBytes(tr.student, tr.critic, tr.teacher)
        steps = len(tr.sigmas) - 1
        row: dict = dict(batch=batch, steps=steps, rollout_latents=tr.cfg.rollout_latents, exit=[])
        for e in exit_steps:
            tr._exit_step = lambda salt, e=e: e
            with saved.count():
                info, sec_c = _timed(lambda: tr.critic_update(0), autocast, device)
            critic_gib, critic_top = saved.gib, saved.by_kind()
            with saved.count():
                info_g, sec_g = _timed(tr.generator_update, autocast, device)
            row["exit"].append(
                dict(
                    exit_step=e,
                    critic_update_s=round(sec_c, 2),
                    generator_update_s=round(sec_g, 2),
                    critic_update_cpu_s=round(CPU_SECONDS[-2], 1),
                    generator_update_cpu_s=round(CPU_SECONDS[-1], 1),
                    critic_saved_gib=round(critic_gib, 4),
                    critic_saved_top=critic_top,
                    generator_saved_gib=round(saved.gib, 4),
                    generator_saved_top=saved.by_kind(),
                    critic_loss=round(info["critic_loss"], 5),
                    dmd_grad=round(info_g["dmd_grad"], 4),
                    **(
                        dict(critic_peak_gib=round(PEAKS[-2], 3), generator_peak_gib=round(PEAKS[-1], 3))
                        if cuda
                        else {}
                    ),
                )
            )
            print(json.dumps(row["exit"][-1]), flush=True)
        if calibrate:  # the rollout before the scored-window change: every chunk keeps the exit step's activations
            plain = distill.rollout
            distill.rollout = lambda *a, grad_latents=None, **k: plain(*a, **k)
            try:
                with saved.count():
                    _timed(tr.generator_update, autocast, device)
                row["generator_saved_gib_every_chunk"] = round(saved.gib, 4)
            finally:
                distill.rollout = plain
        row["peak_rss_gib"] = round(peak_rss_gib(), 2)
        return row


def measure_rollout(config: str, batch: int, autocast: bool, device: str = "cpu") -> dict:
    """The generator's rollout alone (exit step 0: the cheapest; the kept activations do not depend on it): the
    bytes kept for backward when one chunk, the 3 or 4 chunks a 9-latent scored window overlaps, or every chunk
    (the rollout before the scored-window change) keep their exit step's activations."""
    autocast = autocast and not device.startswith("cuda")
    with tempfile.TemporaryDirectory() as tmp:
        tr = dmd_trainer(config, batch, tmp, device)
        saved = SavedBytes(tr.student)
        b = tr._batch()
        row: dict = dict(batch=batch)
        for name, window in (("one_chunk", (0, 3)), ("window_3_chunks", (3, 12)), ("window_4_chunks", (2, 11))):
            with saved.count():
                _timed(lambda w=window: tr._rollout(b, 0, w), autocast, device)
            row[f"{name}_saved_gib"] = round(saved.gib, 4)
        with saved.count():
            _timed(lambda: tr._rollout(b, 0, None), autocast, device)
        row["every_chunk_saved_gib"] = round(saved.gib, 4)
        print(json.dumps(row), flush=True)
        return row


def measure_ode_init(config: str, batch: int, autocast: bool, repeats: int = 2, device: str = "cpu") -> dict:
    cfg = TrainConfig.load(config, dict(init=str(WEIGHTS / "causal.safetensors"), batch=batch))
    student = distill.load_student(cfg, device)
    opt = torch.optim.AdamW(student.parameters(), lr=cfg.lr, betas=tuple(cfg.betas))
    sig_all = torch.tensor([1.0, 0.9, 0.75, 0.5])
    levels, sigmas = pair_levels(dict(sigmas=sig_all.tolist()), cfg.student_timesteps, cfg.student_shift)
    loss_fn = ode_regression_loss(cfg, levels, sigmas)
    bank = SyntheticBank(student, device)
    g = torch.Generator().manual_seed(0)
    b = bank.sample(g, batch, 9)
    b["traj"] = torch.randn(batch, 4, *b["x0"].shape[1:], generator=g).bfloat16().to(device)
    saved = SavedBytes(student)
    secs = []
    for _ in range(repeats):

        def step():
            with saved.count():
                loss, _ = loss_fn(student, b)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()

        secs.append(_timed(step, autocast or device.startswith("cuda"), device)[1])
    row = dict(
        batch=batch,
        step_s=[round(s, 2) for s in secs],
        step_cpu_s=[round(s, 1) for s in CPU_SECONDS[-repeats:]],
        saved_gib=round(saved.gib, 4),
        saved_top=saved.by_kind(),
    )
    if device.startswith("cuda"):
        row["peak_gib"] = round(PEAKS[-1], 3)
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 2], help="DMD rollouts per update")
    ap.add_argument("--ode-batches", type=int, nargs="+", help="ODE-init batch sizes (default: --batches)")
    ap.add_argument("--exit-steps", type=int, nargs="+", default=[0, 3], help="generator exit steps to time")
    ap.add_argument("--config", default="configs/distill_livetalk.yaml", help="the DMD config (its guidance)")
    ap.add_argument("--ode-config", default="configs/ode_init.yaml")
    ap.add_argument("--no-autocast", dest="autocast", action="store_false", help="fp32 throughout")
    ap.add_argument("--calibrate", action="store_true", help="also the every-chunk rollout (the 73 GB GPU figure)")
    ap.add_argument("--skip", nargs="*", default=[], choices=["ode_init", "dmd", "rollout"])
    ap.add_argument("--out", required=True)
    ap.add_argument("--update", action="store_true", help="keep the sections of --out that this run skips")
    ap.add_argument("--device", default="cpu", help="cuda: peak GPU memory per phase too (the real footprint)")
    a = ap.parse_args()
    kept = json.loads(Path(a.out).read_text()) if a.update and Path(a.out).exists() else {}
    res: dict = dict(
        what=(
            "one ODE-init step and one DMD update (1 critic update + the generator update) at the shipped sizes: "
            "c6 as the student, t3 as real score and critic, real weights, random conditions of the pack's shapes "
            "(22 latents of 16x32x32); seconds on this CPU and the bytes autograd keeps for backward per phase"
        ),
        machine=dict(describe(), gpu=torch.cuda.get_device_name() if a.device.startswith("cuda") else None),
        autocast_bf16=a.autocast,
        loadavg_before=loadavg(),
        dmd_config=a.config,
        ode_config=a.ode_config,
    )
    if "ode_init" not in a.skip:
        res["ode_init"] = []
        for b in a.ode_batches or a.batches:
            res["ode_init"].append(measure_ode_init(a.ode_config, b, a.autocast, device=a.device))
            print(json.dumps(res["ode_init"][-1]), flush=True)
    if "dmd" not in a.skip:
        res["dmd"] = [
            measure_dmd(a.config, b, a.exit_steps, a.autocast, a.calibrate and i == 0, a.device)
            for i, b in enumerate(a.batches)
        ]
    if "rollout" not in a.skip:
        res["rollout"] = [measure_rollout(a.config, b, a.autocast, a.device) for b in a.batches]
    for section in a.skip:
        if section in kept:
            res[section] = kept[section]
            res[f"{section}_loadavg"] = kept.get(
                f"{section}_loadavg", [kept.get("loadavg_before"), kept.get("loadavg_after")]
            )
    res["loadavg_after"] = loadavg()
    for section in ("ode_init", "dmd", "rollout"):
        if section not in a.skip:
            res[f"{section}_loadavg"] = [res["loadavg_before"], res["loadavg_after"]]
    res["peak_rss_gib"] = round(peak_rss_gib(), 2)
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(res, indent=2) + "\n")
    print(json.dumps({k: v for k, v in res.items() if k != "machine"}, indent=1))


if __name__ == "__main__":
    main()
