import json
import subprocess
import sys

import numpy as np
import pytest

from talkstream.eval import metrics
from talkstream.eval.evaluate import NotMeasurable, evaluate_clip, evaluate_files, read_image, run_suite
from talkstream.eval.probes import (
    evaluate_behaviour_probe,
    evaluate_frame_probe,
    load_behaviour_probe,
    load_frame_probe,
)
from talkstream.media import read_video, write_audio, write_video
from talkstream.world.behaviour import make_clip
from talkstream.world.render import render_states


@pytest.fixture(scope="module")
def probe():
    return load_frame_probe()


@pytest.fixture(scope="module")
def clip_and_frames(tmp_path_factory):
    clip = make_clip(900_003, 8.0)
    frames = np.stack(list(render_states(clip.identity, clip.states)))
    path = tmp_path_factory.mktemp("clip") / "truth.mp4"
    write_video(path, frames, 25, clip.audio)
    truth = metrics.mouth_truth_from_segments([s.to_dict() for s in clip.segments], clip.n_frames)
    return clip, read_video(path).frames, frames[0], truth, path


def test_probe_accuracy_on_held_out_renders(probe):
    acc = evaluate_frame_probe(probe, n=300, n_identities=100, seed=4242)
    assert acc.mouth_open_mae <= 0.05
    assert acc.blink_f1 >= 0.9
    assert acc.identity_nn_accuracy >= 0.95
    assert acc.yaw_mae_deg < 2.0 and acc.pitch_mae_deg < 2.0


def test_behaviour_probe_accuracy():
    assert evaluate_behaviour_probe(load_behaviour_probe(), n_clips=10, seed=98_000) >= 0.8


def test_ground_truth_clip_scores_best(clip_and_frames, probe):
    clip, frames, ref, truth, _ = clip_and_frames
    good = evaluate_clip(frames, clip.audio, ref, truth, probe).values
    assert good["flags"] == [] and good["best_offset"] == 0
    assert good["mouth_error"] < 0.05
    shifted_truth = np.concatenate([np.zeros(5, np.float32), truth])[: len(truth)]
    shifted_audio = np.concatenate([np.zeros(5 * 640, np.float32), clip.audio])[: len(clip.audio)]
    bad = evaluate_clip(frames, shifted_audio, ref, shifted_truth, probe).values
    assert bad["best_offset"] == 5  # audio delayed by 5 frames is found at +5
    assert bad["mouth_error"] > good["mouth_error"]
    energy_only = evaluate_clip(frames, shifted_audio, ref, None, probe).values
    assert energy_only["best_offset"] in (4, 5, 6)


def test_corruptions_are_flagged(clip_and_frames, probe):
    clip, frames, ref, truth, _ = clip_and_frames
    frozen = frames.copy()
    frozen[60:90] = frozen[60]
    black = frames.copy()
    black[100:103] = 0
    flicker = frames.astype(np.int16)
    flicker[::2] += 25
    other = make_clip(900_004, 8.0)
    swapped = np.stack(list(render_states(other.identity, clip.states)))
    cases = {
        "frozen": frozen,
        "black frames": black,
        "flickering": np.clip(flicker, 0, 255).astype(np.uint8),
        "identity mismatch": swapped,
    }
    for flag, f in cases.items():
        v = evaluate_clip(f, clip.audio, ref, truth, probe).values
        assert flag in v["flags"], (flag, v["flags"])
    blank = frames.copy()
    blank[10:12] = 128
    assert metrics.stability(blank)["blank_frames"] == [10, 11]


def test_frechet_distance_and_motion(clip_and_frames, probe):
    clip, frames, *_ = clip_and_frames
    feats = probe.read(frames)["features"]
    rng = np.random.default_rng(0)
    assert metrics.frechet_distance(feats[::2], feats[1::2]) < metrics.frechet_distance(
        feats, feats + rng.normal(0, 1.0, feats.shape)
    )
    looped = np.tile(clip.states[:50], (4, 1))
    assert metrics.motion(looped)["repetition"] > 0.9 > metrics.motion(clip.states)["repetition"]


def test_bad_inputs_are_clear(tmp_path, clip_and_frames):
    clip, frames, ref, truth, path = clip_and_frames
    (tmp_path / "x.mp4").write_text("not a video")
    with pytest.raises(NotMeasurable, match="not a readable"):
        evaluate_files(tmp_path / "x.mp4")
    write_audio(tmp_path / "short.wav", clip.audio[:16000])
    with pytest.raises(NotMeasurable, match="mismatched lengths"):
        evaluate_files(path, tmp_path / "short.wav")
    (tmp_path / "ref.png").write_bytes(b"\x89PNG broken")
    with pytest.raises(NotMeasurable, match="not a readable image"):
        read_image(tmp_path / "ref.png")
    write_video(tmp_path / "silent.mp4", frames[:30], 25)
    v = evaluate_files(tmp_path / "silent.mp4").values
    assert v["lip_sync"].startswith("not measurable") and v["identity"].startswith("not measurable")
    (tmp_path / "t.json").write_text("{}")
    with pytest.raises(NotMeasurable, match="world truth"):
        evaluate_files(path, truth=tmp_path / "t.json")


def test_eval_cli_writes_json_and_png(tmp_path, clip_and_frames):
    from PIL import Image

    clip, frames, ref, truth, path = clip_and_frames
    Image.fromarray(ref).save(tmp_path / "ref.png")
    meta = tmp_path / "truth.json"
    meta.write_text(json.dumps({"segments": [s.to_dict() for s in clip.segments]}))
    out = tmp_path / "r.json"
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "talkstream.cli",
            "eval",
            "--video",
            str(path),
            "--ref",
            str(tmp_path / "ref.png"),
            "--truth",
            str(meta),
            "--out",
            str(out),
        ],
        capture_output=True,
        text=True,
    )
    assert r.returncode == 0, r.stderr
    v = json.loads(out.read_text())
    assert v["best_offset"] == 0 and v["flags"] == [] and out.with_suffix(".png").stat().st_size > 10_000
    r = subprocess.run(
        [sys.executable, "-m", "talkstream.cli", "eval", "--video", str(tmp_path / "nope.mp4")],
        capture_output=True,
        text=True,
    )
    assert r.returncode == 2 and "no such file" in r.stderr


def test_mouth_error_by_speed_splits_fast_from_slow():
    from talkstream.eval.evaluate import mouth_error_by_speed

    truth = np.r_[np.zeros(10), np.linspace(0, 1, 5), np.ones(10), np.linspace(1, 0, 5)]
    lagged = np.r_[truth[:1], truth[:-1]]  # one frame late: wrong only where the mouth moves
    r = mouth_error_by_speed(lagged, truth)
    assert r["mouth_error_slow"] < 0.05 < r["mouth_error_fast"]
    assert np.isnan(mouth_error_by_speed(np.zeros(8), np.zeros(8))["mouth_error_fast"])  # silence: no split


def test_mouth_amplitude_reads_gain_and_correlation():
    from talkstream.eval.evaluate import mouth_amplitude

    truth = 0.5 + 0.4 * np.sin(np.linspace(0, 12, 200))
    half = mouth_amplitude(0.45 * truth + 0.1, truth)  # a hedging model: the right timing, under half the opening
    assert half["mouth_gain"] == pytest.approx(0.45) and half["mouth_corr"] == pytest.approx(1.0)
    noisy = mouth_amplitude(truth + np.random.default_rng(0).normal(0, 0.3, 200), truth)
    assert 0.8 < noisy["mouth_gain"] < 1.2 and 0.5 < noisy["mouth_corr"] < 0.9
    late = mouth_amplitude(np.roll(truth, 40), truth[:150])  # lengths differ: the common frames count
    assert late["mouth_corr"] < 0.5
    assert np.isnan(mouth_amplitude(np.ones(50), np.ones(50))["mouth_gain"])  # a still truth: not measurable
    still = mouth_amplitude(np.ones(200), truth)  # a still drawn mouth: no gain, no correlation
    assert still["mouth_gain"] == pytest.approx(0.0) and np.isnan(still["mouth_corr"])


def test_suite_on_ground_truth(probe):
    res = run_suite(seeds=(900_000, 900_001), seconds=4.0, probe=probe)
    assert len(res["rows"]) == 2 and res["summary"]["offset_zero_fraction"] == 1.0
    assert res["summary"]["identity_nn_accuracy"] == 1.0
    assert res["summary"]["offset_measured_clips"] >= 1
    assert res["summary"]["flagged_clips"] == 0
    assert res["summary"]["silhouette_iou"] == 1.0
    assert all(r["head_motion"] > 1.0 for r in res["rows"])  # the world's heads sway (degrees of probe-read pose)


def test_suite_head_motion_sees_a_head_held_still(probe):
    """A model can keep the face whole by holding the reference's pose: head motion tells (a still copy reads 0)."""
    still = run_suite(
        generate=lambda ref, clip: np.repeat(ref[None], clip.n_frames, 0), seeds=(900_000,), seconds=4.0, probe=probe
    )
    assert still["rows"][0]["head_motion"] < 0.05 and "frozen" in still["rows"][0]["flags"]


def test_bench_harness_measures_a_stream():
    from talkstream.eval.speed import dit_source, measure_stream, world_source

    r = measure_stream(world_source(2.0, 64, chunk_frames=10))
    assert r["frames"] == 50 and r["chunks"] == 5 and r["steady_fps"] > 0 and r["ttff_s"] > 0
    assert set(r["chunk_latency_ms"]) == {"p50", "p95", "p99"} and r["rss_mib"]["max"] > 0
    d = measure_stream(dit_source("tiny", 32, 32, chunks=3))
    assert d["frames"] == (1 + 4 * 2) + 2 * 12 and "machine" in d  # the clip's first latent decodes to one frame


def test_suite_runs_a_checkpoint(tmp_path, probe):
    """Plumbing of `eval suite --model CKPT` with random tiny checkpoints (teacher and causal)."""
    import torch

    from talkstream.eval.evaluate import checkpoint_generator
    from talkstream.models.checkpoint import save_checkpoint
    from talkstream.models.config import dit_config, vae_config
    from talkstream.models.dit import WanDiT
    from talkstream.models.vae import CausalVAE

    torch.manual_seed(0)
    vae = CausalVAE(vae_config("tiny"))
    save_checkpoint(tmp_path / "vae.safetensors", vae, "vae", vae.cfg)
    dit = WanDiT(dit_config("tiny"))
    save_checkpoint(tmp_path / "teacher.safetensors", dit, "dit", dit.cfg)
    save_checkpoint(tmp_path / "causal.safetensors", dit, "dit", dit.cfg, extra={"chunk": 3})
    for name in ("teacher", "causal"):
        gen = checkpoint_generator(tmp_path / f"{name}.safetensors", tmp_path / "vae.safetensors", size=64, steps=3)
        res = run_suite(generate=gen, seeds=(900_005,), seconds=1.2, size=64, probe=probe)
        assert len(res["rows"]) == 1 and np.isfinite(res["summary"]["mouth_error"])


def test_suite_inputs_replace_the_encoders(tmp_path, probe):
    """Precomputed suite inputs (for machines without espeak-ng / Whisper / MiniLM) give the same suite."""
    import pickle

    from talkstream.eval.evaluate import prepare_suite

    inputs = prepare_suite((900_002,), seconds=2.0)
    inputs = pickle.loads(pickle.dumps(inputs))  # what travels is a pickle
    c = inputs["clips"][900_002]
    assert c["audio_features"].shape[1] == 384 and len(c["audio_features"]) >= 2 * c["clip"].n_frames
    captions = c["clip"].captions_per_frame()  # the caption timeline: one encoded caption per behaviour
    assert len(c["track"].of_frame) == len(captions) and len(c["track"].text) == len(set(captions))
    assert [captions[i] for i in np.unique(c["track"].of_frame, return_index=True)[1]] == list(dict.fromkeys(captions))
    a = run_suite(seeds=(900_002,), seconds=2.0, probe=probe)
    b = run_suite(seeds=(900_002,), seconds=2.0, probe=probe, inputs=inputs)
    assert abs(a["summary"]["mouth_error"] - b["summary"]["mouth_error"]) < 1e-6


def test_missing_suite_inputs_say_how_to_make_them(tmp_path):
    from talkstream.eval.evaluate import load_suite_inputs

    with pytest.raises(FileNotFoundError, match="--save-inputs"):
        load_suite_inputs(tmp_path / "nope.pkl")
    with pytest.raises(ValueError, match=r"no clip for seeds \[7\].*--save-inputs"):  # (eval suite --seeds 7)
        run_suite(seeds=(7,), inputs={"clips": {900_000: None}})


def test_report_prints_what_it_is_shown_and_writes_everything(tmp_path, capsys):
    from talkstream.machine import report

    res = dict(summary=dict(mouth_error=0.5), rows=[1, 2], path=tmp_path)
    out = tmp_path / "new" / "res.json"
    assert report(res, out, show=res["summary"]) is res
    assert json.loads(capsys.readouterr().out) == {"mouth_error": 0.5}
    assert json.loads(out.read_text()) == dict(summary=dict(mouth_error=0.5), rows=[1, 2], path=str(tmp_path))
    report(dict(a=1))  # no file: printed only
    assert json.loads(capsys.readouterr().out) == {"a": 1}


def test_latent_groups_follow_the_causal_vae_and_group_means_hold_one_state_per_latent():
    from talkstream.eval.evaluate import latent_group_mean, latent_groups

    assert latent_groups(10).tolist() == [0, 1, 1, 1, 1, 2, 2, 2, 2, 3]  # frame 0 alone, then 4 a latent
    x = np.array([5.0, 0, 0, 0, 4, 1, 1, 1, 1, 7])
    assert latent_group_mean(x).tolist() == [5.0, 1, 1, 1, 1, 1, 1, 1, 1, 7]  # an onset inside latent 1 is smeared
    still = np.repeat([0.2, 0.6, 0.1], [1, 4, 4])  # already one state per latent: unchanged
    assert np.allclose(latent_group_mean(still), still)
    assert latent_group_mean(np.arange(5.0), temporal_factor=2).tolist() == [0, 1.5, 1.5, 3.5, 3.5]


def test_vae_roundtrip_encodes_each_segment_as_its_own_clip_and_passes_the_leftover_frames():
    import torch

    from talkstream.eval.evaluate import vae_roundtrip
    from talkstream.models.config import vae_config
    from talkstream.models.vae import CausalVAE
    from talkstream.stream.offline import frames_to_video, video_to_frames

    torch.manual_seed(0)
    vae = CausalVAE(vae_config("tiny")).eval()
    frames = np.random.default_rng(0).integers(0, 256, (12, 16, 16, 3), dtype=np.uint8)
    out = vae_roundtrip(vae, frames, segment=7)  # segments 0-6 (5 frames held, 2 as is) and 7-11 (5 held)
    assert out.shape == frames.shape and out.dtype == np.uint8
    assert np.array_equal(out[5:7], frames[5:7])
    with torch.no_grad():
        second = video_to_frames(vae.decode(vae.encode(frames_to_video(frames[7:12], 16))))
    assert np.array_equal(out[7:12], second)  # a fresh clip: nothing carried over from the first segment
    assert not np.array_equal(out[:5], frames[:5])  # (random weights: the round trip changes the frames)


def test_mouth_scores_gathers_error_speed_halves_and_amplitude_over_the_common_frames():
    from talkstream.eval.evaluate import mouth_amplitude, mouth_error_by_speed, mouth_scores

    truth = np.abs(np.sin(np.linspace(0, 12, 120)))
    read = 0.8 * np.roll(truth, 2)[:100]  # shorter, late and smaller
    s = mouth_scores(read, truth)
    assert s["mouth_error"] == np.abs(read - truth[:100]).mean()
    assert s == dict(
        mouth_error=s["mouth_error"], **mouth_error_by_speed(read, truth[:100]), **mouth_amplitude(read, truth[:100])
    )


def test_silhouette_iou_sees_a_shifted_or_damaged_outline():
    """1 for the truth itself, lower the further the head moves and where skin appears beside it; blind to the
    background; sizes must agree."""
    from talkstream.eval.metrics import person_mask, silhouette_iou
    from talkstream.world.behaviour import make_clip
    from talkstream.world.render import Renderer, render_states

    clip = make_clip(900_003, 0.4)
    bg = Renderer(clip.identity, 128).background()
    truth = np.stack(list(render_states(clip.identity, clip.states, 128)))
    assert not person_mask(bg, bg).any() and 0.1 < person_mask(truth[0], bg).mean() < 0.9
    assert silhouette_iou(truth, truth, bg)["silhouette_iou"] == 1.0
    ious = [silhouette_iou(np.roll(truth, px, axis=2), truth, bg)["silhouette_iou"] for px in (1, 3, 8)]
    assert 1.0 > ious[0] > ious[1] > ious[2]
    blob = truth.copy()
    blob[:, 4:34, 4:34] = 255 - bg[4:34, 4:34]  # a patch unlike the scene beside the head (where it is empty)
    assert not person_mask(truth[:, 4:34, 4:34], bg[4:34, 4:34]).any()
    damaged = silhouette_iou(blob, truth, bg)
    assert damaged["silhouette_iou"] < 0.98 and damaged["silhouette_iou_per_frame"].shape == (len(truth),)
    assert silhouette_iou(np.broadcast_to(bg, truth.shape), truth, bg)["silhouette_iou"] == 0.0  # nobody there
    with pytest.raises(ValueError, match="differ in size"):
        silhouette_iou(truth[:, :64], truth, bg)
