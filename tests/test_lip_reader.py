"""The latent lip reader: its labels, that it learns to read a mouth, and how its loss reaches the DiT."""

import numpy as np
import pytest
import torch

from talkstream.train.lip_reader import LatentLipReader, lip_read_loss, lip_targets, train_lip_reader


def test_lip_targets_follow_the_vae_frame_layout():
    states = np.random.default_rng(0).uniform(size=(2, 13, 15)).astype(np.float32)
    t = lip_targets(states, n_latent=4)
    assert t.shape == (2, 4, 16)
    per_frame = t.reshape(2, 4, 4, 4)  # [N, L, frame, field]
    assert np.array_equal(per_frame[:, 0], np.repeat(states[:, :1, :4], 4, axis=1))  # latent 0: frame 0 alone
    assert np.array_equal(per_frame[:, 2], states[:, 5:9, :4])  # latent 2: frames 5..8
    with pytest.raises(ValueError, match="need 17 frames"):
        lip_targets(states, n_latent=5)


def _toy_batch(gen, batch=32, frames=2, size=8):
    """Latents whose channel 0 holds the jaw value inside a mouth blob at a random place: the reader must find
    the blob through the map to read it."""
    z = torch.randn(batch, 4, frames, size, size, generator=gen)
    jaw = torch.rand(batch, frames, generator=gen)
    mouth = torch.zeros(batch, frames, size, size)
    ys, xs = torch.randint(1, size - 2, (2, batch), generator=gen)
    for b in range(batch):
        mouth[b, :, ys[b] : ys[b] + 2, xs[b] : xs[b] + 2] = 1
        z[b, 0, :, ys[b] : ys[b] + 2, xs[b] : xs[b] + 2] = 3 * jaw[b, :, None, None]
    return dict(x0=z, mouth=mouth, lips=jaw[..., None])


def test_reader_learns_to_read_the_mouth():
    torch.manual_seed(0)
    held = _toy_batch(torch.Generator().manual_seed(1), batch=64)
    reader, m = train_lip_reader(
        _toy_batch,
        latent_dim=4,
        outputs=1,
        steps=300,
        device="cpu",
        gen=torch.Generator().manual_seed(0),
        held=held,
        noise_max=0.1,
        lr=3e-3,
    )
    baseline = float((held["lips"] - held["lips"].mean()).abs().mean())  # a constant guess: ~0.25
    assert m["held_jaw_error"] < 0.3 * baseline
    assert not any(p.requires_grad for p in reader.parameters())
    with pytest.raises(ValueError, match="mouth map"):
        reader(held["x0"], held["mouth"][:, :1])


def test_lip_read_loss_reaches_the_velocity_and_skips_context_frames():
    torch.manual_seed(0)
    reader = LatentLipReader(latent_dim=4, width=8, outputs=1).eval().requires_grad_(False)
    B, Fr = 2, 3
    xt = torch.randn(B, 4, Fr, 6, 6)
    v = torch.randn(B, 4, Fr, 6, 6, requires_grad=True)
    sigma = torch.tensor([[0.0, 0.5, 0.5], [0.0, 0.5, 0.5]])  # frame 0: clean context (sigma 0), no loss
    mouth, lips = torch.rand(B, Fr, 6, 6), torch.rand(B, Fr, 1)
    weight = (sigma > 0).float()
    loss = lip_read_loss(reader, xt, v, sigma, mouth, lips, weight)
    loss.backward()
    assert loss > 0 and v.grad[:, :, 1:].abs().sum() > 0
    assert v.grad[:, :, 0].abs().sum() == 0
    # the estimate is x0 = xt - sigma * v: handing the reader that estimate directly gives the same loss
    x0 = xt - sigma[:, None, :, None, None] * v.detach()
    direct = ((reader(x0, mouth) - lips).abs().mean(-1) * weight).sum() / weight.sum()
    assert torch.allclose(loss, direct, atol=1e-6)


def test_reader_training_is_seeded():
    def fit():
        torch.manual_seed(3)  # (train_dit seeds the reader's initial weights the same way)
        r, _ = train_lip_reader(
            _toy_batch, latent_dim=4, outputs=1, steps=3, device="cpu", gen=torch.Generator().manual_seed(0)
        )
        return r.state_dict()

    a, b = fit(), fit()
    assert all(torch.equal(a[k], b[k]) for k in a)
