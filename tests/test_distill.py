"""Few-step distillation: the step list, ODE pairs, ODE init, DMD with Self-Forcing rollouts (tiny models, CPU)."""

import json
import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from talkstream.diffusion.flow import few_step_timesteps, student_sigmas, trajectory_schedule
from talkstream.models.checkpoint import CheckpointError, load_checkpoint, sampling_of, save_checkpoint
from talkstream.models.config import dit_config, vae_config
from talkstream.models.dit import WanDiT
from talkstream.models.vae import CausalVAE
from talkstream.train.config import TrainConfig
from talkstream.train.data import make_pack
from talkstream.train.distill import DMDTrainer, nfe_per_second, pair_levels, student_sampling
from talkstream.train.dmd import dmd_gradient, dmd_loss, guided_x0, score_sigmas, take_window
from talkstream.train.ode_pairs import condition_bank, load_pairs
from talkstream.train.rollout import rollout
from talkstream.train.stages import run_stage


def _tiny(seed: int = 0) -> WanDiT:
    torch.manual_seed(seed)
    m = WanDiT(dit_config("tiny"))
    with torch.no_grad():  # zero-initialised outputs (head, audio adapters) would hide every gradient path
        for p in m.parameters():
            if p.abs().sum() == 0:
                p.normal_(0, 0.05)
    return m


def test_step_list_round_trips_through_the_checkpoint(tmp_path):
    from talkstream.stream.avatar import stream_config
    from talkstream.stream.chunk import SAMPLERS
    from talkstream.stream.engine import ANCHORS

    for steps in (4, 2):
        cfg = TrainConfig(stage="dmd", data="x", student_timesteps=list(few_step_timesteps(steps)), student_shift=5.0)
        m = _tiny()
        save_checkpoint(
            tmp_path / f"s{steps}.safetensors", m, "dit", m.cfg, extra=dict(chunk=3), sampling=student_sampling(cfg)
        )
        back = load_checkpoint(tmp_path / f"s{steps}.safetensors")
        s = sampling_of(back)
        assert s == student_sampling(cfg) and s["reference_init"] == 1.0 and s["audio_guidance"] == 1.0
        sc = stream_config(back, seed=3)  # the engine reads it: the same levels training used
        assert (sc.sampler, sc.anchor, sc.reference_init, sc.audio_guidance, sc.seed) == (
            "few_step",
            "anchor_heavy",
            1.0,
            1.0,
            3,
        )
        assert torch.equal(sc.sigmas(), student_sigmas(few_step_timesteps(steps), 5.0))
    assert sampling_of(_tiny()) is None  # a model without sampling settings
    from talkstream.models.checkpoint import SAMPLERS as CK_SAMPLERS
    from talkstream.models.checkpoint import SAMPLING_ANCHORS

    assert CK_SAMPLERS == SAMPLERS and SAMPLING_ANCHORS == ANCHORS
    bad = dict(student_sampling(TrainConfig(stage="dmd", data="x")), timesteps=[250, 500])
    with pytest.raises(CheckpointError, match="decreasing"):
        save_checkpoint(tmp_path / "bad.safetensors", m, "dit", m.cfg, sampling=bad)


def test_teacher_schedule_passes_through_the_students_levels():
    for steps in (4, 2):
        sig, idx = trajectory_schedule(few_step_timesteps(steps), 3.0, 5)
        assert torch.equal(sig[idx], student_sigmas(few_step_timesteps(steps), 3.0)[:-1])
        assert sig[-1] == 0 and (sig[1:] < sig[:-1]).all()
    # pairs made for the 4-step list serve the 2-step student (its levels are among them)
    sig4, idx4 = trajectory_schedule(few_step_timesteps(4), 3.0, 5)
    levels, s2 = pair_levels(dict(sigmas=sig4[idx4].tolist()), few_step_timesteps(2), 3.0)
    assert levels == [0, 2] and torch.allclose(s2, torch.tensor([1.0, 0.75]))
    with pytest.raises(ValueError, match="make pairs"):
        pair_levels(dict(sigmas=sig4[idx4].tolist()), few_step_timesteps(4), 5.0)
    assert nfe_per_second(4) == pytest.approx(5 / 0.48) and nfe_per_second(8, 2.0) == pytest.approx(17 / 0.48)


def _rollout_inputs(B=2, L=6):
    g = torch.Generator().manual_seed(1)
    cfg = dit_config("tiny")
    noise = torch.randn(B, cfg.in_dim, L, 4, 4, generator=g)
    audio = torch.randn(B, L, cfg.audio_tokens_per_frame, cfg.audio_dim, generator=g)
    ref = torch.randn(B, cfg.in_dim, 1, 4, 4, generator=g)
    text = torch.randn(B, 5, cfg.text_dim, generator=g)
    return noise, audio, ref, text


def test_rollout_gradient_flows_only_through_the_exit_step():
    student = _tiny()
    sig = student_sigmas(few_step_timesteps(4), 3.0)
    noise, audio, ref, text = _rollout_inputs()
    calls = []
    inner = student.forward_chunk

    def spy(x, t, cache, *a, commit=False, **kw):
        calls.append((float(torch.as_tensor(t).max()), torch.is_grad_enabled(), commit))
        return inner(x, t, cache, *a, commit=commit, **kw)

    student.forward_chunk = spy
    for exit_step in (0, 2):
        calls.clear()
        z = noise.clone().requires_grad_(True)
        out = rollout(student, z, sig, exit_step, audio, ref, text, chunk=3, cache_window=3)
        assert out.shape == noise.shape
        # per chunk: exit_step passes without gradient, one with (at the exit level), a cache pass without
        per_chunk = [(float(sig[k] * 1000), k == exit_step, False) for k in range(exit_step + 1)] + [(0.0, False, True)]
        assert calls == per_chunk * 2
        out[:, :, 3:].sum().backward()  # the second chunk's output
        grad = torch.zeros_like(z) if z.grad is None else z.grad  # (None: nothing reached the noise at all)
        assert grad[:, :, :3].abs().sum() == 0  # no gradient reaches the first chunk through the cache
        second = grad[:, :, 3:].abs().sum()
        # from the exit step at the first level the chunk's own noise is the input; later exits see re-noised
        # predictions of no-gradient steps
        assert (second > 0) if exit_step == 0 else (second == 0)
        assert all(p.grad is None or torch.isfinite(p.grad).all() for p in student.parameters())
        assert student.blocks[0].self_attn.q.weight.grad.abs().sum() > 0
        student.zero_grad(set_to_none=True)
    # only the chunks of the scored latents keep the exit step's gradient (the others keep no activations)
    calls.clear()
    out = rollout(student, noise, sig, 1, audio, ref, text, chunk=3, cache_window=3, grad_latents=(4, 6))
    assert [c[1] for c in calls] == [False, False, False] + [False, True, False]
    assert out.requires_grad
    with pytest.raises(ValueError, match="exit_step"):
        rollout(student, noise, sig, 4, audio, ref, text)


def test_rollout_matches_the_stream_engines_few_step_sampler():
    """The rollout's last exit step is the sampler the engine runs (same levels, same noise, same sinks)."""
    from talkstream.stream.chunk import denoise_chunk
    from talkstream.train.rollout import rollout_cache

    student = _tiny().eval()
    sig = student_sigmas(few_step_timesteps(2), 3.0)
    noise, audio, ref, text = _rollout_inputs(B=1)
    with torch.no_grad():
        out = rollout(
            student,
            noise,
            sig,
            1,
            audio,
            ref,
            text,
            chunk=3,
            cache_window=3,
            generator=torch.Generator().manual_seed(5),
        )
        cache = rollout_cache(student, ref, text, None, 3)
        g = torch.Generator().manual_seed(5)
        chunks = [
            denoise_chunk(student, cache, noise[:, :, c : c + 3], sig, text, audio[:, c : c + 3], generator=g)
            for c in (0, 3)
        ]
    assert torch.allclose(out, torch.cat(chunks, 2), atol=1e-5)


def test_dmd_gradient_is_zero_when_critic_and_teacher_agree():
    teacher = _tiny(0)
    critic = _tiny(0)  # the critic starts as the teacher
    noise, audio, ref, text = _rollout_inputs(L=3)
    x = noise.clone().requires_grad_(True)
    sigma = score_sigmas(2, 3.0, generator=torch.Generator().manual_seed(0))
    assert ((sigma >= 0.02) & (sigma <= 0.98)).all()
    xt = torch.lerp(x.detach(), torch.randn_like(x), sigma.view(-1, 1, 1, 1, 1))
    with torch.no_grad():
        real = guided_x0(teacher, xt, sigma, text, audio, ref)
        fake = guided_x0(critic, xt, sigma, text, audio, ref)
    loss, info = dmd_loss(x, fake, real)
    loss.backward()
    assert x.grad.abs().max() == 0 and info["dmd_grad"] == 0
    # with guidance the real score moves away from the unguided critic: a gradient, along (fake - real) / norm
    with torch.no_grad():
        real = guided_x0(teacher, xt, sigma, text, audio, ref, text_scale=2.0, audio_scale=3.0)
    x.grad = None
    dmd_loss(x, fake, real)[0].backward()
    g = dmd_gradient(x, fake, real)
    assert x.grad.abs().max() > 0 and torch.allclose(x.grad.double(), g / x.numel(), atol=1e-12)
    # the guidance formula: u + s_txt (c_noaudio - u) + s_aud (c - c_noaudio)
    with torch.no_grad():
        t = sigma * 1000
        u = teacher(xt, t, torch.zeros_like(text), torch.zeros_like(audio), ref)
        cna = teacher(xt, t, text, torch.zeros_like(audio), ref)
        c = teacher(xt, t, text, audio, ref)
        v = u + 2.0 * (cna - u) + 3.0 * (c - cna)
        want = xt - sigma.view(-1, 1, 1, 1, 1) * v
    assert torch.allclose(real, want, atol=1e-5)


def test_dmd_with_a_flow_matching_critic_moves_a_generator_onto_the_target_distribution():
    """DMD end to end on a case with a known answer: the real score is the exact clean estimate E[x0 | xt] of a 2-D
    Gaussian (mean (2, -1), std (0.5, 0.3)) under the flow's noising, the critic a small network trained with
    ``critic_loss`` on the generator's samples (5 updates per generator update, as Self-Forcing), the generator an
    affine map of noise started at N(0, 1) and trained with ``dmd_loss`` through ``x0_from_velocity``. It must land
    on the target's mean and spread: the losses' signs, the normaliser and the flow's conventions all agree."""
    from talkstream.diffusion.flow import NUM_TRAIN_TIMESTEPS, add_noise, x0_from_velocity
    from talkstream.train.dmd import critic_loss

    torch.manual_seed(0)
    mu, std = torch.tensor([2.0, -1.0]).view(1, 2, 1, 1, 1), torch.tensor([0.5, 0.3]).view(1, 2, 1, 1, 1)

    def real_x0(xt, sigma):
        a, s = (1 - sigma).view(-1, 1, 1, 1, 1), sigma.view(-1, 1, 1, 1, 1)
        return mu + a * std**2 / (a * a * std**2 + s * s) * (xt - a * mu)

    class Critic(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.net = torch.nn.Sequential(
                torch.nn.Linear(5, 128),
                torch.nn.SiLU(),
                torch.nn.Linear(128, 128),
                torch.nn.SiLU(),
                torch.nn.Linear(128, 2),
            )

        def forward(self, xt, t, text, audio, ref, context_mask=None):
            x, sig = xt.flatten(1), (t / NUM_TRAIN_TIMESTEPS).view(-1, 1)
            return self.net(torch.cat([x, sig, x * sig], 1)).view_as(xt)

    shift, log_scale = torch.zeros(2, requires_grad=True), torch.zeros(2, requires_grad=True)
    g, n = torch.Generator().manual_seed(1), 256

    def generate():
        return (shift + log_scale.exp() * torch.randn(n, 2, generator=g)).view(n, 2, 1, 1, 1)

    critic = Critic()
    opt_c = torch.optim.AdamW(critic.parameters(), lr=1e-3, betas=(0.0, 0.999))
    opt_g = torch.optim.AdamW([shift, log_scale], lr=1e-2, betas=(0.0, 0.999), weight_decay=0.0)

    def critic_update():
        x = generate().detach()
        loss = critic_loss(
            critic, x, score_sigmas(n, 1.0, generator=g), None, None, None, noise=torch.randn(x.shape, generator=g)
        )
        opt_c.zero_grad()
        loss.backward()
        opt_c.step()

    for _ in range(300):  # the critic first learns the generator's starting distribution
        critic_update()
    for _ in range(450):
        for _ in range(5):
            critic_update()
        x = generate()
        sigma = score_sigmas(n, 1.0, generator=g)
        xt = add_noise(x.detach(), torch.randn(x.shape, generator=g), sigma)
        with torch.no_grad():
            fake = x0_from_velocity(xt, critic(xt, sigma * NUM_TRAIN_TIMESTEPS, None, None, None), sigma)
            real = real_x0(xt, sigma)
        loss, _ = dmd_loss(x, fake, real)
        opt_g.zero_grad()
        loss.backward()
        opt_g.step()
    assert torch.allclose(shift.detach(), mu.flatten(), atol=0.05), shift
    assert torch.allclose(log_scale.detach().exp(), std.flatten(), atol=0.05), log_scale.exp()


def test_take_window_picks_each_samples_own_window():
    x = torch.arange(2 * 1 * 6).float().view(2, 1, 6, 1, 1)
    w = take_window(x, torch.tensor([0, 3]), 3, 2)
    assert w[0].flatten().tolist() == [0, 1, 2] and w[1].flatten().tolist() == [9, 10, 11]


# -- the stages, a few CPU steps each -------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def world(tmp_path_factory):
    d = tmp_path_factory.mktemp("distill")
    pack = make_pack(d / "pack.npz", clips=6, seconds=1.2, seed=77, progress=False)
    torch.manual_seed(0)
    vae = CausalVAE(vae_config("tiny"))
    save_checkpoint(d / "vae.safetensors", vae, "vae", vae.cfg)
    teacher = _tiny(1)
    save_checkpoint(
        d / "teacher.safetensors", teacher, "dit", teacher.cfg, extra=dict(window_latents=3, look_back=0, look_ahead=0)
    )
    causal = _tiny(2)
    save_checkpoint(d / "causal.safetensors", causal, "dit", causal.cfg, extra=dict(chunk=3, look_back=0, look_ahead=0))
    return d, pack


def _cfg(d, pack, stage, **kw):
    base = dict(
        stage=stage,
        data=str(pack),
        vae=str(d / "vae.safetensors"),
        teacher=str(d / "teacher.safetensors"),
        init=str(d / "causal.safetensors"),
        out=str(d / stage),
        model="tiny",
        steps=2,
        batch=2,
        size=64,
        workers=1,
        log_every=1,
        ckpt_every=1,
        warmup=1,
        look_back=0,
        look_ahead=0,
        n_pairs=3,
        ode_substeps=1,
        rollout_latents=6,
        score_window=3,
        cache_window=3,
        critic_ratio=2,
        betas=[0.0, 0.999],
        latent_cache=str(d / "latents"),
    )
    base.update(kw)
    return base


def test_each_stage_runs_a_few_cpu_steps(world):
    d, pack = world
    m = run_stage(TrainConfig(**_cfg(d, pack, "ode_pairs")))
    assert m["pairs"] == 3 and m["sigmas"] == pytest.approx([1.0, 0.9, 0.75, 0.5])
    pairs = load_pairs(d / "ode_pairs")
    assert pairs["traj"].shape[:2] == (3, 4) and pairs["x0"].shape == (3, 8, 3, 8, 8)
    assert torch.equal(pairs["traj"][:, 1:].float().std((2, 3, 4, 5)) > 0, torch.ones(3, 3, dtype=torch.bool))

    m = run_stage(TrainConfig(**_cfg(d, pack, "ode_init", pairs=str(d / "ode_pairs"), mouth_weight=4.0)))
    assert m["train"]["step"] == 2 and np.isfinite(m["train"]["x0_mse"])
    ode = load_checkpoint(d / "ode_init" / "student.safetensors")
    assert sampling_of(ode)["timesteps"] == [1000.0, 750.0, 500.0, 250.0] and ode.checkpoint_info["chunk"] == 3

    # DMD from the ODE-initialised student, 2-step list; resumes where it stopped
    cfg = _cfg(d, pack, "dmd", init=str(d / "ode_init" / "student.safetensors"), student_timesteps=[1000, 500])
    m = run_stage(TrainConfig(**cfg))
    assert m["generator_updates"] == 2 and m["critic_updates"] == 4
    log = [json.loads(x) for x in (d / "dmd" / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [1, 2] and all(np.isfinite(r["dmd_loss"]) for r in log)
    assert {"critic_loss", "dmd_grad", "real_gap", "exit_step"} <= set(log[-1])
    assert run_stage(TrainConfig(**{**cfg, "steps": 3}))["generator_updates"] == 3
    student = load_checkpoint(d / "dmd" / "student.safetensors")
    assert sampling_of(student)["timesteps"] == [1000.0, 500.0]

    # the student streams with its own step list from pure noise
    from talkstream.stream.avatar import Avatar

    vae = load_checkpoint(d / "vae.safetensors")
    avatar = Avatar(student, vae, size=64)
    assert avatar.cfg.sampler == "few_step" and avatar.cfg.reference_init == 1.0
    ref = np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)
    frames = list(avatar.from_features(ref, np.zeros((60, 384), np.float32), 13))
    assert len(frames) == 13 and frames[0].shape == (64, 64, 3)


def test_critic_warms_up_on_the_initial_generators_rollouts_before_its_first_update(world):
    d, pack = world
    cfg = TrainConfig(**_cfg(d, pack, "dmd", out=str(d / "dmd_warm"), critic_warmup=3, steps=1, critic_ratio=1))
    bank = condition_bank(cfg, "cpu", lambda *a: None)
    trainer = DMDTrainer(cfg, bank, "cpu", log=lambda *a: None)
    student = [p.detach().clone() for p in trainer.student.parameters()]
    critic = [p.detach().clone() for p in trainer.critic.parameters()]
    losses = trainer.warm_critic(d / "dmd_warm" / "warm.jsonl")
    assert len(losses) == 3 and all(np.isfinite(losses))
    assert all(torch.equal(a, b) for a, b in zip(student, trainer.student.parameters()))  # the generator waits
    assert any(not torch.equal(a, b) for a, b in zip(critic, trainer.critic.parameters()))
    assert trainer.step == 0
    trainer.train()  # the warm-up runs once, at the start of a run that has made no generator update
    log = [json.loads(x) for x in (d / "dmd_warm" / "log.jsonl").read_text().splitlines()]
    assert [r.get("critic_warmup") for r in log] == [1, 2, 3, None] and log[-1]["step"] == 1


def test_ship_rule_lets_a_tagged_variant_compete_with_its_step_count(tmp_path):
    for seed in range(4):
        _suite_json(tmp_path, "dmd_lt4", seed, 0.0300)
        _suite_json(tmp_path, "dmd_lt4e", seed, 0.0290)
        _suite_json(tmp_path, "dmd_lt2w", seed, 0.0330)
        _suite_json(tmp_path, "ode_init", seed, 0.0200)  # not a DMD run: never chosen
    r = _rule(tmp_path)
    assert r["chosen"] == {"4": "dmd_lt4e", "2": "dmd_lt2w"} and r["ship"] == "dmd_lt4e"


def test_dmd_runs_under_torchrun_on_two_cpu_processes(world):
    d, pack = world
    cfg = _cfg(d, pack, "dmd", out=str(d / "dmd_ddp"), steps=2, critic_ratio=1)
    (d / "dmd_ddp.yaml").write_text(yaml.safe_dump(cfg))
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    cmd += ["-m", "talkstream.cli", "train", "dmd", "--config", str(d / "dmd_ddp.yaml")]
    res = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    rows = (d / "dmd_ddp" / "log.jsonl").read_text().splitlines()
    assert len(rows) == 2  # rank 0 logs, once per update
    assert sampling_of(load_checkpoint(d / "dmd_ddp" / "student.safetensors")) is not None


def _suite_json(d, name, seed, mouth, head=3.0, ident=1.0, zero=1.0, flagged=0):
    s = dict(
        mouth_error=mouth,
        identity_nn_accuracy=ident,
        head_motion=head,
        offset_zero_fraction=zero,
        offset_measured_clips=4,
        flagged_clips=flagged,
    )
    (d / f"suite_{name}_s{seed}.json").write_text(json.dumps(dict(summary=s)))


def _rule(d):
    res = subprocess.run(
        [sys.executable, "tools/device/distill_rule.py", str(d)], capture_output=True, text=True, timeout=60
    )
    assert res.returncode == 0, res.stderr
    return json.loads((d / "ship.json").read_text())


def test_ship_rule_follows_the_bounds(tmp_path):
    # both within bounds: the lower mouth error ships; per step count the better settings stand for it
    for seed in range(4):
        _suite_json(tmp_path, "dmd_sf4", seed, 0.0290)
        _suite_json(tmp_path, "dmd_lt4", seed, 0.0280, flagged=1)  # better lips but a flagged clip: not chosen
        _suite_json(tmp_path, "dmd_sf2", seed, 0.0320)
        _suite_json(tmp_path, "dmd_lt2", seed, 0.0330)
    r = _rule(tmp_path)
    assert r["chosen"] == {"4": "dmd_sf4", "2": "dmd_sf2"} and r["bounds_met"] == {"4": True, "2": True}
    assert r["ship"] == "dmd_sf4" and r["hand_back"] == "dmd_sf4"
    # one offset miss in 16 is allowed, two are not; a stiff head fails the bound
    _suite_json(tmp_path, "dmd_sf4", 0, 0.0290, zero=0.5)
    r = _rule(tmp_path)
    assert r["bounds_met"]["4"] is False and r["ship"] == "dmd_sf2"
    # neither meets its bounds (sf4: offsets; the 2-step: lips): one no worse than c6 on every count ships
    for seed in range(4):
        _suite_json(tmp_path, "dmd_sf2", seed, 0.0340, head=2.0)
    r = _rule(tmp_path)
    assert r["chosen"]["2"] == "dmd_lt2" and r["ship"] == "dmd_lt2" and "no worse than c6" in r["why"]
    for seed in range(4):
        _suite_json(tmp_path, "dmd_sf2", seed, 0.0340, head=1.0)  # stiller than c6
        _suite_json(tmp_path, "dmd_lt2", seed, 0.0400)
    r = _rule(tmp_path)
    assert r["ship"] is None and r["hand_back"] == "dmd_sf4" and "c6 stays" in r["why"]


# -- the GPU pipeline's whole `run`, rehearsed on the CPU with tiny models ------------------------------------------
def _pipeline(work, env, *args, timeout=600):
    res = subprocess.run(
        ["bash", "tools/device/distill_pipeline.sh", *args],
        cwd=work,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
    return res.stdout


def _machine(tmp_path, name):
    """A fresh checkout-like folder: the repository's code and configs, its own runs/ and hand-back folder."""
    root = Path(__file__).resolve().parents[1]
    work = tmp_path / name
    (work / "bin").mkdir(parents=True)
    for sub in ("configs", "tools", "talkstream"):
        (work / sub).symlink_to(root / sub)
    (work / "bin" / "python3").symlink_to(sys.executable)
    return work


@pytest.mark.slow
def test_the_gpu_pipeline_rehearses_on_cpu_and_resumes_on_a_fresh_machine(world, tmp_path):
    """`distill_pipeline.sh` start -> run (pairs -> ODE init -> DMD -> suites -> rule) -> wait, with micro settings;
    then the hand-back of a run's newest export and of a finished run, and a fresh machine that resumes from them."""
    import pickle

    from talkstream.eval.evaluate import SUITE_SEEDS, prepare_suite

    d, pack = world
    inputs = tmp_path / "inputs.pkl"
    inputs.write_bytes(pickle.dumps(prepare_suite(SUITE_SEEDS[:1], 1.2)))
    a = _machine(tmp_path, "a")
    env = dict(
        os.environ,
        PATH=f"{a / 'bin'}:{os.environ['PATH']}",
        OMP_NUM_THREADS="1",
        DEVICE="cpu",
        INSTALL="0",
        STREAM_FPS="0",
        TEACHER=str(d / "teacher.safetensors"),
        VAE=str(d / "vae.safetensors"),
        INIT=str(d / "causal.safetensors"),
        PACK=str(pack),
        INPUTS=str(inputs),
        SUITE_ARGS="--clips 1 --seconds 1.2 --size 64 --steps 3",
        STAGE_SETS=f"model=tiny size=64 workers=1 look_back=0 look_ahead=0 log_every=1 ckpt_every=1 warmup=1 "
        f"latent_cache={d / 'latents'}",
        PAIRS="3",
        PAIRS_SETS="ode_substeps=1 batch=2",
        ODE_SETS="steps=2 batch=2",
        DMD_RUNS="lt2w",  # LiveTalk settings, 2 steps, a tag: a variant with its own overrides
        SETS_lt2w="critic_warmup=2",
        DMD_BATCH="1",
        DMD_SETS="steps=2 critic_ratio=1 rollout_latents=6 score_window=3 cache_window=3",
        ODE_SEEDS="",  # (the suite's path is the DMD students'; one suite fewer)
        DMD_SEEDS="0",
        RULE_ARGS="--seeds 1",
        OUT="out",
    )
    assert "pipeline started" in _pipeline(a, env, "start")
    out = _pipeline(a, env, "wait", "200")
    assert "DONE" in out
    stages = (a / "runs" / "distill" / "stages.txt").read_text()
    for line in ("ode_pairs (ode_pairs) exit 0", "ode_init (ode_init) exit 0", "dmd_lt2w (distill_livetalk) exit 0"):
        assert line in stages, stages
    assert "suite dmd_lt2w seed 0 exit 0" in stages and "suite ode_init" not in stages
    ship = json.loads((a / "runs" / "distill" / "ship.json").read_text())
    assert ship["hand_back"] == "dmd_lt2w" and "c6 stays" in ship["why"]  # (random tiny models meet no bound)
    with tarfile.open(a / "out" / "small_dmd_lt2w.tar") as t:
        assert {"./student.safetensors", "./log.jsonl", "./metrics.json"} <= set(t.getnames())
    assert tarfile.open(a / "out" / "logs.tar").getnames()
    lt2 = load_checkpoint(a / "runs" / "dmd_lt2w" / "student.safetensors")
    assert sampling_of(lt2)["timesteps"] == [1000.0, 500.0]
    assert (
        json.loads((a / "runs" / "dmd_lt2w" / "config.json").read_text())["init"] == "runs/ode_init/student.safetensors"
    )
    # every run exported its newest weights while it trained (what `wait` hands back)
    latest = (a / "runs" / "dmd_lt2w" / "latest.txt").read_text().strip()
    export = load_checkpoint(a / "runs" / "dmd_lt2w" / latest / "student.safetensors")
    assert latest == "ckpt_000002" and export.checkpoint_info["step"] == 2 and sampling_of(export) == sampling_of(lt2)
    log = [json.loads(x) for x in (a / "runs" / "dmd_lt2w" / "log.jsonl").read_text().splitlines()]
    assert [r.get("critic_warmup") for r in log[:2]] == [1, 2] and log[2]["step"] == 1  # the variant's own setting

    # the machine is taken back while dmd_lt2w runs: pretend it had not finished, and collect as the calls would
    (a / "runs" / "distill" / "DONE").unlink()
    (a / "runs" / "dmd_lt2w" / "metrics.json").unlink()
    os.utime(a / "runs" / "ode_init" / "metrics.json", (1e9, 1e9))  # older than dmd_lt2w's export
    handed = tmp_path / "handed"
    said = []
    for call in (1, 2, 3):
        shutil.rmtree(a / "out")
        said.append(_pipeline(a, env, "wait", "0"))
        shutil.copytree(a / "out", handed / str(call))
    assert "handed back: dmd_lt2w (ckpt_000002)" in said[0] and "handed back: ode_init (final)" in said[1]
    assert not list((handed / "3").glob("ckpt_*")) and "handed back" not in said[2]  # nothing newer to send
    parts = sorted(p.name for p in (handed / "1").glob("ckpt_*")) + sorted(
        p.name for p in (handed / "2").glob("ckpt_*")
    )
    assert parts == ["ckpt_dmd_lt2w.tgz.part00", "ckpt_ode_init.tgz.part00"]
    here = _machine(tmp_path, "here")
    for call in ("1", "2"):
        assert "data/resume/" in _pipeline(here, env, "keep", str(handed / call))
    with tarfile.open(here / "data" / "resume" / "dmd_lt2w.tgz") as t:
        names = set(t.getnames())
    assert {"dmd_lt2w/latest.txt", "dmd_lt2w/ckpt_000002/student.safetensors", "dmd_lt2w/log.jsonl"} <= names
    assert not any("state.pt" in n or "ckpt_000001" in n for n in names)

    # a fresh machine: the finished ODE init and the unfinished DMD run come back; no pairs, no ODE init again
    b = _machine(tmp_path, "b")
    (b / "data").symlink_to(here / "data")
    env_b = dict(env, PATH=f"{b / 'bin'}:{os.environ['PATH']}", RESUME="ode_init dmd_lt2w", DMD_S="500")
    for name in ("ode_init", "dmd_lt2w"):
        _pipeline(b, env_b, "resume", f"data/resume/{name}.tgz")
    assert (b / "runs" / "ode_init" / "metrics.json").exists() and (b / "runs" / "dmd_lt2w.carried").is_dir()
    _pipeline(b, env_b, "run")
    stages = (b / "runs" / "distill" / "stages.txt").read_text()
    assert "ode_pairs" not in stages and "ode_init (ode_init)" not in stages
    carried = "runs/dmd_lt2w.carried/ckpt_000002/student.safetensors"
    trained = json.loads((a / "runs" / "dmd_lt2w" / "log.jsonl").read_text().splitlines()[-1])["seconds"]
    assert f"dmd_lt2w resumes from {carried} for {max(60, int(500 - trained))} s" in stages
    assert "dmd_lt2w (distill_livetalk) exit 0" in stages and "suite dmd_lt2w seed 0 exit 0" in stages
    assert json.loads((b / "runs" / "dmd_lt2w" / "config.json").read_text())["init"] == carried
