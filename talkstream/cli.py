"""talkstream's command line: a thin layer over the library (one subcommand per job)."""

from __future__ import annotations

import argparse
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


def _demo(args) -> None:
    from .media import write_video
    from .world.behaviour import make_clip
    from .world.render import render_states

    print("talkstream demo: no trained model ships yet, so this renders a clip of the synthetic world "
          "(procedural avatar driven by espeak-ng speech) with its audio.")
    clip = make_clip(args.seed, args.seconds)
    t = time.perf_counter()
    write_video(args.out, render_states(clip.identity, clip.states, args.size), clip.fps, clip.audio)
    dt = time.perf_counter() - t
    for seg in clip.segments:
        print(f"  {seg.start:5.2f}-{seg.end:5.2f}s {seg.caption}" + (f': "{seg.text}"' if seg.text else ""))
    print(f"wrote {args.out}: {clip.n_frames} frames, {clip.n_frames / clip.fps:.1f} s, rendered+encoded in {dt:.2f} s")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="talkstream", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)

    world = sub.add_parser("world", help="the synthetic talking-avatar world").add_subparsers(dest="world_cmd",
                                                                                              required=True)
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

    d = sub.add_parser("demo", help="the main job on the embedded default")
    d.add_argument("--out", type=Path, default=Path("out/demo.mp4"))
    d.add_argument("--seed", type=int, default=3)
    d.add_argument("--seconds", type=float, default=10.0)
    d.add_argument("--size", type=int, default=256)
    d.set_defaults(func=_demo)
    return p


def main(argv: list[str] | None = None) -> int:
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
