"""Multi-process training as torchrun starts it (2 CPU processes, gloo): DDP and FSDP train the same model, rank 0
writes one log and one checkpoint, an FSDP run resumes where it stopped, and the ranks stop together."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from talkstream.models.checkpoint import load_checkpoint, save_checkpoint
from talkstream.models.config import vae_config
from talkstream.models.vae import CausalVAE
from talkstream.train.config import TrainConfig
from talkstream.train.data import make_pack


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    d = tmp_path_factory.mktemp("dist")
    pack = make_pack(d / "pack.npz", clips=6, seconds=1.2, seed=321, progress=False)
    torch.manual_seed(0)
    vae = CausalVAE(vae_config("tiny"))
    save_checkpoint(d / "vae.safetensors", vae, "vae", vae.cfg)
    return d, pack


def _torchrun(d: Path, pack: Path, out: str, procs: int = 2, **kw) -> subprocess.CompletedProcess:
    cfg = dict(
        data=str(pack),
        vae=str(d / "vae.safetensors"),
        out=str(d / out),
        model="tiny",
        steps=3,
        batch=2,
        size=64,
        frames=9,
        workers=1,
        log_every=1,
        ckpt_every=1,
        warmup=1,
        look_back=0,
        look_ahead=0,
        lr=1e-2,
        ema=0.9,
        p_motion=0.0,
    )
    cfg.update(kw)
    (d / f"{out}.yaml").write_text(yaml.safe_dump(cfg))
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc_per_node={procs}",
        "-m",
        "talkstream.cli",
        "train",
        "teacher",
        "--config",
        str(d / f"{out}.yaml"),
    ]
    run = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    return run


def _state(run: Path) -> dict:
    """The run's last training state: fp32 weights and EMA (the exported checkpoint is bf16)."""
    st = torch.load(run / "state.pt", weights_only=False)
    return {**{f"model.{k}": v for k, v in st["model"].items()}, **{f"ema.{k}": v for k, v in st["ema"].items()}}


def _same(a: dict, b: dict, tol: float = 2e-4) -> bool:
    # (Adam's first steps turn last-bit gradient differences of two reduction orders into ~3e-5: seen; a run on other
    # batches differs by ~5e-2)
    return a.keys() == b.keys() and all(torch.allclose(a[k], b[k], atol=tol, rtol=tol) for k in a)


def test_ddp_and_fsdp_train_the_same_model_and_fsdp_resumes(setup):
    d, pack = setup
    ddp = _torchrun(d, pack, "ddp", fsdp="off")
    _torchrun(d, pack, "fsdp", fsdp="on")
    log = [json.loads(x) for x in (d / "ddp" / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [1, 2, 3]  # rank 0 alone writes
    assert ddp.stdout.count('"audio_reliance"') == 1  # and reports
    exported = load_checkpoint(d / "fsdp" / "teacher.safetensors").state_dict()  # gathered whole from the shards
    a, b = _state(d / "ddp"), _state(d / "fsdp")
    assert all(torch.allclose(exported[k].float(), b[f"ema.{k}"], atol=1e-2, rtol=1e-2) for k in exported)
    # the same batches and averaged gradients: sharded and replicated training agree
    assert _same(a, b)
    # an FSDP run stopped after 2 steps and resumed to 3 matches the straight one (optimizer, EMA, both ranks'
    # random states restored; the learning rate of the first two steps is the same for 2 and 3 steps)
    _torchrun(d, pack, "fsdp_resume", fsdp="on", steps=2)
    _torchrun(d, pack, "fsdp_resume", fsdp="on", steps=3)
    assert _same(b, _state(d / "fsdp_resume"))
    _torchrun(d, pack, "single", procs=1)  # one process sees only rank 0's batches: another model
    assert not _same(a, _state(d / "single"))


def test_ranks_stop_together_at_the_time_budget(setup):
    """Each rank's own clock would end the loop at different steps, and the rank still in it would wait forever
    for the others' gradients: the ranks follow rank 0's clock."""
    d, pack = setup
    _torchrun(d, pack, "budget", fsdp="on", steps=100_000, time_budget=12, log_every=1000)
    step = torch.load(d / "budget" / "state.pt", weights_only=False)["step"]
    assert 0 < step < 100_000


def test_fsdp_setting_is_checked():
    with pytest.raises(ValueError, match="fsdp must be auto, on or off"):
        TrainConfig(stage="teacher", data="x.npz", fsdp="yes")
