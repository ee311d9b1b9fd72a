"""Carrying a tiny decoder over to a fine-tuned VAE whose encoder moved: the affine map between two VAEs' raw
latents of the same frames, and its folding into the decoder's first convolution
(``experiments/tiny_decoder_adapt.py``)."""

from __future__ import annotations

import torch


@torch.no_grad()
def fit_latent_map(old_raw: torch.Tensor, new_raw: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Least-squares affine map ``old ≈ A @ new + b`` over every latent pixel of [N, C, ...] latents of the same
    frames. Returns A [C, C], b [C]."""
    if old_raw.shape != new_raw.shape:
        raise ValueError(
            f"latents of the same frames must match in shape: {tuple(old_raw.shape)} vs {tuple(new_raw.shape)}"
        )
    c = old_raw.shape[1]
    x = new_raw.transpose(0, 1).reshape(c, -1).T.double()  # [P, C]
    y = old_raw.transpose(0, 1).reshape(c, -1).T.double()
    sol = torch.linalg.lstsq(torch.cat([x, torch.ones(len(x), 1, dtype=x.dtype)], 1), y).solution  # [C + 1, C]
    return sol[:c].T.float(), sol[c].float()


@torch.no_grad()
def fold_latent_map(dec, a: torch.Tensor, b: torch.Tensor, new_mean: torch.Tensor, new_std: torch.Tensor) -> None:
    """Make the tiny decoder ``dec`` read the new VAE's latents: its first convolution sees ``A @ new + b`` (exact
    but at the zero-padded border, where the padding stands for ``b`` rather than 0), and it de-normalises with
    the new VAE's latent statistics."""
    w = dec.conv_in.weight  # [O, C, k, k]
    dec.conv_in.bias += torch.einsum("oikl,i->o", w, b.to(w))
    dec.conv_in.weight.copy_(torch.einsum("oikl,ij->ojkl", w, a.to(w)))
    dec.latent_mean.copy_(new_mean)
    dec.latent_std.copy_(new_std)
