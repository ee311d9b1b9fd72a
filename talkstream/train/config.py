"""Typed training configurations, one per stage, loadable from YAML (``configs/*.yaml``)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

import yaml


@dataclass
class TrainConfig:
    stage: str  # vae | decoder | teacher | causal | ode_pairs | ode_init | dmd
    data: str  # a world pack (.npz) written by `talkstream train pack`; several: joined by commas
    out: str = "runs/run"
    model: str = "small"  # DiT or VAE size name
    steps: int = 1000
    time_budget: float = 0.0  # seconds of the whole stage (data, latents, lip reader, training loop) after which
    # the run stops and exports (0: no limit); the export's evaluation after it is not counted
    batch: int = 8
    lr: float = 2e-4
    weight_decay: float = 0.01
    lr_mult: dict = field(default_factory=dict)  # parameter-name prefix -> learning-rate multiplier, e.g.
    # {ref_embedding: 10}: a zero-initialised addition that the whole model's rate moves too slowly (docs/findings.md)
    warmup: int = 100
    grad_clip: float = 1.0
    ema: float = 0.999  # 0 disables
    bf16: bool = True
    grad_checkpointing: bool = False
    fsdp: str = "auto"  # torchrun runs: "on" shards the model over the ranks (FSDP), "off" replicates it (DDP),
    # "auto": FSDP from 2 B parameters
    compile: bool = False  # torch.compile the DiT blocks' dense parts (GPU runs; the EMA copy stays eager)
    seed: int = 0
    log_every: int = 20
    ckpt_every: int = 500
    size: int = 256  # frame size
    frames: int = 17  # video frames per sample (1 + 4m)
    workers: int = 8  # rendering processes
    latent_cache: str = ""  # DiT stages: a folder keeping the packs' VAE latents between runs ("": none)
    # VAE
    kl_weight: float = 1e-6
    ms_ssim_weight: float = 0.2
    vae: str = ""  # a trained VAE checkpoint (decoder / teacher / causal stages)
    # DiT
    init: str = ""  # initialise from this DiT checkpoint (causal from teacher)
    grow_depth: bool = False  # init has fewer blocks than the model (dit={num_layers: ...}): each of its blocks is
    # followed by copies whose outputs start at zero (models.checkpoint.deepen_dit_state): the same function, more depth
    timestep_shift: float = 3.0
    chunk: int = 3  # latent frames per chunk (causal)
    window: int | None = None
    p_drop_audio: float = 0.1
    p_drop_text: float = 0.1
    p_drop_ref: float = 0.05
    p_drop_all: float = 0.05
    history_corruption: float = 0.3  # probability that a causal sample's context frames get noised
    history_max_sigma: float = 0.3
    mouth_weight: float = 0.0  # extra loss weight on the lips (a Gaussian at the world's mouth position)
    p_motion: float = 0.0  # teacher: probability that a sample's first latents are given clean (motion frames)
    motion_latents: int = 2  # at most this many motion latents (the teacher's long-video overlap)
    motion_corruption: float = 0.0  # teacher: probability that a sample's motion latents get noised (as history)
    lip_read_weight: float = 0.0  # weight of the lip-read loss (a latent lip reader on the DiT's x0 estimate)
    lip_reader_steps: int = 4000  # steps to fit that reader on the run's clean latents before the DiT trains
    lip_reader_max_error: float = 0.04  # refit (another seed) while its held-out jaw error is above this...
    lip_reader_tries: int = 2  # ...at most this many fits in all; the best one is used
    look_back: int = 2  # audio window widening, video frames
    look_ahead: int = 2
    # -- distillation (ode_pairs -> ode_init -> dmd: talkstream/train/distill.py) --
    teacher: str = ""  # the bidirectional teacher: ODE pairs' sampler, DMD's real score and the critic's init
    pairs: str = ""  # ode_init: the ODE pairs file written by the ode_pairs stage
    student_timesteps: list = field(default_factory=lambda: [1000.0, 750.0, 500.0, 250.0])  # the step list, warped
    student_shift: float = 3.0  # by this shift (diffusion.flow.student_sigmas)
    ode_substeps: int = 8  # ode_pairs: teacher Euler steps between consecutive student levels
    n_pairs: int = 1024  # ode_pairs: how many teacher trajectories
    real_text_guidance: float = 1.0  # the teacher's guidance (ODE pairs and DMD's real score):
    real_audio_guidance: float = 2.0  # u + s_txt (c_noaudio - u) + s_aud (c - c_noaudio)
    rollout_latents: int = 21  # dmd: latent frames per Self-Forcing rollout (chunks of ``chunk``)
    score_window: int = 9  # dmd: latents per window the teacher and critic score (the teacher's training window)
    cache_window: int = 9  # dmd rollouts: the stream engine's KV window (latents) ...
    anchor: str = "anchor_heavy"  # ... and anchor mode (the sinks: reference copies) the student streams with
    anchor_copies: int = 3
    critic_ratio: int = 5  # dmd: critic updates per generator update
    critic_warmup: int = 0  # dmd: critic updates on the initial generator's rollouts before its first update
    lr_critic: float = 2e-5
    betas: list = field(default_factory=lambda: [0.9, 0.99])  # AdamW betas (DMD: [0, 0.999])
    score_sigma_min: float = 0.02  # dmd: the score's noise levels, drawn uniformly, warped by timestep_shift,
    score_sigma_max: float = 0.98  # clamped to [min, max]
    ema_start: int = 0  # dmd: generator updates before the EMA starts following the generator
    context_noise: float = 0.0  # dmd rollouts: sigma of the noise on each clean chunk before its cache pass
    dit: dict = field(default_factory=dict)  # DiT stages: fields of the model size's DiTConfig to change, e.g.
    # {ref_concat: true} (an ``init`` checkpoint without such an addition loads into it, the addition at its zero init)
    extra: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.fsdp not in ("auto", "on", "off"):
            raise ValueError(f"fsdp must be auto, on or off, got {self.fsdp!r}")

    @staticmethod
    def load(path: str | Path, overrides: dict | None = None) -> TrainConfig:
        d = yaml.safe_load(Path(path).read_text()) or {}
        d.update(overrides or {})
        known = {f.name for f in dataclasses.fields(TrainConfig)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"{path}: unknown training settings {sorted(unknown)}")
        types = {f.name: f.type for f in dataclasses.fields(TrainConfig)}
        for k, v in d.items():  # YAML reads 5e-4 as a string: coerce by the field's type
            if isinstance(v, str) and types[k] in ("float", "int"):
                try:
                    d[k] = (float if types[k] == "float" else int)(v)
                except ValueError:
                    raise ValueError(f"{path}: {k} must be a number, got {v!r}") from None
        return TrainConfig(**d)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)
