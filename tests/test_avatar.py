"""The Avatar API and `talkstream generate`: inputs (good and bad), end-to-end mp4 with audio, live idling."""

import io
import wave

import numpy as np
import pytest
from PIL import Image

from talkstream.media import MediaError, read_video, write_audio
from talkstream.stream.avatar import Avatar, LiveAudio, load_audio, load_reference


def _face(size=64):
    y, x = np.mgrid[:size, :size]
    img = np.zeros((size, size, 3), np.uint8)
    img[..., 1] = 120
    img[(x - size / 2) ** 2 + (y - size / 2) ** 2 < (size / 3) ** 2] = (200, 150, 120)
    return img


def test_reference_formats(tmp_path):
    rgba = np.concatenate([_face(), np.full((64, 64, 1), 128, np.uint8)], 2)
    Image.fromarray(rgba, "RGBA").save(tmp_path / "a.png")
    Image.fromarray(_face()).convert("CMYK").save(tmp_path / "c.jpg")
    Image.fromarray(_face(80)[:, :60]).save(tmp_path / "wide.png")
    for p in ("a.png", "c.jpg", "wide.png"):
        out = load_reference(tmp_path / p, 32)
        assert out.shape == (32, 32, 3) and out.dtype == np.uint8
    assert load_reference(_face(), 32).shape == (32, 32, 3)


def test_reference_huge_image_is_reduced(tmp_path):
    big = Image.new("RGB", (8660, 5774), (30, 90, 160))  # 50 megapixels
    big.paste(Image.fromarray(_face(2000)), (3000, 1800))
    big.save(tmp_path / "big.jpg", quality=70)
    out = load_reference(tmp_path / "big.jpg", 64)
    assert out.shape == (64, 64, 3) and out.std() > 5


@pytest.mark.parametrize(
    "case,match",
    [
        ("one_pixel", "at least"),
        ("flat", "no usable content"),
        ("text", "not an image"),
        ("missing", "no such"),
        ("truncated", "truncated|not an image"),
    ],
)
def test_reference_errors(tmp_path, case, match):
    p = tmp_path / "x.png"
    if case == "one_pixel":
        Image.new("RGB", (1, 1), (10, 20, 30)).save(p)
    elif case == "flat":
        Image.new("RGB", (64, 64), (10, 20, 30)).save(p)
    elif case == "text":
        p.write_text("hello, not an image")
    elif case == "truncated":
        buf = io.BytesIO()
        Image.fromarray(_face(128)).save(buf, "PNG")
        p.write_bytes(buf.getvalue()[:200])
    with pytest.raises(MediaError, match=match):
        load_reference(p, 32)


def test_audio_rates_channels_and_errors(tmp_path):
    t = np.arange(44100) / 44100
    tone = (0.3 * np.sin(2 * np.pi * 220 * t)).astype(np.float32)
    assert abs(len(load_audio(tone, 44100)) - 16000) <= 2
    assert abs(len(load_audio(np.stack([tone, tone], 1), 44100)) - 16000) <= 2  # stereo
    for rate in (8000, 48000):
        write_audio(tmp_path / f"a{rate}.wav", np.zeros(rate, np.float32) + 0.01, rate)
        assert abs(len(load_audio(tmp_path / f"a{rate}.wav")) - 16000) <= 2
    assert load_audio(np.zeros(16000, np.float32)).max() == 0  # silence only is fine: the avatar listens
    with pytest.raises(MediaError, match="empty"):
        load_audio(np.zeros(0, np.float32))
    with pytest.raises(MediaError, match="NaN"):
        load_audio(np.full(100, np.nan, np.float32))
    with wave.open(str(tmp_path / "t.wav"), "wb") as w:
        w.setnchannels(1), w.setsampwidth(2), w.setframerate(16000)
        w.writeframes(np.zeros(16000, np.int16).tobytes())
    data = (tmp_path / "t.wav").read_bytes()
    (tmp_path / "trunc.wav").write_bytes(data[:30])
    with pytest.raises(MediaError):
        load_audio(tmp_path / "trunc.wav")
    (tmp_path / "empty.wav").write_bytes(data[:44])
    with pytest.raises(MediaError):
        load_audio(tmp_path / "empty.wav")


def test_generate_writes_mp4_with_audio_and_no_half_file(tiny_weights, tmp_path):
    av = Avatar.from_pretrained(tiny_weights, size=32, steps=2)
    audio = (0.1 * np.random.default_rng(0).standard_normal(int(1.3 * 16000))).astype(np.float32)
    res = av.generate(_face(), audio=audio, out=tmp_path / "o.mp4", progress=False)
    v = read_video(tmp_path / "o.mp4")
    assert res.frames == len(v.frames) == round(1.3 * 25) and v.frames.shape[1:] == (32, 32, 3)
    assert abs(len(v.audio) - len(audio)) < 2048
    with pytest.raises(MediaError):
        av.generate(np.zeros((32, 32, 3), np.uint8), audio=audio, out=tmp_path / "bad.mp4", progress=False)
    assert not (tmp_path / "bad.mp4").exists() and not list(tmp_path.glob("*.tmp*"))
    with pytest.raises(ValueError, match="exactly one"):
        av.generate(_face(), out=tmp_path / "x.mp4")


def test_stream_keeps_going_on_silence_until_closed(tiny_weights):
    av = Avatar.from_pretrained(tiny_weights, size=32, steps=1)
    live = LiveAudio(wait=0.01)
    live.push(np.zeros(8000, np.float32))
    frames = []
    for f in av.stream(_face(), live):
        frames.append(f)
        if len(frames) == 40:  # no audio arrived after the first 0.5 s: the avatar keeps generating
            live.close()
    idx = [f.index for f in frames]
    assert len(frames) >= 40 and idx == list(range(len(idx)))
    assert frames[-1].time == pytest.approx(idx[-1] / 25)
    with pytest.raises(FileNotFoundError, match="no causal model"):
        Avatar.from_pretrained(tiny_weights / "nothing")


def test_cli_generate(tiny_weights, tmp_path, capsys):
    from talkstream.cli import main

    Image.fromarray(_face()).save(tmp_path / "ref.png")
    (tmp_path / "notimg.png").write_text("nope")
    # (a drawn disc, not one of the world's avatars: the out-of-domain guard would stop without --force)
    base = ["--weights", str(tiny_weights), "--size", "32", "--steps", "1", "--quiet", "--force"]
    assert (
        main(
            [
                "generate",
                "--image",
                str(tmp_path / "notimg.png"),
                "--say",
                "hi",
                "--out",
                str(tmp_path / "x.mp4"),
                *base,
            ]
        )
        == 2
    )
    assert "not an image" in capsys.readouterr().err and not (tmp_path / "x.mp4").exists()
    assert (
        main(
            [
                "generate",
                "--image",
                str(tmp_path / "ref.png"),
                "--say",
                "Hello there.",
                "--out",
                str(tmp_path / "y.mp4"),
                *base,
            ]
        )
        == 0
    )
    assert '"frames"' in capsys.readouterr().out and len(read_video(tmp_path / "y.mp4").frames) > 10


def test_paced_stream_and_a_reference_encoded_once(tiny_weights):
    from talkstream.stream.pacing import PacingStats

    av = Avatar.from_pretrained(tiny_weights, size=32, steps=1)
    calls = []
    encode = av.vae.encode
    av.vae.encode = lambda x: calls.append(1) or encode(x)
    runs = []
    for pace in (True, False):
        live = LiveAudio(wait=0.01)
        live.push(np.zeros(8000, np.float32))
        live.close()
        pacing = PacingStats()
        runs.append(list(av.stream(_face(), live, pace=pace, pacing=pacing)))
        if pace:  # every frame released, none before its slot on the 25 FPS clock
            assert len(pacing.released) == len(runs[-1]) > 0 and min(pacing.offsets) >= -1e-3
    assert [f.index for f in runs[0]] == [f.index for f in runs[1]]
    assert all((a.image == b.image).all() for a, b in zip(*runs))  # pacing changes when, not what
    assert len(calls) == 1  # the second stream of the same face reused its latent
