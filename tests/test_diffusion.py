import math

import pytest
import torch

from talkstream.diffusion.flow import (
    add_noise,
    euler_sigmas,
    sample_training_sigmas,
    shift_sigma,
    sigmas_from_timesteps,
    velocity_target,
    x0_from_velocity,
)
from talkstream.diffusion.samplers import guided_velocity, sample_euler, sample_few_step


def test_noise_target_and_x0_round_trip():
    x0, n = torch.randn(2, 4, 3, 2, 2), torch.randn(2, 4, 3, 2, 2)
    sigma = torch.tensor([[0.1, 0.5, 0.9], [0.0, 1.0, 0.3]])  # per-frame levels
    xt = add_noise(x0, n, sigma)
    assert torch.allclose(xt[1, :, 0], x0[1, :, 0]) and torch.allclose(xt[1, :, 1], n[1, :, 1])
    assert torch.allclose(x0_from_velocity(xt, velocity_target(x0, n), sigma), x0, atol=1e-6)


def test_shift_and_schedules():
    assert torch.allclose(shift_sigma(torch.tensor([0.0, 1.0]), 5.0), torch.tensor([0.0, 1.0], dtype=torch.float64))
    assert shift_sigma(0.5, 3.0) == pytest.approx(0.75)
    s = sigmas_from_timesteps([1000, 750, 500, 250])
    assert torch.allclose(s, torch.tensor([1.0, 0.75, 0.5, 0.25, 0.0]))
    assert euler_sigmas(4).tolist() == pytest.approx([1, 0.75, 0.5, 0.25, 0])
    with pytest.raises(ValueError):
        sigmas_from_timesteps([250, 500])
    with pytest.raises(ValueError):
        sigmas_from_timesteps([1500])
    sig = sample_training_sigmas(10000, torch.Generator().manual_seed(0), shift=3.0)
    assert 0 < sig.min() and sig.max() < 1 and sig.mean() > 0.55  # the shift favours high noise


def _gaussian_velocity(mu, s):
    """Exact flow-matching velocity for data ~ N(mu, s^2 I), noise ~ N(0, I): E[noise - x0 | x_t]."""

    def v(x, t):
        sig = (t / 1000.0).view(-1, 1)
        a, b = 1 - sig, sig
        var = a**2 * s**2 + b**2
        e_x0 = mu + a * s**2 / var * (x - a * mu)
        e_n = b / var * (x - a * mu)
        return e_n - e_x0

    return v


def test_euler_sampler_on_a_toy_2d_flow():
    mu, s = torch.tensor([3.0, -2.0]), 0.5
    noise = torch.randn(20000, 2, generator=torch.Generator().manual_seed(0))
    out = sample_euler(_gaussian_velocity(mu, s), noise, euler_sigmas(100))
    assert torch.allclose(out.mean(0), mu, atol=0.03)
    assert torch.allclose(out.std(0), torch.tensor([s, s]), atol=0.03)


def test_few_step_sampler_with_a_timestep_list():
    mu, s = torch.tensor([1.0, 1.0]), 0.2
    noise = torch.randn(20000, 2, generator=torch.Generator().manual_seed(1))
    out = sample_few_step(
        _gaussian_velocity(mu, s), noise, sigmas_from_timesteps([1000, 750, 500, 250]), torch.Generator().manual_seed(2)
    )
    assert torch.allclose(out.mean(0), mu, atol=0.03)
    assert (out.std(0) < 0.25).all()  # the posterior mean at sigma=0.25 is a little narrower than the data


def test_multi_condition_cfg():
    u, a, at = torch.tensor(0.0), torch.tensor(1.0), torch.tensor(3.0)
    assert guided_velocity([u, a], [1.0]) == a
    assert guided_velocity([u, a], [4.0]) == 4.0
    assert guided_velocity([u, a, at], [2.0, 1.5]) == 2.0 * 1 + 1.5 * 2
    with pytest.raises(ValueError):
        guided_velocity([u, a], [1.0, 2.0])
    assert math.isfinite(float(guided_velocity([u], [])))


def test_condition_dropout_rates_and_null():
    from talkstream.diffusion.samplers import apply_dropout, drop_conditions

    d = drop_conditions(torch.Generator().manual_seed(0), 20000, p_audio=0.2, p_text=0.1, p_ref=0.05, p_all=0.05)
    assert abs(d["audio"].float().mean() - (1 - 0.8 * 0.95)) < 0.015
    assert abs(d["ref"].float().mean() - (1 - 0.95 * 0.95)) < 0.015
    assert (d["audio"] & d["text"] & d["ref"]).float().mean() >= 0.045
    cond = torch.ones(4, 3, 2)
    out = apply_dropout(torch.tensor([True, False, True, False]), cond)
    assert (
        out[0].abs().sum() == 0 and torch.equal(out[1], cond[1]) and apply_dropout(torch.ones(1).bool(), None) is None
    )
