"""The training stages run end to end on a CPU (a few steps, tiny sizes) and write loadable checkpoints."""

import json

import numpy as np
import pytest
import torch

from talkstream.models.checkpoint import load_checkpoint
from talkstream.models.config import dit_config
from talkstream.models.dit import WanDiT
from talkstream.train.config import TrainConfig
from talkstream.train.data import dequantize_features, load_pack, make_pack, mouth_maps, quantize_features, render_pack
from talkstream.train.stages import LatentBank, audio_reliance, export_run, run_stage


@pytest.fixture(scope="module")
def pack(tmp_path_factory):
    d = tmp_path_factory.mktemp("pack")
    return make_pack(d / "pack.npz", clips=6, seconds=1.2, seed=123, progress=False)


def test_pack_round_trip_and_render(pack):
    p = load_pack(pack)
    assert p.n_clips == 6 and p.n_frames == 30 and p.audio_features.shape == (6, 60, 384)
    assert p.caption_emb.shape[0] == len(p.captions) and p.caption_ids.max() < len(p.captions)
    frames = render_pack(p, 64, workers=2)
    assert frames.shape == (6, 30, 64, 64, 3) and frames.std() > 10
    assert np.array_equal(frames[:2], render_pack(p, 64, workers=1, clips=slice(0, 2)))


def test_packs_join_with_merged_captions(pack, tmp_path):
    other = make_pack(tmp_path / "other.npz", clips=3, seconds=1.2, seed=500, progress=False)
    a, b = load_pack(pack), load_pack(other)
    both = load_pack(f"{pack},{other}")
    assert both.n_clips == 9 and list(both.seeds) == list(a.seeds) + list(b.seeds)
    assert np.array_equal(both.audio_features[6:], b.audio_features) and both.identities[6] == b.identities[0]
    assert len(both.captions) == len(set(a.captions) | set(b.captions))
    for part, offset in ((a, 0), (b, 6)):  # every frame keeps its caption text and its token embedding
        for i in range(part.n_clips):
            for t in (0, part.n_frames - 1):
                old, new = part.caption_ids[i, t], both.caption_ids[offset + i, t]
                assert part.captions[old] == both.captions[new]
                m = part.caption_mask[old]
                assert np.array_equal(both.caption_emb[new, : len(m)][m], part.caption_emb[old][m])
                assert both.caption_mask[new].sum() == m.sum()
    with pytest.raises(ValueError, match="share clips"):
        load_pack([pack, pack])
    with pytest.raises(ValueError, match="clip lengths"):
        load_pack([pack, make_pack(tmp_path / "long.npz", clips=1, seconds=2.0, seed=900, progress=False)])


def test_feature_quantization_error_is_half_a_step():
    rng = np.random.default_rng(0)
    f = rng.normal(0, 1, (3, 50, 384)).astype(np.float32) * rng.uniform(0.1, 5, 384) + rng.normal(0, 3, 384)
    q, lo, step = quantize_features(f)
    assert q.dtype == np.uint8 and q.shape == f.shape and lo.shape == step.shape == (384,)
    err = np.abs(dequantize_features(q, lo, step).astype(np.float32) - f)
    assert np.all(err <= step / 2 + 2e-3 * np.abs(f) + 1e-6)  # half a step (+ float16 rounding)
    assert err.mean() < 0.01 * f.std()


def test_mouth_maps_peak_at_the_mouth(pack):
    from talkstream.world.render import FrameState, mouth_center

    p = load_pack(pack)
    m = mouth_maps(p, slice(0, 2), n_latent=8, grid=32)
    assert m.shape == (2, 8, 32, 32) and m.max() <= 1 and m.min() >= 0
    for k in range(2):
        for t in (0, 5):  # latent 5 covers frames 17..20
            frames = [0] if t == 0 else range(4 * t - 3, 4 * t + 1)
            mx, my = np.mean([mouth_center(p.identities[k], FrameState.from_array(p.states[k, f])) for f in frames], 0)
            y, x = np.unravel_index(m[k, t].argmax(), m[k, t].shape)
            assert abs((x + 0.5) * 8 - mx) <= 4 and abs((y + 0.5) * 8 - my) <= 4


def _cfg(tmp, pack, stage, **kw):
    base = dict(
        stage=stage,
        data=str(pack),
        out=str(tmp / stage),
        model="tiny",
        steps=3,
        batch=2,
        size=64,
        frames=9,
        workers=2,
        log_every=1,
        ckpt_every=2,
        warmup=1,
        look_back=0,
        look_ahead=0,
    )
    base.update(kw)
    return TrainConfig(**base)


def test_all_stages_run_and_resume(tmp_path, pack):
    m = run_stage(_cfg(tmp_path, pack, "vae"))
    assert m["psnr_db"] > 0 and (tmp_path / "vae" / "loss.png").exists()
    vae_file = tmp_path / "vae" / "vae.safetensors"
    vae = load_checkpoint(vae_file)
    assert vae.latent_std.min() > 0
    log = [json.loads(x) for x in (tmp_path / "vae" / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [1, 2, 3]
    # resume: asking for more steps continues from the saved state
    m2 = run_stage(_cfg(tmp_path, pack, "vae", steps=4))
    assert m2["train"]["step"] == 4
    d = run_stage(
        _cfg(tmp_path, pack, "decoder", vae=str(vae_file), extra={"channels": 16, "mouth_weight": 5.0, "crop": 32})
    )
    assert "tiny_psnr_db" in d and d["tiny_speedup"] > 0
    # decoder-only fine-tuning: the encoder (so the latent space and its statistics) stays exactly as it was
    run_stage(
        _cfg(
            tmp_path,
            pack,
            "vae",
            out=str(tmp_path / "vae_ft"),
            init=str(vae_file),
            lr=1e-2,
            extra={"freeze_encoder": True, "crop": 32, "mouth_weight": 5.0, "motion_weight": 2.0, "l2_weight": 10.0},
        )
    )
    assert "lips_motion" in json.loads((tmp_path / "vae_ft" / "log.jsonl").read_text().splitlines()[-1])
    ft = load_checkpoint(tmp_path / "vae_ft" / "vae.safetensors").state_dict()
    base = load_checkpoint(vae_file).state_dict()  # (re-exported by the resumed run)
    assert all(torch.equal(base[k], v) for k, v in ft.items() if k.startswith("encoder.") or k.startswith("latent_"))
    assert any(not torch.equal(base[k], v) for k, v in ft.items() if k.startswith("decoder."))
    t = run_stage(_cfg(tmp_path, pack, "teacher", vae=str(vae_file), frames=25, mouth_weight=4.0, p_motion=0.5))
    assert np.isfinite(t["train"]["loss"]) and t["train"]["loss"] != t["train"]["mse"]
    rel = t["audio_reliance"]  # lips error with own / shuffled / no audio on held-out clips
    assert set(rel["sigma_0.5"]) == {"own", "shuffled", "none", "gain"} and np.isfinite(rel["mean_gain"])
    assert np.isfinite(rel["training_clips_mean_gain"])  # the same measure on training clips (memorisation)
    bank = LatentBank(
        _cfg(tmp_path, pack, "teacher", vae=str(vae_file), frames=25), vae, "cpu", slice(0, 3), load_pack(pack)
    )
    assert bank.lips.shape == (3, bank.L, 16)
    one_by_one = LatentBank(
        _cfg(tmp_path, pack, "teacher", vae=str(vae_file), frames=25),
        vae,
        "cpu",
        slice(0, 3),
        load_pack(pack),
        encode_clips=1,
    )  # (the VAE encodes each clip on its own)
    # (bf16 latents: a last-bit difference of the fp32 encoder flips one bf16 step, 0.4% of the value)
    assert torch.allclose(one_by_one.latents.float(), bank.latents.float(), atol=1e-2, rtol=1e-2)
    assert torch.allclose(one_by_one.refs.float(), bank.refs.float(), atol=1e-2, rtol=1e-2)
    cache = tmp_path / "latents"
    cached = LatentBank(
        _cfg(tmp_path, pack, "teacher", vae=str(vae_file), frames=25, latent_cache=str(cache)),
        vae,
        "cpu",
        slice(0, 3),
        load_pack(pack),
    )
    assert len(list(cache.glob("clip_*.pt"))) == 3 and torch.equal(cached.latents, bank.latents)
    for f in cache.glob("clip_*.pt"):  # a second bank reads the cache (proof: what it reads is what it gets)
        saved = torch.load(f)
        torch.save(dict(latents=saved["latents"] + 1, refs=saved["refs"]), f)
    again = LatentBank(
        _cfg(tmp_path, pack, "teacher", vae=str(vae_file), frames=25, latent_cache=str(cache)),
        vae,
        "cpu",
        slice(0, 3),
        load_pack(pack),
    )
    assert torch.equal(again.latents, bank.latents + 1) and torch.equal(again.refs, bank.refs)
    shifted = LatentBank(
        _cfg(tmp_path, pack, "teacher", vae=str(vae_file), frames=25, latent_cache=str(cache)),
        vae,
        "cpu",
        slice(2, 4),
        load_pack(pack),
    )  # another split: clip 2 read back, clip 3 encoded
    assert len(list(cache.glob("clip_*.pt"))) == 4 and torch.equal(shifted.latents[0], bank.latents[2] + 1)
    assert torch.equal(shifted.refs[0], bank.refs[2])
    other_vae = load_checkpoint(vae_file)  # other weights: another key, encoded afresh
    torch.nn.init.zeros_(next(other_vae.parameters()))
    LatentBank(
        _cfg(tmp_path, pack, "teacher", vae=str(vae_file), frames=25, latent_cache=str(cache)),
        other_vae,
        "cpu",
        slice(0, 3),
        load_pack(pack),
    )
    assert len(list(cache.glob("clip_*.pt"))) == 7
    fresh = WanDiT(dit_config("tiny"))  # zero-initialised audio adapters: the audio cannot matter
    assert audio_reliance(fresh, bank, n_latent=7)["mean_gain"] == 0
    torch.nn.init.normal_(fresh.head.head.weight, std=0.1)  # (a fresh head predicts zero whatever it sees)
    assert audio_reliance(fresh, bank, n_latent=7)["mean_gain"] == 0
    for block in fresh.blocks:  # an adapter that passes the audio on: own and shuffled audio now differ
        torch.nn.init.normal_(block.audio_attn.attn.o.weight, std=0.5)
    assert audio_reliance(fresh, bank, n_latent=7)["mean_gain"] != 0
    teacher = tmp_path / "teacher" / "teacher.safetensors"
    info = load_checkpoint(teacher).checkpoint_info
    assert info["window_latents"] == 7 and info["motion_latents"] == 2
    # depth growth: a 4-block teacher from the 2-block one (the copies' outputs start at zero), trained a step
    run_stage(
        _cfg(
            tmp_path,
            pack,
            "teacher",
            vae=str(vae_file),
            frames=25,
            out=str(tmp_path / "grown"),
            init=str(teacher),
            grow_depth=True,
            dit={"num_layers": 4},
            steps=1,
        )
    )
    assert load_checkpoint(tmp_path / "grown" / "teacher.safetensors").cfg.num_layers == 4
    with pytest.raises(ValueError, match="set init"):
        run_stage(_cfg(tmp_path, pack, "teacher", vae=str(vae_file), grow_depth=True, dit={"num_layers": 4}))
    c = run_stage(
        _cfg(
            tmp_path,
            pack,
            "causal",
            vae=str(vae_file),
            frames=25,
            init=str(teacher),
            chunk=3,
            mouth_weight=4.0,
            lip_read_weight=0.5,
            lip_reader_steps=5,
            lip_reader_max_error=0.0,
        )
    )
    assert np.isfinite(c["train"]["loss"]) and c["train"]["lip_read"] > 0
    assert c["lip_reader"]["steps"] == 5 and np.isfinite(c["lip_reader"]["held_jaw_error"])
    assert c["lip_reader"]["fits"] == 2  # a 5-step reader misses any bound: refitted once, then the better one used
    model = load_checkpoint(tmp_path / "causal" / "causal.safetensors")
    assert model.checkpoint_info["chunk"] == 3
    before = load_checkpoint(teacher).state_dict()
    assert any(not torch.equal(before[k], v) for k, v in model.state_dict().items())
    # a stopped run's last state exports as the checkpoint the run wrote (its EMA, its chunk, its step)
    trained = model.state_dict()
    (tmp_path / "causal" / "causal.safetensors").unlink()
    assert [p.name for p in export_run(tmp_path / "causal")] == ["causal.safetensors"]
    exported = load_checkpoint(tmp_path / "causal" / "causal.safetensors")
    assert all(torch.equal(trained[k], v) for k, v in exported.state_dict().items())
    assert exported.checkpoint_info["chunk"] == 3 and exported.checkpoint_info["train"]["step"] == 3
    with pytest.raises(ValueError, match="DiT runs"):
        export_run(tmp_path / "vae")
    with pytest.raises(FileNotFoundError, match="not a training run"):
        export_run(tmp_path)


def test_bad_config_is_clear(tmp_path):
    (tmp_path / "c.yaml").write_text("stage: vae\ndata: x\nbogus: 1\n")
    with pytest.raises(ValueError, match="unknown training settings"):
        TrainConfig.load(tmp_path / "c.yaml")
    (tmp_path / "d.yaml").write_text("stage: vae\ndata: x\nlr: 5e-4\nsteps: '7'\n")
    cfg = TrainConfig.load(tmp_path / "d.yaml")
    assert cfg.lr == 5e-4 and cfg.steps == 7
    (tmp_path / "e.yaml").write_text("stage: vae\ndata: x\nlr: fast\n")
    with pytest.raises(ValueError, match="lr must be a number"):
        TrainConfig.load(tmp_path / "e.yaml")
    with pytest.raises(ValueError, match="unknown stage"):
        run_stage(TrainConfig(stage="nope", data="x"))


def test_a_dit_with_ref_concat_starts_from_a_checkpoint_without_it_and_nothing_else_is_waived(tmp_path):
    import pytest
    import torch

    from talkstream.models.checkpoint import load_checkpoint, load_dit_weights, save_checkpoint
    from talkstream.models.config import DiTConfig, dit_config
    from talkstream.models.dit import WanDiT

    def load_dit_init(model, path):  # as train_dit starts from cfg.init
        load_dit_weights(model, load_checkpoint(path).state_dict())

    torch.manual_seed(0)
    plain = WanDiT(dit_config("tiny"))
    save_checkpoint(tmp_path / "plain.safetensors", plain, "dit", plain.cfg)
    m = WanDiT(DiTConfig.from_dict({**dit_config("tiny").to_dict(), "ref_concat": True}))
    load_dit_init(m, str(tmp_path / "plain.safetensors"))
    assert torch.equal(m.patch_embedding.weight, plain.patch_embedding.weight.to(m.patch_embedding.weight.dtype))
    assert m.ref_embedding.weight.abs().sum() == 0
    wider = WanDiT(DiTConfig.from_dict({**dit_config("tiny").to_dict(), "ffn_dim": 256}))
    with pytest.raises(ValueError, match="does not fit"):
        load_dit_init(wider, str(tmp_path / "plain.safetensors"))


def test_every_shipped_training_config_loads():
    from pathlib import Path

    from talkstream.train.config import TrainConfig

    paths = sorted(Path(__file__).resolve().parents[1].glob("configs/*.yaml"))
    assert len(paths) >= 6
    stages = {TrainConfig.load(p).stage for p in paths}  # unknown keys or ill-typed values raise
    assert stages == {"vae", "decoder", "teacher", "causal", "ode_pairs", "ode_init", "dmd"}


def test_latent_map_fit_and_fold():
    """A tiny decoder carried over to a VAE whose latents are an affine image of the old ones decodes the new
    latents as it decoded the old: exactly with b = 0, inside the zero-padded border otherwise."""
    from talkstream.models.vae import TinyDecoder, TinyDecoderConfig
    from talkstream.train.latent_map import fit_latent_map, fold_latent_map

    g = torch.Generator().manual_seed(0)
    c = 16
    dec = TinyDecoder(TinyDecoderConfig(latent_dim=c, channels=(16, 8, 8)))
    dec.latent_mean.copy_(torch.randn(c, generator=g))
    dec.latent_std.copy_(torch.rand(c, generator=g) + 0.5)
    a_true = torch.eye(c) + 0.2 * torch.randn(c, c, generator=g)
    new = torch.randn(2, c, 3, 16, 16, generator=g)  # frames of 128 x 128
    for b_true in (torch.zeros(c), torch.randn(c, generator=g)):
        old = torch.einsum("ij,bj...->bi...", a_true, new) + b_true.view(1, -1, 1, 1, 1)
        a, b = fit_latent_map(old, new)
        assert torch.allclose(a, a_true, atol=1e-4) and torch.allclose(b, b_true, atol=1e-4)
        mean, std = torch.randn(c, generator=g), torch.rand(c, generator=g) + 0.5
        carried = TinyDecoder(dec.cfg)
        carried.load_state_dict(dec.state_dict())
        fold_latent_map(carried, a, b, mean, std)
        with torch.no_grad():
            want = dec(old, normalized=False)
            got = carried((new - mean.view(1, -1, 1, 1, 1)) / std.view(1, -1, 1, 1, 1))
        inside = (..., slice(40, -40), slice(40, -40))  # the border's reach: 4 latent px (measured)
        if not b_true.any():
            inside = slice(None)
        assert torch.allclose(got[inside], want[inside], atol=1e-4), (got - want)[inside].abs().max()
    with pytest.raises(ValueError, match="same frames"):
        fit_latent_map(new, new[:1])


def test_tiny_decoder_loss_parts():
    from talkstream.models.losses import masked_l1, reconstruction_loss
    from talkstream.train.stages import tiny_decoder_loss

    g = torch.Generator().manual_seed(0)
    x, y, target = (torch.rand(2, 3, 5, 32, 32, generator=g) * 2 - 1 for _ in range(3))
    mouth = torch.zeros(2, 1, 5, 32, 32)
    mouth[..., 10:20, 12:22] = 1
    plain, info = tiny_decoder_loss(y, x, ms_ssim_weight=0.1)
    assert set(info) == {"truth"} and torch.allclose(plain, reconstruction_loss(y, x, ms_ssim_weight=0.1))
    full, info = tiny_decoder_loss(
        y, x, mouth, l2=20.0, ms_ssim_weight=0.1, mouth_weight=3.0, target=target, distill_weight=0.5
    )
    assert set(info) == {"truth", "distill", "lips"}
    want = (
        reconstruction_loss(y, x, l2=20.0, ms_ssim_weight=0.1)
        + 0.5 * reconstruction_loss(y, target, ms_ssim_weight=0.0)
        + 3.0 * masked_l1(y, x, mouth)
    )
    assert torch.allclose(full, want)
    assert (
        tiny_decoder_loss(x, x, mouth, mouth_weight=3.0)[1]["lips"] == 0
    )  # a perfect decode loses nothing at the lips


@pytest.mark.parametrize("causal", [False, True])
def test_clean_context_gets_history_corruption_only_when_asked(causal):
    """The teacher's motion latents (p_motion) and the causal model's context chunks are given at timestep 0; with
    history corruption (motion_corruption / history_corruption = 1) they carry a little noise, else they are x0."""
    from talkstream.train.stages import _dit_loss

    seen = {}

    def model(xt, t, text, audio, ref, **kw):
        seen.update(xt=xt, t=t)
        return torch.zeros_like(xt)

    x0 = torch.randn(4, 16, 6, 4, 4, generator=torch.Generator().manual_seed(0))
    batch = dict(
        x0=x0,
        audio=torch.zeros(4, 6, 16, 384),
        text=torch.zeros(4, 3, 384),
        ref=torch.zeros(4, 16, 1, 4, 4),
        mouth=torch.zeros(4, 6, 4, 4),
        text_mask=torch.ones(4, 3, dtype=torch.bool),
    )
    key = "history_corruption" if causal else "motion_corruption"
    for p in (0.0, 1.0):
        cfg = TrainConfig(
            stage="causal" if causal else "teacher", data="", p_motion=1.0, history_max_sigma=0.3, **{key: p}
        )
        for seed in range(8):  # the causal model gives clean context to half its samples: draw until some have it
            torch.manual_seed(seed)
            _dit_loss(cfg, causal)(model, batch)
            ctx = seen["t"] == 0
            if ctx.any():
                break
        assert ctx.any() and not ctx.all()
        moved = (seen["xt"] - x0).abs().amax(dim=(1, 3, 4))[ctx]  # per context latent
        assert (moved == 0).all() if p == 0 else (moved > 0).all(), (p, moved)


def test_lr_mult_gives_a_prefix_its_own_rate_and_rejects_a_name_that_matches_nothing(tmp_path):
    from talkstream.models.config import DiTConfig
    from talkstream.train.runner import Runner, param_groups

    model = WanDiT(DiTConfig.from_dict({**dit_config("tiny").to_dict(), "ref_concat": True}))
    groups = param_groups(model, {"ref_embedding": 10, "blocks.0": 0.5})
    by_mult = {g["lr_mult"]: g["params"] for g in groups}
    assert {id(p) for p in by_mult[10.0]} == {id(p) for p in model.ref_embedding.parameters()}
    assert {id(p) for p in by_mult[0.5]} == {id(p) for p in model.blocks[0].parameters()}
    assert sum(len(ps) for ps in by_mult.values()) == len(list(model.parameters()))
    with pytest.raises(ValueError, match="names no trainable parameter"):
        param_groups(model, {"ref_embeding": 10})

    # one optimiser step: the multiplied group moves at its rate (weight decay off, so AdamW's first step moves
    # each weight by lr x sign(grad) and the two rates read back exactly)
    cfg = TrainConfig(
        stage="teacher",
        data="x",
        out=str(tmp_path / "run"),
        lr=1e-3,
        warmup=0,
        weight_decay=0.0,
        ema=0,
        lr_mult={"ref_embedding": 10},
        steps=1,
    )
    x = torch.randn(1, model.cfg.in_dim, 1, 4, 4)

    def loss_fn(m, batch):
        return m.ref_embedding.weight.sum() + m.patch_embedding.weight.sum() + 100.0, {}  # > 0: a log-scale plot

    runner = Runner(cfg, model, loss_fn, lambda gen: x, "cpu")
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    runner.train()
    step_ref = (model.ref_embedding.weight - before["ref_embedding.weight"]).abs()
    step_main = (model.patch_embedding.weight - before["patch_embedding.weight"]).abs()
    assert torch.allclose(step_ref, torch.full_like(step_ref, 1e-2), rtol=1e-3)
    assert torch.allclose(step_main, torch.full_like(step_main, 1e-3), rtol=1e-3)


def test_time_budget_counts_the_whole_stage(tmp_path, capsys):
    """The seconds a stage spent before its first step (latents, lip reader, compile) come out of its time budget:
    a budget already spent trains no step and keeps the weights it started from; the rest trains as asked."""
    import time
    from dataclasses import replace

    from talkstream.train.runner import Runner

    model = torch.nn.Linear(2, 1)

    def loss_fn(m, batch):
        return (m(batch) ** 2).mean() + 1.0, {}

    x = torch.randn(4, 2)
    cfg = TrainConfig(stage="teacher", data="x", out=str(tmp_path / "spent"), steps=5, time_budget=60, ema=0, warmup=0)
    before = model.weight.detach().clone()
    runner = Runner(cfg, model, loss_fn, lambda gen: x, "cpu", started=time.perf_counter() - 61)
    runner.train()
    assert runner.step == 0 and torch.equal(model.weight, before)
    assert "61s spent before the first step, 0s to train" in capsys.readouterr().out
    assert (tmp_path / "spent" / "state.pt").exists()  # (saved, so `train export` can write it)
    runner = Runner(
        replace(cfg, out=str(tmp_path / "left")), model, loss_fn, lambda gen: x, "cpu", started=time.perf_counter() - 10
    )
    assert 49 < runner.loop_budget(time.perf_counter()) <= 50
    runner.train()
    assert runner.step == 5 and not torch.equal(model.weight, before)
