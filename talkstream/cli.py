"""talkstream's command line: a thin layer over the library (one subcommand per job)."""

from __future__ import annotations

import argparse
import importlib
import json
import sys
import time
from pathlib import Path


def _world_make(args) -> None:
    from .world.dataset import make_world

    t = time.perf_counter()
    res = make_world(args.out, args.clips, args.seconds, args.size, args.workers, args.seed, progress=not args.quiet)
    res["seconds_taken"] = round(time.perf_counter() - t, 2)
    print(json.dumps(res))


def _world_show(args) -> None:
    from .media import write_video
    from .world.behaviour import make_clip
    from .world.render import render_states

    clip = make_clip(args.seed, args.seconds)
    write_video(args.out, render_states(clip.identity, clip.states, args.size), clip.fps, clip.audio)
    for seg in clip.segments:
        said = f' "{seg.text}"' if seg.text else ""
        print(f"{seg.start:6.2f}-{seg.end:6.2f}s  {seg.state:9s} {seg.caption}{said}")
    print(f"wrote {args.out} ({clip.n_frames} frames at {clip.fps} fps, {args.size}x{args.size}, with audio)")


BUNDLED_REFERENCE = Path(__file__).parent / "assets" / "reference.png"
DEMO_SENTENCE = "Hello! I am a talkstream avatar. I listen, I think, and then I answer you in real time."


def _check_out(out: Path) -> None:
    """Refuse an ``--out`` that names a directory before any work is done."""
    if out.is_dir():
        raise ValueError(f"--out {out}: is a directory; name the file to write (e.g. {out / 'out.mp4'})")


def _generate(args) -> None:
    if getattr(args, "pipeline", "single") == "tpp":  # one denoising step a process, under torchrun
        from .stream.parallel import generate_tpp

        return generate_tpp(args)
    from .machine import check_device
    from .stream.avatar import Avatar

    check_device(args.device)
    _check_out(args.out)
    if args.image is None:
        args.image = BUNDLED_REFERENCE
        print(f"talkstream: no --image given: using the bundled reference image {args.image}", file=sys.stderr)
    from .models.manifest import weights_kind

    if weights_kind(args.weights, args.decoder or "vae") == "livetalk":  # published weights: their own pipeline
        from .stream.published import generate_cli

        return generate_cli(args)
    from .eval.guard import guard_reference

    guard_reference(args.image, force=args.force)  # the embedded (world) model: warn on what it cannot draw
    opts = dict(anchor=args.anchor, steps=args.steps, audio_guidance=args.audio_guidance, seed=args.seed)
    if args.sampler:
        opts["sampler"] = args.sampler
    if args.reference_init is not None:
        opts["reference_init"] = args.reference_init
    if args.start_from is not None:
        opts["start_from"] = args.start_from
    avatar = Avatar.from_pretrained(args.weights, device=args.device, decoder=args.decoder, size=args.size, **opts)
    res = avatar.generate(
        args.image, audio=args.audio, say=args.say, prompt=args.prompt, out=args.out, progress=not args.quiet
    )
    print(
        json.dumps(
            dict(
                out=str(res.out),
                frames=res.frames,
                seconds=round(res.seconds, 2),
                ttff_s=round(res.ttff, 3),
                fps=round(res.fps, 2),
                real_time_factor=round(res.fps / 25.0, 3),
                device=args.device,
            )
        )
    )


def _demo(args) -> None:
    print(
        "talkstream demo: the embedded causal model animates the bundled reference image, speaking a sentence "
        "synthesised by espeak-ng (see talkstream/weights/MODEL_CARD.md for what this early model can do)."
    )
    args.image = BUNDLED_REFERENCE
    args.audio, args.say = None, args.say or DEMO_SENTENCE
    _generate(args)


def _eval_dispatch(args) -> None:
    if str(args.video) == "suite":
        return _eval_suite(args)
    args.video = args.video_opt or args.video
    if args.video is None:
        raise ValueError("eval needs --video (or 'talkstream eval suite')")
    return _eval(args)


def _eval(args) -> None:
    from .eval.evaluate import evaluate_files, json_values, plot_report

    if args.real:
        return _eval_real(args)
    report = evaluate_files(args.video, args.audio, args.ref, args.truth)
    values = json_values(report)
    out = args.out or Path(args.video).with_suffix(".eval.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(values, indent=2))
    png = plot_report(report, out.with_suffix(".png"), title=Path(args.video).name)
    print(json.dumps({k: v for k, v in values.items() if not k.endswith("by_offset")}, indent=2))
    print(f"wrote {out} and {png}")


def _eval_real(args) -> None:
    from .eval.evaluate import read_image
    from .eval.real_face import evaluate_real
    from .media import read_audio, read_video

    video = read_video(args.video)
    audio = read_audio(args.audio) if args.audio else video.audio
    res = evaluate_real(video.frames, audio, read_image(args.ref) if args.ref else None, fps=video.fps)
    res = {k: v for k, v in res.items() if not k.endswith("by_offset")}
    out = args.out or Path(args.video).with_suffix(".real.json")
    out.write_text(json.dumps(res, indent=2))
    print(json.dumps(res, indent=2))


def _eval_suite(args) -> None:
    import pickle

    from .eval.evaluate import SUITE_SEEDS, checkpoint_generator, load_suite_inputs, prepare_suite, run_suite

    seeds = tuple(args.seeds) if args.seeds else SUITE_SEEDS[: args.clips]
    if args.save_inputs:
        args.save_inputs.parent.mkdir(parents=True, exist_ok=True)
        with open(args.save_inputs, "wb") as f:
            pickle.dump(prepare_suite(seeds, args.seconds), f, protocol=pickle.HIGHEST_PROTOCOL)
        print(f"wrote {args.save_inputs}")
        return
    inputs = load_suite_inputs(args.inputs) if args.inputs else None
    gen = None
    if args.model != "world":
        from .machine import check_device

        check_device(args.device)
        vae = args.vae or Path(__file__).parent / "weights" / "vae.safetensors"
        gen = checkpoint_generator(
            args.model,
            vae,
            args.size,
            args.device,
            args.steps,
            args.audio_guidance,
            inputs,
            args.timestep_shift,
            args.noise_seed,
            args.reference_init,
            args.start_from,
            args.captions,
        )
    res = run_suite(
        generate=gen, seconds=args.seconds, size=args.size, seeds=seeds, inputs=inputs, keep_frames=bool(args.sample)
    )
    if args.sample:  # the first clip: an mp4 with its audio, or a GIF of its first 4 s
        from .media import write_gif, write_video
        from .world.behaviour import make_clip

        seed = seeds[0]
        frames = res.pop("frames")[seed]
        if args.sample.suffix.lower() == ".gif":
            write_gif(args.sample, frames[:100])  # 4 s
        else:
            clip = inputs["clips"][seed]["clip"] if inputs else make_clip(seed, args.seconds)
            write_video(args.sample, frames, 25, audio=clip.audio)
    print(
        f"{'seed':>8} {'mouth err':>10} {'offset':>7} {'sync conf':>10} {'id dist':>8} {'drift/min':>10} "
        f"{'flicker':>8}  flags"
    )
    for r in res["rows"]:
        print(
            f"{r['seed']:>8} {r['mouth_error']:>10.4f} {str(r['best_offset'])[:7]:>7} {r['sync_confidence']:>10.4f} "
            f"{r['identity_distance']:>8.3f} {r['drift_per_minute']:>10.3f} {r['flicker']:>8.4f}  "
            f"{', '.join(r['flags']) or '-'}"
        )
    print(json.dumps(res["summary"], indent=2))
    if args.out:
        from .machine import describe

        res["machine"] = describe()
        if gen is not None:
            res["captions"] = args.captions
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(res, indent=2))


def _train(args) -> None:
    import gc

    import torch.distributed as dist
    import yaml

    from .train.config import TrainConfig
    from .train.stages import run_stage

    overrides = {k: yaml.safe_load(v) for k, v in (kv.split("=", 1) for kv in args.set)}
    cfg = TrainConfig.load(args.config, {"stage": args.stage, **overrides})
    metrics = run_stage(cfg)
    if dist.is_initialized():  # (started by torchrun: rank 0 reports; all leave together, once rank 0 has written)
        # (once in make test a rank that left early aborted on exit, "terminate called without an active
        # exception"; Gloo threads holding tensors at interpreter exit can: free them, wait for all, then close)
        rank = dist.get_rank()
        gc.collect()
        dist.barrier()
        dist.destroy_process_group()
        if rank:
            return
    print(json.dumps(metrics, indent=2, default=str))


def _export(args) -> None:
    from .train.stages import export_run

    if args.run is None:
        raise SystemExit("train export: give the run's folder with --run (it holds config.json and state.pt)")
    for path in export_run(args.run):
        print(f"wrote {path}")


def _pack(args) -> None:
    from .train.data import make_pack

    out = make_pack(args.out, args.clips, args.seconds, args.seed, audio=not args.no_audio, text=not args.no_audio)
    print(f"wrote {out} ({out.stat().st_size / 2**20:.1f} MiB)")


# Stages that own their subcommands: each module has ``register(sub)`` that adds its parser(s) to ``sub`` and imports
# its heavy dependencies only when its command runs (``talkstream --help`` stays fast).
COMMAND_MODULES: tuple[str, ...] = ("talkstream.eval.bench_cli", "talkstream.serve.cli")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="talkstream", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(sub)

    world = sub.add_parser("world", help="the synthetic talking-avatar world").add_subparsers(
        dest="world_cmd", required=True
    )
    m = world.add_parser("make", help="render a data set of world clips (resumable)")
    m.add_argument("--clips", type=int, required=True)
    m.add_argument("--seconds", type=float, default=8.0)
    m.add_argument("--size", type=int, default=256)
    m.add_argument("--out", type=Path, required=True)
    m.add_argument("--workers", type=int, default=1)
    m.add_argument("--seed", type=int, default=0)
    m.add_argument("--quiet", action="store_true")
    m.set_defaults(func=_world_make)

    s = world.add_parser("show", help="render one world clip to mp4 with its audio")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--seconds", type=float, default=8.0)
    s.add_argument("--size", type=int, default=256)
    s.add_argument("--out", type=Path, default=Path("out/world.mp4"))
    s.set_defaults(func=_world_show)

    e = sub.add_parser("eval", help="measure a clip: lip sync, identity, stability, motion (JSON + PNG)")
    e.add_argument("video", nargs="?", type=Path, help="the clip to measure (or 'suite')")
    e.add_argument("--video", dest="video_opt", type=Path)
    e.add_argument("--audio", type=Path, help="driving audio (default: the video's own track)")
    e.add_argument("--ref", type=Path, help="reference image")
    e.add_argument("--truth", type=Path, help="world clip json (viseme truth for exact lip sync)")
    e.add_argument("--real", action="store_true", help="real-face metrics (dlib landmarks and descriptors)")
    e.add_argument(
        "--model",
        default="world",
        help="for 'suite': 'world' (ground-truth renders) or a DiT checkpoint (.safetensors)",
    )
    e.add_argument("--vae", type=Path, help="for 'suite' with a checkpoint: the VAE (default: the shipped one)")
    e.add_argument("--size", type=int, default=256)
    e.add_argument("--steps", type=int, default=30, help="sampling steps (teacher: in all; causal: per chunk)")
    e.add_argument("--audio-guidance", type=float, default=2.0, help="suite: audio CFG scale")
    e.add_argument(
        "--timestep-shift", type=float, help="suite: sampling schedule shift (default: 3, the samplers' own)"
    )
    e.add_argument("--noise-seed", type=int, default=0, help="suite: the samplers' initial noise (a suite is one draw)")
    e.add_argument(
        "--reference-init",
        type=float,
        help="suite: start sampling (teacher windows, causal chunks) at this sigma from the noised reference "
        "(1: pure noise; default: each sampler's own, teacher 0.8, causal 0.9)",
    )
    e.add_argument(
        "--start-from",
        choices=["reference", "previous"],
        help="suite, causal model: each chunk starts from the reference (default) or the last latent",
    )
    e.add_argument(
        "--captions",
        choices=["timeline", "first_spoken"],
        default="timeline",
        help="suite: the text prompt follows each clip's behaviour plan (default) or is its first spoken "
        "segment's caption throughout (the suite's prompt before the caption timeline)",
    )
    e.add_argument("--clips", type=int, default=8, help="suite: how many held-out clips (at most 8)")
    e.add_argument(
        "--seeds",
        type=int,
        nargs="+",
        help="suite: these world seeds instead of the held-out clips (e.g. "
        "training clips, whose error beside the held-out one's is the generalisation gap)",
    )
    e.add_argument("--inputs", type=Path, help="suite: precomputed clips/features/captions (from --save-inputs)")
    e.add_argument(
        "--save-inputs",
        type=Path,
        help="suite: compute the clips' audio features and captions "
        "(espeak-ng, Whisper, MiniLM) into this file and stop",
    )
    e.add_argument(
        "--sample",
        type=Path,
        help="suite: write the first clip's generated video here (.mp4 with audio, or .gif: its first 4 s)",
    )
    e.add_argument("--device", default="cpu")
    e.add_argument("--seconds", type=float, default=8.0)
    e.add_argument("--out", type=Path)
    e.set_defaults(func=_eval_dispatch)

    t = sub.add_parser(
        "train",
        help="train a stage: vae | decoder | teacher | causal | ode_pairs | ode_init | dmd (few-step distillation) | "
        "pack (make a world pack) | "
        "export (a stopped DiT run's last state as its checkpoint)",
    )
    t.add_argument(
        "stage",
        choices=["vae", "decoder", "teacher", "causal", "ode_pairs", "ode_init", "dmd", "pack", "export"],
    )
    t.add_argument("--run", type=Path, help="export: the run's folder (its config.json and state.pt)")
    t.add_argument("--config", type=Path, help="YAML training config (configs/*.yaml)")
    t.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config value")
    t.add_argument("--out", type=Path, help="pack: output .npz")
    t.add_argument("--clips", type=int, default=300)
    t.add_argument("--seconds", type=float, default=3.0)
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--no-audio", action="store_true", help="pack: states only (enough for the VAE)")
    t.set_defaults(func=lambda a: {"pack": _pack, "export": _export}.get(a.stage, _train)(a))

    def stream_options(q, steps: int) -> None:
        q.add_argument("--out", type=Path, default=Path("out/demo.mp4"))
        q.add_argument("--prompt", help='text prompt, e.g. "smiles while speaking"')
        q.add_argument("--weights", help="folder or causal .safetensors (default: the embedded model)")
        q.add_argument("--device", default="cpu")
        q.add_argument(
            "--decoder", choices=["vae", "tiny"], help="default: vae; tiny: ~30x faster, softer mouths (docs/speed.md)"
        )
        q.add_argument("--size", type=int, default=256)
        q.add_argument(
            "--anchor", default="reference", choices=["reference", "anchor_heavy", "rolling_sink", "memory_bank"]
        )
        q.add_argument("--sampler", choices=["euler", "few_step"])
        q.add_argument("--steps", type=int, default=steps, help="euler steps per chunk")
        q.add_argument("--audio-guidance", type=float, default=1.0)
        q.add_argument("--seed", type=int, default=0)
        q.add_argument(
            "--reference-init",
            type=float,
            help="each chunk starts at this sigma from the noised reference (1: from noise; default 0.9; lower: "
            "a little better lip-sync, a stiller head)",
        )
        q.add_argument(
            "--start-from",
            choices=["reference", "previous"],
            help="what each chunk after the first starts from: the reference (default) or the last "
            "latent (the head's pose carries on instead of returning to the reference's)",
        )
        q.add_argument("--quiet", action="store_true")
        q.add_argument(
            "--force",
            action="store_true",
            help="generate even when the embedded model cannot draw the reference (a photograph, a drawing unlike "
            "its avatars, no face): it warns and stops without this",
        )

    g = sub.add_parser("generate", help="reference image + audio (or text to say) -> mp4 with the audio muxed")
    g.add_argument("--image", type=Path, help="reference image of the person (default: the bundled reference)")
    src = g.add_mutually_exclusive_group(required=True)
    src.add_argument("--audio", type=Path, help="speech file (wav/flac/mp3/mp4..., any rate, mono or stereo)")
    src.add_argument("--say", help="text spoken by espeak-ng")
    stream_options(g, 12)
    g.add_argument(
        "--pipeline",
        choices=["single", "tpp"],
        default="single",
        help="tpp: timestep-forcing pipeline, one denoising step a process plus a decode process, under torchrun "
        "(torchrun --nproc-per-node N -m talkstream generate --pipeline tpp ...; euler runs N - 1 steps)",
    )
    g.set_defaults(func=_generate)

    d = sub.add_parser("demo", help="the main job on the embedded default")
    d.add_argument("--say", help="what the avatar says (default: a demo sentence)")
    stream_options(d, 8)
    d.set_defaults(func=_demo)
    return p


ALIASES: dict[tuple[str, str], str] = {("bench", "conversation"): "bench-conversation"}  # two-word spellings


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if tuple(argv[:2]) in ALIASES:
        argv = [ALIASES[tuple(argv[:2])], *argv[2:]]
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except (ValueError, RuntimeError, OSError) as e:  # our errors are ValueError/RuntimeError subclasses
        print(f"talkstream: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("talkstream: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
