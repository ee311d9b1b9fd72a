import json

import pytest
import torch
from safetensors.torch import save_file

from talkstream.models.checkpoint import (
    CheckpointError,
    deepen_dit_state,
    diffusers_to_wan,
    load_checkpoint,
    load_dit_weights,
    normalize_dit_state_dict,
    read_state_dict,
    save_checkpoint,
    wan_to_diffusers,
)
from talkstream.models.config import DiTConfig, TinyDecoderConfig, dit_config, vae_config
from talkstream.models.dit import WanDiT
from talkstream.models.vae import CausalVAE, TinyDecoder


def _diffusers_wan(**kw):
    from diffusers import WanTransformer3DModel

    args = dict(
        patch_size=(1, 2, 2),
        num_attention_heads=12,
        attention_head_dim=128,
        in_channels=16,
        out_channels=16,
        text_dim=4096,
        freq_dim=256,
        ffn_dim=8960,
        num_layers=30,
        cross_attn_norm=True,
        qk_norm="rms_norm_across_heads",
        eps=1e-6,
    )
    args.update(kw)
    return WanTransformer3DModel(**args)


def test_diffusers_wan13b_every_key_maps_and_shapes_agree():
    with torch.device("meta"):
        ref = _diffusers_wan()
        ours = WanDiT(dit_config("wan1.3b"))
    dsd, osd = ref.state_dict(), ours.state_dict()
    mapped = diffusers_to_wan(dsd)
    assert set(mapped) <= set(osd)
    assert all(mapped[k].shape == osd[k].shape for k in mapped)
    assert set(osd) - set(mapped) == {k for k in osd if "audio" in k}  # only our additions are new
    assert set(wan_to_diffusers(mapped)) == set(dsd)


def test_diffusers_model_output_is_reproduced_exactly():
    torch.manual_seed(0)
    ref = _diffusers_wan(
        num_attention_heads=2,
        attention_head_dim=24,
        in_channels=4,
        out_channels=4,
        text_dim=32,
        freq_dim=16,
        ffn_dim=64,
        num_layers=2,
    ).eval()
    with torch.no_grad():
        for p in ref.parameters():
            p.normal_(0, 0.1)
    cfg = DiTConfig("x", dim=48, num_layers=2, num_heads=2, ffn_dim=64, in_dim=4, out_dim=4, text_dim=32, freq_dim=16)
    ours = WanDiT(cfg).eval()
    info = load_dit_weights(ours, normalize_dit_state_dict(ref.state_dict()))
    assert info["missing_additions"]  # the audio adapter, left at zero
    x, ctx, t = torch.randn(1, 4, 3, 8, 6), torch.randn(1, 7, 32), torch.tensor([637.0])
    with torch.no_grad():
        a = ref(x, t, ctx, return_dict=False)[0]
        b = ours(x, t, ctx)
    assert (a - b).abs().max() < 1e-5


def test_original_wan_selfforcing_and_sharded_files(tmp_path):
    torch.manual_seed(0)
    m = WanDiT(dit_config("tiny"))
    base = {k: v for k, v in m.state_dict().items() if "audio" not in k}
    save_file(base, str(tmp_path / "wan.safetensors"))  # original Wan layout
    torch.save(
        {
            "generator": {f"model.{k}": v for k, v in base.items()},
            "generator_ema": {f"model._fsdp_wrapped_module.{k}": v * 0 + 1 for k, v in base.items()},
        },
        tmp_path / "selfforcing.pt",
    )
    keys = sorted(base)
    save_file({k: base[k] for k in keys[: len(keys) // 2]}, str(tmp_path / "m-00001-of-00002.safetensors"))
    save_file({k: base[k] for k in keys[len(keys) // 2 :]}, str(tmp_path / "m-00002-of-00002.safetensors"))
    (tmp_path / "m.safetensors.index.json").write_text(
        json.dumps(
            {"weight_map": {k: f"m-0000{1 + (i >= len(keys) // 2)}-of-00002.safetensors" for i, k in enumerate(keys)}}
        )
    )
    for name, ema, expect_ones in (
        ("wan.safetensors", True, False),
        ("selfforcing.pt", True, True),
        ("selfforcing.pt", False, False),
        ("m.safetensors.index.json", True, False),
    ):
        sd, _ = read_state_dict(tmp_path / name, ema=ema)
        fresh = WanDiT(dit_config("tiny"))
        load_dit_weights(fresh, normalize_dit_state_dict(sd))
        w = fresh.blocks[0].self_attn.q.weight
        assert torch.equal(w, torch.ones_like(w)) if expect_ones else torch.equal(w, m.blocks[0].self_attn.q.weight)


def test_own_checkpoints_round_trip_and_shard(tmp_path):
    torch.manual_seed(0)
    m = WanDiT(dit_config("tiny"))
    files = save_checkpoint(tmp_path / "dit.safetensors", m, "dit", m.cfg, extra={"steps": 3})
    assert files == [tmp_path / "dit.safetensors"]
    back = load_checkpoint(tmp_path / "dit.safetensors")
    assert back.cfg == m.cfg and back.checkpoint_info == {"steps": 3}
    assert all(torch.equal(a, b) for a, b in zip(m.state_dict().values(), back.state_dict().values()))
    files = save_checkpoint(tmp_path / "big.safetensors", m, "dit", m.cfg, max_shard_bytes=100_000)
    assert len(files) > 2 and all(f.stat().st_size < 16 * 2**20 for f in files)
    back = load_checkpoint(tmp_path / "big.safetensors")
    assert all(torch.equal(a, b) for a, b in zip(m.state_dict().values(), back.state_dict().values()))
    v = CausalVAE(vae_config("tiny"))
    save_checkpoint(tmp_path / "vae.safetensors", v, "vae", v.cfg)
    assert isinstance(load_checkpoint(tmp_path / "vae.safetensors"), CausalVAE)
    d = TinyDecoder(TinyDecoderConfig(latent_dim=8, channels=16))
    save_checkpoint(tmp_path / "td.safetensors", d, "tiny_decoder", d.cfg)
    assert isinstance(load_checkpoint(tmp_path / "td.safetensors"), TinyDecoder)


def test_checkpoint_errors_name_what_mismatched(tmp_path):
    small = WanDiT(DiTConfig.from_dict({**dit_config("tiny").to_dict(), "dim": 32, "num_heads": 2}))
    with pytest.raises(CheckpointError, match=r"shape mismatch: .*\(32"):
        load_dit_weights(WanDiT(dit_config("tiny")), small.state_dict())
    save_checkpoint(tmp_path / "ok.safetensors", small, "dit", small.cfg)
    data = (tmp_path / "ok.safetensors").read_bytes()
    (tmp_path / "trunc.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated or corrupted"):
        load_checkpoint(tmp_path / "trunc.safetensors")
    (tmp_path / "junk.safetensors").write_bytes(b"\x00" * 10)
    with pytest.raises(CheckpointError, match="trunc|corrupted"):
        read_state_dict(tmp_path / "junk.safetensors")
    with pytest.raises(CheckpointError, match="no such checkpoint"):
        read_state_dict(tmp_path / "missing.safetensors")
    with pytest.raises(CheckpointError, match="not a Wan DiT"):
        normalize_dit_state_dict({"foo.weight": torch.zeros(1)})
    save_file({"x": torch.zeros(1)}, str(tmp_path / "plain.safetensors"))
    with pytest.raises(CheckpointError, match="not a talkstream checkpoint"):
        load_checkpoint(tmp_path / "plain.safetensors")


def test_a_deepened_dit_computes_what_the_shallow_one_did():
    """Depth growth: blocks 2 -> 4 (each followed by a copy whose outputs are zero) leaves the function as it was,
    and the copies train (their outputs get gradients)."""
    torch.manual_seed(0)
    cfg = dit_config("tiny")
    small = WanDiT(cfg).eval()
    with torch.no_grad():
        for p in small.parameters():
            p.normal_(0, 0.1)
    deep = WanDiT(DiTConfig.from_dict({**cfg.to_dict(), "num_layers": 4})).eval()
    load_dit_weights(deep, deepen_dit_state(small.state_dict(), 4))
    x, t = torch.randn(1, cfg.in_dim, 2, 8, 8), torch.tensor([[500.0, 500.0]])
    text, audio = torch.randn(1, 5, 384), torch.randn(1, 2, cfg.audio_tokens_per_frame, 384)
    want = small(x, t, text, audio)
    got = deep(x, t, text, audio)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert not torch.equal(small(x, t, text, torch.zeros_like(audio)), want)  # (the audio path is live)
    assert torch.equal(deep.blocks[2].ffn[0].weight, small.blocks[1].ffn[0].weight)
    assert not deep.blocks[3].self_attn.o.weight.any() and deep.blocks[3].self_attn.q.weight.any()
    got.square().sum().backward()
    assert deep.blocks[3].ffn[2].weight.grad.abs().sum() > 0
    with pytest.raises(CheckpointError, match="multiple of 2"):
        deepen_dit_state(small.state_dict(), 3)
    with pytest.raises(CheckpointError, match="no blocks"):
        deepen_dit_state({"head.head.weight": torch.zeros(1)}, 4)
