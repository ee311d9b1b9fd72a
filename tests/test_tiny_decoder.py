"""The tiny decoder's lips terms, its CPU training script on a small cache, and the ceiling script's stream decode."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from talkstream.models.checkpoint import load_checkpoint, save_checkpoint
from talkstream.models.config import TinyDecoderConfig
from talkstream.models.vae import TinyDecoder
from talkstream.train.stages import tiny_decoder_loss

ROOT = Path(__file__).resolve().parents[1]


def _script(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "experiments" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod
    spec.loader.exec_module(mod)
    return mod


def _moving_lips(T: int = 5, size: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    x = torch.rand(2, 3, T, size, size, generator=g) * 2 - 1
    mouth = torch.zeros(2, 1, T, size, size)
    mouth[..., 4:12, 4:12] = 1.0
    return x, mouth


def test_lips_motion_term_sees_frozen_lips_not_a_constant_offset():
    x, mouth = _moving_lips()
    shifted = (x + 0.2).clamp(-5, 5)  # the same frame-to-frame change everywhere
    _, info = tiny_decoder_loss(shifted, x, mouth, ms_ssim_weight=0.0, mouth_weight=12.0, motion_weight=12.0)
    assert info["lips"] == pytest.approx(0.2, rel=1e-4)
    assert info["lips_motion"] == pytest.approx(0.0, abs=1e-6)
    frozen = x[:, :, :1].expand_as(x).clone()  # lips that never move
    loss, info = tiny_decoder_loss(frozen, x, mouth, ms_ssim_weight=0.0, mouth_weight=12.0, motion_weight=12.0)
    assert info["lips_motion"] > 0.3
    plain, _ = tiny_decoder_loss(frozen, x, mouth, ms_ssim_weight=0.0, mouth_weight=12.0)
    assert float(loss - plain) == pytest.approx(12.0 * float(info["lips_motion"]), rel=1e-4)
    with pytest.raises(ValueError, match="mouth"):
        tiny_decoder_loss(frozen, x, None, motion_weight=1.0)


def test_lips_map_peaks_at_each_frames_mouth():
    mod = _script("tiny_decoder_cpu")
    mouths = torch.tensor([[[10.5, 20.5], [30.5, 5.5]]])  # [B=1, F=2, (x, y)]
    m = mod.lips_map(mouths, 40)
    assert m.shape == (1, 1, 2, 40, 40)
    for f, (cx, cy) in enumerate([(10, 20), (30, 5)]):
        assert tuple(int(v) for v in np.unravel_index(int(m[0, 0, f].argmax()), (40, 40))) == (cy, cx)
        assert float(m[0, 0, f].max()) == pytest.approx(1.0)


def _synthetic_cache(d: Path, shards: int = 3, n: int = 4, F: int = 5, c: int = 32) -> None:
    rng = np.random.default_rng(0)
    d.mkdir(parents=True)
    for s in range(shards):
        x = rng.integers(0, 256, (n, F, c, c, 3), dtype=np.uint8)
        np.savez(
            d / f"shard_{s:04d}.npz",
            x=x,
            target=x // 2 + 60,
            z=rng.standard_normal((n, 16, 1 + (F - 1) // 4, c // 8, c // 8)).astype(np.float16),
            mouth=np.full((n, F, 2), c / 2, np.float32),
            sigma=np.array([0.0, 0.1] * (n // 2)),
            clip=np.arange(n),
        )


def test_cpu_training_moves_the_weights_and_writes_a_loadable_decoder(tmp_path):
    mod = _script("tiny_decoder_cpu")
    _synthetic_cache(tmp_path / "cache")
    torch.manual_seed(0)
    init = TinyDecoder(TinyDecoderConfig(channels=(16, 12, 8)))
    save_checkpoint(tmp_path / "init.safetensors", init, "tiny_decoder", init.cfg)
    out = tmp_path / "run"
    argv = [
        "tiny_decoder_cpu.py",
        "train",
        "--dir",
        str(tmp_path / "cache"),
        "--init",
        str(tmp_path / "init.safetensors"),
    ]
    argv += ["--out", str(out), "--steps", "4", "--batch", "2", "--distill", "1", "--noisy", "--eval-every", "2"]
    argv += ["--ema", "0.5", "--lr", "1e-2"]
    old = sys.argv
    sys.argv = argv
    try:
        mod.main()
    finally:
        sys.argv = old
    dec = load_checkpoint(out / "tiny_decoder.safetensors", dtype=torch.float32)
    assert isinstance(dec, TinyDecoder) and dec.cfg.channels == (16, 12, 8)
    with torch.no_grad():
        moved = sum(float((a - b).abs().sum()) for a, b in zip(dec.parameters(), init.parameters()))
    assert moved > 0
    rows = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    assert "held_out" in rows[1] and "vae_lips" in rows[1]["held_out"] and "truth_lips_motion" in rows[0]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 4 and summary["config"]["distill"] == 1.0


def test_cpu_training_refuses_an_empty_cache(tmp_path):
    mod = _script("tiny_decoder_cpu")
    (tmp_path / "cache").mkdir()
    sys_argv, sys.argv = sys.argv, ["x", "train", "--dir", str(tmp_path / "cache")]
    try:
        with pytest.raises(SystemExit, match="0 shards"):
            mod.main()
    finally:
        sys.argv = sys_argv


def test_ceiling_decode_of_recorded_chunks_equals_the_streamed_frames(tiny_weights):
    """The ceiling script records the latent chunks a stream hands its decoder; decoding them again chunk by chunk
    gives the stream's own frames (so the VAE / tiny comparison is on exactly what the product decodes)."""
    from talkstream.stream.avatar import Avatar

    mod = _script("tiny_decoder_ceiling")
    torch.manual_seed(0)
    base = Avatar.from_pretrained(tiny_weights, dtype="fp32")
    vae_as_module = _VAEModule(base.vae)
    rec = mod._Recorder(vae_as_module)
    avatar = Avatar(base.dit, base.vae, rec, base.cfg)
    ref = np.random.default_rng(1).integers(0, 256, (256, 256, 3), dtype=np.uint8)
    n = 13
    feats = np.random.default_rng(0).standard_normal((2 * n + 40, 384)).astype(np.float32)
    frames = np.stack(list(avatar.from_features(ref, feats, n)))
    assert len(rec.chunks) >= 2
    again = mod.decode_chunks(vae_as_module, rec.chunks, n)
    np.testing.assert_array_equal(again, frames)


class _VAEModule(torch.nn.Module):
    """The VAE's decoder called the way the engine calls a tiny decoder (``dec(z, cache)``)."""

    def __init__(self, vae) -> None:
        super().__init__()
        self.vae = vae

    def forward(self, z, cache=None):
        return self.vae.decode(z, cache)


def test_decoder_stage_trains_with_lips_motion_and_noised_latents(tmp_path):
    """The stage's GPU recipe (configs/decoder_lips.yaml): lips + lips-motion terms, distillation of the VAE
    decoder's frames for latents with noise added; a bad combination is a one-line error."""
    from talkstream.models.config import vae_config
    from talkstream.models.vae import CausalVAE
    from talkstream.train.config import TrainConfig
    from talkstream.train.data import make_pack
    from talkstream.train.stages import run_stage

    pack = make_pack(tmp_path / "pack.npz", clips=4, seconds=1.2, seed=5, progress=False)
    torch.manual_seed(0)
    vae = CausalVAE(vae_config("tiny"))
    save_checkpoint(tmp_path / "vae.safetensors", vae, "vae", vae.cfg)
    extra = dict(channels=16, crop=32, mouth_weight=12.0, motion_weight=12.0, distill=1.0, latent_noise=0.3)
    base = dict(stage="decoder", data=str(pack), vae=str(tmp_path / "vae.safetensors"), model="tiny", steps=2)
    base.update(batch=2, size=64, frames=9, workers=1, ckpt_every=100, warmup=1, log_every=1, look_back=0, look_ahead=0)
    m = run_stage(TrainConfig(**base, out=str(tmp_path / "dec"), extra=extra))
    assert "tiny_psnr_db" in m and m["train"]["step"] == 2
    log = [json.loads(x) for x in (tmp_path / "dec" / "log.jsonl").read_text().splitlines()]
    assert log[-1]["lips_motion"] > 0 and log[-1]["distill"] > 0
    for bad, msg in ((dict(latent_noise=0.3, distill=0.0), "latent_noise"), (dict(motion_weight=1.0), "mouth_weight")):
        with pytest.raises(ValueError, match=msg):
            run_stage(TrainConfig(**base, out=str(tmp_path / "bad"), extra=dict(channels=16, crop=32, **bad)))


def test_refit_of_the_last_convolution_recovers_it_from_its_own_frames(tmp_path):
    """The closed-form refit's layout (features, pixel shuffle, frames per latent): fitted to a decoder's own frames
    it gives back that decoder's last convolution (to the frames' uint8 rounding)."""
    mod = _script("tiny_decoder_cpu")
    torch.manual_seed(0)
    dec = TinyDecoder(TinyDecoderConfig(channels=(16, 12, 8))).eval()
    with torch.no_grad():
        dec.conv_out.weight.mul_(8.0)  # frames well above the uint8 step
    save_checkpoint(tmp_path / "init.safetensors", dec, "tiny_decoder", dec.cfg)
    _synthetic_cache(tmp_path / "cache", shards=3, n=4, F=9, c=32)
    for p in sorted((tmp_path / "cache").glob("*.npz")):
        d = dict(np.load(p))
        with torch.no_grad():
            y = dec(torch.from_numpy(d["z"]).float()).clamp(-1, 1)
        d["target"] = ((y.permute(0, 2, 3, 4, 1) + 1) * 127.5).round().byte().numpy()
        np.savez(p, **d)
    old = sys.argv
    sys.argv = ["x", "refit", "--dir", str(tmp_path / "cache"), "--init", str(tmp_path / "init.safetensors")]
    sys.argv += ["--out", str(tmp_path / "fit"), "--distill", "1", "--ridge", "1e-6", "--batch", "4"]
    try:
        mod.main()
    finally:
        sys.argv = old
    fit = load_checkpoint(tmp_path / "fit" / "tiny_decoder.safetensors", dtype=torch.float32)
    w0, w1 = dec.conv_out.weight.detach().flatten(), fit.conv_out.weight.detach().flatten()
    assert float(torch.corrcoef(torch.stack([w0, w1]))[0, 1]) > 0.99
    scrambled = TinyDecoder(dec.cfg)  # another network's last layer does not fit these frames
    assert float(torch.corrcoef(torch.stack([scrambled.conv_out.weight.detach().flatten(), w1]))[0, 1]) < 0.5
