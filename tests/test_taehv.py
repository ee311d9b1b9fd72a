"""The TAEHV tiny autoencoder for Wan2.1 latents: the taew2_1 key layout, shapes, streaming == whole."""

import pytest
import torch
import torch.nn.functional as F

from talkstream.models.taehv import TAEHV, MemBlock, TAEHVError, TGrow, TPool, load_taehv, load_taehv_state
from talkstream.models.vae import FeatureCache


def _mem(i: int, c: int) -> dict:
    """A memory block's parameters: conv(2c -> c), ReLU, conv, ReLU, conv (no skip weight when widths agree)."""
    return {
        f"{i}.conv.0.weight": (c, 2 * c, 3, 3),
        f"{i}.conv.0.bias": (c,),
        f"{i}.conv.2.weight": (c, c, 3, 3),
        f"{i}.conv.2.bias": (c,),
        f"{i}.conv.4.weight": (c, c, 3, 3),
        f"{i}.conv.4.bias": (c,),
    }


# taehv.py's nn.Sequential for taew2_1 (16 latent channels, patch size 1), written out index by index
TAEW2_1 = {
    **{f"encoder.{k}": v for k, v in {"0.weight": (64, 3, 3, 3), "0.bias": (64,)}.items()},
    "encoder.2.conv.weight": (64, 128, 1, 1),  # TPool stride 2
    "encoder.3.weight": (64, 64, 3, 3),
    **{f"encoder.{k}": v for i in (4, 5, 6) for k, v in _mem(i, 64).items()},
    "encoder.7.conv.weight": (64, 128, 1, 1),  # TPool stride 2
    "encoder.8.weight": (64, 64, 3, 3),
    **{f"encoder.{k}": v for i in (9, 10, 11) for k, v in _mem(i, 64).items()},
    "encoder.12.conv.weight": (64, 64, 1, 1),  # TPool stride 1
    "encoder.13.weight": (64, 64, 3, 3),
    **{f"encoder.{k}": v for i in (14, 15, 16) for k, v in _mem(i, 64).items()},
    "encoder.17.weight": (16, 64, 3, 3),
    "encoder.17.bias": (16,),
    "decoder.1.weight": (256, 16, 3, 3),
    "decoder.1.bias": (256,),
    **{f"decoder.{k}": v for i in (3, 4, 5) for k, v in _mem(i, 256).items()},
    "decoder.7.conv.weight": (256, 256, 1, 1),  # TGrow stride 1
    "decoder.8.weight": (128, 256, 3, 3),
    **{f"decoder.{k}": v for i in (9, 10, 11) for k, v in _mem(i, 128).items()},
    "decoder.13.conv.weight": (256, 128, 1, 1),  # TGrow stride 2
    "decoder.14.weight": (64, 128, 3, 3),
    **{f"decoder.{k}": v for i in (15, 16, 17) for k, v in _mem(i, 64).items()},
    "decoder.19.conv.weight": (128, 64, 1, 1),  # TGrow stride 2
    "decoder.20.weight": (64, 64, 3, 3),
    "decoder.22.weight": (3, 64, 3, 3),
    "decoder.22.bias": (3,),
}


def _random_taew2_1(seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {k: torch.randn(*s, generator=g) * (0.5 / (torch.tensor(s[1:]).prod() ** 0.5 if len(s) > 1 else 10))
            for k, s in TAEW2_1.items()}  # fmt: skip


def test_key_names_and_shapes_are_taew2_1(tmp_path):
    model = TAEHV()
    assert {k: tuple(v.shape) for k, v in model.state_dict().items()} == TAEW2_1
    sd = _random_taew2_1()
    torch.save(sd, tmp_path / "taew2_1.pth")
    loaded = load_taehv(tmp_path / "taew2_1.pth")
    assert all(torch.equal(loaded.state_dict()[k], sd[k]) for k in sd)
    from safetensors.torch import save_file

    save_file(sd, str(tmp_path / "taew2_1.safetensors"))
    assert torch.equal(
        load_taehv(tmp_path / "taew2_1.safetensors").state_dict()["decoder.22.weight"], sd["decoder.22.weight"]
    )


def test_temporal_grow_kept_at_its_last_frame_for_a_preview_model():
    sd = _random_taew2_1()
    preview = TAEHV(decoder_time_upscale=(False, False, True))  # one 2x grow fewer: 2 frames per latent
    load_taehv_state(preview, dict(sd))
    assert torch.equal(preview.state_dict()["decoder.13.conv.weight"], sd["decoder.13.conv.weight"][128:])
    y = preview.eval().decode(torch.randn(1, 16, 3, 2, 2), clamp=False)
    assert y.shape == (1, 3, 1 + 2 * 2, 16, 16)


def test_clear_errors(tmp_path):
    sd = _random_taew2_1()
    del sd["decoder.22.bias"]
    with pytest.raises(TAEHVError, match=r"missing 1: \['decoder.22.bias'\]"):
        load_taehv_state(TAEHV(), sd)
    sd = _random_taew2_1()
    sd["decoder.1.weight"] = torch.zeros(256, 48, 3, 3)  # a 48-channel (Wan2.2) tiny decoder
    with pytest.raises(TAEHVError, match="shape mismatch: decoder.1.weight"):
        load_taehv_state(TAEHV(), sd)
    with pytest.raises(TAEHVError, match="no such file"):
        load_taehv(tmp_path / "taew2_1.pth")
    with pytest.raises(TAEHVError, match="latents must be"):
        TAEHV().decode(torch.zeros(1, 8, 1, 2, 2))
    with pytest.raises(TAEHVError, match="multiple of 4"):
        TAEHV().encode(torch.zeros(1, 3, 3, 16, 16), FeatureCache())


def _frame_by_frame(model: TAEHV, z_raw: torch.Tensor) -> torch.Tensor:
    """A plain sequential reading of TAEHV's decoder: one time step at a time, each memory block fed the input it
    saw one step earlier (zeros at first), each grow layer emitting its frames in order; the first 3 dropped."""
    memory: dict[int, torch.Tensor] = {}
    out = []

    def run(x: torch.Tensor, start: int) -> None:
        for i in range(start, len(model.decoder)):
            block = model.decoder[i]
            if isinstance(block, MemBlock):
                past = memory.get(i, torch.zeros_like(x))
                memory[i] = x
                x = block(x, past)
            elif isinstance(block, TGrow):
                frames = block.conv(x).chunk(block.stride, dim=1)  # output channel group k is frame k
                for f in frames:
                    run(f, i + 1)
                return
            else:
                assert not isinstance(block, TPool)
                x = block(x)
        out.append(x)

    for t in range(z_raw.shape[2]):
        run(z_raw[:, :, t], 0)
    return torch.stack(out[model.frames_to_trim :], 2)


@torch.no_grad()
def test_decode_shapes_upsampling_and_a_sequential_reading():
    model = TAEHV().eval()
    load_taehv_state(model, _random_taew2_1())
    z = torch.randn(1, 16, 4, 3, 5, generator=torch.Generator().manual_seed(1))
    y = model.decode(z, clamp=False)
    assert y.shape == (1, 3, 1 + 4 * 3, 24, 40)  # 8x space, 4x time, the stream's first latent gives one frame
    assert y.std() > 0.01
    want = _frame_by_frame(model, z) * 2 - 1  # the network takes the DiT's normalised latents; [0, 1] -> [-1, 1]
    assert (y - want).abs().max() <= 1e-5
    assert torch.allclose(model.decode(z), want.clamp(-1, 1), atol=1e-5)
    raw = z * model.latents_std.view(1, -1, 1, 1, 1) + model.latents_mean.view(1, -1, 1, 1, 1)  # Wan VAE latents
    assert torch.allclose(model.decode(raw, normalized=False, clamp=False), y, atol=1e-5)


@torch.no_grad()
def test_streaming_equals_whole():
    model = TAEHV().eval()
    load_taehv_state(model, _random_taew2_1(1))
    z = torch.randn(1, 16, 6, 2, 3, generator=torch.Generator().manual_seed(2))
    whole = model.decode(z, clamp=False)
    for cuts in ([1, 1, 1, 1, 1, 1], [1, 2, 3], [3, 3]):
        cache, parts, i = FeatureCache(), [], 0
        for n in cuts:
            parts.append(model.decode(z[:, :, i : i + n], cache, clamp=False))
            assert parts[-1].shape[2] == (1 + 4 * (n - 1) if i == 0 else 4 * n)
            i += n
        assert (torch.cat(parts, 2) - whole).abs().max() <= 1e-5, cuts
    # the encoder: 4 frames per latent, streamed in chunks of 4m frames
    x = torch.rand(1, 3, 12, 16, 24, generator=torch.Generator().manual_seed(3)) * 2 - 1
    lat = model.encode(x)
    assert lat.shape == (1, 16, 3, 2, 3)
    cache = FeatureCache()
    streamed = torch.cat([model.encode(x[:, :, :4], cache), model.encode(x[:, :, 4:], cache)], 2)
    assert (streamed - lat).abs().max() <= 1e-5
    # a whole clip of 1 + 4m frames is padded at its end with its last frame (as taehv's encode_video)
    padded = torch.cat([x[:, :, :9], x[:, :, 8:9].expand(-1, -1, 3, -1, -1)], 2)
    assert torch.allclose(model.encode(x[:, :, :9]), model.encode(padded), atol=1e-6)
    assert F.mse_loss(model.encode(x[:, :, :9]), lat) > 0  # and differs from the 12-frame clip
