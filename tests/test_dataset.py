import json
import subprocess
import sys

import numpy as np
import pytest

from talkstream.media import MediaError, read_audio, read_video, write_audio, write_video
from talkstream.world.dataset import DatasetError, VideoFolder, WorldDataset, clip_stem, make_world, open_dataset


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    out = tmp_path_factory.mktemp("world")
    res = make_world(out, clips=3, seconds=2.0, size=64, workers=2, seed=5, progress=False)
    assert res == dict(made=3, skipped=0, total=3)
    return out


def test_world_make_writes_complete_clips(world):
    ds = open_dataset(world)
    assert isinstance(ds, WorldDataset) and len(ds) == 3
    s = ds.load(1)
    assert s.frames.shape == (50, 64, 64, 3) and s.states.shape == (50, 15) and len(s.audio) == 32000
    assert s.identity is not None and all(s.captions)
    meta = json.loads((world / (clip_stem(1) + ".json")).read_text())
    assert meta["seed"] == 6 and meta["segments"]
    assert not list(world.rglob("*.tmp*"))


def test_world_make_resumes(world):
    (world / (clip_stem(2) + ".json")).unlink()  # as if interrupted before the last file
    res = make_world(world, clips=4, seconds=2.0, size=64, workers=1, seed=5, progress=False)
    assert res == dict(made=2, skipped=2, total=4)
    with pytest.raises(DatasetError, match="use another folder"):
        make_world(world, clips=4, seconds=3.0, size=64, seed=5, progress=False)


def test_window_sampling_aligns_audio_and_truth(world, rng):
    ds = open_dataset(world)
    w = ds.window(rng, 20)
    assert w.frames.shape[0] == 20 and w.states.shape[0] == 20 and len(w.audio) == 20 * 640
    full = ds.load(ds.names.index(w.name))
    assert np.array_equal(full.states[w.start : w.start + 20], w.states)
    with pytest.raises(DatasetError, match="fewer than"):
        ds.window(rng, 500)


def test_corrupted_shard_is_a_clear_error(world, tmp_path):
    import shutil

    bad = tmp_path / "bad"
    shutil.copytree(world, bad)
    npz = bad / (clip_stem(0) + ".npz")
    npz.write_bytes(npz.read_bytes()[:50])
    mp4 = bad / (clip_stem(1) + ".mp4")
    mp4.write_bytes(mp4.read_bytes()[:400])
    ds = open_dataset(bad)
    with pytest.raises(DatasetError, match="corrupted"):
        ds.load(0)
    with pytest.raises(DatasetError, match="corrupted|truncated|no decodable"):
        ds.load(1)


def test_unwritable_output_is_a_clear_error(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(DatasetError, match="cannot write"):
        make_world(blocker / "sub", clips=1, seconds=1.0, size=32, progress=False)
    with pytest.raises(MediaError, match="cannot write"):
        write_video(blocker / "x.mp4", np.zeros((2, 16, 16, 3), np.uint8))
    r = subprocess.run(
        [sys.executable, "-m", "talkstream.cli", "world", "make", "--clips", "1", "--out", str(blocker / "sub")],
        capture_output=True,
        text=True,
    )
    assert r.returncode == 2 and r.stderr.strip().count("\n") == 0 and "cannot write" in r.stderr


def test_real_video_folder_reader(tmp_path, rng):
    # a 'real' clip at 30 fps with 44.1 kHz audio: read back at 25 fps / 16 kHz
    frames = rng.integers(0, 255, (60, 48, 64, 3), dtype=np.uint8)
    t = np.arange(2 * 44100) / 44100
    write_video(
        tmp_path / "spk1" / "a.mp4",
        frames,
        30,
        (0.3 * np.sin(2 * np.pi * 220 * t)).astype(np.float32),
        sample_rate=44100,
    )
    write_video(tmp_path / "b.mp4", frames[:30], 25)  # no audio track
    ds = open_dataset(tmp_path)
    assert isinstance(ds, VideoFolder) and ds.names == ["b.mp4", "spk1/a.mp4"]
    s = ds.load(1)
    assert s.fps == 25 and len(s.frames) == 50 and len(s.audio) == 32000 and s.states is None
    assert 0.15 < np.sqrt(np.mean(s.audio[4000:28000] ** 2)) < 0.25  # the sine survived resampling
    w = ds.window(rng, 25, i=1)
    assert w.frames.shape == (25, 48, 64, 3) and len(w.audio) == 16000
    with pytest.raises(DatasetError, match="no audio"):
        ds.load(0)
    with pytest.raises(DatasetError, match="neither"):
        open_dataset(_empty(tmp_path))


def _empty(tmp_path):
    d = tmp_path / "empty"
    d.mkdir()
    return d


def test_media_round_trips_and_errors(tmp_path, rng):
    a = (0.5 * np.sin(np.arange(16000) / 7)).astype(np.float32)
    for suffix in (".wav", ".flac"):
        write_audio(tmp_path / f"a{suffix}", a)
        b = read_audio(tmp_path / f"a{suffix}")
        assert len(b) == 16000 and np.abs(a - b).max() < 1e-3
    assert len(read_audio(tmp_path / "a.wav", sample_rate=8000)) == 8000
    frames = np.broadcast_to(np.linspace(0, 255, 32).astype(np.uint8)[None, :, None], (24, 32, 3))
    write_video(tmp_path / "v.mp4", np.stack([frames] * 5), 25, a[:3200])
    v = read_video(tmp_path / "v.mp4")
    assert v.frames.shape == (5, 24, 32, 3) and np.abs(v.frames.astype(int) - frames).mean() < 3
    assert v.audio is not None and len(v.audio) >= 3200
    (tmp_path / "plain").write_text("x")  # written files get an ordinary file's mode, not the temp file's 0600
    assert (tmp_path / "v.mp4").stat().st_mode & 0o777 == (tmp_path / "plain").stat().st_mode & 0o777
    (tmp_path / "not.mp4").write_text("hello")
    with pytest.raises(MediaError, match="not a readable"):
        read_video(tmp_path / "not.mp4")
    with pytest.raises(MediaError, match="no such file"):
        read_audio(tmp_path / "missing.wav")
    wav = (tmp_path / "a.wav").read_bytes()
    (tmp_path / "trunc.wav").write_bytes(wav[:30])
    with pytest.raises(MediaError):
        read_audio(tmp_path / "trunc.wav")
    with pytest.raises(MediaError, match="mono"):
        write_audio(tmp_path / "s.wav", np.zeros((2, 100), np.float32))
    assert not list(tmp_path.glob(".*tmp*"))
