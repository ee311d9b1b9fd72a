"""Published weights streamed: the LiveTalk student (OmniAvatar-1.3B layout) with the Wan2.1 VAE, wav2vec2 audio
features and umT5 prompt embeddings, chunk by chunk through ``StreamEngine`` (bounded KV cache, async decode) at the
model's own 16 fps.

LiveTalk's inference settings (``LIVETALK_STREAM``): 512x512, chunks of 3 latent frames, 4 steps
[1000, 936, 832, 624] (its shift-5 warped list as bf16 rounds it, few-step sampler), Anchor-Heavy Identity Sinks of
the stream's first 9 latent frames + 3 window frames (15 attended latent frames), the clean chunk committed by a pass
at t = 0. One deliberate difference from LiveTalk's script: RoPE positions are re-based every chunk (sinks, then the
window, then the chunk: positions 0..14 always), where LiveTalk rotates by absolute frame index; both are equal up to
the 5th chunk and ours never leaves the 21 positions the student was trained on.
"""

from __future__ import annotations

import json
import math
import sys
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ..models.manifest import ManifestError, WeightsManifest, read_manifest
from .avatar import Frame
from .engine import StreamConfig, StreamEngine, StreamStats

LIVETALK_STREAM = StreamConfig(
    chunk=3,
    window=3,
    sampler="few_step",
    timesteps=(1000, 936, 832, 624),
    timestep_shift=1.0,
    anchor="anchor_heavy",
    anchor_copies=9,
)
SIZE = 512
TEXT_LEN = 512  # umT5 tokens the DiT's cross-attention reads (the prompt's, then zeros)
# LiveTalk's example prompt (configs/causal_inference.yaml), used when none is given
DEFAULT_PROMPT = (
    "A realistic video of a person speaking directly to the camera. The individual maintains steady eye contact with "
    "clear, expressive facial features. Their facial expressions are naturally animated and emotionally engaging, "
    "with precise lip movements perfectly synchronized to their speech."
)
CPU_REFUSED = (
    "the LiveTalk student (1.3B parameters) needs a GPU: each 0.75 s of its video costs about 80 TFLOP (5 passes of "
    "3072 tokens attending 15360), minutes per second of video on a CPU; run it with --device cuda (about 20 GB of "
    "GPU memory)"
)


def load_prompt_embeddings(path: str | Path) -> torch.Tensor:
    """Precomputed umT5 prompt embeddings from a .safetensors (one tensor) or .pt file -> [1, 512, 4096]."""
    from ..models.checkpoint import read_state_dict

    sd, _ = read_state_dict(path)
    if len(sd) != 1:
        raise ManifestError(f"{path}: expected one tensor of umT5 embeddings [L, 4096], found {len(sd)}")
    t = next(iter(sd.values()))
    t = t[None] if t.ndim == 2 else t
    if t.ndim != 3 or t.shape[0] != 1 or t.shape[-1] != 4096 or t.shape[1] > TEXT_LEN:
        raise ManifestError(
            f"{path}: umT5 embeddings must be [L <= {TEXT_LEN}, 4096] or [1, L, 4096], got {tuple(t.shape)}"
        )
    return F.pad(t, (0, 0, 0, TEXT_LEN - t.shape[1]))  # zero padding to 512 tokens, as Wan's pipelines feed them


def encode_prompt(m: WeightsManifest, prompt: str, device: str, dtype: torch.dtype) -> torch.Tensor:
    """umT5 embeddings [1, 512, 4096] of ``prompt`` with the folder's encoder, which is freed afterwards (~11 GB)."""
    from ..models.umt5 import load_prompt_encoder

    enc = load_prompt_encoder(m.path("text_encoder"), m.path("tokenizer"), device, dtype)
    text = enc.encode(prompt)
    del enc
    if str(device).startswith("cuda"):
        torch.cuda.empty_cache()
    return text


@dataclass
class PublishedAvatar:
    dit: torch.nn.Module
    vae: torch.nn.Module  # the Wan2.1 VAE (encodes the reference; decodes unless a tiny decoder is given)
    decoder: torch.nn.Module
    audio: object  # models.wav2vec.Wav2VecFeatures
    text: torch.Tensor  # [1, L, 4096] umT5 embeddings
    device: str = "cuda"
    cfg: StreamConfig = LIVETALK_STREAM
    size: int = SIZE

    @staticmethod
    def from_folder(
        root: str | Path,
        device: str = "cuda",
        decoder: str = "vae",
        dtype: torch.dtype = torch.bfloat16,
        prompt: str | None = None,
    ) -> PublishedAvatar:
        """Load the parts ``read_manifest`` names. A CPU is refused before anything loads (``CPU_REFUSED``)."""
        if not str(device).startswith("cuda"):
            raise ValueError(CPU_REFUSED)
        m = read_manifest(root, decoder, need_text_encoder=True)
        return PublishedAvatar.from_manifest(m, device, decoder, dtype, prompt)

    @staticmethod
    def from_manifest(
        m: WeightsManifest, device: str, decoder: str, dtype: torch.dtype, prompt: str | None = None
    ) -> PublishedAvatar:
        """``prompt`` (default ``DEFAULT_PROMPT``) is encoded by the folder's umT5 encoder; precomputed
        ``text_embeddings`` are used as they are."""
        from ..models.omniavatar import load_omniavatar
        from ..models.taehv import load_taehv
        from ..models.wan_vae import load_wan_vae
        from ..models.wav2vec import Wav2VecFeatures, load_wav2vec

        if m.has("text_embeddings"):
            text = load_prompt_embeddings(m.path("text_embeddings")).to(device, dtype)
        else:
            text = encode_prompt(m, prompt or DEFAULT_PROMPT, device, dtype)
        if m.dit_source == "merged":
            dit = load_omniavatar(m.path("dit"), device=device, dtype=dtype)
        else:
            dit = load_omniavatar(m.path("lora"), m.path("base"), m.path("lora_config"), device=device, dtype=dtype)
        vae = load_wan_vae(m.path("vae"), device=device, dtype=dtype)
        dec = load_taehv(m.path("tiny_decoder"), device=device, dtype=dtype) if decoder == "tiny" else vae
        audio = Wav2VecFeatures(load_wav2vec(m.path("wav2vec2"), device=device, dtype=torch.float32), fps=dit.fps)
        return PublishedAvatar(dit, vae, dec, audio, text, device)

    @property
    def fps(self) -> int:
        return self.dit.fps

    @torch.no_grad()
    def frames(self, image, wav: np.ndarray, stats: StreamStats | None = None) -> Iterator[np.ndarray]:
        """Frames of ``image`` speaking ``wav`` (16 kHz mono), as they are made."""
        from ..models.omniavatar import pack_audio_frames
        from .avatar import load_reference
        from .offline import frames_to_video

        dtype = next(self.dit.parameters()).dtype
        ref = load_reference(image, self.size)
        z_ref = self.vae.encode(frames_to_video(ref[None], self.size).to(self.device, dtype))
        feats = self.audio.encode(wav).to(self.device, dtype)  # [n_frames, 10752], one row per video frame
        n_frames = len(feats)
        n_latents = 1 + math.ceil((n_frames - 1) / 4)
        engine = StreamEngine(self.dit, self.decoder, self.cfg, self.device)
        engine.start(z_ref, self.text)

        def audio_for(first: int, k: int) -> torch.Tensor:
            if first >= n_latents:
                raise StopIteration
            return pack_audio_frames(feats, first, k)

        for idx, img in engine.frames(audio_for, stats=stats):
            if idx >= n_frames:
                return
            yield img

    @torch.no_grad()
    def stream(self, image, audio_chunks: Iterable[np.ndarray], stats: StreamStats | None = None) -> Iterator[Frame]:
        """Live: frames (``stream.avatar.Frame``: index, seconds, uint8 image, as ``Avatar.stream`` gives) as they are
        made, from 16 kHz mono chunks as they arrive. wav2vec2 rows come out of ``Wav2VecStream`` once their
        look-ahead audio is in; a chunk waits for the rows of its video frames. An empty chunk means "no audio now":
        silence is added so the avatar keeps going; the stream ends when the source does (its last frames drawn from
        the audio it had)."""
        from ..models.omniavatar import pack_audio_frames
        from .avatar import load_reference
        from .offline import frames_to_video

        dtype = next(self.dit.parameters()).dtype
        ref = load_reference(image, self.size)
        z_ref = self.vae.encode(frames_to_video(ref[None], self.size).to(self.device, dtype))
        live, source = self.audio.stream(), iter(audio_chunks)
        silence = np.zeros(self.audio.samples_per_frame * 2 * self.cfg.chunk, np.float32)  # half a chunk's 12 frames
        rows: list[torch.Tensor] = []  # wav2vec2 rows of video frames ``base`` .. ``have`` - 1
        base, have, closed = 0, 0, False
        total: int | None = None  # frames of the whole stream, once the source has ended

        def audio_for(first: int, k: int) -> torch.Tensor:
            nonlocal base, have, closed, total
            need = 4 * (first + k - 1) + 1  # rows up to the chunk's last video frame
            while have < need and not closed:
                try:
                    a = next(source)
                except StopIteration:
                    new, closed = live.flush(), True
                else:
                    new = live.push(silence if a is None or len(a) == 0 else np.asarray(a, np.float32))
                if len(new):
                    rows.append(new.to(self.device, dtype))
                    have += len(new)
            if closed:
                total = have
                if first and 4 * first - 3 >= have:
                    raise StopIteration
            feats = torch.cat(rows)
            windows = pack_audio_frames(feats, first, k, offset=base)
            keep = min(have, max(base, 4 * (first + k) - 3))  # the next chunk's first frame: older rows are done
            rows[:] = [feats[keep - base :]]
            base = keep
            return windows

        engine = StreamEngine(self.dit, self.decoder, self.cfg, self.device)
        engine.start(z_ref, self.text)
        for idx, img in engine.frames(audio_for, stats=stats):
            if total is not None and idx >= total:
                return
            yield Frame(idx, idx / self.fps, img)

    def generate(self, image, audio, out: str | Path, progress: bool = True) -> dict:
        from tqdm import tqdm

        from ..media import SAMPLE_RATE, write_video
        from .avatar import load_audio

        wav = load_audio(audio)
        stats = StreamStats()
        n = self.audio.n_frames(len(wav))
        bar = tqdm(total=n, desc="generate", unit="frame", disable=not progress)
        written = [0]

        def counted() -> Iterator[np.ndarray]:
            for f in self.frames(image, wav, stats):
                bar.update()
                written[0] += 1
                yield f

        try:
            write_video(out, counted(), self.fps, audio=wav[: int(n * SAMPLE_RATE / self.fps)])
        finally:
            bar.close()
        elapsed = time.perf_counter() - stats.started
        frames = written[0]
        return dict(
            out=str(out),
            frames=frames,
            seconds=round(frames / self.fps, 2),
            ttff_s=round(stats.ttff or 0.0, 3),
            fps=round(frames / max(elapsed, 1e-9), 2),
            real_time_factor=round(frames / max(elapsed, 1e-9) / self.fps, 3),
            model_fps=self.fps,
            device=self.device,
        )


def generate_cli(args) -> None:
    """``talkstream generate --weights DIR`` for published weights."""
    if args.say is not None:
        raise ValueError("--say needs the embedded model's speech path; with --weights give --audio")
    decoder = args.decoder or "vae"
    if not str(args.device).startswith("cuda"):
        raise ValueError(CPU_REFUSED)
    avatar = PublishedAvatar.from_folder(args.weights, args.device, decoder, prompt=args.prompt)
    if args.prompt and read_manifest(args.weights, decoder).has("text_embeddings"):
        print(
            "talkstream: --prompt is ignored: the precomputed text_embeddings of manifest.json are used",
            file=sys.stderr,
        )
    print(json.dumps(avatar.generate(args.image, args.audio, args.out, progress=not args.quiet)))


__all__ = [
    "CPU_REFUSED",
    "DEFAULT_PROMPT",
    "LIVETALK_STREAM",
    "PublishedAvatar",
    "encode_prompt",
    "generate_cli",
    "load_prompt_embeddings",
]
