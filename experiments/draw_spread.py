"""Is a model's lip-sync error bias or draw-to-draw spread? Sample one suite clip with several noise seeds, read
each video's jaw opening with the frame probe, and compare each draw's mouth error with the error of the draws'
mean reading (offset 0, against the world's truth). A mean far better than the draws: the model knows where the
mouth goes and each draw scatters around it (sampling, guidance); a mean as bad as the draws: a shared bias.

    python experiments/draw_spread.py --model talkstream/weights/teacher.safetensors --seed 900001 --draws 2 \
        --inputs data/suite_inputs.pkl --out benchmarks/results/draw_spread_teacher_900001_cpu.json \
        --plot docs/findings/draw_spread_teacher_900001.png

(one 8-s teacher draw: 8-14 min on 2 CPU cores.) ``--replot JSON --plot PNG`` draws an earlier result again.
"""

import argparse
import json
import time

import numpy as np

from talkstream.eval import metrics
from talkstream.eval.evaluate import checkpoint_generator, clip_mouth_truth, load_suite_inputs, mouth_scores
from talkstream.eval.probes import load_frame_probe
from talkstream.machine import describe, report
from talkstream.world.render import render_states


def plot(res: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    truth, reads = np.asarray(res["truth"]), np.asarray(res["readings"])
    fig, ax = plt.subplots(figsize=(12, 3.5))
    ax.plot(truth, "k-", lw=2, label="world truth")
    for s, r in enumerate(reads):
        ax.plot(r, "-", alpha=0.7, label=f"draw {s} ({res['draws'][s]['mouth_error']:.4f})")
    ax.set(
        xlabel="video frame (25 fps)",
        ylabel="jaw opening (probe)",
        title=f"{res['model'].split('/')[-1]} on suite clip {res['seed']}: mean of draws "
        f"{res['mean_of_draws']['mouth_error']:.4f}, truth render {res['truth_render']['mouth_error']:.4f}",
    )
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=90)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model")
    ap.add_argument("--vae", default="talkstream/weights/vae.safetensors")
    ap.add_argument("--seed", type=int, default=900_001, help="the suite clip (world seed)")
    ap.add_argument("--draws", type=int, default=4, help="noise seeds 0 .. draws-1")
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--audio-guidance", type=float, default=2.0)
    ap.add_argument("--inputs", help="suite inputs (talkstream eval suite --save-inputs)")
    ap.add_argument("--out")
    ap.add_argument("--plot", help="a PNG of the truth and each draw's reading")
    ap.add_argument("--replot", help="plot this earlier result instead of sampling")
    a = ap.parse_args()
    if a.replot:
        with open(a.replot) as f:
            return plot(json.load(f), a.plot or "draw_spread.png")
    if not (a.model and a.inputs):
        ap.error("--model and --inputs are needed to sample")
    inputs = load_suite_inputs(a.inputs)
    clip = inputs["clips"][a.seed]["clip"]
    truth = clip_mouth_truth(clip)
    probe = load_frame_probe()
    jaw = metrics.F["jaw_open"]
    truth_frames = np.stack(list(render_states(clip.identity, clip.states, 256)))
    reads, draws, t0 = [], [], time.perf_counter()
    for s in range(a.draws):
        gen = checkpoint_generator(
            a.model, a.vae, steps=a.steps, audio_guidance=a.audio_guidance, inputs=inputs, noise_seed=s
        )
        t = time.perf_counter()
        frames = gen(truth_frames[0], clip)
        reads.append(probe.read(frames)["states"][:, jaw])
        draws.append(dict(noise_seed=s, seconds=time.perf_counter() - t, **mouth_scores(reads[-1], truth)))
        print(draws[-1], flush=True)
    n = min(len(r) for r in reads)
    stack = np.stack([r[:n] for r in reads])
    res = dict(
        model=a.model,
        seed=a.seed,
        steps=a.steps,
        audio_guidance=a.audio_guidance,
        draws=draws,
        truth_render=mouth_scores(probe.read(truth_frames)["states"][:, jaw], truth),
        mean_of_draws=mouth_scores(stack.mean(0), truth),
        median_of_draws=mouth_scores(np.median(stack, 0), truth),
        draw_spread=float(stack.std(0).mean()),
        readings=stack.round(4).tolist(),
        truth=np.asarray(truth[:n]).round(4).tolist(),
        machine=describe(),
        seconds=time.perf_counter() - t0,
    )
    report(res, a.out, show={k: res[k] for k in ("truth_render", "mean_of_draws", "median_of_draws", "draw_spread")})
    if a.plot:
        plot(res, a.plot)


if __name__ == "__main__":
    main()
