"""The OmniAvatar / LiveTalk DiT layout: the released key names and shapes, merged and LoRA-separate loading, the
reference channels, the held first frame, the packed audio path, LiveTalk's sinks, streaming through the engine."""

import json

import pytest
import torch
from safetensors.torch import save_file

from talkstream.models.checkpoint import CheckpointError
from talkstream.models.config import DiTConfig, TinyDecoderConfig, dit_config
from talkstream.models.dit import WanDiT
from talkstream.models.omniavatar import (
    LORA_TARGETS,
    RELEASE_FINGERPRINTS,
    build_omniavatar,
    detect_omniavatar_config,
    key_fingerprint,
    load_omniavatar,
    merge_lora,
    pack_audio_frames,
)


def _tiny(seed=0):
    torch.manual_seed(seed)
    m = WanDiT(dit_config("omniavatar-tiny")).eval()
    with torch.no_grad():  # zero-initialised parts (the head) would hide bugs
        for p in m.parameters():
            if not p.any():
                p.normal_(0, 0.05)
    return m


def _inputs(cfg, Fr=9, H=8, W=8, seed=1):
    g = torch.Generator().manual_seed(seed)
    return dict(
        x=torch.randn(1, cfg.in_dim, Fr, H, W, generator=g),
        t=torch.rand(1, Fr, generator=g) * 900 + 50,
        context=torch.randn(1, 7, cfg.text_dim, generator=g),
        audio=torch.randn(1, Fr, cfg.audio_tokens_per_frame, cfg.audio_dim, generator=g),
        ref=torch.randn(1, cfg.in_dim, 1, H, W, generator=g),
    )


@pytest.mark.parametrize("name", ["omniavatar1.3b", "omniavatar14b"])
def test_configs_reproduce_the_released_files_key_fingerprints(name):
    """OmniAvatar's / LiveTalk's loaders identify their merged files by an MD5 of the sorted key:shape list; our
    configs give exactly those fingerprints, so every released key and shape is ours."""
    with torch.device("meta"):
        sd = WanDiT(dit_config(name)).state_dict()
    assert RELEASE_FINGERPRINTS[key_fingerprint(sd)] == name
    assert sd["patch_embedding.weight"].shape[1] == 33 and sd["audio_proj.proj.weight"].shape == (32, 4 * 10752)


def test_livetalk_student_at_real_shapes_maps_loads_and_runs_512_on_meta():
    """Every key of the student as the release names it (with a training wrapper prefix, as Self-Forcing-style
    trainers save), at the 1.3B's shapes: mapped, checked, loaded; a 512x512 stream chunk runs."""
    with torch.device("meta"):
        release = {f"model.{k}": v for k, v in WanDiT(dit_config("omniavatar1.3b")).state_dict().items()}
    assert len(release) == 857
    model = build_omniavatar(release, device="meta", dtype=torch.bfloat16)
    assert model.cfg.name == "omniavatar1.3b" and model.fps == 16
    assert all(p.is_meta and p.dtype == torch.bfloat16 for p in model.parameters())
    with torch.device("meta"):
        ref = torch.randn(1, 16, 1, 64, 64, dtype=torch.bfloat16)  # 512x512 -> 64x64 latents
        cache = model.new_cache(3)
        model.prefill_sinks(ref.repeat(1, 1, 9, 1, 1), cache, reference=ref)
        for _ in range(2):
            v = model.forward_chunk(
                torch.randn(1, 16, 3, 64, 64, dtype=torch.bfloat16),
                torch.full((1, 3), 936.0),
                cache,
                torch.randn(1, 512, 4096, dtype=torch.bfloat16),
                torch.randn(1, 3, 4, 10752, dtype=torch.bfloat16),
                commit=True,
            )
            assert v.shape == (1, 16, 3, 64, 64)
        full = model(
            torch.randn(1, 16, 6, 64, 64, dtype=torch.bfloat16),
            torch.full((1, 6), 500.0),
            torch.randn(1, 512, 4096, dtype=torch.bfloat16),
            torch.randn(1, 6, 4, 10752, dtype=torch.bfloat16),
            ref,
            chunk=3,
        )
    assert full.shape == (1, 16, 6, 64, 64) and cache.n_sink == 6


def test_real_shape_errors_name_the_keys():
    with torch.device("meta"):
        sd = WanDiT(dit_config("omniavatar1.3b")).state_dict()
    bad = dict(sd)
    bad["audio_cond_projs.3.weight"] = torch.empty(1536, 16, device="meta")
    del bad["blocks.7.ffn.2.bias"]
    with pytest.raises(CheckpointError, match=r"audio_cond_projs\.3\.weight.*missing 1: \['blocks\.7\.ffn\.2\.bias'\]"):
        build_omniavatar(bad, cfg=dit_config("omniavatar1.3b"), device="meta")
    with pytest.raises(CheckpointError, match="no audio_proj"):
        detect_omniavatar_config({k: v for k, v in sd.items() if not k.startswith("audio_")})


def test_merged_file_round_trip_on_cpu(tmp_path):
    m = _tiny()
    save_file({k: v.contiguous() for k, v in m.state_dict().items()}, str(tmp_path / "model.safetensors"))
    cfg = m.cfg
    # a file of the tiny size is recognised by its shapes only when the config is given (not a release size)
    with pytest.raises(CheckpointError, match="unknown size"):
        load_omniavatar(tmp_path / "model.safetensors")
    sd = {k: v for k, v in m.state_dict().items()}
    loaded = build_omniavatar(sd, cfg=cfg)
    inp = _inputs(cfg)
    with torch.no_grad():
        assert torch.equal(m(**inp, chunk=3), loaded(**inp, chunk=3))


def _lora_release(m: WanDiT, rank=4, alpha=8.0, seed=3):
    """A Wan-base + OmniAvatar-style LoRA release of ``m``'s size: base with 16 input channels and no audio, the LoRA
    file with peft names for q, k, v, o, ffn.0, ffn.2 plus the full new tensors."""
    g = torch.Generator().manual_seed(seed)
    merged = {k: v.clone() for k, v in m.state_dict().items()}
    base = {k: v.clone() for k, v in merged.items() if not k.startswith("audio_")}
    base["patch_embedding.weight"] = merged["patch_embedding.weight"][:, :16].clone()
    lora = {k: v.clone() for k, v in merged.items() if k.startswith(("audio_", "patch_embedding."))}
    for k, w in merged.items():
        mod = k[: -len(".weight")]
        if k.startswith("blocks.") and w.ndim == 2 and any(mod.endswith("." + t) for t in LORA_TARGETS):
            a = torch.randn(rank, w.shape[1], generator=g) * 0.1
            b = torch.randn(w.shape[0], rank, generator=g) * 0.1
            lora[f"{mod}.lora_A.default.weight"] = a
            lora[f"{mod}.lora_B.default.weight"] = b
            merged[k] = w + (alpha / rank) * (b @ a)
    return base, lora, merged


def test_lora_separate_release_loads_as_its_merge(tmp_path):
    m = _tiny()
    base, lora, merged = _lora_release(m)
    n_pairs = sum(k.endswith("lora_A.default.weight") for k in lora)
    assert n_pairs == 4 * m.cfg.num_layers * 2 + 2 * m.cfg.num_layers  # self/cross q k v o + ffn.0 / ffn.2
    save_file(base, str(tmp_path / "diffusion_pytorch_model.safetensors"))
    torch.save(lora, tmp_path / "pytorch_model.pt")
    (tmp_path / "config.json").write_text(json.dumps({"lora_rank": 4, "lora_alpha": 8.0, "in_dim": 33}))
    with pytest.raises(CheckpointError, match="LoRA release: give the Wan2.1-T2V base"):
        load_omniavatar(tmp_path / "pytorch_model.pt")
    sd = merge_lora(base, lora, alpha=8.0, rank=4)
    assert set(sd) == set(merged) and all(torch.allclose(sd[k], merged[k], atol=1e-6) for k in merged)
    separate = build_omniavatar(sd, cfg=m.cfg)
    together = build_omniavatar(merged, cfg=m.cfg)
    inp = _inputs(m.cfg)
    with torch.no_grad():
        a, b = separate(**inp, chunk=3), together(**inp, chunk=3)
    assert (a - b).abs().max() < 1e-4
    # a half pair is named
    broken = {k: v for k, v in lora.items() if k != "blocks.1.ffn.0.lora_B.default.weight"}
    with pytest.raises(CheckpointError, match=r"blocks\.1\.ffn\.0: lora_A and lora_B"):
        merge_lora(base, broken, alpha=8.0)


def test_first_frame_is_held_as_the_reference_and_the_mask_marks_it():
    m = _tiny()
    inp = _inputs(m.cfg, Fr=6)
    y = m.condition(inp["x"], inp["ref"], 0)
    assert y.shape[1] == 33 and torch.equal(y[:, :16, 0], inp["ref"][:, :, 0])
    assert y[:, 32, 0].eq(0).all() and y[:, 32, 1:].eq(1).all()
    assert torch.equal(y[:, 16:32], inp["ref"].expand(-1, -1, 6, -1, -1))
    later = m.condition(inp["x"], inp["ref"], 3)  # a later chunk: no frame 0 in it
    assert later[:, 32].eq(1).all() and torch.equal(later[:, :16], inp["x"])
    with torch.no_grad():
        v = m(**inp, chunk=3)
    sigma = inp["t"][:, 0] / 1000
    x0 = inp["x"][:, :, 0] - sigma.view(-1, 1, 1, 1) * v[:, :, 0]
    assert (x0 - inp["ref"][:, :, 0]).abs().max() < 1e-5  # the sampler lands on the reference
    with pytest.raises(ValueError, match="needs the reference latent"):
        m(inp["x"], inp["t"], inp["context"], inp["audio"])


def test_audio_reaches_exactly_blocks_2_to_half():
    m = _tiny()
    assert list(m.audio_blocks) == [2] and len(m.audio_cond_projs) == 1  # 4 blocks: 2 .. 4 / 2
    big = dit_config("omniavatar1.3b")
    with torch.device("meta"):
        assert list(WanDiT(big).audio_blocks) == list(range(2, 16))
    inp = _inputs(m.cfg)
    seen = []
    hooks = [
        b.register_forward_pre_hook(lambda mod, args, i=i: seen.append((i, args[0].clone())))
        for i, b in enumerate(m.blocks)
    ]
    with torch.no_grad():
        m(**inp, chunk=3)
        first = dict(seen)
        seen.clear()
        m(**{**inp, "audio": inp["audio"] * 2}, chunk=3)
    for h in hooks:
        h.remove()
    changed = [i for i in range(4) if not torch.equal(first[i], dict(seen)[i])]
    assert changed == [2, 3]  # added before block 2; block 3 sees it through block 2
    with torch.no_grad():
        for p in m.audio_cond_projs.parameters():
            p.zero_()
        a = m(**inp, chunk=3)
        b = m(**{**inp, "audio": torch.randn_like(inp["audio"])}, chunk=3)
    assert torch.equal(a, b)


def test_streaming_equals_the_block_causal_pass_and_livetalk_sinks_fill_first():
    m = _tiny()
    inp = _inputs(m.cfg, Fr=12)
    with torch.no_grad():
        offline = m(**inp, chunk=3)
        cache = m.new_cache(100)
        m.prefill_sinks(inp["ref"], cache, inp["context"])
        outs = [
            m.forward_chunk(
                inp["x"][:, :, i : i + 3],
                inp["t"][:, i : i + 3],
                cache,
                inp["context"],
                inp["audio"][:, i : i + 3],
                commit=True,
            )
            for i in range(0, 12, 3)
        ]
    assert (torch.cat(outs, 2) - offline).abs().max() < 1e-4
    assert cache.sink_ids == [0] and cache.frame_ids == list(range(1, 12))
    # LiveTalk: 9 sinks (the stream's first 9 latent frames) + 3 window frames + the chunk = 15 attended frames
    with torch.no_grad():
        cache = m.new_cache(3)
        m.prefill_sinks(inp["ref"].repeat(1, 1, 9, 1, 1), cache, reference=inp["ref"])
        for _ in range(8):
            x = torch.randn(1, 16, 3, 8, 8)
            m.forward_chunk(x, 0.0, cache, inp["context"], inp["audio"][:, :3], commit=True)
    assert cache.sink_ids == list(range(9)) and cache.frame_ids == [21, 22, 23]
    assert cache.sink_k[0].shape[1] == 9 and cache.k[0].shape[1] == 3
    with pytest.raises(ValueError, match="cannot be replaced mid-stream"):
        m.prefill_sinks(inp["ref"], cache)


def test_pack_audio_frames_follows_omniavatar():
    feats = torch.arange(10.0)[:, None].repeat(1, 3)  # video frame i has features == i
    w = pack_audio_frames(feats, 0, 3)
    assert w[:, :, 0].tolist() == [[0, 0, 0, 0], [1, 2, 3, 4], [5, 6, 7, 8]]
    assert pack_audio_frames(feats, 3, 1)[0, :, 0].tolist() == [9, 9, 9, 9]  # past the end: the last frame
    with pytest.raises(ValueError):
        pack_audio_frames(torch.zeros(0, 3), 0, 1)


def test_engine_streams_the_layout_with_anchor_heavy_sinks():
    from talkstream.models.vae import TinyDecoder
    from talkstream.stream.engine import StreamConfig, StreamEngine

    m = _tiny()
    dec = TinyDecoder(TinyDecoderConfig(latent_dim=16, channels=8)).eval()
    cfg = StreamConfig(
        chunk=3,
        window=3,
        sampler="few_step",
        timesteps=(1000, 936, 832, 624),
        timestep_shift=1.0,
        anchor="anchor_heavy",
        anchor_copies=9,
    )
    eng = StreamEngine(m, dec, cfg)
    ref = torch.randn(1, 16, 1, 8, 8)
    text = torch.randn(1, 7, m.cfg.text_dim)
    audio = torch.randn(3, 4, m.cfg.audio_dim)
    eng.start(ref, text)
    first = eng.next_chunk(audio)
    assert (first.latents[:, :, 0] - ref[:, :, 0]).abs().max() < 1e-5  # the stream opens on the reference
    eng.start(ref, text)
    frames = list(eng.frames(lambda f, k: audio, n_chunks=5))
    assert [i for i, _ in frames] == list(range(9 + 4 * 12)) and frames[0][1].shape == (64, 64, 3)
    assert eng.cache.sink_ids == list(range(9)) and eng.cache.n_context == 3


def test_tiny_config_validates():
    with pytest.raises(ValueError, match="OmniAvatar audio path"):
        DiTConfig.from_dict({**dit_config("omniavatar-tiny").to_dict(), "audio_adaln": True})


def _tiny_published(**windows):
    """A PublishedAvatar of small random parts (wav2vec2, Wan VAE, OmniAvatar DiT); ``windows``: the audio features'
    look_back / look_ahead (seconds), else Wav2VecFeatures' defaults."""
    import transformers

    from talkstream.models.wan_vae import WanVAE, WanVAEConfig
    from talkstream.models.wav2vec import Wav2VecFeatures
    from talkstream.stream.published import PublishedAvatar

    torch.manual_seed(0)
    w2v_cfg = transformers.Wav2Vec2Config(
        hidden_size=16,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=32,
        conv_dim=(16,) * 7,
        num_conv_pos_embeddings=16,
        num_conv_pos_embedding_groups=2,
    )
    audio = Wav2VecFeatures(transformers.Wav2Vec2Model(w2v_cfg).eval(), fps=16, **windows)
    cfg = DiTConfig.from_dict({**dit_config("omniavatar-tiny").to_dict(), "audio_dim": audio.dim})
    dit = WanDiT(cfg).eval()
    vae = WanVAE(WanVAEConfig(dim=8)).eval()
    return PublishedAvatar(dit, vae, vae, audio, torch.randn(1, 5, cfg.text_dim), device="cpu", size=64)


def test_published_live_stream_equals_the_whole_file():
    """Audio pushed live in uneven pieces (rows emitted as their look-ahead arrives, old rows dropped) gives the
    frames of the whole-file path."""
    import numpy as np

    avatar = _tiny_published(look_back=0.5, look_ahead=0.25)
    wav = np.random.default_rng(0).normal(0, 0.1, 24000).astype(np.float32)  # 1.5 s: 25 frames at 16 fps
    image = np.random.default_rng(1).integers(0, 255, (64, 64, 3), dtype=np.uint8)
    whole = list(avatar.frames(image, wav))
    cuts = [0, 700, 5000, 5001, 13000, 24000]
    live = list(avatar.stream(image, (wav[a:b] for a, b in zip(cuts[:-1], cuts[1:]))))
    assert [f.index for f in live] == list(range(25)) and len(whole) == 25
    assert live[16].time == 1.0  # seconds at the model's 16 fps
    diff = max(np.abs(f.image.astype(int) - b.astype(int)).max() for f, b in zip(live, whole))
    assert diff <= 2  # float rounding of the streamed wav2vec2 rows only


def test_published_pipeline_end_to_end_on_cpu_at_a_tiny_size(tmp_path):
    """The whole --weights path on small random parts: the Wan VAE encodes the reference, wav2vec2 features are
    packed per latent frame, the student streams with LiveTalk's sinks, an mp4 at the model's 16 fps comes out."""
    import numpy as np

    from talkstream.media import read_video

    avatar = _tiny_published()
    wav = np.random.default_rng(0).normal(0, 0.1, 16000).astype(np.float32)  # 1 s: 17 frames at 16 fps
    frames = list(
        avatar.frames(np.full((80, 80, 3), 128, np.uint8) + np.arange(80, dtype=np.uint8)[:, None, None], wav)
    )
    assert len(frames) == 17 and frames[0].shape == (64, 64, 3)
    res = avatar.generate(
        np.random.default_rng(1).integers(0, 255, (64, 64, 3), dtype=np.uint8), wav, tmp_path / "o.mp4"
    )
    video = read_video(tmp_path / "o.mp4")
    assert res["frames"] == 17 and res["model_fps"] == 16 and round(video.fps) == 16 and len(video.frames) == 17


def _livetalk_stream_parts():
    """The tiny layout under LiveTalk's streaming settings, a tiny decoder, and one chunk's inputs."""
    from talkstream.models.vae import TinyDecoder
    from talkstream.stream.published import LIVETALK_STREAM

    m = _tiny()
    dec = TinyDecoder(TinyDecoderConfig(latent_dim=16, channels=8)).eval()
    ref, text = torch.randn(1, 16, 1, 8, 8), torch.randn(1, 7, m.cfg.text_dim)
    return m, dec, LIVETALK_STREAM, ref, text, torch.randn(3, 4, m.cfg.audio_dim)


def test_prepared_runner_streams_the_layout_as_the_plain_passes():
    """stream.runner's prepared context (rotated once per chunk) takes the OmniAvatar conditioning through
    WanDiT.chunk_input / chunk_velocity: the same latents as forward_chunk, the first frame held, sinks filled."""
    from dataclasses import replace

    from talkstream.stream.engine import StreamConfig, StreamEngine

    if "runner" not in StreamConfig.__dataclass_fields__:
        pytest.skip("this engine has no runner option")
    m, dec, cfg, ref, text, audio = _livetalk_stream_parts()
    runs = {}
    for runner in ("plain", "prepared"):
        eng = StreamEngine(m, dec, replace(cfg, runner=runner))
        eng.start(ref, text)
        runs[runner] = [eng.next_chunk(audio).latents for _ in range(6)]
        assert eng.cache.sink_ids == list(range(9)) and eng.cache.n_context == 3
    assert (eng.runner is not None) and all((a - b).abs().max() < 1e-4 for a, b in zip(runs["plain"], runs["prepared"]))
    assert (runs["prepared"][0][:, :, 0] - ref[:, :, 0]).abs().max() < 1e-5


def test_graphed_first_chunk_holds_the_first_frame_in_every_stream(monkeypatch):
    """runner="graphs" with the layout's clean first frame: the first chunk's graph (recorded by the first stream
    with the frame held) replays it for the next stream too; the chunks that fill the sinks run eagerly (a CPU
    stand-in replays each pass over the buffers it was recorded with, as a CUDA graph does)."""
    from dataclasses import replace

    from talkstream.stream.engine import StreamEngine
    from talkstream.stream.runner import ChunkRunner
    from tests.test_stream_speed import _RecordedPass

    monkeypatch.setattr(ChunkRunner, "_record", lambda self: (g := _RecordedPass(self), g.out))
    m, dec, cfg, ref, text, audio = _livetalk_stream_parts()
    plain = StreamEngine(m, dec, cfg)
    plain.start(ref, text)
    want = [plain.next_chunk(audio).latents for _ in range(6)]  # 3 chunks fill the 9 sinks, then the window
    eng = StreamEngine(m, dec, replace(cfg, runner="prepared"))
    eng.runner = ChunkRunner(m, graphs=True)
    for _ in range(2):
        eng.start(ref, text)
        got = [eng.next_chunk(audio).latents for _ in range(6)]
        assert all((a - b).abs().max() < 1e-4 for a, b in zip(want, got))
        assert (got[0][:, :, 0] - ref[:, :, 0]).abs().max() < 1e-5
    assert eng.runner.captures == 2 and eng.runner.replays > 0  # the first chunk's graph and the full window's


def _hf_to_wan_umt5(sd: dict) -> dict:
    out = {"token_embedding.weight": sd["shared.weight"], "norm.weight": sd["encoder.final_layer_norm.weight"]}
    names = {
        "layer.0.SelfAttention.q": "attn.q",
        "layer.0.SelfAttention.k": "attn.k",
        "layer.0.SelfAttention.v": "attn.v",
        "layer.0.SelfAttention.o": "attn.o",
        "layer.0.SelfAttention.relative_attention_bias": "pos_embedding.embedding",
        "layer.0.layer_norm": "norm1",
        "layer.1.DenseReluDense.wi_0": "ffn.gate.0",
        "layer.1.DenseReluDense.wi_1": "ffn.fc1",
        "layer.1.DenseReluDense.wo": "ffn.fc2",
        "layer.1.layer_norm": "norm2",
    }
    for k, v in sd.items():
        if k.startswith("encoder.block."):
            i, rest = k[len("encoder.block.") :].split(".", 1)
            out[f"blocks.{i}.{names[rest[: -len('.weight')]]}.weight"] = v
    return out


def test_umt5_encoder_matches_transformers_umt5_and_zeroes_the_padding(tmp_path):
    """Our umT5 (Wan's key layout, which models_t5_umt5-xxl-enc-bf16.pth loads into) equals transformers'
    UMT5EncoderModel at random init, relative position buckets and padding mask included."""
    import transformers

    from talkstream.models.umt5 import clean_prompt, load_umt5, relative_buckets

    cfg = transformers.UMT5Config(
        vocab_size=100,
        d_model=32,
        d_kv=8,
        d_ff=48,
        num_layers=2,
        num_heads=4,
        feed_forward_proj="gated-gelu",
        relative_attention_num_buckets=32,
        relative_attention_max_distance=128,
        dropout_rate=0.0,
    )
    torch.manual_seed(0)
    hf = transformers.UMT5EncoderModel(cfg).eval()
    torch.save(_hf_to_wan_umt5(hf.state_dict()), tmp_path / "umt5.pth")
    ours = load_umt5(tmp_path / "umt5.pth", dtype=torch.float32)
    assert ours.cfg.num_layers == 2 and ours.cfg.num_heads == 4 and ours.cfg.dim_ffn == 48
    ids = torch.randint(1, 100, (2, 150))
    mask = torch.ones(2, 150, dtype=torch.long)
    mask[1, 40:] = 0  # a short prompt: its padding is masked
    with torch.no_grad():
        ref = hf(input_ids=ids, attention_mask=mask).last_hidden_state
        got = ours(ids, mask)
    assert (got[0] - ref[0]).abs().max() < 1e-4 and (got[1, :40] - ref[1, :40]).abs().max() < 1e-4
    assert got[1, 40:].eq(0).all()
    rel = torch.arange(-200, 201)
    hf_b = hf.encoder.block[0].layer[0].SelfAttention._relative_position_bucket(rel)
    assert torch.equal(relative_buckets(rel), hf_b)
    assert clean_prompt("  A  &amp;\n B ") == "A & B"


def test_precomputed_prompt_embeddings_are_zero_padded_to_512(tmp_path):
    from talkstream.models.manifest import ManifestError
    from talkstream.stream.published import load_prompt_embeddings

    save_file({"prompt": torch.randn(20, 4096)}, str(tmp_path / "p.safetensors"))
    t = load_prompt_embeddings(tmp_path / "p.safetensors")
    assert t.shape == (1, 512, 4096) and t[0, 20:].eq(0).all() and t[0, :20].abs().sum() > 0
    save_file({"prompt": torch.randn(20, 384)}, str(tmp_path / "bad.safetensors"))
    with pytest.raises(ManifestError, match="must be"):
        load_prompt_embeddings(tmp_path / "bad.safetensors")
