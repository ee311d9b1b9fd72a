"""Streaming engine: streamed == offline, chunked decode == whole decode, anchor modes, bounded memory."""

import numpy as np
import pytest
import torch

from talkstream.diffusion.flow import euler_sigmas
from talkstream.models.config import DiTConfig, dit_config, vae_config
from talkstream.models.dit import WanDiT
from talkstream.models.encoders import audio_windows
from talkstream.models.vae import CausalVAE
from talkstream.stream.chunk import denoise_chunk
from talkstream.stream.engine import AudioFeed, StreamConfig, StreamEngine

A = 384


def _ref(seed=1):
    return torch.randn(1, 8, 1, 4, 4, generator=torch.Generator().manual_seed(seed))


def _features(seconds=3.0, seed=2):
    return np.random.default_rng(seed).standard_normal((int(50 * seconds), A)).astype(np.float32)


def _run(dit, vae, cfg, feats, step=None, n_chunks=None):
    """Stream; ``step``: feed the features that many at a time, as they would arrive live."""
    eng = StreamEngine(dit, vae, cfg, async_decode=True)
    eng.start(_ref())
    feed = AudioFeed(0, 0)
    pos = [0]

    def audio_for(first, k):
        while not feed.ready(first, k):
            if pos[0] >= len(feats):
                feed.close()
                if feed.received // 2 <= feed.offset_frame or first * 4 - 3 >= len(feats) // 2:
                    raise StopIteration
                break
            n = step or len(feats)
            feed.push(feats[pos[0] : pos[0] + n])
            pos[0] += n
        if first * 4 - 3 >= len(feats) // 2:
            raise StopIteration
        return feed.windows(first, k)

    lat = []
    orig = eng.next_chunk

    def spy(audio):
        c = orig(audio)
        lat.append(c.latents)
        return c

    eng.next_chunk = spy
    frames = list(eng.frames(audio_for, n_chunks=n_chunks))
    return eng, torch.cat(lat, 2), frames, feed


def test_streamed_equals_offline_and_chunked_decode(stream_models):
    dit, vae = stream_models
    cfg = StreamConfig(chunk=2, window=4, steps=3)
    feats = _features(3.0)
    _, lat_live, frames_live, feed = _run(dit, vae, cfg, feats, step=7)
    _, lat_all, frames_all, _ = _run(dit, vae, cfg, feats)
    torch.testing.assert_close(lat_live, lat_all, atol=1e-5, rtol=1e-5)
    # an independent offline loop over the whole audio: same cache, same chunk steps
    n_lat = lat_all.shape[2]
    g = torch.Generator().manual_seed(cfg.seed)
    cache = dit.new_cache(window=cfg.window)
    dit.prefill_sinks(_ref(), cache)
    aw = audio_windows(torch.from_numpy(feats), n_lat)[None]
    ref = []
    for a in range(0, n_lat, cfg.chunk):
        noise = torch.randn(1, 8, cfg.chunk, 4, 4, generator=g)
        ref.append(
            denoise_chunk(
                dit,
                cache,
                noise,
                euler_sigmas(3, cfg.timestep_shift),
                None,
                aw[:, a : a + cfg.chunk],
                generator=g,
                sampler="euler",
            )
        )
    torch.testing.assert_close(lat_all, torch.cat(ref, 2)[:, :, :n_lat], atol=1e-5, rtol=1e-5)
    # frames: chunk-by-chunk (async) decode == decoding all latents at once; indices are consecutive
    idx = [i for i, _ in frames_all]
    assert idx == list(range(len(idx))) and len(idx) == 1 + 4 * (n_lat - 1)
    with torch.no_grad():
        whole = ((vae.decode(lat_all)[0].permute(1, 2, 3, 0).clamp(-1, 1) + 1) * 127.5).round().byte().numpy()
    got = np.stack([f for _, f in frames_all])
    assert np.abs(got.astype(int) - whole.astype(int)).max() <= 1
    assert all((a[1] == b[1]).all() for a, b in zip(frames_live, frames_all))
    assert len(feed.buf) < 2 * 4 * 4 + 16  # fed features are dropped once no window needs them


def test_audio_changes_the_stream(stream_models):
    dit, vae = stream_models
    cfg = StreamConfig(chunk=2, window=4, steps=2)
    _, a, _, _ = _run(dit, vae, cfg, _features(1.0, seed=2))
    _, b, _, _ = _run(dit, vae, cfg, _features(1.0, seed=3))
    assert (a - b).abs().max() > 1e-3


def _sink_keys(dit, latents):
    cache = dit.new_cache(window=4)
    dit.prefill_sinks(latents, cache)
    return cache.sink_k[0]


def test_anchor_reference_and_anchor_heavy(stream_models):
    dit, vae = stream_models
    eng, *_ = _run(dit, vae, StreamConfig(chunk=2, window=4, steps=2), _features(1.0), n_chunks=2)
    assert eng.cache.n_sink == 1
    torch.testing.assert_close(eng.cache.sink_k[0], _sink_keys(dit, _ref()))
    eng, *_ = _run(
        dit,
        vae,
        StreamConfig(chunk=2, window=4, steps=2, anchor="anchor_heavy", anchor_copies=3),
        _features(1.0),
        n_chunks=2,
    )
    assert eng.cache.n_sink == 3
    torch.testing.assert_close(eng.cache.sink_k[0], _sink_keys(dit, _ref().repeat(1, 1, 3, 1, 1)))


def test_anchor_rolling_sink_replaces_reference_by_first_generated_frame(stream_models):
    dit, vae = stream_models
    eng, lat, *_ = _run(
        dit, vae, StreamConfig(chunk=2, window=4, steps=2, anchor="rolling_sink"), _features(2.0), n_chunks=3
    )
    assert eng.cache.n_sink == 1
    torch.testing.assert_close(eng.sinks, lat[:, :, :1])
    torch.testing.assert_close(eng.cache.sink_k[0], _sink_keys(dit, lat[:, :, :1]))
    assert (eng.cache.sink_k[0] - _sink_keys(dit, _ref())).abs().max() > 1e-3


def test_anchor_memory_bank_and_refinement(stream_models):
    dit, vae = stream_models
    cfg = StreamConfig(chunk=2, steps=2, anchor="memory_bank", long_term_every=2, long_term_size=3, short_term=2)
    eng, lat, *_ = _run(dit, vae, cfg, _features(6.0), n_chunks=8)
    assert len(eng.long_term) == 3 and eng.cache.n_sink == 4  # reference + 3 long-term latents
    torch.testing.assert_close(eng.sinks[:, :, :1], _ref())
    torch.testing.assert_close(
        eng.sinks[:, :, 1:], torch.cat([lat[:, :, 2 * c * 2 - 1 : 2 * c * 2] for c in (2, 3, 4)], 2)
    )
    assert eng.cache.n_context == 2  # short-term memory: the latest latents
    eng_r, lat_r, *_ = _run(dit, vae, StreamConfig(**{**cfg.__dict__, "refine_every": 2}), _features(6.0), n_chunks=2)
    eng_n, lat_n, *_ = _run(dit, vae, cfg, _features(6.0), n_chunks=2)
    assert eng_r.refinements == 1 and eng_n.refinements == 0
    torch.testing.assert_close(lat_r, lat_n)  # refinement repairs memory, not what was already emitted
    assert (eng_r.cache.k[0] - eng_n.cache.k[0]).abs().max() > 1e-4  # ... and the window now holds the repair


def test_memory_and_positions_bounded_over_a_long_stream(stream_models):
    dit, vae = stream_models
    eng = StreamEngine(
        dit, vae, StreamConfig(chunk=2, short_term=2, steps=1, anchor="memory_bank", long_term_every=3, refine_every=5)
    )
    eng.start(_ref())
    feed = AudioFeed(0, 0)
    sizes, buffered = [], []
    for i in range(40):
        feed.push(_features(0.32, seed=i))  # 8 video frames of features per 2-latent chunk
        eng.next_chunk(feed.windows(eng.next_latent, 2))
        sizes.append(eng.cache.nbytes())
        buffered.append(len(feed.buf))
        assert eng.cache.n_context <= 2 and eng.cache.n_sink <= 4
    assert len(set(sizes[10:])) == 1 and max(buffered) <= 32
    assert eng.cache.next_frame == 80 and eng.refinements == 8


def test_stream_config_errors():
    with pytest.raises(ValueError, match="anchor"):
        StreamConfig(anchor="magic")
    with pytest.raises(ValueError, match="sampler"):
        StreamConfig(sampler="dpm")
    with pytest.raises(ValueError, match="features"):
        AudioFeed(0, 0).push(np.zeros((3, 5)))


def test_teacher_generates_window_by_window():
    """The offline teacher samples windows of its trained length; later windows start from the previous
    window's last latents (clean motion latents), so generating further never changes what came before."""
    from talkstream.models.dit import WanDiT
    from talkstream.models.vae import CausalVAE
    from talkstream.stream.offline import OfflineGenerator

    torch.manual_seed(0)
    dit, vae = WanDiT(dit_config("tiny")).eval(), CausalVAE(vae_config("tiny")).eval()
    dit.checkpoint_info = dict(window_latents=3, motion_latents=1, look_back=0, look_ahead=0)
    seen = []
    dit.register_forward_pre_hook(lambda m, args: seen.append((args[0].shape[2], args[1].flatten()[0].item())))
    gen = OfflineGenerator(dit, vae, size=32, steps=2, audio_guidance=1.0)
    ref = np.random.default_rng(0).integers(0, 255, (32, 32, 3), dtype=np.uint8)
    feats = np.random.default_rng(1).standard_normal((60, 384)).astype(np.float32)
    short = gen.generate(ref, feats, 9)
    seen.clear()
    long = gen.generate(ref, feats, 21)  # 6 latents: 3 new, then 1 motion + 2 new, then 1 motion + 1 new
    assert short.shape == (9, 32, 32, 3) and long.shape == (21, 32, 32, 3)
    assert np.array_equal(short, long[:9])
    assert [n for n, _ in seen] == [3, 3, 3, 3, 2, 2] and [t for _, t in seen][2:] == [0.0] * 4
    gen.decode_latents = 1  # decoding latent by latent (bounded memory for long videos) gives the same frames
    assert np.abs(gen.generate(ref, feats, 21).astype(int) - long).max() <= 1
    gen.decode_latents = 8
    # teacher forcing (analysis): other motion latents change the later windows only; too few are an error
    torch.nn.init.normal_(dit.head.head.weight, std=0.5)  # (a fresh DiT's zero head ignores every input)
    own = gen.generate(ref, feats, 21)
    forced = gen.generate(ref, feats, 21, forced_motion=torch.randn(1, vae.cfg.latent_dim, 6, 4, 4))
    assert np.array_equal(forced[:9], own[:9]) and not np.array_equal(forced[9:], own[9:])
    with pytest.raises(ValueError, match="forced_motion"):
        gen.generate(ref, feats, 21, forced_motion=torch.randn(1, vae.cfg.latent_dim, 2, 4, 4))


def test_reference_init_starts_the_teachers_sampling_from_the_noised_reference():
    """``reference_init`` s < 1: the schedule starts at s (then the sigmas below it), and the new latents start as the
    reference latent noised to s, so s -> 0 returns the reference itself in every frame; 1 is the plain sampler."""
    from talkstream.diffusion.flow import reference_sigmas
    from talkstream.stream.engine import ChunkDecoder
    from talkstream.stream.offline import OfflineGenerator, frames_to_video

    sig = euler_sigmas(8, 3.0)
    assert torch.equal(reference_sigmas(sig, 1.0), sig)
    cut = reference_sigmas(sig, 0.9)
    assert cut[0] == 0.9 and cut[-1] == 0 and (cut[1:] < 0.9).all() and (cut.diff() < 0).all()
    torch.manual_seed(0)
    dit, vae = WanDiT(dit_config("tiny")).eval(), CausalVAE(vae_config("tiny")).eval()
    dit.checkpoint_info = dict(window_latents=3, motion_latents=1, look_back=0, look_ahead=0)
    torch.nn.init.normal_(dit.head.head.weight, std=0.5)  # (a fresh DiT's zero head ignores every input)
    ref = np.random.default_rng(0).integers(0, 255, (32, 32, 3), dtype=np.uint8)
    feats = np.random.default_rng(1).standard_normal((60, 384)).astype(np.float32)
    plain = OfflineGenerator(dit, vae, size=32, steps=4, audio_guidance=1.0)
    assert np.array_equal(
        plain.generate(ref, feats, 9),
        OfflineGenerator(dit, vae, size=32, steps=4, audio_guidance=1.0, reference_init=1.0).generate(ref, feats, 9),
    )
    near = OfflineGenerator(dit, vae, size=32, steps=4, audio_guidance=1.0, reference_init=1e-6).generate(ref, feats, 9)
    with torch.no_grad():  # the reference latent in all 3 latents, decoded
        still = vae.encode(frames_to_video(ref[None], 32))
        want = ChunkDecoder(vae)(still.expand(-1, -1, 3, -1, -1).contiguous())
    assert np.abs(near.astype(int) - want.astype(int)).max() <= 1
    assert not np.array_equal(near, plain.generate(ref, feats, 9))
    with pytest.raises(ValueError, match="start sigma"):
        OfflineGenerator(dit, vae, size=32, reference_init=0.0).generate(ref, feats, 9)


def test_reference_init_starts_each_stream_chunk_from_the_noised_reference(stream_models):
    """The engine's ``reference_init``: every chunk starts at that sigma from the reference latent, so a start near 0
    commits the reference itself; 1 (the default) is the plain stream; outside (0, 1] is an error."""
    dit, vae = stream_models
    cfg = StreamConfig(chunk=2, window=4, steps=4)
    _, plain, _, _ = _run(dit, vae, cfg, _features(), n_chunks=2)
    _, same, _, _ = _run(
        dit, vae, StreamConfig(chunk=2, window=4, steps=4, reference_init=1.0), _features(), n_chunks=2
    )
    assert torch.equal(plain, same)
    _, near, _, _ = _run(
        dit, vae, StreamConfig(chunk=2, window=4, steps=4, reference_init=1e-6), _features(), n_chunks=2
    )
    assert torch.allclose(near, _ref().expand_as(near), atol=1e-4) and not torch.allclose(plain, near, atol=1e-2)
    assert StreamConfig(steps=4, reference_init=0.5).sigmas()[0] == 0.5
    from talkstream.stream.avatar import REFERENCE_INIT, stream_config  # trained checkpoints start from it

    assert stream_config(dit).reference_init == REFERENCE_INIT < 1
    assert stream_config(dit, reference_init=1.0).reference_init == 1.0
    with pytest.raises(ValueError, match="reference_init"):
        StreamConfig(reference_init=1.5)


def test_start_from_previous_starts_each_later_chunk_from_the_last_committed_latent(stream_models):
    """``start_from="previous"``: the first chunk starts from the reference, each later one from the last latent
    the stream committed (near sigma 0 a chunk commits its start, so what it started from reads back)."""
    dit, vae = stream_models
    other = torch.randn_like(_ref())
    for start_from, expect in (("reference", _ref()), ("previous", other)):
        cfg = StreamConfig(chunk=2, window=4, steps=4, reference_init=1e-6, start_from=start_from)
        eng = StreamEngine(dit, vae, cfg)
        eng.start(_ref())
        audio = torch.zeros(2, dit.cfg.audio_tokens_per_frame, dit.cfg.audio_dim)
        first = eng.next_chunk(audio).latents
        assert torch.allclose(first, _ref().expand_as(first), atol=1e-4)  # the first chunk: from the reference
        assert torch.equal(eng.last_latent, first[:, :, -1:])
        eng.last_latent = other  # (as if the stream had moved the head)
        second = eng.next_chunk(audio).latents
        assert torch.allclose(second, expect.expand_as(second), atol=1e-4)
    with pytest.raises(ValueError, match="start_from"):
        StreamConfig(start_from="noise")


def test_suite_generator_passes_the_timestep_shift(tmp_path):
    """``eval suite --timestep-shift``, ``--noise-seed`` and ``--reference-init`` reach the teacher's sampler (default
    shift: its own 3; default start: the teacher's ``TEACHER_REFERENCE_INIT``)."""
    from talkstream.eval.evaluate import checkpoint_generator
    from talkstream.models.checkpoint import save_checkpoint
    from talkstream.models.dit import WanDiT
    from talkstream.models.vae import CausalVAE
    from talkstream.stream.offline import TEACHER_REFERENCE_INIT

    torch.manual_seed(0)
    dit, vae = WanDiT(dit_config("tiny")).eval(), CausalVAE(vae_config("tiny")).eval()
    save_checkpoint(
        tmp_path / "t.safetensors", dit, "dit", dit.cfg, extra=dict(look_back=0, look_ahead=0, window_latents=3)
    )
    save_checkpoint(tmp_path / "v.safetensors", vae, "vae", vae.cfg)
    clip = type("Clip", (), dict(seed=1, n_frames=5))()
    from talkstream.stream.prompts import PromptTrack

    old = dict(audio_features=np.zeros((20, 384), np.float16), text=torch.zeros(1, 4, 384), text_mask=None)
    inputs = {"clips": {1: old | dict(track=PromptTrack(torch.zeros(1, 4, 384), None, np.zeros(5, np.int64)))}}
    ref = np.zeros((32, 32, 3), np.uint8)
    with pytest.raises(ValueError, match="no caption timelines"):  # inputs written before caption timelines
        checkpoint_generator(
            tmp_path / "t.safetensors", tmp_path / "v.safetensors", size=32, steps=2, inputs={"clips": {1: old}}
        )(ref, clip)
    with pytest.raises(ValueError, match="captions must be one of"):
        checkpoint_generator(tmp_path / "t.safetensors", tmp_path / "v.safetensors", captions="speaking")
    assert checkpoint_generator(
        tmp_path / "t.safetensors",
        tmp_path / "v.safetensors",
        size=32,
        steps=2,
        audio_guidance=1.0,
        inputs={"clips": {1: old}},
        captions="first_spoken",
    )(ref, clip).shape == (5, 32, 32, 3)

    def timesteps(**kw):
        seen = []
        gen = checkpoint_generator(
            tmp_path / "t.safetensors",
            tmp_path / "v.safetensors",
            size=32,
            steps=2,
            audio_guidance=1.0,
            inputs=inputs,
            **kw,
        )
        handle = torch.nn.modules.module.register_module_forward_pre_hook(  # the generator's own DiT
            lambda m, args: seen.append(args[1].flatten()[-1].item()) if isinstance(m, WanDiT) else None
        )
        try:
            gen(ref, clip)
        finally:
            handle.remove()
        return seen

    for shift, mid in ((None, 0.75), (1.0, 0.5)):  # 2 Euler steps from pure noise: sigma 1, then the middle
        seen = timesteps(timestep_shift=shift, reference_init=1.0)
        assert seen[0] == pytest.approx(1000) and seen[1] / seen[0] == pytest.approx(mid)
    assert timesteps()[0] == pytest.approx(1000 * TEACHER_REFERENCE_INIT) and TEACHER_REFERENCE_INIT < 1
    assert timesteps(reference_init=0.5)[0] == pytest.approx(500)
    draws = [
        checkpoint_generator(
            tmp_path / "t.safetensors",
            tmp_path / "v.safetensors",
            size=32,
            steps=2,
            audio_guidance=1.0,
            inputs=inputs,
            noise_seed=s,
        )(ref, clip)
        for s in (0, 0, 1)
    ]
    assert np.array_equal(draws[0], draws[1]) and not np.array_equal(draws[0], draws[2])  # --noise-seed


def test_a_moving_sink_keeps_the_identity_reference_for_ref_concat(stream_models):
    dit, vae = stream_models
    rc = WanDiT(DiTConfig.from_dict({**dit.cfg.to_dict(), "ref_concat": True})).eval()
    rc.load_state_dict(dit.state_dict(), strict=False)
    with torch.no_grad():
        rc.ref_embedding.weight.normal_(0, 0.05)
    eng, lat, *_ = _run(
        rc, vae, StreamConfig(chunk=2, window=4, steps=2, anchor="rolling_sink"), _features(2.0), n_chunks=3
    )
    torch.testing.assert_close(eng.sinks, lat[:, :, :1])  # the sink moved to the first generated frame...
    torch.testing.assert_close(eng.cache.ref_tokens, rc.embed_reference(_ref()))  # ...the reference did not


def test_a_prompt_track_gives_each_window_its_middle_latents_caption():
    from talkstream.stream.prompts import PromptTrack

    text = torch.arange(2.0)[:, None, None].expand(2, 3, 4)
    track = PromptTrack(text, torch.ones(2, 3, dtype=torch.bool), np.array([0] * 10 + [1] * 10))
    # latents 0..2 -> middle latent 1 = frame 4; latents 2..4 -> latent 3 = frame 12; past the end: the last frame
    assert [track.index_for(f, 3) for f in (0, 2, 4)] == [0, 1, 1]
    emb, mask = track.for_latents(2, 3)
    assert emb.shape == (1, 3, 4) and emb.unique().item() == 1 and mask.shape == (1, 3)
    calls = []

    def encode(caps):
        calls.append(caps)
        return torch.randn(len(caps), 5, 4), torch.ones(len(caps), 5, dtype=torch.bool)

    built = PromptTrack.from_captions(["idle", "idle", "speaks", "idle"], encode)
    assert calls == [["idle", "speaks"]] and built.of_frame.tolist() == [0, 0, 1, 0]
    half = track.to(dtype=torch.float16)  # (the suite's inputs travel in half precision)
    assert half.text.dtype == torch.float16 and torch.equal(half.mask, track.mask)
    assert torch.equal(half.to(dtype=torch.float32).text, text) and half.of_frame is track.of_frame
    with pytest.raises(ValueError, match="caption indices"):
        PromptTrack(text, None, np.array([0, 2]))
    with pytest.raises(ValueError, match="per video frame"):
        PromptTrack(text, None, np.zeros(0, int))
    with pytest.raises(ValueError, match="at least one"):
        PromptTrack.from_captions([], encode)


def test_teacher_and_engine_follow_a_prompt_track(stream_models):
    """A track that never changes is the one caption (bit-equal); one that changes moves only what comes after
    the change: the teacher's later windows, the engine's later chunks."""
    from talkstream.stream.avatar import Avatar
    from talkstream.stream.offline import OfflineGenerator
    from talkstream.stream.prompts import PromptTrack

    dit, vae = stream_models
    dit.checkpoint_info = dict(window_latents=3, motion_latents=1, look_back=0, look_ahead=0)
    ref = np.random.default_rng(0).integers(0, 255, (32, 32, 3), dtype=np.uint8)
    feats = _features(1.0)
    text = torch.randn(2, 4, A, generator=torch.Generator().manual_seed(3))
    one = PromptTrack(text, None, np.zeros(21, np.int64))
    later = PromptTrack(text, None, np.array([0] * 12 + [1] * 9))  # changes at frame 12 (latent 3)
    gen = OfflineGenerator(dit, vae, size=32, steps=2, audio_guidance=1.0)
    plain = gen.generate(ref, feats, 21, text[:1])
    assert np.array_equal(gen.generate(ref, feats, 21, one), plain)
    moved = gen.generate(ref, feats, 21, later)  # windows: latents 0-2 (caption 0), 2-4 and 4-5 (caption 1)
    assert np.array_equal(moved[:9], plain[:9]) and not np.array_equal(moved[9:], plain[9:])
    avatar = Avatar(dit, vae, cfg=StreamConfig(chunk=2, window=4, steps=2), size=32)
    stream = lambda t: np.stack(list(avatar.from_features(ref, feats, 21, t)))
    plain = stream(text[:1])
    assert np.array_equal(stream(one), plain)
    moved = stream(later)  # chunks: latents 0-1 (frames 0-4, caption 0), then 2-3 and 4-5 (caption 1)
    assert np.array_equal(moved[:5], plain[:5]) and not np.array_equal(moved[5:], plain[5:])
    del dit.checkpoint_info
