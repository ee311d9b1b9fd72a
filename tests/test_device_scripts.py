"""The device round's hand-back keeps within what one call can return (8 files, 64 MiB together): a call that held
two DiTs would lose one's shards."""

import os
import subprocess
import tarfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
MIB = 1024 * 1024


def hand_back(tmp_path: Path, *runs: str) -> subprocess.CompletedProcess:
    script = (ROOT / "tools" / "device" / "device_round.sh").read_text()
    body = script[script.index("hand_back() {") :]
    body = body[: body.index("\n}\n") + 3]  # the function alone, not the script's mode dispatch
    return subprocess.run(
        ["bash", "-c", f'{body}\nOUT="$1"; shift; hand_back "$@"', "_", "out", *runs],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        check=True,
    )


def make_dit(folder: Path) -> None:  # a DiT's shards as the runs write them (sparse: sizes without the bytes)
    folder.mkdir(parents=True)
    for i, size in enumerate((15.6, 15.6, 15.4, 4.2), 1):
        with open(folder / f"teacher-0000{i}-of-00004.safetensors", "wb") as f:
            f.truncate(int(size * MIB))
    (folder / "teacher.safetensors.index.json").write_text("{}")
    (folder.parent / f"{folder.name}.logs.tar").write_bytes(b"logs")


def test_two_dits_come_back_one_per_call_within_the_limits(tmp_path):
    make_dit(tmp_path / "runs" / "t3")
    make_dit(tmp_path / "runs" / "c5")
    (tmp_path / "out").mkdir()
    r = hand_back(tmp_path, "runs/t3", "runs/c5")
    files = [p for p in (tmp_path / "out").rglob("*") if p.is_file()]
    assert len(files) <= 8 and sum(p.stat().st_size for p in files) <= 64 * MIB
    assert sorted(p.name for p in (tmp_path / "out" / "t3").iterdir()) == [
        f"teacher-0000{i}-of-00004.safetensors" for i in (1, 2, 3)
    ]
    assert not (tmp_path / "out" / "c5").exists() and "runs/c5: checkpoint not handed back" in r.stdout
    with tarfile.open(tmp_path / "out" / "small.tar") as t:
        names = {Path(n).as_posix().lstrip("./") for n in t.getnames()}
    assert {
        "t3/teacher-00004-of-00004.safetensors",
        "t3/teacher.safetensors.index.json",
        "t3_logs.tar",
        "c5_logs.tar",
    } <= names  # the run left behind still sends its logs

    (tmp_path / "out").rename(tmp_path / "first_call")  # the next call's fetch, into an emptied $OUT
    (tmp_path / "out").mkdir()
    hand_back(tmp_path, "runs/c5")
    assert len(list((tmp_path / "out" / "c5").iterdir())) == 3


def test_nproc_runs_each_run_as_a_torchrun_on_gpus_of_its_own(tmp_path):
    (tmp_path / "tools" / "device").mkdir(parents=True)
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "dit_pack.npz").write_bytes(b"")
    (tmp_path / "site").mkdir()
    (tmp_path / "site" / ".ready").write_bytes(b"")
    script = (
        (ROOT / "tools" / "device" / "device_round.sh")
        .read_text()
        .replace("/tmp/site/.ready", str(tmp_path / "site/.ready"))
    )
    (tmp_path / "tools" / "device" / "device_round.sh").write_text(script)
    (tmp_path / "tools" / "device" / "device_env.sh").write_text(
        (ROOT / "tools" / "device" / "device_env.sh").read_text()
    )
    (tmp_path / "configs").symlink_to(ROOT / "configs")
    bin_ = tmp_path / "bin"
    bin_.mkdir()
    (bin_ / "nvidia-smi").write_text("#!/bin/sh\nfor i in 0 1 2 3; do echo GPU $i; done\n")
    (bin_ / "python3").write_text(f'#!/bin/sh\necho "$CUDA_VISIBLE_DEVICES $*" >> {tmp_path}/calls.txt\n')
    for f in bin_.iterdir():
        f.chmod(0o755)
    env = {"PATH": f"{bin_}:/usr/bin:/bin", "START_WAIT": "1", "GPU": "0", "NPROC": "2", "HOME": str(tmp_path)}

    def start(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            ["bash", "tools/device/device_round.sh", "start", *args],
            cwd=tmp_path,
            env=env,
            capture_output=True,
            text=True,
        )

    assert start("teacher", "runs/t", "lr=1e-4", "--", "causal", "runs/c").returncode == 0
    calls = sorted((tmp_path / "calls.txt").read_text().splitlines())
    torchrun = "-m torch.distributed.run --standalone --nproc_per_node=2 -m talkstream.cli train"
    assert calls[0].startswith(f"0,1 {torchrun} teacher --config configs/teacher.yaml --set out=runs/t")
    assert "--set lr=1e-4" in calls[0]
    assert calls[1].startswith(f"2,3 {torchrun} causal --config configs/causal.yaml --set out=runs/c")
    env["GPU"] = "3"  # 2 GPUs from GPU 3 of 4: refused, nothing started
    r = start("teacher", "runs/t2")
    assert r.returncode == 2 and "this machine has 4" in r.stdout
    assert len((tmp_path / "calls.txt").read_text().splitlines()) == 2
    env.update(NPROC="1")  # one process a run, run k on GPU (3 + k) mod 4
    assert start("teacher", "runs/t3", "--", "causal", "runs/c3").returncode == 0
    calls = (tmp_path / "calls.txt").read_text().splitlines()[2:]
    assert sorted(c.split(" --config")[0] for c in calls) == [
        "0 -m talkstream.cli train causal",
        "3 -m talkstream.cli train teacher",
    ]


def test_suite_plans_start_every_line_once_and_collect(tmp_path):
    """`device_suites.sh`: every plan line runs at once with its own variables, GPUs taken in turn and a thread
    limit (36 suites without it took 192 threads each); a plan started again skips what started;
    `wait` hands every JSON back in one tar."""
    bin_ = tmp_path / "bin"
    bin_.mkdir()
    (bin_ / "nvidia-smi").write_text("#!/bin/sh\necho GPU 0\necho GPU 1\n")
    (bin_ / "nvidia-smi").chmod(0o755)
    stub = tmp_path / "stub.sh"  # stands in for `device_round.sh suite`: its log and JSON under the same names
    stub.write_text(
        'tag=$3; [ "${SEEDS:-0}" != 0 ] && tag=${tag}_s$SEEDS; mkdir -p runs; touch runs/suite_$tag.txt\n'
        'echo "gpu=$CUDA_VISIBLE_DEVICES threads=$OMP_NUM_THREADS ri=${REFINIT:-} cap=${CAPTIONS:-} $*"\n'
        'echo {} > "$OUT/suite_$tag.json"\n'
    )
    plan = tmp_path / "p.plan"
    plan.write_text(
        "# a comment\nSEEDS=0 REFINIT=0.8 data/t3/teacher.safetensors 30 t3\n\n"
        "SEEDS=1 CAPTIONS=first_spoken data/t3/teacher.safetensors 30 t3\n"
        "SEEDS=2 data/c6/causal.safetensors 8 c6\n"
    )
    env = dict(
        os.environ,
        PATH=f"{bin_}:{os.environ['PATH']}",
        SUITES_ROOT=str(tmp_path / "suites"),
        SUITE_CMD=f"bash {stub}",
        START_WAIT="1",
        OUT=str(tmp_path / "out"),
    )
    (tmp_path / "out").mkdir()
    run = lambda *a: (
        subprocess.run(
            ["bash", str(ROOT / "tools" / "device" / "device_suites.sh"), *a],
            cwd=tmp_path,
            env=env,
            capture_output=True,
            text=True,
            check=True,
        ).stdout
    )
    assert "started 3 suites on 2 GPUs" in run("start", str(plan))
    assert "started 0 suites" in run("start", str(plan))  # started again: nothing twice
    assert "3 of 3 suites written" in run("wait", "10")
    logs = {p.stem: p.read_text().strip() for p in (tmp_path / "suites" / "p.plan").glob("*.log")}
    assert logs == {
        "t3": "gpu=0 threads=4 ri=0.8 cap= data/t3/teacher.safetensors 30 t3",
        "t3_s1": "gpu=1 threads=4 ri= cap=first_spoken data/t3/teacher.safetensors 30 t3",
        "c6_s2": "gpu=0 threads=4 ri= cap= data/c6/causal.safetensors 8 c6",
    }
    with tarfile.open(tmp_path / "out" / "suites.tar") as t:
        names = {Path(n).name for n in t.getnames()}
    assert {"suite_t3.json", "suite_t3_s1.json", "suite_c6_s2.json", "suite_t3.txt"} <= names


def _git(repo: Path, *args: str) -> str:
    env = dict(
        os.environ, GIT_AUTHOR_NAME="t", GIT_AUTHOR_EMAIL="t@t", GIT_COMMITTER_NAME="t", GIT_COMMITTER_EMAIL="t@t"
    )
    return subprocess.run(["git", *args], cwd=repo, env=env, capture_output=True, text=True, check=True).stdout


def _slim(repo: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["bash", str(ROOT / "tools" / "device" / "slim_tree.sh"), *args], cwd=repo, capture_output=True, text=True
    )


def test_slim_tree_takes_the_shards_out_and_puts_back_exactly_what_it_took(tmp_path):
    repo = tmp_path / "repo"
    (repo / "talkstream" / "weights").mkdir(parents=True)
    (repo / "docs").mkdir()
    _git(repo, "init", "-q")
    for i in (1, 2):
        (repo / "talkstream" / "weights" / f"causal-0000{i}-of-00002.safetensors").write_bytes(bytes([i]) * 300_000)
    (repo / "talkstream" / "weights" / "causal.safetensors.index.json").write_text("{}")
    (repo / "talkstream" / "weights" / "probe.safetensors").write_bytes(b"p" * 1000)
    (repo / "docs" / "strip.png").write_bytes(b"x" * 200_000)
    (repo / "code.py").write_text("x = 1\n")
    (repo / ".git" / "info" / "exclude").write_text("/.devin/")  # (someone's line, without its newline)
    _git(repo, "add", ".")
    _git(repo, "commit", "-qm", "base")
    before_index = _git(repo, "ls-files", "-s")
    before_exclude = (repo / ".git" / "info" / "exclude").read_text()

    # a staged change of someone else's: refused, nothing touched
    (repo / "code.py").write_text("x = 2\n")
    _git(repo, "add", "code.py")
    staged = _git(repo, "ls-files", "-s")
    r = _slim(repo, "on")
    assert r.returncode == 1 and "staged changes" in r.stderr and "code.py" in r.stderr
    assert _git(repo, "diff", "--cached", "--name-only") == "code.py\n" and _git(repo, "ls-files", "-s") == staged
    assert "slim tree: off" in _slim(repo, "status").stdout
    _git(repo, "commit", "-qm", "code", "--", "code.py")
    before_index = _git(repo, "ls-files", "-s")

    full = _slim(repo, "status").stdout
    assert "0.8 MiB" in full  # 2 x 300 kB shards + the 200 kB picture + small files
    assert "slim tree + carry code.py: 0.0 MiB" in _slim(repo, "check", "code.py").stdout
    r = _slim(repo, "on")
    assert r.returncode == 0, r.stderr
    assert "slim tree: on (3 files out of the index)" in r.stdout and "a call sends 0.0 MiB" in r.stdout
    tracked = _git(repo, "ls-files").split()
    assert "talkstream/weights/causal-00001-of-00002.safetensors" not in tracked and "docs/strip.png" not in tracked
    assert {"talkstream/weights/causal.safetensors.index.json", "talkstream/weights/probe.safetensors"} <= set(tracked)
    assert _git(repo, "ls-files", "-o", "--exclude-standard") == ""  # ignored: they do not travel as untracked
    assert (repo / "docs" / "strip.png").exists()  # the files stay on disk
    assert "already on" in _slim(repo, "on").stdout

    # someone commits their own path while the tree is slim: the deletions stay out of their commit
    (repo / "notes.md").write_text("n\n")
    _git(repo, "add", "notes.md")
    _git(repo, "commit", "-qm", "notes", "--", "notes.md")
    assert "causal-00001-of-00002.safetensors" in _git(repo, "ls-tree", "-r", "--name-only", "HEAD")
    (repo / ".git" / "info" / "exclude").write_text((repo / ".git" / "info" / "exclude").read_text() + "/.gl/\n")

    r = _slim(repo, "off")
    assert r.returncode == 0, r.stderr
    assert "slim tree: off" in r.stdout and "warning" not in r.stdout
    notes = _git(repo, "ls-files", "-s", "notes.md").splitlines()
    assert sorted(_git(repo, "ls-files", "-s").splitlines()) == sorted(before_index.splitlines() + notes)  # exactly
    assert _git(repo, "status", "--porcelain") == ""  # index = HEAD = working files again
    assert (repo / ".git" / "info" / "exclude").read_text() == before_exclude + "\n/.gl/\n"  # ours gone, theirs kept
    assert "already off" in _slim(repo, "off").stdout

    # on, then off with someone's staged change pending: ours are restored, theirs stays staged
    assert _slim(repo, "on").returncode == 0
    (repo / "code.py").write_text("x = 3\n")
    _git(repo, "add", "code.py")
    assert _slim(repo, "off").returncode == 0
    assert _git(repo, "diff", "--cached", "--name-only") == "code.py\n"


def test_distill_wait_hands_back_the_newest_export_within_a_calls_limits(tmp_path):
    """`distill_pipeline.sh wait` while a run trains: its newest export (4 incompressible shards of a student's
    size, the worst case) comes back in parts of at most 16 MiB, at most 8 files and 64 MiB with the logs; the next
    wait sends nothing again until a newer export exists."""
    (tmp_path / "tools").symlink_to(ROOT / "tools")
    run = tmp_path / "runs" / "dmd_sf4"
    for step in (10, 20):
        (run / f"ckpt_{step:06d}").mkdir(parents=True)
        for i in range(1, 5):
            (run / f"ckpt_{step:06d}" / f"student-0000{i}-of-00004.safetensors").write_bytes(os.urandom(12 * MIB))
        (run / f"ckpt_{step:06d}" / "student.safetensors.index.json").write_text("{}")
    (run / "latest.txt").write_text("ckpt_000010\n")
    (run / "log.jsonl").write_text('{"step": 10, "seconds": 42.0}\n')
    (run / "config.json").write_text("{}")
    env = dict(os.environ, OUT=str(tmp_path / "out"))

    def wait() -> str:
        if (tmp_path / "out").exists():
            for f in (tmp_path / "out").iterdir():
                f.unlink()
        r = subprocess.run(
            ["bash", "tools/device/distill_pipeline.sh", "wait", "0"],
            cwd=tmp_path,
            env=env,
            capture_output=True,
            text=True,
        )
        assert r.returncode == 0, r.stderr
        return r.stdout

    assert "handed back: dmd_sf4 (ckpt_000010)" in wait()
    files = [p for p in (tmp_path / "out").rglob("*") if p.is_file()]
    assert len(files) <= 8 and all(p.stat().st_size <= 16 * MIB for p in files)
    assert sum(p.stat().st_size for p in files) <= 64 * MIB
    parts = sorted(p for p in files if p.name.startswith("ckpt_dmd_sf4.tgz.part"))
    assert len(parts) == 4  # 48 MiB of random bytes in parts of 15 MiB
    joined = tmp_path / "joined.tgz"
    joined.write_bytes(b"".join(p.read_bytes() for p in parts))
    with tarfile.open(joined) as t:
        names = set(t.getnames())
    assert "dmd_sf4/ckpt_000010/student-00004-of-00004.safetensors" in names and "dmd_sf4/latest.txt" in names
    assert not any("ckpt_000020" in n for n in names)
    assert "handed back" not in wait()  # nothing newer
    (run / "latest.txt").write_text("ckpt_000020\n")
    assert "handed back: dmd_sf4 (ckpt_000020)" in wait()


def test_serve_gpu_embeds_every_caption_the_server_uses_and_names_a_missing_one(tmp_path, monkeypatch):
    """tools/device/serve_gpu.py stands in for MiniLM on a GPU machine: its caption list covers every state's and
    action's caption and the calibration's; an embedded caption comes back as saved, any other stops the run."""
    import importlib.util

    import torch

    from talkstream.agent.actions import ACTION_CAPTIONS, STATE_CAPTIONS
    from talkstream.stream.avatar import Avatar

    spec = importlib.util.spec_from_file_location("serve_gpu", ROOT / "tools" / "device" / "serve_gpu.py")
    serve_gpu = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(serve_gpu)
    caps = serve_gpu.captions()
    assert {*STATE_CAPTIONS.values(), *ACTION_CAPTIONS.values(), "listens attentively"} <= set(caps)
    saved = {
        c: dict(text=torch.full((1, 3, 4), float(i)), mask=torch.ones(1, 3, dtype=torch.bool))
        for i, c in enumerate(caps)
    }
    torch.save(saved, tmp_path / "captions.pt")
    monkeypatch.setattr(Avatar, "encode_prompt", Avatar.encode_prompt)  # restored after the test
    serve_gpu.use_embedded(str(tmp_path / "captions.pt"))
    avatar = object.__new__(Avatar)
    text, mask = avatar.encode_prompt(STATE_CAPTIONS["listening"])
    assert torch.equal(text, saved[STATE_CAPTIONS["listening"]]["text"]) and mask.all()
    assert avatar.encode_prompt("") == (None, None)
    with pytest.raises(SystemExit, match="dances wildly"):
        avatar.encode_prompt("dances wildly")
