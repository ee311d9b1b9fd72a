"""The device round's hand-back keeps within what one call can return (8 files, 64 MiB together): session 14 lost a
DiT's shards from a call that held two."""

import subprocess
import tarfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MIB = 1024 * 1024


def hand_back(tmp_path: Path, *runs: str) -> subprocess.CompletedProcess:
    script = (ROOT / "scripts" / "device_round.sh").read_text()
    body = script[script.index("hand_back() {"):]
    body = body[:body.index("\n}\n") + 3]  # the function alone, not the script's mode dispatch
    return subprocess.run(["bash", "-c", f'{body}\nOUT="$1"; shift; hand_back "$@"', "_", "out", *runs],
                          cwd=tmp_path, capture_output=True, text=True, check=True)


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
        f"teacher-0000{i}-of-00004.safetensors" for i in (1, 2, 3)]
    assert not (tmp_path / "out" / "c5").exists() and "runs/c5: checkpoint not handed back" in r.stdout
    with tarfile.open(tmp_path / "out" / "small.tar") as t:
        names = {Path(n).as_posix().lstrip("./") for n in t.getnames()}
    assert {"t3/teacher-00004-of-00004.safetensors", "t3/teacher.safetensors.index.json", "t3_logs.tar",
            "c5_logs.tar"} <= names  # the run left behind still sends its logs

    (tmp_path / "out").rename(tmp_path / "first_call")  # the next call's fetch, into an emptied $OUT
    (tmp_path / "out").mkdir()
    hand_back(tmp_path, "runs/c5")
    assert len(list((tmp_path / "out" / "c5").iterdir())) == 3
