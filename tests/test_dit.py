import pytest
import torch

from talkstream.models.config import DIT_CONFIGS, DiTConfig, dit_config
from talkstream.models.dit import WanDiT
from talkstream.models.masks import attention_groups, block_causal_mask
from talkstream.models.rope import apply_rope, rope_cos_sin


def _model(seed=0, **over):
    torch.manual_seed(seed)
    cfg = dit_config("tiny")
    if over:
        cfg = DiTConfig.from_dict({**cfg.to_dict(), **over})
    m = WanDiT(cfg).eval()
    with torch.no_grad():  # zero-initialised parts (audio output, head) would hide bugs: randomise them
        for p in m.parameters():
            if p.abs().sum() == 0:
                p.normal_(0, 0.05)
    return m


def _inputs(B=1, Fr=9, H=8, W=12, seed=1):
    g = torch.Generator().manual_seed(seed)
    return dict(
        x=torch.randn(B, 8, Fr, H, W, generator=g),
        t=torch.rand(B, Fr, generator=g) * 1000,
        context=torch.randn(B, 5, 384, generator=g),
        audio=torch.randn(B, Fr, 8, 384, generator=g),
        ref=torch.randn(B, 8, 1, H, W, generator=g),
    )


@pytest.mark.parametrize("name", sorted(DIT_CONFIGS))
def test_shapes_every_config(name):
    cfg = dit_config(name)
    with torch.device("meta"):
        m = WanDiT(cfg)
        x = torch.randn(1, cfg.in_dim, 3, 8, 8)
        out = m(
            x,
            torch.full((1,), 500.0),
            torch.randn(1, 4, cfg.text_dim),
            torch.randn(1, 3, cfg.audio_tokens_per_frame, cfg.audio_dim),
            torch.randn(1, cfg.in_dim, 1, 8, 8),
            chunk=1,
        )
    assert out.shape == x.shape


def test_wan13b_parameter_count_matches_wan21_t2v_13b():
    with torch.device("meta"):
        m = WanDiT(dit_config("wan1.3b"))
    assert m.base_parameter_count() == 1_418_996_800  # diffusers' WanTransformer3DModel, 1.3B config
    with torch.device("meta"):
        big = WanDiT(dit_config("wan14b"))
    assert 13.5e9 < big.base_parameter_count() < 14.5e9


def test_small_config_size():
    with torch.device("meta"):
        m = WanDiT(dit_config("small"))
    assert 20e6 <= sum(p.numel() for p in m.parameters()) <= 60e6


def test_mask_block_causal_structure():
    m = block_causal_mask(1, 7, chunk=3, window=3)
    assert m[0].tolist() == [True] + [False] * 7  # the sink sees only itself
    assert m[1:, 0].all()  # everyone sees the sink
    assert m[1, 1:4].all() and not m[1, 4:].any()  # chunk 0 sees itself, not the future
    assert m[4, 1:7].all() and not m[4, 7:].any()
    assert not m[7, 1:4].any() and m[7, 4:8].all()  # window 3: chunk 2 no longer sees chunk 0
    groups = attention_groups(m)
    assert [(a, b) for a, b, _ in groups] == [(0, 1), (1, 4), (4, 7), (7, 8)]


def test_no_future_leak():
    m = _model()
    inp = _inputs()
    with torch.no_grad():
        base = m(**inp, chunk=3)
        later = dict(inp)
        later["x"] = inp["x"].clone()
        later["x"][:, :, 6:] += torch.randn_like(inp["x"][:, :, 6:]) * 3
        later["audio"] = inp["audio"].clone()
        later["audio"][:, 6:] += 1.0
        out = m(**later, chunk=3)
    assert torch.equal(base[:, :, :6], out[:, :, :6])  # earlier chunks untouched, bit for bit
    assert (base[:, :, 6:] - out[:, :, 6:]).abs().max() > 1e-3  # the perturbed chunk did change
    with torch.no_grad():
        full = m(**inp)
        full_later = m(**later)
    assert (full[:, :, :6] - full_later[:, :, :6]).abs().max() > 1e-4  # bidirectional does leak (by design)


@pytest.mark.parametrize("window", [None, 3, 6])
def test_kv_cache_streaming_equals_block_causal(window):
    m = _model()
    inp = _inputs(Fr=12)
    with torch.no_grad():
        offline = m(**inp, chunk=3, window=window)
        cache = m.new_cache(window if window is not None else 1000)
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
    streamed = torch.cat(outs, dim=2)
    assert (streamed - offline).abs().max() < 1e-4
    if window is not None:
        assert cache.n_context == window and cache.frame_ids == list(range(12 - window, 12))


def test_read_only_steps_do_not_touch_the_cache():
    m = _model()
    inp = _inputs(Fr=6)
    with torch.no_grad():
        cache = m.new_cache(3)
        m.prefill_sinks(inp["ref"], cache, inp["context"])
        m.forward_chunk(inp["x"][:, :, :3], 0.0, cache, inp["context"], inp["audio"][:, :3], commit=True)
        k0 = [k.clone() for k in cache.k]
        a = m.forward_chunk(inp["x"][:, :, 3:], inp["t"][:, 3:], cache, inp["context"], inp["audio"][:, 3:])
        b = m.forward_chunk(inp["x"][:, :, 3:], inp["t"][:, 3:], cache, inp["context"], inp["audio"][:, 3:])
    assert torch.equal(a, b) and all(torch.equal(x, y) for x, y in zip(k0, cache.k)) and cache.next_frame == 3


def test_rolling_rope_continuity_over_10000_frames(monkeypatch):
    """Stream 10,002 frames: the RoPE positions used never pass sinks + window + chunk, and a chunk
    late in the stream is computed exactly like the same chunk early on (no drift from position growth)."""
    import talkstream.models.dit as dit_module

    m = _model()
    g = torch.Generator().manual_seed(3)
    x, ref = torch.randn(1, 8, 3, 2, 2, generator=g), torch.randn(1, 8, 1, 2, 2, generator=g)
    ctx, audio = torch.randn(1, 5, 384, generator=g), torch.randn(1, 3, 8, 384, generator=g)
    seen = []
    orig = dit_module.rope_cos_sin

    def spy(pos, *a, **k):
        seen.append(int(pos.max()))
        return orig(pos, *a, **k)

    monkeypatch.setattr(dit_module, "rope_cos_sin", spy)
    with torch.no_grad():
        cache = m.new_cache(6)
        m.prefill_sinks(ref, cache, ctx)
        outs = {}
        for i in range(3334):
            out = m.forward_chunk(x, 0.0, cache, ctx, audio, commit=True)
            if i in (10, 3333):
                outs[i] = out
    assert cache.next_frame == 10002 and cache.n_context == 6
    assert max(seen) == 1 + 6 + 3 - 1  # sink at 0, six context frames, three query frames
    assert torch.allclose(outs[10], outs[3333], atol=1e-6)


def test_rope_is_relative():
    q = torch.randn(1, 2, 1, 24, dtype=torch.float64)
    k = torch.randn(1, 2, 1, 24, dtype=torch.float64)
    scores = []
    for shift in (0, 37, 9000):
        cos, sin = rope_cos_sin(torch.tensor([shift, shift + 3]), 1, 1, 24, dtype=torch.float64)
        qr, kr = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        scores.append((qr[0, 1] * kr[0, 0]).sum().item())
    assert max(scores) - min(scores) < 1e-9


def test_audio_adapter_zero_init_and_per_frame_window():
    torch.manual_seed(0)
    m = WanDiT(dit_config("tiny")).eval()
    inp = _inputs()
    with torch.no_grad():
        a = m(**inp)
        inp2 = dict(inp, audio=torch.randn_like(inp["audio"]))
        assert torch.equal(a, m(**inp2))  # zero-initialised output: audio has no effect yet
    m = _model()
    with torch.no_grad():
        base = m(**inp)
        changed = inp["audio"].clone()
        changed[:, 4] += 2.0  # only latent frame 4's audio window
        out = m(**dict(inp, audio=changed), chunk=1)
        base_c = m(**inp, chunk=1)
    diff = (out - base_c).abs().amax(dim=(0, 1, 3, 4))
    assert diff[:4].max() == 0 and diff[4] > 1e-3  # earlier frames never see it (block-causal, k=1)
    assert base.shape == out.shape


def test_audio_adaln_zero_init_and_causal():
    torch.manual_seed(0)
    m = WanDiT(dit_config("tiny")).eval()  # fresh: the audio AdaLN's output layer is zero
    plain = WanDiT(DiTConfig.from_dict({**dit_config("tiny").to_dict(), "audio_adaln": False})).eval()
    plain.load_state_dict({k: v for k, v in m.state_dict().items() if not k.startswith("audio_embedding.")})
    inp = _inputs()
    with torch.no_grad():
        torch.nn.init.normal_(m.head.head.weight, std=0.05)
        plain.head.head.weight.copy_(m.head.head.weight)
        assert torch.equal(m(**inp), plain(**inp))
        torch.nn.init.normal_(m.audio_embedding[2].weight, std=0.05)  # only the AdaLN path hears the audio
        a2 = inp["audio"].clone()
        a2[:, 5:] = torch.randn_like(a2[:, 5:])
        y1, y2 = m(**inp, chunk=1), m(**{**inp, "audio": a2}, chunk=1)
    assert torch.equal(y1[:, :, :5], y2[:, :, :5])  # earlier frames never see later audio
    assert (y1[:, :, 5:] - y2[:, :, 5:]).abs().amax() > 1e-4


def test_bad_inputs_are_clear_errors():
    m = _model()
    inp = _inputs()
    with pytest.raises(ValueError, match=r"x must be \[B, 8"):
        m(torch.randn(1, 3, 2, 8, 8), 10.0)
    with pytest.raises(ValueError, match="divisible by the patch"):
        m(torch.randn(1, 8, 2, 7, 8), 10.0)
    with pytest.raises(ValueError, match="floating-point"):
        m(torch.zeros(1, 8, 2, 8, 8, dtype=torch.long), 10.0)
    with pytest.raises(ValueError, match="timesteps"):
        m(inp["x"], torch.rand(2, 3))
    with pytest.raises(ValueError, match="audio must be"):
        m(inp["x"], 5.0, audio=torch.randn(1, 2, 8, 384))
    with pytest.raises(ValueError, match="text context"):
        m(inp["x"], 5.0, context=torch.randn(1, 4, 99))
    with pytest.raises(ValueError, match="unknown model size"):
        dit_config("huge")


def test_gradient_checkpointing_same_gradients():
    m = _model()
    inp = _inputs(Fr=3)
    m.train()
    loss = m(**inp, chunk=3).square().mean()
    g1 = torch.autograd.grad(loss, list(m.parameters()), allow_unused=True)
    m.gradient_checkpointing = True
    loss2 = m(**inp, chunk=3).square().mean()
    g2 = torch.autograd.grad(loss2, list(m.parameters()), allow_unused=True)
    for a, b in zip(g1, g2):
        if a is not None:
            assert torch.allclose(a, b, atol=1e-6)


def test_ref_concat_starts_as_the_model_without_it_and_streams_like_the_full_block_causal_pass():
    plain = _model()
    m = WanDiT(DiTConfig.from_dict({**dit_config("tiny").to_dict(), "ref_concat": True})).eval()
    missing, unexpected = m.load_state_dict(plain.state_dict(), strict=False)
    assert missing == ["ref_embedding.weight"] and not unexpected
    inp = _inputs(Fr=12)
    with torch.no_grad():
        assert torch.equal(m(**inp), plain(**inp))  # zero-initialised: nothing changes until it is trained
        torch.nn.init.normal_(m.ref_embedding.weight, std=0.05)
        full = m(**inp, chunk=3)
        other = m(**{**inp, "ref": torch.randn_like(inp["ref"])}, chunk=3)
        assert (full - other).abs().amax(dim=(0, 1, 3, 4)).min() > 1e-4  # every frame sees the reference
        cache = m.new_cache(1000)
        m.prefill_sinks(inp["ref"], cache, inp["context"])
        streamed = torch.cat(
            [
                m.forward_chunk(
                    inp["x"][:, :, i : i + 3],
                    inp["t"][:, i : i + 3],
                    cache,
                    inp["context"],
                    inp["audio"][:, i : i + 3],
                    commit=True,
                )
                for i in range(0, 12, 3)
            ],
            2,
        )
        assert (streamed - full).abs().max() < 1e-4
        # sinks that change during a stream (rolling / memory-bank anchors) keep the identity reference's tokens
        moved = m.new_cache(1000)
        m.prefill_sinks(torch.randn_like(inp["ref"]), moved, inp["context"], reference=inp["ref"])
        assert torch.equal(moved.ref_tokens, cache.ref_tokens)
        assert cache.sinks_only().ref_tokens is cache.ref_tokens
