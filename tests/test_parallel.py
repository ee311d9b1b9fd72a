"""Timestep-forcing pipeline parallelism on CPU processes (gloo), started as torchrun starts them: the pipelined
stream equals the single-process timestep-forcing stream, idle input waits without time-outs, and a failed or
killed rank ends every process with a message that names it."""

import json
import os
import sys
import time
from pathlib import Path

import pytest
import torch

from talkstream.models.config import dit_config
from talkstream.models.dit import WanDiT
from talkstream.stream.engine import StreamConfig
from talkstream.stream.parallel import (
    PipelineError,
    TPPConfig,
    init_pipeline,
    launch_local,
    role_name,
    split_steps,
    stop_on_failure,
    timestep_forcing_stream,
)

H = W = 4  # latent size of the tiny model (2 x 2 tokens a frame)


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """The tiny model runs ~40x faster on one thread than on two a loaded machine shares (as the ranks do)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _tiny_dit() -> WanDiT:
    torch.manual_seed(0)
    dit = WanDiT(dit_config("tiny"))
    with torch.no_grad():
        for p in dit.parameters():
            if not p.any():
                p.normal_(0, 0.05)
    return dit.eval()


def _inputs(dit: WanDiT):
    g = torch.Generator().manual_seed(1)
    ref = torch.randn(1, dit.cfg.in_dim, 1, H, W, generator=g)
    text = torch.randn(1, 5, dit.cfg.text_dim, generator=g)
    text2 = torch.randn(1, 7, dit.cfg.text_dim, generator=g)
    return ref, text, text2


def _audio(dit: WanDiT, first: int, k: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(100 + first)
    return torch.randn(k, dit.cfg.audio_tokens_per_frame, dit.cfg.audio_dim, generator=g)


def _prompts(text2, change_at: int):
    return lambda first, k: (text2, None) if first == change_at else None


def _worker(out: str, stream: dict, opts: dict, n_chunks: int, fault: dict) -> None:
    """One rank: rank 0 feeds audio (pausing once if asked) and a prompt change, the middle ranks step, the last
    writes the clean latents it received."""
    torch.set_num_threads(1)
    rank = int(os.environ["RANK"])
    sys.stderr = open(Path(out) / f"rank{rank}.err", "w")  # noqa: SIM115 - the process ends with os._exit
    cfg = TPPConfig(StreamConfig(**stream), **opts)

    def work() -> int:
        proc = init_pipeline(cfg)
        dit = _tiny_dit()
        ref, text, text2 = _inputs(dit)
        if fault.get("rank") == rank:
            _inject(dit, fault)
        st = proc.stream(cfg)
        if rank == 0:
            starts = []

            def audio(first, k):
                starts.append(time.monotonic())  # rank 0 may start this chunk (after any wait for the decode rank)
                if first == fault.get("pause_at"):
                    time.sleep(fault["pause_s"])
                return _audio(dit, first, k)

            st.run_input(dit, ref, audio, text, None, _prompts(text2, stream["chunk"] * 2), n_chunks)
            (Path(out) / "starts.json").write_text(json.dumps(starts))
        elif rank < proc.world - 1:
            st.run_steps(dit)
        else:
            zs, emitted = [], []
            for _, z in st.latents():
                zs.append(z)
                time.sleep(fault.get("decode_s", 0.0))  # a slow consumer (decoder, video writer)
                emitted.append(time.monotonic())
            torch.save(zs, Path(out) / "latents.pt")
            (Path(out) / "emitted.json").write_text(json.dumps(emitted))
        proc.close()
        return 0

    stop_on_failure(work)
    sys.stderr.flush()
    os._exit(0)


def _inject(dit: WanDiT, fault: dict) -> None:
    """This rank fails at its ``at``-th forward pass: an exception, or the process killed outright."""
    calls = [0]
    forward = dit.forward_chunk

    def failing(*a, **kw):
        calls[0] += 1
        if calls[0] == fault["at"]:
            if fault["kind"] == "kill":
                os._exit(9)
            raise RuntimeError("injected failure")
        return forward(*a, **kw)

    dit.forward_chunk = failing


def _run(tmp_path, world, stream, n_chunks, opts=None, fault=None, timeout=180):
    opts = {"heartbeat_s": 0.2, "peer_timeout_s": 3.0, **(opts or {})}
    args = (str(tmp_path), stream, opts, n_chunks, fault or {})
    codes = launch_local(_worker, world, args, timeout_s=timeout, preload=(__name__,))
    errs = {r: (tmp_path / f"rank{r}.err").read_text() for r in range(world) if (tmp_path / f"rank{r}.err").exists()}
    return codes, errs


def _reference(stream: dict, n_chunks: int, world: int) -> list[torch.Tensor]:
    dit = _tiny_dit()
    ref, text, text2 = _inputs(dit)
    cfg = TPPConfig(StreamConfig(**stream))
    return list(
        timestep_forcing_stream(
            dit,
            cfg,
            ref,
            lambda first, k: _audio(dit, first, k),
            text,
            prompts=_prompts(text2, stream["chunk"] * 2),
            n_chunks=n_chunks,
            world=world,
        )
    )


def _max_diff(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    assert len(a) == len(b) and [x.shape for x in a] == [x.shape for x in b]
    return max((x - y).abs().max().item() for x, y in zip(a, b))


# -- the pure parts ------------------------------------------------------------------------------------------------
def test_split_steps_and_roles():
    assert split_steps(4, 4) == [range(0, 1), range(1, 2), range(2, 3), range(3, 4)]
    assert split_steps(4, 2) == [range(0, 2), range(2, 4)]
    assert split_steps(4, 3) == [range(0, 2), range(2, 3), range(3, 4)]
    assert split_steps(4, 1) == [range(0, 4)]
    with pytest.raises(ValueError, match="1 .. 4"):
        split_steps(4, 5)
    assert role_name(0, 5, 4) == "denoising step 0, audio and prompt input"
    assert role_name(2, 3, 4) == "decode"
    assert role_name(1, 3, 4) == "denoising steps 2-3"


def test_config_refuses_what_would_serialise_the_pipeline():
    with pytest.raises(ValueError, match="memory_bank feeds clean latents back"):
        TPPConfig(StreamConfig(anchor="memory_bank"))
    with pytest.raises(ValueError, match="start_from='previous'"):
        TPPConfig(StreamConfig(reference_init=0.9, start_from="previous"))
    with pytest.raises(ValueError, match="peer_timeout_s"):
        TPPConfig(heartbeat_s=1.0, peer_timeout_s=1.5)
    assert TPPConfig(StreamConfig(sampler="few_step", timesteps=(1000, 750, 500, 250))).n_steps == 4
    assert TPPConfig().sink_chunk(5) == 5 and TPPConfig(sink_at=1).sink_chunk(5) == 1


def test_stream_settings_on_n_ranks():
    from talkstream.stream.parallel import tpp_stream_config

    euler = tpp_stream_config(StreamConfig(sampler="euler", steps=12), 5)
    assert euler.steps == 4 and len(euler.sigmas()) == 5  # one euler step a DiT rank
    few = StreamConfig(sampler="few_step", timesteps=(1000, 750, 500, 250))
    assert tpp_stream_config(few, 3) == few  # 4 steps grouped on 2 DiT ranks
    with pytest.raises(ValueError, match="2 .. 5"):
        tpp_stream_config(few, 6)


def test_reference_stream_gives_each_step_its_own_cache_and_no_commit_pass():
    """Per chunk: one forward per step, each writing (commit) into its own step's cache at that step's timestep;
    the caches then hold different keys (each its own noise level's) for the same frames."""
    dit = _tiny_dit()
    ref, text, _ = _inputs(dit)
    calls = []
    forward = dit.forward_chunk

    def spy(x, t, cache, *a, **kw):
        calls.append((id(cache), kw.get("commit"), round(float(t), 3)))
        return forward(x, t, cache, *a, **kw)

    dit.forward_chunk = spy
    stream = StreamConfig(chunk=2, window=4, sampler="few_step", timesteps=(1000, 750, 500), timestep_shift=3.0)
    cfg = TPPConfig(stream)
    caches = []
    new_cache = dit.new_cache

    def keep(window):
        caches.append(new_cache(window))
        return caches[-1]

    dit.new_cache = keep
    out = list(timestep_forcing_stream(dit, cfg, ref, lambda f, k: _audio(dit, f, k), text, n_chunks=3))
    assert len(out) == 3 and out[0].shape == (1, dit.cfg.in_dim, 2, H, W)
    ts = [round(float(s) * 1000, 3) for s in stream.sigmas()[:-1]]
    assert len(calls) == 3 * 3  # steps x chunks: no clean commit pass
    for c in range(3):
        chunk_calls = calls[3 * c : 3 * c + 3]
        assert [cid for cid, _, _ in chunk_calls] == [id(x) for x in caches]
        assert all(commit for _, commit, _ in chunk_calls)
        assert [t for _, _, t in chunk_calls] == ts
    assert all(c.frame_ids == [2, 3, 4, 5] for c in caches)  # a window of 4 after 6 frames
    assert not torch.equal(caches[0].k[0], caches[1].k[0])
    torch.testing.assert_close(caches[0].sink_k[0], caches[2].sink_k[0])  # the sinks are shared (t = 0)


def test_one_step_equals_the_engines_single_cache_timestep_forcing():
    """With one step, per-step caches and the engine's single-cache ``cache_mode="timestep_forcing"`` are the same
    thing (and seed 0 draws the same noise): bit-equal chunks. With more steps they are different methods."""
    from talkstream.models.config import vae_config
    from talkstream.models.vae import CausalVAE
    from talkstream.stream import chunk, engine

    if "timestep_forcing" not in getattr(chunk, "CACHE_MODES", ()):
        pytest.skip("this engine has no timestep_forcing cache mode")
    dit = _tiny_dit()
    ref, text, _ = _inputs(dit)
    sc = StreamConfig(chunk=2, window=4, sampler="few_step", timesteps=(1000,), cache_mode="timestep_forcing")
    eng = engine.StreamEngine(dit, CausalVAE(vae_config("tiny")), sc, "cpu", async_decode=False)
    eng.start(ref, text)
    got = [eng.next_chunk(_audio(dit, 2 * c, 2)).latents for c in range(4)]
    want = list(timestep_forcing_stream(dit, TPPConfig(sc), ref, lambda f, k: _audio(dit, f, k), text, n_chunks=4))
    assert _max_diff(got, want) == 0.0


# -- several processes -------------------------------------------------------------------------------------------
STREAM = dict(chunk=2, window=4, sampler="few_step", timesteps=(1000, 500), anchor="rolling_sink", reference_init=0.9)


def test_pipeline_equals_single_process_and_idle_input_waits(tmp_path):
    """3 processes (steps 0 and 1, decode): rolling sink, a prompt change at chunk 2, and rank 0's input silent for
    2.5 s (past the 1 s heartbeat time-out: waiting for input is not a failure)."""
    n = 7
    fault = dict(pause_at=2 * 4, pause_s=2.5)  # before chunk 4
    codes, errs = _run(tmp_path, 3, STREAM, n, opts=dict(peer_timeout_s=1.0), fault=fault)
    assert codes == [0, 0, 0], errs
    got = torch.load(tmp_path / "latents.pt")
    want = _reference(STREAM, n, world=3)
    assert _max_diff(got, want) <= 1e-5
    # the rolling sink and the prompt change did change the stream (so the comparison covers them)
    fixed = _reference(dict(STREAM, anchor="reference"), n, world=3)
    assert _max_diff(want, fixed) > 1e-3


def test_one_step_a_rank_and_grouped_steps_equal_single_process(tmp_path):
    """4 steps on 5 processes (one step each + decode; the rolling sink switches at chunk 5, when the ranks are at 5
    different chunks), and on 3 (steps 0-1, steps 2-3, decode) with the euler sampler, audio guidance (two passes a
    step) and anchor-heavy sinks: both equal one process."""
    few = dict(chunk=2, window=4, sampler="few_step", timesteps=(1000, 750, 500, 250), anchor="rolling_sink")
    codes, errs = _run(tmp_path, 5, few, 7)
    assert codes == [0] * 5, errs
    assert _max_diff(torch.load(tmp_path / "latents.pt"), _reference(few, 7, world=5)) <= 1e-5
    euler = dict(chunk=2, window=4, sampler="euler", steps=4, audio_guidance=2.0, anchor="anchor_heavy")
    (tmp_path / "g").mkdir()
    codes, errs = _run(tmp_path / "g", 3, euler, 5)
    assert codes == [0] * 3, errs
    assert _max_diff(torch.load(tmp_path / "g" / "latents.pt"), _reference(euler, 5, world=3)) <= 1e-5


def test_a_slow_decode_rank_holds_rank_0_to_max_in_flight_chunks(tmp_path):
    """A decode rank (or its consumer) taking 0.3 s a chunk, max_in_flight 2: rank 0 starts chunk c only after chunk
    c - 2 was emitted, so the chunks in flight stay 2 however fast the DiT ranks are; the stream is still exact."""
    n = 6
    codes, errs = _run(tmp_path, 3, STREAM, n, opts=dict(max_in_flight=2), fault=dict(decode_s=0.3))
    assert codes == [0, 0, 0], errs
    starts = json.loads((tmp_path / "starts.json").read_text())
    emitted = json.loads((tmp_path / "emitted.json").read_text())
    assert len(emitted) == len(starts) == n
    assert all(starts[c] >= emitted[c - 2] for c in range(2, n))
    assert starts[2] - starts[0] >= 0.3  # without the bound rank 0 would have run ahead at the DiT ranks' pace
    assert _max_diff(torch.load(tmp_path / "latents.pt"), _reference(STREAM, n, world=3)) <= 1e-5


def test_a_failing_rank_stops_every_process_with_its_message(tmp_path):
    codes, errs = _run(tmp_path, 3, STREAM, 8, fault=dict(rank=1, at=3, kind="raise"))
    assert codes == [1, 1, 1], errs
    msg = "rank 1 (denoising step 1) failed: RuntimeError: injected failure"
    assert all(msg in errs[r] for r in range(3)), errs
    assert not (tmp_path / "latents.pt").exists()


def test_a_killed_rank_is_found_by_its_silent_heartbeat(tmp_path):
    codes, errs = _run(tmp_path, 3, STREAM, 8, fault=dict(rank=1, at=3, kind="kill"))
    assert codes[1] == 9 and codes[0] == codes[2] == 1, (codes, errs)
    for r in (0, 2):
        assert "rank 1 (denoising step 1) has sent no heartbeat" in errs[r], errs


def test_pipeline_needs_a_process_group():
    with pytest.raises(PipelineError, match="torch.distributed"):
        from talkstream.stream.parallel import TPPStream

        TPPStream(TPPConfig())


def test_stats_time_to_first_frame_and_steady_fps():
    from talkstream.stream.parallel import TPPStats

    s = TPPStats(started=1.0, first_frame_at=1.5, frames=48, chunks=4, chunk_times=[1.5, 1.7, 1.9, 2.1])
    assert s.ttff == 0.5 and round(s.steady_fps(12), 6) == 60.0  # the last 2 chunks' 24 frames in 0.4 s
    assert TPPStats(chunk_times=[1.0, 2.0]).steady_fps(12) is None


# -- the command line ------------------------------------------------------------------------------------------------
def test_generate_pipeline_tpp_under_torchrun_writes_the_video(tiny_weights, tmp_path):
    """torchrun --nproc-per-node 3 -m talkstream generate --pipeline tpp: the tiny model's euler sampler runs 2 steps
    (one a rank), the last rank writes the mp4 with its audio and prints the run's JSON."""
    import subprocess

    import numpy as np

    from talkstream.media import read_video, write_audio

    write_audio(tmp_path / "speech.wav", (0.1 * np.sin(np.arange(12000) / 9)).astype(np.float32))  # 0.75 s
    out = tmp_path / "tpp.mp4"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "3", "-m", "talkstream"]
    cmd += ["generate", "--pipeline", "tpp", "--weights", str(tiny_weights), "--size", "32", "--quiet"]
    cmd += ["--audio", str(tmp_path / "speech.wav"), "--out", str(out), "--anchor", "rolling_sink"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads(r.stdout.strip().splitlines()[-1])
    assert res["pipeline"] == "tpp" and res["ranks"] == 3 and res["frames"] == 19
    assert res["layout"] == ["denoising step 0, audio and prompt input", "denoising step 1", "decode"]
    video = read_video(out)
    assert len(video.frames) == 19 and video.audio is not None


def test_generate_pipeline_tpp_bad_input_ends_every_rank_with_its_reason(tiny_weights, tmp_path):
    """A missing image on rank 0: every rank prints rank 0's error, whether it read it itself or torchrun ended it
    first (SIGTERM), and nothing is written."""
    import subprocess

    import numpy as np

    from talkstream.media import write_audio

    write_audio(tmp_path / "speech.wav", (0.1 * np.sin(np.arange(4000) / 9)).astype(np.float32))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "3", "-m", "talkstream"]
    cmd += ["generate", "--pipeline", "tpp", "--weights", str(tiny_weights), "--size", "32", "--quiet"]
    cmd += [
        "--audio",
        str(tmp_path / "speech.wav"),
        "--out",
        str(tmp_path / "x.mp4"),
        "--image",
        str(tmp_path / "no.png"),
    ]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert r.returncode != 0
    lines = [x for x in r.stderr.splitlines() if x.startswith("talkstream: error:")]
    assert len(lines) == 3 and all(
        "rank 0 failed: MediaError:" in x and "no.png: no such image file" in x for x in lines
    )
    assert not (tmp_path / "x.mp4").exists()


def test_generate_pipeline_tpp_without_torchrun_is_a_one_line_error(tiny_weights, capsys, monkeypatch):
    from talkstream.cli import main

    monkeypatch.delenv("RANK", raising=False)
    assert main(["generate", "--pipeline", "tpp", "--weights", str(tiny_weights), "--say", "hi"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("talkstream: error: --pipeline tpp runs one process a denoising step") and "\n" not in err


def test_tpp_speed_benchmark_runs_at_a_tiny_size(tmp_path):
    """benchmarks/tpp_speed.py on CPU processes (gloo) with the tiny model: one process (engine and timestep
    forcing) and pipelines of 2 and 3, every case measured, JSON and plot written (timings are not asserted)."""
    import subprocess

    out = tmp_path / "tpp.json"
    script = Path(__file__).resolve().parents[1] / "benchmarks" / "tpp_speed.py"
    cmd = [sys.executable, str(script), "--device", "cpu", "--models", "tiny", "--sizes", "32x32", "--gpus", "1", "2"]
    cmd += ["3", "--chunks", "4", "--warmup", "1", "--out", str(out)]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads(out.read_text())["results"]
    assert [(x["gpus"], x["mode"]) for x in res] == [
        (1, "engine_commit"),
        (1, "timestep_forcing"),
        (2, "pipeline"),
        (3, "pipeline"),
    ]
    assert all(x["fps"] > 0 and x["ttff_s"] > 0 and x["frames"] == 1 + 4 * (4 * 3 - 1) for x in res)
    roles = [x["role"] for x in res[3]["ranks"]]
    assert roles == ["denoising steps 0-1, audio and prompt input", "denoising steps 2-3", "decode"]
    assert all(x["compute_ms_median"] > 0 for x in res[3]["ranks"])
    assert out.with_suffix(".png").stat().st_size > 0
