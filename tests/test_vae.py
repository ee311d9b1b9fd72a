import pytest
import torch

from talkstream.models.config import VAE_CONFIGS, TinyDecoderConfig, vae_config
from talkstream.models.losses import kl_divergence, ms_ssim, psnr, reconstruction_loss
from talkstream.models.vae import CausalVAE, FeatureCache, TinyDecoder


@pytest.mark.parametrize("name", sorted(VAE_CONFIGS))
def test_vae_shapes_and_compression(name):
    torch.manual_seed(0)
    v = CausalVAE(vae_config(name)).eval()
    s, tf = v.cfg.spatial_factor, v.cfg.temporal_factor
    x = torch.rand(1, 3, 1 + 2 * tf, 2 * s, 3 * s) * 2 - 1
    with torch.no_grad():
        z = v.encode(x)
        y = v.decode(z)
    assert z.shape == (1, v.cfg.latent_dim, 3, 2, 3) and y.shape == x.shape


def test_vae_chunked_equals_whole():
    torch.manual_seed(0)
    v = CausalVAE(vae_config("tiny")).eval()
    x = torch.rand(1, 3, 17, 32, 32) * 2 - 1
    with torch.no_grad():
        z = v.encode(x)
        c = FeatureCache()
        z_chunks = torch.cat([v.encode(x[:, :, :1], c), v.encode(x[:, :, 1:9], c), v.encode(x[:, :, 9:], c)], 2)
        y = v.decode(z)
        c = FeatureCache()
        y_chunks = torch.cat([v.decode(z[:, :, i : i + 2], c) for i in range(0, z.shape[2], 2)], 2)
    assert (z - z_chunks).abs().max() < 1e-5
    assert (y - y_chunks).abs().max() < 1e-5
    # causality: changing the last frames never changes earlier latents
    x2 = x.clone()
    x2[:, :, 13:] = 0
    with torch.no_grad():
        assert torch.equal(v.encode(x2)[:, :, :4], z[:, :, :4])


def test_vae_bad_inputs():
    v = CausalVAE(vae_config("tiny"))
    with pytest.raises(ValueError, match="1 \\+ 4m"):
        v.encode(torch.zeros(1, 3, 4, 16, 16))
    with pytest.raises(ValueError, match="multiples of 8"):
        v.encode(torch.zeros(1, 3, 5, 12, 16))
    with pytest.raises(ValueError, match="latents must be"):
        v.decode(torch.zeros(1, 3, 2, 2, 2))
    with pytest.raises(ValueError, match="temporal_down"):
        type(v.cfg)("bad", channel_mult=(1, 2), temporal_down=(True, True))


def test_tiny_decoder_chunked_equals_whole_and_is_small():
    torch.manual_seed(0)
    d = TinyDecoder(TinyDecoderConfig(latent_dim=8, channels=32)).eval()
    z = torch.randn(1, 8, 5, 4, 4)
    with torch.no_grad():
        y = d(z)
        c = FeatureCache()
        yc = torch.cat([d(z[:, :, :1], c), d(z[:, :, 1:4], c), d(z[:, :, 4:], c)], 2)
    assert y.shape == (1, 3, 17, 32, 32) and (y - yc).abs().max() < 1e-6
    assert sum(p.numel() for p in TinyDecoder(TinyDecoderConfig()).parameters()) < 5e6


def test_ms_ssim_is_float32_under_autocast():
    x = torch.rand(2, 3, 64, 64)
    y = (x + 0.05 * torch.randn_like(x)).clamp(0, 1)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        inside = ms_ssim(x, y)
    assert inside.dtype == torch.float32 and torch.allclose(inside, ms_ssim(x, y))


def test_losses():
    x = torch.rand(2, 3, 3, 64, 64) * 2 - 1
    assert reconstruction_loss(x, x) < 1e-5
    noisy = (x + 0.3 * torch.randn_like(x)).clamp(-1, 1)
    assert reconstruction_loss(x, noisy) > 0.1
    frames = x.transpose(1, 2).flatten(0, 1)
    assert torch.allclose(ms_ssim(frames, frames), torch.ones(6), atol=1e-5)
    assert (ms_ssim(frames, noisy.transpose(1, 2).flatten(0, 1)) < 0.9).all()
    assert kl_divergence(torch.zeros(3), torch.zeros(3)) == 0
    assert psnr(x, x + 0.02) > 39


def test_temporal_receptive_field_is_bounded():
    """With per-frame convolutions outside the latent rate, a latent reaches only receptive_latents() of output."""
    cfg = vae_config("tiny")
    v = CausalVAE(cfg).eval()
    z = torch.randn(1, cfg.latent_dim, 8, 4, 4)
    z2 = z.clone()
    z2[:, :, 1] += 1.0
    with torch.no_grad():
        d = (v.decode(z2) - v.decode(z)).abs().amax(dim=(0, 1, 3, 4))  # per output frame
    tf, r = cfg.temporal_factor, cfg.receptive_latents()
    touched = (d > 0).nonzero().flatten()
    assert touched.min() == 1 and touched.max() == tf * (r - 1) + tf  # latent 1 -> frames 1..4, then r-1 latents on
    assert d[0] == 0


@pytest.mark.parametrize("k,stride,pad", [(1, 1, 1), (2, 1, 1), (3, 1, 1), (2, 2, 0)])
def test_conv3d_as_2d_equals_conv3d(k, stride, pad):
    from talkstream.models.vae import conv3d_as_2d

    g = torch.Generator().manual_seed(0)
    x, w, b = torch.randn(2, 5, 9, 8, 8, generator=g), torch.randn(7, 5, k, 3, 3, generator=g), torch.randn(7)
    ref = torch.nn.functional.conv3d(x, w, b, stride=(stride, 1, 1), padding=(0, pad, pad))
    torch.testing.assert_close(conv3d_as_2d(x, w, b, stride, pad), ref, atol=1e-4, rtol=1e-4)
