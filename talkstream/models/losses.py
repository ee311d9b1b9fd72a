"""Losses for the VAE and the tiny decoder: L1/L2, MS-SSIM and KL (no pretrained perceptual nets exist here)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

_MS_WEIGHTS = (0.0448, 0.2856, 0.3001, 0.2363, 0.1333)


def _gauss(size: int = 11, sigma: float = 1.5, device=None) -> torch.Tensor:
    x = torch.arange(size, dtype=torch.float32, device=device) - size // 2
    g = torch.exp(-(x**2) / (2 * sigma**2))
    return g / g.sum()


def _ssim_parts(x: torch.Tensor, y: torch.Tensor, win: torch.Tensor, data_range: float):
    C = x.shape[1]
    k = win.shape[0]
    wx = win.view(1, 1, 1, k).expand(C, 1, 1, k)
    wy = win.view(1, 1, k, 1).expand(C, 1, k, 1)

    def blur(t):
        return F.conv2d(F.conv2d(t, wx, groups=C), wy, groups=C)

    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    mx, my = blur(x), blur(y)
    sxx, syy, sxy = blur(x * x) - mx**2, blur(y * y) - my**2, blur(x * y) - mx * my
    cs = (2 * sxy + c2) / (sxx + syy + c2)
    ssim = ((2 * mx * my + c1) / (mx**2 + my**2 + c1)) * cs
    return ssim.mean((1, 2, 3)), cs.mean((1, 2, 3))


def ms_ssim(x: torch.Tensor, y: torch.Tensor, data_range: float = 2.0) -> torch.Tensor:
    """Multi-scale SSIM of images [N, C, H, W] (as many scales as the size allows, at most 5), per image.

    Always computed in float32, also inside an autocast region: its variances are differences of
    nearly equal numbers, which bf16 cannot represent."""
    with torch.autocast(x.device.type, enabled=False):
        return _ms_ssim(x.float(), y.float(), data_range)


def _ms_ssim(x: torch.Tensor, y: torch.Tensor, data_range: float) -> torch.Tensor:
    win = _gauss(device=x.device)
    scales = 1
    while scales < len(_MS_WEIGHTS) and min(x.shape[-2:]) // 2**scales >= win.shape[0]:
        scales += 1
    w = torch.tensor(_MS_WEIGHTS[:scales], device=x.device)
    w = w / w.sum()
    vals = []
    for i in range(scales):
        ssim, cs = _ssim_parts(x, y, win, data_range)
        vals.append(ssim if i == scales - 1 else cs)
        if i < scales - 1:
            x, y = F.avg_pool2d(x, 2), F.avg_pool2d(y, 2)
    stack = torch.stack([v.clamp_min(1e-6) for v in vals], 0)
    return torch.prod(stack ** w[:, None], 0)


def kl_divergence(mean: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """KL(N(mean, exp(logvar)) || N(0, 1)), averaged over elements."""
    return 0.5 * (mean.pow(2) + logvar.exp() - 1 - logvar).mean()


def reconstruction_loss(
    x: torch.Tensor, y: torch.Tensor, l1: float = 1.0, l2: float = 0.0, ms_ssim_weight: float = 0.2
) -> torch.Tensor:
    """Videos [B, 3, T, H, W] in [-1, 1]: weighted L1 + L2 + (1 - MS-SSIM) over all frames."""
    loss = l1 * (x - y).abs().mean() + l2 * (x - y).pow(2).mean()
    if ms_ssim_weight:
        xf, yf = x.transpose(1, 2).flatten(0, 1), y.transpose(1, 2).flatten(0, 1)
        loss = loss + ms_ssim_weight * (1 - ms_ssim(xf.float(), yf.float())).mean()
    return loss


def masked_l1(x: torch.Tensor, y: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Mean |x - y| under a per-pixel weight map broadcast over channels (e.g. [B, 1, T, H, W] at the lips)."""
    return ((x.float() - y.float()).abs() * weight).sum() / (x.shape[1] * weight.sum()).clamp_min(1)


def psnr(x: torch.Tensor, y: torch.Tensor, data_range: float = 2.0) -> torch.Tensor:
    mse = (x.float() - y.float()).pow(2).mean()
    return 10 * torch.log10(data_range**2 / mse.clamp_min(1e-12))
