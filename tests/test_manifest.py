"""The weights-folder manifest: which file is what, and errors that name every missing file."""

import json

import pytest

from talkstream.models.manifest import ManifestError, read_manifest
from talkstream.stream.avatar import WEIGHTS

LIVETALK_LAYOUT = (
    "LiveTalk-1.3B-V0.1/model.safetensors",
    "Wan2.1-T2V-1.3B/Wan2.1_VAE.pth",
    "Wan2.1-T2V-1.3B/models_t5_umt5-xxl-enc-bf16.pth",
    "Wan2.1-T2V-1.3B/google/umt5-xxl/tokenizer.json",
    "wav2vec2-base-960h/config.json",
)


def _touch(root, *names):
    for n in names:
        p = root / n
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(b"x")


def test_the_embedded_folder_is_talkstreams_own():
    m = read_manifest(WEIGHTS, decoder="tiny")
    assert m.kind == "talkstream" and m.path("tiny_decoder").name == "tiny_decoder.safetensors"


def test_livetalk_layout_resolves_every_role(tmp_path):
    _touch(tmp_path, *LIVETALK_LAYOUT)
    m = read_manifest(tmp_path, need_text_encoder=True)
    assert m.kind == "livetalk" and m.dit_source == "merged"
    assert m.path("dit") == tmp_path / "LiveTalk-1.3B-V0.1/model.safetensors"
    assert m.path("wav2vec2") == tmp_path / "wav2vec2-base-960h" and m.path("tokenizer").is_dir()
    with pytest.raises(
        ManifestError, match=r"tiny_decoder = the tiny Wan decoder, for --decoder tiny \(taew2_1\.pth or"
    ):
        read_manifest(tmp_path, decoder="tiny")
    _touch(tmp_path, "taew2_1.pth")
    assert read_manifest(tmp_path, decoder="tiny").path("tiny_decoder").name == "taew2_1.pth"


def test_an_empty_folder_names_every_missing_file_in_one_line(tmp_path):
    with pytest.raises(ManifestError) as e:
        read_manifest(tmp_path, need_text_encoder=True)
    msg = str(e.value)
    assert "\n" not in msg
    for name in (
        "LiveTalk-1.3B-V0.1/model.safetensors",
        "OmniAvatar-1.3B/pytorch_model.pt",
        "Wan2.1-T2V-1.3B/Wan2.1_VAE.pth",
        "wav2vec2-base-960h",
        "models_t5_umt5-xxl-enc-bf16.pth",
        "google/umt5-xxl",
    ):
        assert name in msg
    assert "taew2_1" not in msg  # not needed with the VAE decoder


def test_lora_release_and_its_missing_parts(tmp_path):
    _touch(tmp_path, *LIVETALK_LAYOUT[1:], "OmniAvatar-1.3B/pytorch_model.pt", "OmniAvatar-1.3B/config.json")
    with pytest.raises(ManifestError, match=r"missing base = the Wan2\.1-T2V-1\.3B DiT") as e:
        read_manifest(tmp_path)
    assert "LiveTalk-1.3B-V0.1" not in str(e.value)  # a LoRA release was begun: only its missing part is named
    _touch(tmp_path, "Wan2.1-T2V-1.3B/diffusion_pytorch_model.safetensors")
    m = read_manifest(tmp_path)
    assert m.dit_source == "lora" and m.path("lora_config").name == "config.json"


def test_manifest_json_names_files(tmp_path):
    _touch(tmp_path, "models/student.safetensors", "vae.pth", "w2v/config.json", "prompt_umt5.safetensors")
    (tmp_path / "manifest.json").write_text(
        json.dumps(
            {
                "dit": "models/student.safetensors",
                "vae": "vae.pth",
                "wav2vec2": str(tmp_path / "w2v"),
                "text_embeddings": "prompt_umt5.safetensors",
            }
        )
    )
    m = read_manifest(tmp_path, need_text_encoder=True)  # precomputed embeddings stand in for the encoder
    assert m.path("dit").name == "student.safetensors" and m.path("wav2vec2") == tmp_path / "w2v"
    (tmp_path / "manifest.json").write_text(json.dumps({"dit": "gone.safetensors", "vea": "vae.pth"}))
    with pytest.raises(ManifestError, match=r"unknown roles \['vea'\]"):
        read_manifest(tmp_path)
    (tmp_path / "manifest.json").write_text(json.dumps({"dit": "gone.safetensors"}))
    with pytest.raises(ManifestError, match=r"dit = .*gone\.safetensors \(named in manifest\.json: no such file\)"):
        read_manifest(tmp_path)
    (tmp_path / "manifest.json").write_text("{not json")
    with pytest.raises(ManifestError, match="not JSON"):
        read_manifest(tmp_path)


def test_not_a_folder(tmp_path):
    with pytest.raises(ManifestError, match="not a folder"):
        read_manifest(tmp_path / "nothing")
