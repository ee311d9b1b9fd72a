"""The Wan2.1 VAE: parity with diffusers' AutoencoderKLWan, streaming == whole, the released key layouts."""

import pytest
import torch

from talkstream.models.vae import FeatureCache
from talkstream.models.wan_vae import (
    WAN21_LATENT_MEAN,
    WAN21_LATENT_STD,
    WanVAE,
    WanVAEConfig,
    WanVAEError,
    diffusers_to_wan_vae,
    load_wan_vae,
    load_wan_vae_state,
    wan_vae_to_diffusers,
)

diffusers = pytest.importorskip("diffusers")
from diffusers import AutoencoderKLWan  # noqa: E402

SMALL = dict(base_dim=16)  # Wan2.1's exact layout (the same 194 key names) at a sixth of its width
SMALL_CFG = WanVAEConfig(dim=16)


def _pair(seed: int = 0, **cfg):
    torch.manual_seed(seed)
    ref = AutoencoderKLWan(**cfg).eval()
    ours = WanVAE(WanVAEConfig.from_diffusers(dict(ref.config))).eval()
    load_wan_vae_state(ours, ref.state_dict(), "diffusers model")
    return ref, ours


def _ref_decode(ref, z: torch.Tensor) -> torch.Tensor:
    """diffusers' own latent-by-latent loop (AutoencoderKLWan._decode) without its final clamp."""
    ref.clear_cache()
    x, out = ref.post_quant_conv(z), []
    for i in range(z.shape[2]):
        ref._conv_idx = [0]
        kw = dict(feat_cache=ref._feat_map, feat_idx=ref._conv_idx, first_chunk=i == 0)
        out.append(ref.decoder(x[:, :, i : i + 1], **kw))
    ref.clear_cache()
    return torch.cat(out, 2)


@torch.no_grad()
def test_parity_with_diffusers_reduced_width():
    ref, ours = _pair(**SMALL)
    x = torch.rand(1, 3, 9, 16, 24, generator=torch.Generator().manual_seed(1)) * 2 - 1
    mu_ref = ref.encode(x).latent_dist.mode()
    mu = ours.encode(x, normalize=False)
    assert mu.shape == (1, 16, 3, 2, 3)
    assert mu.std() > 0.05  # not a degenerate signal
    assert (mu - mu_ref).abs().max() <= 1e-4
    z = torch.randn(1, 16, 4, 2, 3, generator=torch.Generator().manual_seed(2))
    y_ref = _ref_decode(ref, z)
    y = ours.decode(z, normalized=False, clamp=False)
    assert y.shape == (1, 3, 13, 16, 24) == y_ref.shape
    assert y.std() > 0.05 and (y.abs() < 1).float().mean() > 0.9  # the comparison is not of clamped values
    assert (y - y_ref).abs().max() <= 1e-4
    # the public decode (clamped, as diffusers' decode is)
    assert (ours.decode(z, normalized=False) - ref.decode(z).sample).abs().max() <= 1e-4


@pytest.mark.slow
@torch.no_grad()
def test_parity_with_diffusers_real_config_small_input():
    ref, ours = _pair()  # Wan2.1's released shape: dim 96, 127M parameters
    assert sum(p.numel() for p in ours.parameters()) == sum(p.numel() for p in ref.parameters())
    x = torch.rand(1, 3, 5, 16, 16, generator=torch.Generator().manual_seed(1)) * 2 - 1
    assert (ours.encode(x, normalize=False) - ref.encode(x).latent_dist.mode()).abs().max() <= 1e-4
    z = torch.randn(1, 16, 3, 2, 2, generator=torch.Generator().manual_seed(2))
    y = ours.decode(z, normalized=False, clamp=False)
    assert y.shape == (1, 3, 9, 16, 16)
    assert (y - _ref_decode(ref, z)).abs().max() <= 1e-4


@torch.no_grad()
def test_chunked_decode_and_encode_equal_whole():
    torch.manual_seed(0)
    vae = WanVAE(SMALL_CFG).eval()
    z = torch.randn(1, 16, 6, 2, 2)
    whole = vae.decode(z, clamp=False)
    assert whole.shape[2] == 1 + 4 * 5
    for cuts in ([1, 1, 1, 1, 1, 1], [2, 1, 3], [3, 3]):
        cache, parts, i = FeatureCache(), [], 0
        for n in cuts:
            parts.append(vae.decode(z[:, :, i : i + n], cache, clamp=False))
            assert parts[-1].shape[2] == (1 + 4 * (n - 1) if i == 0 else 4 * n)
            i += n
        assert (torch.cat(parts, 2) - whole).abs().max() <= 1e-5, cuts
    # the GPU path (3D convolutions as 2D ones over stacked frames) computes the same thing
    assert (vae.set_conv_mode(True).decode(z, clamp=False) - whole).abs().max() <= 1e-5
    vae.set_conv_mode(False)
    x = torch.rand(1, 3, 13, 16, 16) * 2 - 1
    mu = vae.encode(x)
    assert (vae.set_conv_mode(True).encode(x) - mu).abs().max() <= 1e-5
    vae.set_conv_mode(False)
    for cuts in ([1, 4, 4, 4], [5, 8]):
        cache, parts, i = FeatureCache(), [], 0
        for n in cuts:
            parts.append(vae.encode(x[:, :, i : i + n], cache))
            i += n
        assert (torch.cat(parts, 2) - mu).abs().max() <= 1e-5, cuts


@torch.no_grad()
def test_latent_normalisation_is_wans():
    torch.manual_seed(0)
    vae = WanVAE(SMALL_CFG).eval()
    x = torch.rand(1, 3, 5, 16, 16) * 2 - 1
    raw = vae.encode(x, normalize=False)
    mean = torch.tensor(WAN21_LATENT_MEAN).view(1, -1, 1, 1, 1)
    std = torch.tensor(WAN21_LATENT_STD).view(1, -1, 1, 1, 1)
    assert torch.allclose(vae.encode(x), (raw - mean) * (1.0 / std), atol=1e-5)  # Wan: (mu - mean) * (1 / std)
    assert torch.allclose(vae.decode(vae.normalize(raw)), vae.decode(raw, normalized=False), atol=1e-5)
    assert vae.decode(raw, normalized=False).abs().max() <= 1.0  # clamped to [-1, 1] as Wan's decode


# Wan2.1's wan/modules/vae.py builds WanVAE_ from nn.Sequential lists; Wan2.1_VAE.pth is that module's state dict.
# A few of its names and shapes at the released config, read off the code (dims 96/192/384/384, z_dim 16):
ORIGINAL_KEYS = {
    "encoder.conv1.weight": (96, 3, 3, 3, 3),
    "encoder.downsamples.0.residual.0.gamma": (96, 1, 1, 1),
    "encoder.downsamples.2.resample.1.weight": (96, 96, 3, 3),  # downsample2d: ZeroPad2d, Conv2d
    "encoder.downsamples.3.shortcut.weight": (192, 96, 1, 1, 1),
    "encoder.downsamples.5.time_conv.weight": (192, 192, 3, 1, 1),  # downsample3d
    "encoder.middle.1.to_qkv.weight": (1152, 384, 1, 1),
    "encoder.middle.1.norm.gamma": (384, 1, 1),
    "encoder.head.0.gamma": (384, 1, 1, 1),
    "encoder.head.2.weight": (32, 384, 3, 3, 3),
    "conv1.weight": (32, 32, 1, 1, 1),
    "conv2.weight": (16, 16, 1, 1, 1),
    "decoder.conv1.weight": (384, 16, 3, 3, 3),
    "decoder.upsamples.3.time_conv.weight": (768, 384, 3, 1, 1),  # upsample3d doubles channels -> 2 frames
    "decoder.upsamples.3.resample.1.weight": (192, 384, 3, 3),  # and halves them spatially
    "decoder.upsamples.4.residual.2.weight": (384, 192, 3, 3, 3),
    "decoder.upsamples.4.shortcut.weight": (384, 192, 1, 1, 1),
    "decoder.upsamples.11.resample.1.weight": (96, 192, 3, 3),  # upsample2d
    "decoder.upsamples.14.residual.6.weight": (96, 96, 3, 3, 3),
    "decoder.head.2.weight": (3, 96, 3, 3, 3),
}


def test_original_key_layout_maps_one_to_one():
    from diffusers.loaders.single_file_utils import convert_wan_vae_to_diffusers

    with torch.device("meta"):
        ours = WanVAE()
        ref = AutoencoderKLWan()
    sd = ours.state_dict()
    assert len(sd) == 194
    for k, shape in ORIGINAL_KEYS.items():
        assert tuple(sd[k].shape) == shape, k
    # diffusers' converter, written against the released Wan2.1_VAE.pth, maps our names exactly as we do
    theirs = convert_wan_vae_to_diffusers(dict(sd))
    mine = wan_vae_to_diffusers(sd)
    assert set(theirs) == set(mine) == set(ref.state_dict())
    assert all(tuple(mine[k].shape) == tuple(ref.state_dict()[k].shape) for k in mine)
    back = diffusers_to_wan_vae(mine)
    assert list(back) == list(sd)  # 1:1 both ways, nothing merged or dropped


@torch.no_grad()
def test_original_pth_and_diffusers_folder_load(tmp_path):
    from diffusers.loaders.single_file_utils import convert_wan_vae_to_diffusers

    torch.manual_seed(0)
    src = WanVAE(SMALL_CFG).eval()
    sd = {k: torch.randn_like(v) * 0.1 + (1 if k.endswith("gamma") else 0) for k, v in src.state_dict().items()}
    src.load_state_dict(sd)
    # an original-layout .pth (as Wan2.1_VAE.pth is: a plain state dict)
    torch.save(sd, tmp_path / "Wan2.1_VAE.pth")
    # a diffusers folder, written by diffusers from the same weights converted by diffusers' own converter
    ref = AutoencoderKLWan(**SMALL).eval()
    ref.load_state_dict(convert_wan_vae_to_diffusers(dict(sd)))
    ref.save_pretrained(tmp_path / "vae")
    z = torch.randn(1, 16, 3, 2, 2)
    want = src.decode(z)
    # the .pth carries no config: a reduced width must be told; the real one is the default
    with pytest.raises(WanVAEError, match="does not fit the Wan2.1 VAE"):
        load_wan_vae(tmp_path / "Wan2.1_VAE.pth")
    m = WanVAE(SMALL_CFG)
    load_wan_vae_state(m, torch.load(tmp_path / "Wan2.1_VAE.pth"))
    assert (m.eval().decode(z) - want).abs().max() <= 1e-6
    folder = load_wan_vae(tmp_path / "vae")
    assert folder.cfg.dim == 16
    assert (folder.decode(z) - want).abs().max() <= 1e-5
    assert (folder.decode(z) - ref.decode(folder.denormalize(z)).sample).abs().max() <= 1e-4


def test_clear_errors():
    vae = WanVAE(SMALL_CFG)
    sd = vae.state_dict()
    del sd["decoder.head.2.weight"]
    with pytest.raises(WanVAEError, match=r"missing 1: \['decoder.head.2.weight'\]"):
        load_wan_vae_state(vae, sd)
    with pytest.raises(WanVAEError, match="not a Wan2.1 VAE state dict"):
        load_wan_vae_state(vae, {"blocks.0.self_attn.q.weight": torch.zeros(2)})
    with pytest.raises(WanVAEError, match="no such file"):
        load_wan_vae("/nonexistent/Wan2.1_VAE.pth")
    with pytest.raises(WanVAEError, match="1 \\+ 4m frames"):
        vae.encode(torch.zeros(1, 3, 4, 16, 16))
    with pytest.raises(WanVAEError, match="multiples of 8"):
        vae.encode(torch.zeros(1, 3, 1, 12, 16))
    with pytest.raises(WanVAEError, match="latents must be"):
        vae.decode(torch.zeros(1, 8, 1, 2, 2))


def test_bench_decoders_runs_and_reports():
    """The GPU benchmark's function, run small on the CPU in both dtypes it uses (numbers measured, not checked)."""
    from talkstream.models.wan_vae import bench_decoders

    for dtype in (torch.float32, torch.bfloat16):
        res = bench_decoders("cpu", size=16, latents=2, dtype=dtype, repeats=1, warmup=False, vae=WanVAE(SMALL_CFG))
        assert res["dtype"] == str(dtype).removeprefix("torch.")
        for name in ("wan_vae", "taehv"):
            assert res[name]["frames_per_chunk"] == 8  # 2 latents after the first: 4 frames each
            assert res[name]["per_frame_ms"] > 0 and res[name]["per_frame_cpu_ms"] > 0
        assert res["taehv_speedup"] > 0
