"""World speed: rendered frames/s on one core at 256x256, and clips/min for `world make`.

Prints JSON and writes it to benchmarks/results/world_speed_cpu.json.
"""

import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from talkstream.machine import describe, report  # noqa: E402
from talkstream.world.behaviour import make_clip  # noqa: E402
from talkstream.world.dataset import make_world  # noqa: E402
from talkstream.world.render import FrameState, Renderer  # noqa: E402


def render_fps(size: int, n: int = 600) -> float:
    clip = make_clip(1, seconds=n / 25)
    r = Renderer(clip.identity, size)
    r.render()
    t = time.perf_counter()
    for row in clip.states:
        r.render(FrameState.from_array(row))
    return n / (time.perf_counter() - t)


def main() -> None:
    machine = describe()
    if hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {sorted(os.sched_getaffinity(0))[0]})  # one core for the per-core figure
    res = {"machine": machine, "render_fps_per_core": {s: round(render_fps(s), 1) for s in (128, 256, 512)}}
    t = time.perf_counter()
    n = 8
    for seed in range(n):
        make_clip(seed, 8.0)
    res["plan_clips_per_s"] = round(n / (time.perf_counter() - t), 2)
    if hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, set(range(os.cpu_count() or 1)))
    workers = os.cpu_count() or 1
    with tempfile.TemporaryDirectory() as d:
        clips = 8
        t = time.perf_counter()
        make_world(d, clips=clips, seconds=8.0, size=256, workers=workers, progress=False)
        dt = time.perf_counter() - t
    res["world_make"] = dict(
        clips=clips,
        seconds_per_clip=8.0,
        size=256,
        workers=workers,
        clips_per_min=round(clips / dt * 60, 1),
        video_seconds_per_wall_second=round(clips * 8.0 / dt, 2),
    )
    report(res, Path(__file__).parent / "results" / "world_speed_cpu.json")


if __name__ == "__main__":
    main()
