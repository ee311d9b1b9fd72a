import os

import numpy as np
import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")


@pytest.fixture
def rng():
    return np.random.default_rng(0)


@pytest.fixture(scope="module")
def tiny_weights(tmp_path_factory):
    """A folder with a tiny random causal model (chunks of 2 latents) and VAE: the Avatar API end to end in
    seconds (the shipped models take minutes a clip on CPU)."""
    import torch

    from talkstream.models.checkpoint import save_checkpoint
    from talkstream.models.config import dit_config, vae_config
    from talkstream.models.dit import WanDiT
    from talkstream.models.vae import CausalVAE

    d = tmp_path_factory.mktemp("w")
    torch.manual_seed(0)
    dit = WanDiT(dit_config("tiny"))
    with torch.no_grad():
        for p in dit.parameters():
            if not p.any():
                p.normal_(0, 0.05)
    save_checkpoint(d / "causal.safetensors", dit, "dit", dit.cfg, extra=dict(chunk=2, look_back=0, look_ahead=0))
    vae = CausalVAE(vae_config("tiny"))
    save_checkpoint(d / "vae.safetensors", vae, "vae", vae.cfg)
    return d


@pytest.fixture(scope="module")
def stream_models():
    """A tiny random DiT (eval) and VAE for the streaming tests: the zero-initialised head and audio adapters get
    weight, so every input (audio included) changes the output."""
    import torch

    from talkstream.models.config import dit_config, vae_config
    from talkstream.models.dit import WanDiT
    from talkstream.models.vae import CausalVAE

    torch.manual_seed(0)
    dit = WanDiT(dit_config("tiny")).eval()
    with torch.no_grad():
        for n, p in dit.named_parameters():
            if "audio" in n or not p.any():
                p.normal_(0, 0.05)
    return dit, CausalVAE(vae_config("tiny")).eval()
