"""``talkstream serve`` under load: N concurrent WebSocket sessions on loopback, each with its own avatar stream.

For each N the server is started with ``max_sessions=N`` on 127.0.0.1, N clients (in a process of their own, as remote
clients would not share the server's interpreter) say hello and read for ``--seconds``
(the avatar idles and listens: the engine runs all the time, paced at real time), and one more client must be told
``busy``. Per session: frames received, frames per second, frames lost (gaps in the frame index) and video images
dropped for a slow reader (frames that arrive without their JPEG), the p50 / p99 interval between frames. A session is
real-time when it receives >= 95% of 25 frames a second. Bounded in count and time; stops by itself.

    python benchmarks/serve_load.py --sessions 1,2,3 --seconds 10 --size 64 --steps 4 \\
        --out benchmarks/results/serve_load_64_steps4_cpu.json

``--batch-bench``: no server; the avatar alone, as the server's start-up calibration times it
(``serve.capacity.calibrate``): rounds of 1..``--max-batch`` sessions' chunks (each denoised and decoded), each session
in its own thread (as the server runs them) and batched in one forward pass (``stream.batch``), at each ``--sizes``;
how many sessions fit real time (a round within 0.48 s, and within the server's 75% headroom) each way. On a GPU
(real-time sessions per card):

    python benchmarks/serve_load.py --batch-bench --device cuda --sizes 256,512 --max-batch 32 \\
        --out benchmarks/results/serve_batch_h100.json
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

from talkstream.agent.audio import SAMPLE_RATE, float_to_pcm16
from talkstream.machine import describe, report
from talkstream.serve import protocol as P

FPS = 25


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def _serving(app, path: str = "/ws", scheme: str = "ws"):
    import uvicorn

    port = _free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", lifespan="on"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.time() + 120
    while not server.started:
        if not thread.is_alive() or time.time() > deadline:
            raise RuntimeError("the server did not start")
        time.sleep(0.05)
    try:
        yield f"{scheme}://127.0.0.1:{port}{path}"
    finally:
        server.should_exit = True
        thread.join(30)


QUESTION = "Hello there, how are you doing today?"
REPLY = "[smile] I am well, thank you."  # (short: a reply ends before the session's next question)
PACKET_S = 0.04  # the talking clients' microphone packets (40 ms of PCM16, sent at real time)
VOICED = 0.01  # a frame's audio (or the question's sample) louder than this is speech


def chat_standin(reply: str = REPLY):
    """An OpenAI-compatible ``/v1/chat/completions`` streaming ``reply`` word by word at once: the talking load test's
    language model, so that its turns cost the server's speech recognition, voice and avatar, not a model's wait."""
    from starlette.applications import Starlette
    from starlette.responses import StreamingResponse
    from starlette.routing import Route

    def sse(obj) -> str:
        return f"data: {json.dumps(obj)}\n\n"

    async def completions(request):
        await request.json()

        async def events():
            for i, word in enumerate(reply.split(" ")):
                yield sse({"choices": [{"index": 0, "delta": {"content": word if i == 0 else " " + word}}]})
            yield sse({"choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]})
            yield "data: [DONE]\n\n"

        return StreamingResponse(events(), media_type="text/event-stream")

    return Starlette(routes=[Route("/v1/chat/completions", completions, methods=["POST"])])


class Reader:
    """One session: hello, then every frame's arrival time, index, JPEG size and whether it carries voiced audio.
    ``talk`` (utterance samples at 16 kHz, period s, offset s): a microphone that sends silence in real time and the
    utterance every ``period`` seconds from ``offset`` after the session is ready; ``said`` holds the time each
    utterance's last voiced sample left."""

    def __init__(self, url: str, stop: threading.Event, talk: tuple | None = None) -> None:
        from websockets.sync.client import connect

        self.ws = connect(url, max_size=2**22, legacy=True)
        self.stop, self.messages, self.frames, self.said = stop, [], [], []
        self.ws.send(json.dumps({"type": "hello", "version": 1, "voice": "espeak", "sample_rate": SAMPLE_RATE}))
        self.thread = threading.Thread(target=self._read, daemon=True)
        self.thread.start()
        self.talk = talk
        if talk is not None:
            self.mic = threading.Thread(target=self._speak, daemon=True)
            self.mic.start()

    def _read(self) -> None:
        with contextlib.suppress(Exception):
            while not self.stop.is_set():
                try:
                    msg = self.ws.recv(timeout=1.0)
                except TimeoutError:
                    continue
                if isinstance(msg, str):
                    self.messages.append({**json.loads(msg), "_t": time.perf_counter()})
                else:
                    index, pts, jpeg, pcm = P.decode_frame(msg)
                    voiced = bool(len(pcm)) and float(np.abs(pcm).max()) > VOICED
                    self.frames.append((time.perf_counter(), index, len(jpeg), voiced, pts))

    def _speak(self) -> None:
        utterance, period, offset = self.talk
        n = int(round(PACKET_S * SAMPLE_RATE))
        loud = np.flatnonzero(np.abs(utterance) > VOICED)
        last_voiced = int(loud[-1]) if len(loud) else len(utterance) - 1  # (the question's trailing quiet after it)
        silence = np.zeros(n, np.float32)
        while not self.stop.is_set() and not self.ready():
            time.sleep(0.02)
        start = time.perf_counter()
        next_say, pos, k = start + offset, None, 0
        with contextlib.suppress(Exception):
            while not self.stop.is_set():
                now = time.perf_counter()
                if pos is None and now >= next_say:
                    pos, next_say = 0, next_say + period
                if pos is not None:
                    piece = utterance[pos : pos + n]
                    if pos <= last_voiced < pos + n:
                        self.said.append(now)  # the packet with the last voiced sample leaves now
                    pos += n
                    if pos >= len(utterance):
                        pos = None
                    piece = np.pad(piece, (0, n - len(piece)))
                else:
                    piece = silence
                self.ws.send(float_to_pcm16(piece))
                k += 1
                time.sleep(max(0.0, start + k * PACKET_S - time.perf_counter()))

    def ready(self) -> bool:
        return any(m["type"] == "ready" for m in self.messages) and bool(self.frames)


def clients_main(url: str, n: int, talk_audio: str | None = None, period: float = 0.0) -> None:
    """``--clients``: ``n`` readers of ``url`` in this process, driven over stdin / stdout by ``Clients``; with
    ``talk_audio`` (a .npy utterance) each one talks every ``period`` seconds, the sessions' turns staggered."""
    stop = threading.Event()
    utterance = None if talk_audio is None else np.load(talk_audio).astype(np.float32)
    readers = [
        Reader(url, stop, None if utterance is None else (utterance, period, 1.0 + period * i / n)) for i in range(n)
    ]
    print("connected", flush=True)
    for line in sys.stdin:
        if line.strip() == "ready":
            print(json.dumps(all(r.ready() for r in readers)), flush=True)
        elif line.strip() == "close":
            stop.set()
            for r in readers:
                r.ws.close()
                r.thread.join(5)
            print(json.dumps([dict(frames=r.frames, messages=r.messages, said=r.said) for r in readers]), flush=True)
            return


class Clients:
    """``n`` sessions' readers in a process of their own (``--clients``): their websocket work (receiving, parsing
    every frame) does not share the server's interpreter, as remote clients would not. Their arrival times are
    ``time.perf_counter`` there, the same monotonic clock as here."""

    def __init__(
        self, url: str, n: int, timeout: float = 120.0, talk_audio: str | None = None, period: float = 0.0
    ) -> None:
        here = os.path.abspath(__file__)
        cmd = [sys.executable, here, "--clients", url, "--sessions", str(n)]
        if talk_audio is not None:
            cmd += ["--talk-audio", talk_audio, "--talk", str(period)]
        root = os.path.dirname(os.path.dirname(here))  # (talkstream importable there as here)
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")]))}
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env)
        self.timeout = timeout
        if self._line() != "connected":
            raise RuntimeError("the client process did not connect its sessions")

    def _line(self) -> str:
        box: list[str] = []
        reader = threading.Thread(target=lambda: box.append(self.proc.stdout.readline()), daemon=True)
        reader.start()
        reader.join(self.timeout)
        if not box or not box[0]:
            self.proc.kill()
            raise RuntimeError(f"the client process stopped answering (exit {self.proc.poll()})")
        return box[0].strip()

    def _ask(self, what: str) -> str:
        self.proc.stdin.write(what + "\n")
        self.proc.stdin.flush()
        return self._line()

    def ready(self) -> bool:
        return json.loads(self._ask("ready"))

    def close(self) -> list[dict]:
        """Close every session; each one's frames [(time, index, JPEG bytes, voiced, pts)], messages (with their
        arrival times) and the times its questions ended (``said``)."""
        try:
            return json.loads(self._ask("close"))
        finally:
            with contextlib.suppress(Exception):
                self.proc.stdin.close()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()


def session_stats(frames: list, messages: list, t0: float, t1: float, said: list | None = None) -> dict:
    """One session's frames received within [t0, t1]: frames per second, lost, images dropped, intervals, the
    playout delay a player needs for them; with
    ``said`` (the times the client's utterances ended), each turn's reply time: from the utterance's end to the
    first frame of the next voiced run (the avatar's reply reaching the client; None: none within the window)."""
    from talkstream.serve.capacity import REAL_TIME  # (the server's own measure of a real-time session)

    fr = [f for f in frames if t0 <= f[0] <= t1]
    idx = np.array([f[1] for f in fr])
    t = np.array([f[0] for f in fr])
    gaps = np.diff(t) if len(t) > 1 else np.zeros(1)
    fps = len(fr) / (t1 - t0)
    # the buffer a player needs to show every frame of the window on time, having started at the session's first
    # frame: frame i is due at first arrival + (pts_i - first pts) + the buffer
    lag = [f[0] - f[4] for f in fr if len(f) > 4]
    start = next((f[0] - f[4] for f in frames if len(f) > 4), None)
    return dict(
        frames=len(fr),
        fps=round(fps, 2),
        playout_delay_s=None if not lag else round(max(0.0, max(lag) - start), 3),
        real_time=fps >= REAL_TIME * FPS,
        frames_lost=int(np.sum(np.diff(idx) - 1)) if len(idx) > 1 else 0,
        images_dropped=int(sum(f[2] == 0 for f in fr)),
        interval_p50_ms=round(float(np.percentile(gaps, 50)) * 1000, 1),
        interval_p99_ms=round(float(np.percentile(gaps, 99)) * 1000, 1),
        interval_max_ms=round(float(gaps.max()) * 1000, 1),
        errors=[m for m in messages if m["type"] == "error"],
        **({} if said is None else _turns(frames, messages, said, t0, t1)),
    )


def _turns(frames: list, messages: list, said: list, t0: float, t1: float) -> dict:
    """The turns that ended within [t0, t1]: each one's reply time at the client (its first voiced frame's arrival)
    and as heard (when a player that started at the session's first frame shows it: at its timestamp, or on arrival
    if that is later), and the server's own measure."""
    replies, heard = [], []
    start = next((f[0] - f[4] for f in frames if len(f) > 4), 0.0)
    firsts = [f for i, f in enumerate(frames) if len(f) > 4 and f[3] and (i == 0 or not frames[i - 1][3])]
    for te in (t for t in said if t0 <= t <= t1):
        first = next((f for f in firsts if f[0] > te), None)
        replies.append(None if first is None else round(first[0] - te, 3))
        heard.append(None if first is None else round(max(first[0], start + first[4]) - te, 3))
    server = [m.get("reply_frame_s") for m in messages if m["type"] == "latency" and t0 <= m.get("_t", 0) <= t1]
    voiced = [f for f in frames if t0 <= f[0] <= t1 and len(f) > 3]
    return dict(
        turns=len(replies),
        replied=sum(r is not None for r in replies),
        reply_s=replies,
        reply_heard_s=heard,
        server_reply_frame_s=[x for x in server if x is not None],
        interrupted=sum(m["type"] == "clear" for m in messages if t0 <= m.get("_t", 0) <= t1),  # (barge-ins)
        voiced_share=round(sum(f[3] for f in voiced) / max(1, len(voiced)), 3),
    )


def run_level(cfg, models, n: int, seconds: float, warmup: float, talk: tuple | None = None) -> dict:
    """``talk``: (utterance .npy path, period s): every session talks (``Reader``)."""
    import dataclasses

    from talkstream.serve.app import build_app

    app = build_app(dataclasses.replace(cfg, max_sessions=n), models)
    with _serving(app) as url:
        clients = Clients(url, n, talk_audio=talk[0] if talk else None, period=talk[1] if talk else 0.0)
        try:
            deadline = time.perf_counter() + 180
            while not clients.ready():
                if time.perf_counter() > deadline:
                    raise RuntimeError("sessions did not start within 180 s")
                time.sleep(0.05)
            from websockets.sync.client import connect

            with connect(url) as extra:  # the N+1th
                busy = json.loads(extra.recv(timeout=10))
            time.sleep(warmup)
            batcher = models.batcher
            before = len(batcher.batches) if batcher is not None else 0
            t0 = time.perf_counter()
            sessions_during = len(app.state.talkstream["sessions"])
            time.sleep(seconds)
            t1 = time.perf_counter()
            batches = list(batcher.batches[before:]) if batcher is not None else []  # (bounded at 1,000: enough)
            pass_s = list(batcher.pass_s[before:]) if batcher is not None else []
        finally:
            received = clients.close()
        freed = time.perf_counter()
        while app.state.talkstream["sessions"] and time.perf_counter() - freed < 10:
            time.sleep(0.01)
        freed_s = time.perf_counter() - freed
        per = [session_stats(r["frames"], r["messages"], t0, t1, r["said"] if talk else None) for r in received]
    return dict(
        sessions=n,
        seconds=round(t1 - t0, 2),
        server_sessions_during=sessions_during,
        server_sessions_after=len(app.state.talkstream["sessions"]),
        freed_s=round(freed_s, 3),
        extra_client=busy,
        real_time_sessions=sum(p["real_time"] for p in per),
        fps_min=min(p["fps"] for p in per),
        interval_p99_ms_max=max(p["interval_p99_ms"] for p in per),
        playout_delay_s_max=max((p["playout_delay_s"] for p in per if p["playout_delay_s"] is not None), default=None),
        frames_lost_total=sum(p["frames_lost"] for p in per),
        images_dropped_total=sum(p["images_dropped"] for p in per),
        batch_sizes={str(k): batches.count(k) for k in sorted(set(batches))},  # passes run, by sessions in each
        # each size's median pass (s) and the share of the level the batcher spent in passes: the rest of a round
        # is what the sessions do beside the pass
        pass_s_median={
            str(k): round(float(np.median([p for b, p in zip(batches, pass_s) if b == k])), 4)
            for k in sorted(set(batches))
        },
        batcher_busy=round(sum(pass_s) / max(t1 - t0, 1e-9), 3),
        runner=None if batcher is None or batcher.runner is None else "graphs",
        **(_talk_summary(per) if talk else {}),
        per_session=per,
    )


def _talk_summary(per: list[dict]) -> dict:
    """A talking level's turns over all its sessions: how many were answered, reply times at the client."""
    replies = [r for p in per for r in p["reply_s"] if r is not None]
    heard = [r for p in per for r in p["reply_heard_s"] if r is not None]
    server = [r for p in per for r in p["server_reply_frame_s"]]

    def q(xs, p):
        return None if not xs else round(float(np.percentile(xs, p)), 3)

    return dict(
        turns=sum(p["turns"] for p in per),
        turns_replied=sum(p["replied"] for p in per),
        interrupted=sum(p["interrupted"] for p in per),
        rate_limited=sum(e.get("code") == "rate_limited" for p in per for e in p["errors"]),
        reply_s_p50=q(replies, 50),
        reply_s_p90=q(replies, 90),
        reply_s_max=q(replies, 100),
        reply_heard_s_p50=q(heard, 50),
        reply_heard_s_p90=q(heard, 90),
        server_reply_frame_s_p50=q(server, 50),
        voiced_share_mean=round(float(np.mean([p["voiced_share"] for p in per])), 3),
    )


def batch_bench(args) -> None:
    import torch

    from talkstream.serve.app import ServeConfig, speed_path, stream_options
    from talkstream.serve.capacity import calibrate
    from talkstream.stream.avatar import BUNDLED_REFERENCE, Avatar, load_reference

    sizes = [int(x) for x in args.sizes.split(",")]
    if not 1 <= args.max_batch <= 256 or not 1 <= args.rounds <= 20:
        raise SystemExit("serve_load: error: --max-batch must be 1-256 and --rounds 1-20")
    try:
        points = None if args.points is None else [int(x) for x in args.points.split(",")]
    except ValueError:
        raise SystemExit(f"serve_load: error: --points takes comma-separated integers, not {args.points!r}") from None
    res = dict(
        benchmark="serve_batch",
        what="seconds per round of n sessions' chunks (denoised + decoded; 0.48 s of video each), each session in "
        "its own thread against one batched pass; real-time sessions = largest n whose round fits 0.48 s "
        "(and 0.75 x: the server)",
        device=args.device,
        torch_threads=torch.get_num_threads(),
        machine=describe(),
        load_average_before=os.getloadavg(),
        sizes=[],
    )
    for size in sizes:
        cfg = ServeConfig(size=size, device=args.device, speed=args.speed)
        avatar = Avatar.from_pretrained(None, device=args.device, decoder="tiny", size=size, **stream_options(cfg))
        cap = calibrate(
            avatar,
            load_reference(BUNDLED_REFERENCE, size),
            max_sessions=args.max_batch,
            rounds=args.rounds,
            measure_all=not args.until_over,
            points=points,
            progress=lambda m, size=size: print(f"{size}px {m}", flush=True),
        )
        video = cap.chunk_video_s
        row = dict(size=size, speed=speed_path(cfg), stream_config=str(avatar.cfg), round_s=cap.round_s)
        for w, times in cap.round_s.items():
            row[f"real_time_sessions_{w}"] = max([n for n, s in times.items() if s <= video], default=0)
            row[f"server_sessions_{w}"] = max([n for n, s in times.items() if s <= 0.75 * video], default=0)
        row["batched_speedup"] = {
            n: round(cap.round_s["separate"][n] / cap.round_s["batched"][n], 3)
            for n in cap.round_s["batched"]
            if n in cap.round_s["separate"]
        }
        row["server_would_batch"] = cap.batch
        row["memory_per_session_mb"] = cap.memory_per_session_mb
        res["sizes"].append(row)
        if args.out:  # each size as it ends (a run cut short keeps the sizes it finished)
            Path(args.out).write_text(json.dumps(res, indent=1))
    res["load_average_after"] = os.getloadavg()
    report(res, args.out, show={k: v for k, v in res.items() if k != "machine"})


def plot(res: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    levels = [lv for lv in res["levels"] if "per_session" in lv]
    ns = [lv["sessions"] for lv in levels]
    talk = any("turns" in lv for lv in levels)
    fig, axes = plt.subplots(1, 3 if talk else 2, figsize=(13 if talk else 9, 3.5))
    a, b = axes[0], axes[1]
    for lv in levels:
        a.scatter([lv["sessions"]] * len(lv["per_session"]), [p["fps"] for p in lv["per_session"]], c="C0")
        b.scatter([lv["sessions"]] * len(lv["per_session"]), [p["interval_p99_ms"] for p in lv["per_session"]], c="C1")
    a.axhline(FPS, ls="--", c="gray", label="real time (25 fps)")
    a.set(xlabel="concurrent sessions", ylabel="frames/s received per session", xticks=ns)
    a.legend()
    b.axhline(1000 / FPS, ls="--", c="gray", label="40 ms")
    b.set(xlabel="concurrent sessions", ylabel="p99 inter-frame interval (ms)", xticks=ns)
    b.legend()
    if talk:  # each turn's reply as heard, and the turns left unanswered in the window
        c = axes[2]
        for lv in levels:
            heard = [r for p in lv["per_session"] for r in p.get("reply_heard_s", []) if r is not None]
            c.scatter([lv["sessions"]] * len(heard), heard, c="C2", s=12)
            c.annotate(f"{lv['turns_replied']}/{lv['turns']}", (lv["sessions"], 0), ha="center", va="bottom")
        c.set(xlabel="concurrent sessions", ylabel="reply heard after the question (s)", xticks=ns, ylim=(0, None))
        c.set_title("replied / turns at the bottom", fontsize=9)
    how = f"{res['steps']} Euler steps" if res.get("steps") else f"the {res.get('speed', 'default')} path"
    talking = f", every session talking every {res['talk_every_s']:g} s" if res.get("talk_every_s") else ""
    fig.suptitle(f"talkstream serve on loopback: {res['size']}x{res['size']}, {how}, {res['device']}{talking}")
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sessions", default="1,2,3", help="comma-separated concurrent session counts (at most 64)")
    ap.add_argument("--seconds", type=float, default=10.0, help="measured seconds per level (at most 120)")
    ap.add_argument("--warmup", type=float, default=2.0)
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--steps", type=int, help="euler steps (the quality path); default: the --speed path's")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--speed", default="auto", choices=["auto", "fast", "quality"], help="the server's --speed")
    ap.add_argument("--batch", default="auto", choices=["auto", "on", "off"], help="the server's --batch")
    ap.add_argument("--batch-bench", action="store_true", help="time batched against separate chunks (no server)")
    ap.add_argument("--sizes", default="64,256", help="--batch-bench: video sizes")
    ap.add_argument("--max-batch", type=int, default=4, help="--batch-bench: most sessions a round")
    ap.add_argument("--points", help="--batch-bench: time only these session counts (comma-separated); default every n")
    ap.add_argument(
        "--until-over", action="store_true", help="--batch-bench: stop each way at its first round over the budget"
    )
    ap.add_argument("--rounds", type=int, default=4, help="--batch-bench: timed rounds per point (median)")
    ap.add_argument("--out", help="JSON path (a PNG plot is written next to it)")
    ap.add_argument(
        "--talk",
        type=float,
        default=0.0,
        help="every session talks every this many seconds (espeak's question; a stand-in language model replies)",
    )
    ap.add_argument(
        "--no-calibrate", dest="calibrate", action="store_false", help="skip the start-up calibration's measurement"
    )
    ap.add_argument("--clients", metavar="URL", help=argparse.SUPPRESS)  # the readers' own process (Clients)
    ap.add_argument("--talk-audio", help=argparse.SUPPRESS)  # (the utterance, for the readers' process)
    args = ap.parse_args()
    if args.clients:
        clients_main(args.clients, int(args.sessions), args.talk_audio, args.talk)
        return
    if args.batch_bench:
        batch_bench(args)
        return
    levels = [int(x) for x in args.sessions.split(",")]
    if not levels or max(levels) > 64 or min(levels) < 1 or not 0 < args.seconds <= 120:
        raise SystemExit("serve_load: error: --sessions must be 1-64 each and --seconds in (0, 120]")

    import torch

    from talkstream.serve.app import Models, ServeConfig
    from talkstream.serve.security import SecurityConfig

    with contextlib.ExitStack() as stack:
        talk = None
        if args.talk:  # a stand-in language model answers at once; the question is espeak's, made once here
            if not 5 <= args.talk <= 60:
                raise SystemExit("serve_load: error: --talk must be 5-60 s (a turn, its reply and a pause)")
            from talkstream.agent.tts import EspeakTTS

            llm_url = stack.enter_context(_serving(chat_standin(), path="/v1", scheme="http"))
            question = os.path.join(stack.enter_context(tempfile.TemporaryDirectory()), "question.npy")
            np.save(question, EspeakTTS().synthesize(QUESTION))
            talk = (question, args.talk)
        else:  # the LLM is never asked (nobody speaks): a closed local port keeps the local model from loading
            llm_url = "http://127.0.0.1:9/v1"
        cfg = ServeConfig(
            size=args.size,
            device=args.device,
            voice="espeak",
            llm_url=llm_url,
            stream_options={"steps": args.steps} if args.steps else {},
            speed=args.speed,
            batch={"on": True, "off": False}.get(args.batch),
            max_sessions=max(levels),
            # every client of this test comes from 127.0.0.1: the per-address limits (new sessions; messages, of which
            # a talking client sends 25 a second) cover all of them
            security=SecurityConfig(
                connect_burst=2 * sum(levels) + 8,
                connects_per_min=60.0 * (2 * sum(levels) + 8),
                messages_per_s=200.0 + 50.0 * max(levels),
                message_burst=1000 + 250 * max(levels),
            ),
        )
        models = Models(cfg)
        res = dict(
            benchmark="serve_load",
            size=args.size,
            steps=args.steps,
            speed=models.speed,
            batch=models.capacity.batch,
            stream_config=str(models.avatar.cfg),
            device=args.device,
            decoder=cfg.decoder,
            torch_threads=torch.get_num_threads(),
            machine=describe(),
            load_average_before=os.getloadavg(),
            talk_every_s=args.talk or None,
            messages_per_s_per_address=cfg.security.messages_per_s,
            question=QUESTION if talk else None,
            levels=[],
        )
        if args.calibrate:  # what `talkstream serve` would admit here, measured as at its start-up
            from talkstream.serve.capacity import calibrate

            cap = calibrate(
                models.avatar, models.images["reference"], headroom=cfg.headroom, batch=cfg.batch, verify_s=cfg.verify_s
            )
            res["startup_capacity"] = cap.as_dict()
            print(f"start-up calibration: {cap.sessions} session(s), batched: {cap.batch}, {cap.round_s}", flush=True)
        for n in levels:
            try:
                lv = run_level(cfg, models, n, args.seconds, args.warmup, talk)
            except Exception as e:  # (recorded; the next level starts a fresh server)
                print(f"{n} sessions: failed: {type(e).__name__}: {e}", flush=True)
                res["levels"].append(dict(sessions=n, error=f"{type(e).__name__}: {e}"))
                continue
            print(
                f"{n} sessions: real-time {lv['real_time_sessions']}/{n}, min {lv['fps_min']} fps, "
                f"p99 interval <= {lv['interval_p99_ms_max']} ms, lost {lv['frames_lost_total']}, "
                f"N+1th: {lv['extra_client'].get('type')}, freed in {lv['freed_s']} s"
                + (
                    f", {lv['turns_replied']}/{lv['turns']} replied, heard p50 {lv['reply_heard_s_p50']} s"
                    if talk
                    else ""
                ),
                flush=True,
            )
            res["levels"].append(lv)
            if args.out:  # each level as it ends (a later level that fails loses only itself)
                Path(args.out).write_text(json.dumps(res, indent=1))
        res["load_average_after"] = os.getloadavg()
        res["real_time_sessions_held"] = max(
            [lv["sessions"] for lv in res["levels"] if lv.get("real_time_sessions") == lv["sessions"]], default=0
        )
        report(res, args.out, show={k: v for k, v in res.items() if k != "levels"})
        if args.out:
            plot(res, os.path.splitext(args.out)[0] + ".png")


if __name__ == "__main__":
    main()
