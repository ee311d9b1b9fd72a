"""At which noise level does a teacher lose the person's outline? The true render's first window (its latents) is
noised to sigma s and denoised by the teacher from s down to 0 (the suite's sampler: Euler, audio guidance 2, shift
3, the clip's audio / caption / first frame as reference), decoded, and read against the truth: silhouette IoU
(``metrics.silhouette_iou``) per starting sigma. s = 1 is plain generation; a model that keeps the outline from
s = 0.5 but not from 1 loses it while the layout is decided (the high-noise steps), where only the reference can
pin it; one that loses it from small s too damages what it is given.

    python experiments/structure_by_noise.py --model talkstream/weights/teacher.safetensors \
        --sigmas 0.2 0.4 0.6 0.8 1.0 --out benchmarks/results/structure_by_noise_cpu.json
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch

from talkstream.diffusion.flow import add_noise, euler_sigmas, reference_sigmas
from talkstream.diffusion.samplers import guided_velocity
from talkstream.eval.evaluate import load_suite_inputs
from talkstream.eval.metrics import silhouette_iou
from talkstream.machine import describe, report
from talkstream.models.checkpoint import load_checkpoint
from talkstream.models.encoders import audio_windows
from talkstream.stream.engine import ChunkDecoder
from talkstream.stream.offline import audio_span, frames_to_video, teacher_window
from talkstream.world.render import Renderer, render_states


@torch.no_grad()
def denoise_from(
    dit,
    x0: torch.Tensor,
    s: float,
    noise: torch.Tensor,
    steps: int,
    shift: float,
    guidance: float,
    text,
    text_mask,
    audio,
    ref,
) -> torch.Tensor:
    """x0 [1, C, L, h, w] noised to sigma ``s`` (flow matching: (1 - s) x0 + s noise), then the Euler steps of the
    ``steps``-step schedule that lie below ``s`` (the first one starts at ``s`` itself)."""
    sig = reference_sigmas(euler_sigmas(steps, shift), s)
    z = add_noise(x0, noise, s)
    for i in range(len(sig) - 1):
        t = torch.full((1, z.shape[2]), float(sig[i]) * 1000)
        v = dit(z, t, text, audio, ref, context_mask=text_mask)
        if guidance != 1.0:
            v = guided_velocity([dit(z, t, text, torch.zeros_like(audio), ref, context_mask=text_mask), v], [guidance])
        z = z + (sig[i + 1] - sig[i]) * v
    return z


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True, help="a teacher checkpoint")
    ap.add_argument("--vae", default="talkstream/weights/vae.safetensors")
    ap.add_argument("--inputs", type=Path, default=Path("data/suite_inputs.pkl"), help="from eval suite --save-inputs")
    ap.add_argument("--seed", type=int, default=900_000, help="the suite clip")
    ap.add_argument("--sigmas", type=float, nargs="+", default=[0.2, 0.4, 0.6, 0.8, 1.0])
    ap.add_argument("--noise-seed", type=int, default=0)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--shift", type=float, default=3.0)
    ap.add_argument("--audio-guidance", type=float, default=2.0)
    ap.add_argument("--out")
    a = ap.parse_args()
    if not all(0 < s <= 1 for s in a.sigmas):
        ap.error(f"--sigmas must lie in (0, 1], got {a.sigmas}")
    torch.set_grad_enabled(False)
    dit = load_checkpoint(a.model, dtype=torch.float32).eval()
    if (getattr(dit, "checkpoint_info", {}) or {}).get("chunk"):
        ap.error(f"{a.model} is a causal model; this reads a teacher (whole windows)")
    vae = load_checkpoint(a.vae, dtype=torch.float32).eval()
    c = load_suite_inputs(a.inputs)["clips"][a.seed]
    clip, size = c["clip"], 256
    window, _ = teacher_window(dit)
    n_frames = 1 + vae.cfg.temporal_factor * (window - 1)
    truth = np.stack(list(render_states(clip.identity, clip.states[:n_frames], size)))
    background = Renderer(clip.identity, size).background()
    x0 = vae.encode(frames_to_video(truth, size))
    ref = vae.encode(frames_to_video(truth[:1], size))
    lb, la = audio_span(dit)
    audio = audio_windows(
        torch.as_tensor(c["audio_features"], dtype=torch.float32), x0.shape[2], look_back=lb, look_ahead=la
    )[None]
    text, mask = c["text"].float(), c["text_mask"]
    noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(a.noise_seed))
    rows = {}
    decode = ChunkDecoder(vae)
    rows["vae_roundtrip"] = silhouette_iou(decode(x0), truth, background)["silhouette_iou"]
    for s in a.sigmas:
        z = denoise_from(dit, x0, s, noise, a.steps, a.shift, a.audio_guidance, text, mask, audio, ref)
        per = silhouette_iou(ChunkDecoder(vae)(z), truth, background)["silhouette_iou_per_frame"]
        rows[f"sigma_{s:g}"] = dict(silhouette_iou=float(per.mean()), last_quarter=float(per[-len(per) // 4 :].mean()))
        print(f"sigma {s:g}: silhouette IoU {per.mean():.3f}", flush=True)
    report(
        dict(
            model=a.model,
            seed=a.seed,
            frames=n_frames,
            noise_seed=a.noise_seed,
            steps=a.steps,
            shift=a.shift,
            audio_guidance=a.audio_guidance,
            rows=rows,
            machine=describe(),
        ),
        a.out,
    )


if __name__ == "__main__":
    main()
