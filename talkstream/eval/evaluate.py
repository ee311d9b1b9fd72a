"""Evaluate one clip (``talkstream eval``) and a fixed held-out suite (``talkstream eval suite``)."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable
from pathlib import Path

import numpy as np

from ..media import MediaError, read_audio, read_video
from ..world.behaviour import FPS, Clip, make_clip
from ..world.render import Renderer, render_states
from . import metrics
from .probes import FrameProbe, load_frame_probe

MAX_LENGTH_MISMATCH = 0.2  # seconds between video and audio before the pair is refused


class NotMeasurable(ValueError):
    """The inputs cannot be measured (no audio, mismatched lengths, unreadable files...)."""


def read_image(path: str | Path) -> np.ndarray:
    """Any image file -> RGB uint8 [H, W, 3] (alpha dropped over white, CMYK / palette converted)."""
    from PIL import Image, UnidentifiedImageError

    path = Path(path)
    if not path.is_file():
        raise NotMeasurable(f"{path}: no such image")
    try:
        with Image.open(path) as im:
            im.load()
            if im.mode in ("RGBA", "LA", "P"):
                im = im.convert("RGBA")
                bg = Image.new("RGBA", im.size, (255, 255, 255, 255))
                im = Image.alpha_composite(bg, im)
            return np.asarray(im.convert("RGB"))
    except (UnidentifiedImageError, OSError) as e:
        raise NotMeasurable(f"{path}: not a readable image ({e})") from None


def evaluate_clip(
    frames: np.ndarray,
    audio: np.ndarray | None,
    reference: np.ndarray | None,
    mouth_truth: np.ndarray | None = None,
    probe: FrameProbe | None = None,
    fps: float = FPS,
) -> metrics.ClipReport:
    """Every metric that the inputs allow; what they do not allow is reported as 'not measurable'."""
    if frames.ndim != 4 or frames.shape[-1] != 3 or len(frames) < 3:
        raise NotMeasurable(f"need at least 3 RGB frames, got shape {frames.shape}")
    probe = probe or load_frame_probe()
    read = probe.read(frames)
    values: dict = dict(frames=len(frames), seconds=len(frames) / fps)
    series: dict = dict(mouth_read=read["states"][:, metrics.F["jaw_open"]])
    if audio is not None:
        values.update({k: v for k, v in metrics.lip_sync_energy(series["mouth_read"], audio, fps).items()})
        series["audio_envelope"] = metrics.audio_envelope(audio, len(frames), fps)
    else:
        values["lip_sync"] = "not measurable: no audio"
    if mouth_truth is not None:
        truth = metrics.lip_sync_truth(series["mouth_read"], mouth_truth)
        values.update(truth)  # the viseme truth's offset overrides the energy's
        series["mouth_truth"] = mouth_truth[: len(frames)]
    if reference is not None:
        ref_id = probe.read(reference[None])["identity"][0]
        drift = metrics.identity_drift(read["identity"], ref_id, fps)
        series["identity_distance"] = drift.pop("distance_per_frame")
        values.update(drift)
    else:
        values["identity"] = "not measurable: no reference image"
    stab = metrics.stability(frames)
    series["flicker"] = stab.pop("flicker_per_frame")
    values.update(stab)
    values.update(metrics.motion(read["states"], fps))
    series["yaw"] = read["states"][:, metrics.F["yaw"]]
    series["identity"] = read["identity"]
    report = metrics.ClipReport(values, series)
    values["flags"] = report.flags()
    return report


def evaluate_files(
    video: str | Path, audio: str | Path | None = None, ref: str | Path | None = None, truth: str | Path | None = None
) -> metrics.ClipReport:
    try:
        v = read_video(video)
    except MediaError as e:
        raise NotMeasurable(str(e)) from None
    frames = v.frames
    if abs(v.fps - FPS) > 0.01:
        idx = np.minimum(np.round(np.arange(int(len(frames) * FPS / v.fps)) * v.fps / FPS).astype(int), len(frames) - 1)
        frames = frames[idx]
    if audio is not None:
        try:
            sound = read_audio(audio)
        except MediaError as e:
            raise NotMeasurable(str(e)) from None
    else:
        sound = v.audio
    if sound is not None:
        gap = abs(len(sound) / 16000 - len(frames) / FPS)
        if gap > MAX_LENGTH_MISMATCH:
            raise NotMeasurable(
                f"mismatched lengths: video {len(frames) / FPS:.2f} s, audio {len(sound) / 16000:.2f} s"
            )
    reference = read_image(ref) if ref is not None else None
    mouth_truth = None
    if truth is not None:
        try:
            meta = json.loads(Path(truth).read_text())
            mouth_truth = metrics.mouth_truth_from_segments(meta["segments"], len(frames))
        except (OSError, json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
            raise NotMeasurable(f"{truth}: not a world truth json ({e})") from None
    return evaluate_clip(frames, sound, reference, mouth_truth)


def plot_report(report: metrics.ClipReport, path: str | Path, title: str = "") -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    s = report.series
    t = np.arange(len(s["mouth_read"])) / FPS
    fig, axes = plt.subplots(4, 1, figsize=(10, 9), sharex=True)
    axes[0].plot(t, s["mouth_read"], label="mouth open (read back)")
    if "mouth_truth" in s:
        axes[0].plot(t[: len(s["mouth_truth"])], s["mouth_truth"], label="mouth open (viseme truth)", alpha=0.7)
    if "audio_envelope" in s:
        env = s["audio_envelope"]
        axes[0].plot(t, env / (env.max() + 1e-9), label="audio loudness (scaled)", alpha=0.5)
    axes[0].legend(loc="upper right", fontsize=8)
    axes[0].set_ylabel("lip sync")
    if "identity_distance" in s:
        axes[1].plot(t, s["identity_distance"])
        axes[1].axhline(metrics.IDENTITY_LIMIT, color="r", ls="--", lw=0.8)
    axes[1].set_ylabel("identity distance")
    axes[2].plot(t[1:-1], s["flicker"])
    axes[2].axhline(metrics.FLICKER_LIMIT, color="r", ls="--", lw=0.8)
    axes[2].set_ylabel("flicker")
    axes[3].plot(t, s["yaw"])
    axes[3].set_ylabel("yaw (deg)")
    axes[3].set_xlabel("seconds")
    v = report.values
    fig.suptitle(f"{title}  flags: {', '.join(v['flags']) or 'none'}", fontsize=10)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return path


def json_values(report: metrics.ClipReport) -> dict:
    def clean(x):
        if isinstance(x, (np.floating, np.integer)):
            return x.item()
        if isinstance(x, dict):
            return {str(k): clean(v) for k, v in x.items()}
        if isinstance(x, (list, tuple)):
            return [clean(v) for v in x]
        return x

    return clean(report.values)


# -- the held-out suite ------------------------------------------------------------------------------------
SUITE_SEEDS = tuple(range(900_000, 900_008))  # identities and sentences never used for training (seeds < 900k)
Generator = Callable[[np.ndarray, np.ndarray, float], np.ndarray]  # (reference frame, audio, seconds) -> frames


def world_truth_generator(seed: int, size: int) -> np.ndarray:
    clip = make_clip(seed, 8.0)
    return np.stack(list(render_states(clip.identity, clip.states, size)))


def speaking_caption(clip) -> str:
    """The caption of a clip's first spoken segment (or of its first segment): the suite's one text prompt before
    the caption timeline (``captions="first_spoken"``)."""
    return next((s.caption for s in clip.segments if s.state == "speaking"), clip.segments[0].caption)


CAPTION_MODES = ("timeline", "first_spoken")  # the suite's text prompt: the clip's behaviour plan, or one caption


def _encode_clip(clip, whisper, text):
    """A suite clip's Whisper features (with half a second of look-ahead room), its encoded first spoken caption
    and its caption timeline (a ``PromptTrack``: the caption of each frame's behaviour segment)."""
    from ..stream.prompts import PromptTrack

    emb, mask = text.encode([speaking_caption(clip)])
    track = PromptTrack.from_captions(clip.captions_per_frame(), text.encode)
    return whisper.encode(np.pad(clip.audio, (0, clip.sample_rate // 2))), emb, mask, track


def prepare_suite(seeds: tuple[int, ...] = SUITE_SEEDS, seconds: float = 8.0) -> dict:
    """What the suite needs from espeak-ng, Whisper and MiniLM, computed once: per seed the planned clip, its
    Whisper features, its encoded first spoken caption and its caption timeline. Pickled (`eval suite
    --save-inputs`) it lets the suite run on a machine without those (a remote GPU)."""
    import torch

    from ..models.encoders import TextEncoder, WhisperFeatures

    whisper, text = WhisperFeatures(), TextEncoder()
    out = {}
    for seed in seeds:
        clip = make_clip(seed, seconds)
        feats, emb, mask, track = _encode_clip(clip, whisper, text)
        # kept small (it travels to GPU machines): the segments' own copies of the speech audio are dropped
        # (the clip's audio has it all), arrays are stored in float16
        segments = [
            dataclasses.replace(
                sg, speech=None if sg.speech is None else dataclasses.replace(sg.speech, audio=np.zeros(0, np.float32))
            )
            for sg in clip.segments
        ]
        clip = dataclasses.replace(clip, segments=segments, audio=clip.audio.astype(np.float16))
        out[seed] = dict(
            clip=clip,
            audio_features=feats.astype(np.float16),
            text=emb.half(),
            text_mask=mask,
            track=track.to(dtype=torch.float16),
        )
    return dict(seconds=seconds, clips=out)


def load_suite_inputs(path: str | Path) -> dict:
    """The pickled ``prepare_suite`` output (``eval suite --save-inputs``); a pickle: load only files you wrote."""
    import pickle

    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"no such file: {path} (write it with `talkstream eval suite --save-inputs`)")
    with open(path, "rb") as f:
        return pickle.load(f)


def checkpoint_generator(
    dit_path: str | Path,
    vae_path: str | Path,
    size: int = 256,
    device: str = "cpu",
    steps: int = 30,
    audio_guidance: float = 2.0,
    inputs: dict | None = None,
    timestep_shift: float | None = None,
    noise_seed: int = 0,
    reference_init: float | None = None,
    start_from: str | None = None,
    captions: str = "timeline",
) -> Callable[[np.ndarray, Clip], np.ndarray]:
    """A suite generator from trained checkpoints: Whisper features of the clip's audio, its captions (see
    ``captions``), the reference frame -> generated frames. A causal checkpoint (it records its chunk)
    streams through the engine (``steps`` Euler steps per chunk); a teacher samples offline (``stream.offline``).
    ``inputs`` (``prepare_suite``): precomputed features and captions instead of running the encoders.
    ``timestep_shift``: of the sampling schedule (default: the samplers' own, 3). ``noise_seed``: the samplers'
    initial noise (one seed's suite is one draw: run two to see the spread). ``reference_init`` < 1: sampling (the
    teacher's windows, the causal model's chunks) starts at that sigma from the noised reference latent; 1: from
    pure noise; None: as each sampler does by default (the engine's ``REFERENCE_INIT``, the teacher's
    ``TEACHER_REFERENCE_INIT``). ``start_from`` (causal model): ``StreamConfig.start_from``. ``captions``:
    "timeline" (the default): the text prompt follows the clip's behaviour plan, each window or chunk
    getting its segment's caption as in training (a conversation's planner knows when the avatar speaks or
    listens); "first_spoken": the first spoken segment's caption for the whole clip (every suite before)."""
    if captions not in CAPTION_MODES:
        raise ValueError(f"captions must be one of {CAPTION_MODES}, got {captions!r}")
    import torch

    from ..models.checkpoint import load_checkpoint, sampling_of

    dit = load_checkpoint(dit_path, device=device, dtype=torch.float32)
    vae = load_checkpoint(vae_path, device=device, dtype=torch.float32)
    encoders: list = []

    def encoded(clip):
        """(features, text, text_mask) for a clip: ``text`` its caption timeline or its first spoken caption."""
        if inputs is not None:
            c = inputs["clips"][clip.seed]
            if captions == "timeline" and "track" not in c:
                raise ValueError(
                    "these suite inputs have no caption timelines (written by an older talkstream): write "
                    "them again with `talkstream eval suite --save-inputs`, or pass captions='first_spoken'"
                )
            feats, emb, mask, track = c["audio_features"], c["text"], c["text_mask"], c.get("track")
        else:
            if not encoders:
                from ..models.encoders import TextEncoder, WhisperFeatures

                encoders.extend([WhisperFeatures(), TextEncoder()])
            feats, emb, mask, track = _encode_clip(clip, *encoders)
        if captions == "timeline":
            return feats.astype(np.float32), track.to(dtype=torch.float32), None
        return feats.astype(np.float32), emb.float(), mask

    sampler = dict(seed=noise_seed) | ({} if timestep_shift is None else dict(timestep_shift=timestep_shift))
    if (getattr(dit, "checkpoint_info", {}) or {}).get("chunk"):  # a causal model: the streaming engine
        from ..stream.avatar import Avatar, stream_config

        start = {k: v for k, v in dict(reference_init=reference_init, start_from=start_from).items() if v is not None}
        # a distilled student samples as it ships (its checkpoint's step list, no CFG): steps and the audio guidance
        # are the Euler samplers' settings
        euler = {} if sampling_of(dit) else dict(steps=steps, audio_guidance=audio_guidance)
        avatar = Avatar(
            dit,
            vae,
            cfg=stream_config(dit, **euler, **start, **sampler),
            device=device,
            size=size,
        )

        def generate(reference: np.ndarray, clip: Clip) -> np.ndarray:
            feats, emb, mask = encoded(clip)
            return np.stack(list(avatar.from_features(reference, feats, clip.n_frames, emb, mask)))

        return generate
    from ..stream.offline import TEACHER_REFERENCE_INIT, OfflineGenerator

    gen = OfflineGenerator(
        dit,
        vae,
        device=device,
        size=size,
        steps=steps,
        audio_guidance=audio_guidance,
        reference_init=TEACHER_REFERENCE_INIT if reference_init is None else reference_init,
        **sampler,
    )

    def generate(reference: np.ndarray, clip: Clip) -> np.ndarray:
        feats, emb, mask = encoded(clip)
        return gen.generate(reference, feats, clip.n_frames, emb, mask)

    return generate


def inputs_generator(avatar, inputs: dict) -> Callable[[np.ndarray, Clip], np.ndarray]:
    """A suite generator that streams ``avatar`` (a ``stream.avatar.Avatar``) from saved suite inputs
    (``prepare_suite``): each clip's Whisper features and its caption timeline."""
    import torch

    def generate(reference: np.ndarray, clip: Clip) -> np.ndarray:
        c = inputs["clips"][clip.seed]
        track = c["track"].to(dtype=torch.float32)
        feats = c["audio_features"].astype(np.float32)
        return np.stack(list(avatar.from_features(reference, feats, clip.n_frames, track)))

    return generate


def vae_roundtrip(vae, frames: np.ndarray, segment: int = 33) -> np.ndarray:
    """uint8 frames [T, H, W, 3] through ``vae`` (encode, decode) in segments of ``segment`` frames (bounded
    memory; each segment starts a fresh causal clip): what any DiT in that latent space can reproduce at best.
    The < 4 frames at a segment's end that its latents cannot hold are passed through as they are."""
    import torch

    from ..stream.offline import frames_to_video, video_to_frames

    dev = next(vae.parameters()).device
    out = []
    for s in range(0, len(frames), segment):
        seg = frames[s : s + segment]
        n = 1 + 4 * ((len(seg) - 1) // 4)
        with torch.no_grad():
            y = video_to_frames(vae.decode(vae.encode(frames_to_video(seg[:n], seg.shape[1]).to(dev))))
        out.append(np.concatenate([y, seg[n:]]))
    return np.concatenate(out)


def clip_mouth_truth(clip) -> np.ndarray:
    """Per-frame jaw-opening truth (from its speech segments): what the probe's readings are scored on."""
    return metrics.mouth_truth_from_segments([s.to_dict() for s in clip.segments], clip.n_frames)


def mouth_scores(mouth_read: np.ndarray, mouth_truth: np.ndarray) -> dict:
    """Over the frames both have, at offset 0: the mean mouth error, its fast / slow halves and the amplitude."""
    n = min(len(mouth_read), len(mouth_truth))
    read, truth = np.asarray(mouth_read[:n]), np.asarray(mouth_truth[:n])
    return dict(
        mouth_error=float(np.abs(read - truth).mean()),
        **mouth_error_by_speed(read, truth),
        **mouth_amplitude(read, truth),
    )


def mouth_error_by_speed(mouth_read: np.ndarray, mouth_truth: np.ndarray) -> dict:
    """Mouth error (offset 0) on the frames where the truth's mouth moves faster than its median speed, and
    on the rest: 4x temporal compression and under-trained models lose the fast half first."""
    n = min(len(mouth_read), len(mouth_truth))
    truth = np.asarray(mouth_truth[:n], np.float64)
    speed = np.abs(np.gradient(truth)) if n > 1 else np.zeros(n)
    fast = speed > np.median(speed) if n else speed.astype(bool)  # strictly above: never every frame
    if not fast.any():  # a still mouth (or < 2 frames): no fast half
        return dict(mouth_error_fast=float("nan"), mouth_error_slow=float("nan"))
    err = np.abs(np.asarray(mouth_read[:n], np.float64) - truth)
    return dict(mouth_error_fast=float(err[fast].mean()), mouth_error_slow=float(err[~fast].mean()))


def mouth_amplitude(mouth_read: np.ndarray, mouth_truth: np.ndarray) -> dict:
    """How far the drawn mouth follows the truth's (offset 0): ``mouth_gain``, the least-squares slope of the read on
    the truth (1: full amplitude; a model that hedges between mouths opens them less, gain < 1), and
    ``mouth_corr``, their correlation. NaN where the truth or the read does not move."""
    nan = dict(mouth_gain=float("nan"), mouth_corr=float("nan"))
    n = min(len(mouth_read), len(mouth_truth))
    if n < 2:
        return nan
    truth, read = (np.asarray(x[:n], np.float64) for x in (mouth_truth, mouth_read))
    truth, read = truth - truth.mean(), read - read.mean()
    var_t, var_r = float(truth @ truth), float(read @ read)
    if var_t <= 1e-12:
        return nan
    corr = float(read @ truth / np.sqrt(var_t * var_r)) if var_r > 1e-12 else float("nan")
    return dict(mouth_gain=float(read @ truth / var_t), mouth_corr=corr)


def latent_groups(n_frames: int, temporal_factor: int = 4) -> np.ndarray:
    """The latent each video frame belongs to in a causal VAE: frame 0 alone in latent 0, then frames
    tf*l - tf + 1 .. tf*l in latent l (the last group may be short)."""
    f = np.arange(n_frames)
    return np.where(f == 0, 0, (f + temporal_factor - 1) // temporal_factor)


def latent_group_mean(series: np.ndarray, temporal_factor: int = 4) -> np.ndarray:
    """A per-frame series with each latent's frames replaced by their mean: what a video would read if every
    latent held one state for its frames (no motion inside a latent). Applied to the probe's reading of the true
    renders it bounds what 4x temporal compression costs a mouth error when intra-latent motion is lost."""
    x = np.asarray(series, np.float64)
    g = latent_groups(len(x), temporal_factor)
    means = np.bincount(g, weights=x) / np.maximum(np.bincount(g), 1)
    return means[g]


def seam_ratio(avatar, probe: FrameProbe, seed: int, seconds: float = 3.0) -> np.ndarray:
    """Chunk seams of a streaming ``avatar`` (``stream.avatar.Avatar``) on world clip ``seed``: the mean probe-readout
    jump at chunk boundaries / its limit (2.5x the mean jump inside chunks, or the largest frame-to-frame move of
    the truth), for jaw open, yaw and pitch; <= 1: no visible seam. The stream's noise comes from the engine's own
    generator (``avatar.cfg.seed``), so a seam ratio is a function of the model, the clip and that seed."""
    clip = make_clip(seed, seconds)
    truth = np.stack(list(render_states(clip.identity, clip.states, 256)))
    frames = np.stack([f.image for f in avatar.stream(truth[0], [clip.audio])])[: clip.n_frames]
    if len(frames) < 60 or frames.std() <= 5:
        raise ValueError(f"clip {seed}: the stream gave {len(frames)} frames of std {frames.std():.1f} (blank?)")
    cols = [0, 5, 6]  # jaw open, yaw, pitch (world state fields)
    jumps = np.abs(np.diff(probe.read(frames)["states"][:, cols], axis=0))  # jumps[i]: frame i -> i + 1
    first = 1 + 4 * (avatar.cfg.chunk - 1)  # frames in the first chunk, then 4 * chunk per chunk
    boundary = np.arange(first, len(frames), 4 * avatar.cfg.chunk) - 1
    inside = np.setdiff1d(np.arange(len(jumps)), boundary)
    truth_jump = np.abs(np.diff(clip.states[: len(frames)][:, cols], axis=0)).max(0)
    return jumps[boundary].mean(0) / np.maximum(2.5 * jumps[inside].mean(0), truth_jump)


def head_motion(values: dict) -> float:
    """How much the head moves: the mean of the probe-read yaw / pitch / roll standard deviations (degrees) over a
    clip (``metrics.motion``). The truth's own figure is the target: a sampler anchored to the reference frame
    can keep the face whole by holding the head still, which the other suite figures do not see."""
    return float(np.mean([values["yaw_std"], values["pitch_std"], values["roll_std"]]))


def run_suite(
    generate: Callable[[np.ndarray, Clip], np.ndarray] | None = None,
    seconds: float = 8.0,
    size: int = 256,
    seeds: tuple[int, ...] = SUITE_SEEDS,
    probe: FrameProbe | None = None,
    inputs: dict | None = None,
    keep_frames: bool = False,
) -> dict:
    """For each held-out seed: the world clip's first frame is the reference, its audio drives the model,
    and ``generate(reference, clip)`` returns frames. ``generate=None`` evaluates the ground-truth renders
    (the row every model is compared to). ``inputs`` (``prepare_suite``) supplies the planned clips.

    Identity NN accuracy: the fraction of frames whose probe identity is nearer to their own reference than
    to any other suite clip's reference."""
    if inputs is not None and (missing := [s for s in seeds if s not in inputs["clips"]]):
        raise ValueError(
            f"the suite inputs hold no clip for seeds {missing} (they hold {sorted(inputs['clips'])}): "
            "write inputs for them with `talkstream eval suite --save-inputs F --seeds ...`"
        )
    probe = probe or load_frame_probe()
    rows, ids, refs, kept = [], [], [], {}
    for seed in seeds:
        clip = inputs["clips"][seed]["clip"] if inputs is not None else make_clip(seed, seconds)
        audio = np.asarray(clip.audio, np.float32)
        truth_frames = np.stack(list(render_states(clip.identity, clip.states, size)))
        frames = truth_frames if generate is None else generate(truth_frames[0], clip)
        shape = metrics.silhouette_iou(frames, truth_frames, Renderer(clip.identity, size).background())
        truth = clip_mouth_truth(clip)
        rep = evaluate_clip(frames, audio, truth_frames[0], truth, probe)
        v = rep.values
        ids.append(rep.series["identity"])
        refs.append(probe.read(truth_frames[:1])["identity"][0])
        if keep_frames:
            kept[seed] = frames
        rows.append(
            dict(
                seed=seed,
                mouth_error=v["mouth_error"],
                best_offset=v["best_offset"],
                sync_confidence=v["sync_confidence"],
                identity_distance=v["identity_distance_mean"],
                drift_per_minute=v["drift_per_minute"],
                flicker=v["flicker"],
                flags=v["flags"],
                silhouette_iou=shape["silhouette_iou"],
                head_motion=head_motion(v),
                **mouth_error_by_speed(rep.series["mouth_read"], truth),
                **mouth_amplitude(rep.series["mouth_read"], truth),
            )
        )
    gallery = np.stack(refs)
    for k, (row, x) in enumerate(zip(rows, ids)):
        nearest = np.argmin(((x[:, None] - gallery[None]) ** 2).sum(-1), axis=1)
        row["identity_nn_accuracy"] = float(np.mean(nearest == k))
    keys = (
        "mouth_error",
        "mouth_error_fast",
        "mouth_error_slow",
        "mouth_gain",
        "mouth_corr",
        "sync_confidence",
        "identity_distance",
        "identity_nn_accuracy",
        "silhouette_iou",
        "head_motion",
        "drift_per_minute",
        "flicker",
    )
    summary = {k: float(np.nanmean([r[k] for r in rows])) for k in keys}
    measured = [r for r in rows if r["best_offset"] != "not measurable"]
    summary["offset_zero_fraction"] = float(np.mean([r["best_offset"] == 0 for r in measured])) if measured else None
    summary["offset_measured_clips"] = len(measured)
    summary["flagged_clips"] = sum(bool(r["flags"]) for r in rows)
    out = dict(rows=rows, summary=summary)
    if keep_frames:
        out["frames"] = kept
    return out
