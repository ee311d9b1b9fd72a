"""How many conversations this machine holds in real time, measured; and whether to batch their chunks.

A session's avatar must make one chunk (``chunk`` latent frames = 0.48 s of video at 25 FPS) every 0.48 s. The server
times the avatar itself when it starts: rounds of ``n`` sessions' chunks (each denoised and decoded, as a session
does), each session in its own thread at the same time as the server runs them and, for ``n`` >= 2, batched in one
forward pass (``stream.batch``). The capacity is the
largest ``n`` whose round fits in ``headroom`` x 0.48 s (the rest of the time is for speech recognition, the
language model, the voice and the picture encoding, which share the same device on a CPU); batching is used when it
measured faster than separate threads at that ``n``. The server then runs that many sessions live for a few seconds
(``verify_sessions``: paced, batched as it batches them, each in its own thread) and lowers the count until all of
them stream in real time: on a GPU with eager passes the rounds alone once admitted 8 sessions at 256x256 that got
14.4 frames/s each.
A machine that cannot hold even one session in real time still serves one (the page shows its frame rate) and says
so. Beyond the capacity a new client is told ``busy``.

Memory: a session holds its KV cache (bounded by the window), its decoder's feature cache, and its outgoing queue
(bounded by ``ConversationConfig.max_queue``: images are dropped first, then the oldest audio beyond 4x); the bound
per session is measured from a calibration stream and stated. A new session is refused while the machine's
available memory is under ``memory_margin`` x that bound.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field

import torch

from ..agent.conversation import ConversationConfig
from ..stream.batch import BATCH_SIZES, ChunkBatcher, batch_runner, next_chunks
from ..stream.engine import FPS, ChunkDecoder

AUDIO_BYTES_PER_FRAME = 640 * 4  # float32 samples of one frame's 40 ms
CALIBRATION_CAPTION = "listens attentively"  # what the calibration's sessions are captioned with


@dataclass
class Capacity:
    sessions: int  # concurrent real-time sessions admitted
    batch: bool  # sessions' chunks denoised in one forward pass
    real_time: bool  # False: even one session is slower than real time here (one is still served)
    chunk_video_s: float  # seconds of video a chunk makes
    headroom: float  # share of each chunk's time the avatar may use
    round_s: dict[str, dict[int, float]] = field(default_factory=dict)  # "separate"/"batched" -> n -> s per round
    memory_per_session_mb: float = 0.0
    how: str = "measured at start-up"
    verified_fps: dict[int, float] = field(default_factory=dict)  # n -> the slowest of n live sessions' frames/s

    def as_dict(self) -> dict:
        return asdict(self)

    def busy_message(self) -> str:
        return (
            f"this server holds {self.sessions} real-time conversation{'s' * (self.sessions != 1)} at a time and "
            "all are taken; try again in a minute"
        )


def available_memory_mb() -> float | None:
    """MemAvailable from /proc/meminfo (None where there is none)."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


def session_memory_bound_mb(engine, decoder_cache: dict, size: int, cfg: ConversationConfig | None = None) -> float:
    """The most a session holds: its KV cache (full window), decoder feature cache, and its outgoing queue at its
    bound (4 x max_queue frames; images only in the first max_queue, the rest audio only)."""
    cfg = cfg or ConversationConfig()
    cache = engine.cache.nbytes()
    dec = sum(t.numel() * t.element_size() for t in decoder_cache.values() if isinstance(t, torch.Tensor))
    queue = cfg.max_queue * size * size * 3 + 4 * cfg.max_queue * AUDIO_BYTES_PER_FRAME
    return (cache + dec + queue) / 2**20


REAL_TIME = 0.95  # a session is real time at >= 95% of 25 frames/s (as benchmarks/serve_load.py counts it)


def verify_sessions(
    avatar, image, n: int, batch: bool, seconds: float = 3.0, start_timeout: float = 120.0, runner=None
) -> dict:
    """Run ``n`` sessions' avatars as the server runs them (``AvatarLoop``: paced, fed silence through the audio
    encoder, decoded, frames handed out; one ``ChunkBatcher`` when ``batch``) and count each one's frames over
    ``seconds`` once all have started. Lock-step rounds (``calibrate``) time the denoising and decoding alone; what a
    session also does in its own thread (audio features, the decode hand-off, its frames) competes with the others
    for the interpreter and the device, which only running them shows."""
    from ..agent.avatar_loop import AvatarLoop

    if n < 1 or seconds <= 0:
        raise ValueError("need n >= 1 and seconds > 0")
    batcher = ChunkBatcher(max_batch=n, runner=runner) if batch and n >= 2 else None
    loops = [AvatarLoop(avatar, image, batcher=batcher) for _ in range(n)]

    def counts() -> list[int]:
        return [loop.frames_out for loop in loops]

    try:
        for loop in loops:
            loop.start(lambda _frame: None)  # (each loop counts the frames it hands out)
        deadline = time.perf_counter() + start_timeout
        warm = 2 * avatar.cfg.chunk * 4  # two chunks' frames each: past the first chunks' extra work
        while min(counts()) < warm and time.perf_counter() < deadline:
            if any(loop.error is not None for loop in loops):
                break
            time.sleep(0.02)
        t0, c0 = time.perf_counter(), counts()
        time.sleep(seconds)
        t1, c1 = time.perf_counter(), counts()
    finally:
        for loop in loops:
            loop.close()
    errors = [repr(loop.error) for loop in loops if loop.error is not None]
    if errors:
        raise RuntimeError(f"a calibration session failed: {errors[0]}")
    fps = [(b - a) / (t1 - t0) for a, b in zip(c0, c1)]
    return dict(sessions=n, batch=batcher is not None, fps=[round(f, 2) for f in fps], min_fps=round(min(fps), 2))


def fewer_sessions(n: int, min_fps: float) -> int:
    """The next count to try after ``n`` live sessions reached only ``min_fps`` each: the share of real time they got,
    scaled down, and at least one fewer."""
    return max(1, min(n - 1, int(n * min_fps / FPS)))


def _round_time(engines, decoders, audio, batched: bool, rounds: int, runner=None) -> float:
    """Median wall seconds for every engine to make (and decode) one chunk: batched in one pass (through ``runner``,
    as the server's batches run), or each in its own thread at the same time, as the server's sessions run."""

    def one(i: int) -> None:
        with torch.no_grad():
            decoders[i](engines[i].next_chunk(audio).latents)

    times = []
    with ThreadPoolExecutor(len(engines)) as pool:
        for r in range(rounds + 1):  # the first round is not timed (a new batch size's first pass allocates)
            t = time.perf_counter()
            if batched:
                with torch.no_grad():
                    chunks = next_chunks(engines, [audio] * len(engines), runner)
                    for d, c in zip(decoders, chunks):
                        d(c.latents)
            else:
                list(pool.map(one, range(len(engines))))
            if r:
                times.append(time.perf_counter() - t)
    return statistics.median(times)


@torch.no_grad()
def calibrate(
    avatar,
    image,
    max_sessions: int | None = None,
    headroom: float = 0.75,
    rounds: int = 3,
    batch: bool | None = None,
    progress=None,
    measure_all: bool = False,
    points: Sequence[int] | None = None,
    verify_s: float = 0.0,
) -> Capacity:
    """Time rounds of 1, 2, ... sessions' chunks on ``avatar`` at its size (``image``: a reference frame) until a
    round no longer fits ``headroom`` x a chunk's video time; ``batch``: None measures both ways, True / False only
    that way; ``measure_all``: every n up to ``max_sessions`` both ways (a benchmark, not a start-up); ``points``:
    time rounds only at these n (e.g. 1, 2, 4, 8, ... where a GPU holds many; every n gets its session either way).
    Warm-up chunks (until the cache's window is full) are not timed. ``verify_s`` > 0: the count the rounds admit
    (when it is 2 or more) is then run as live sessions for that many seconds (``verify_sessions``), and lowered
    until they all stream in real time (on a GPU the rounds alone overstated it: docs/serve.md). ``max_sessions``
    None: 8 on a CPU (every n timed); on a GPU 64, timed at the batch sizes a graphed batch is padded to
    (``stream.batch.BATCH_SIZES``) unless ``points`` says otherwise."""
    if max_sessions is None:
        gpu = str(avatar.device).startswith("cuda")
        max_sessions = 64 if gpu else 8
        if gpu and points is None:
            points = BATCH_SIZES
    if not 0 < headroom <= 1 or max_sessions < 1 or rounds < 1:
        raise ValueError("need 0 < headroom <= 1, max_sessions >= 1, rounds >= 1")
    timed = set(range(1, max_sessions + 1)) if points is None else {n for n in points if 1 <= n <= max_sessions}
    if not timed:
        raise ValueError(f"no point to time in 1..{max_sessions}: {points}")
    cfg = avatar.cfg
    video_s = cfg.chunk * 4 / FPS
    budget = headroom * video_s
    dit = avatar.dit
    audio = torch.zeros(cfg.chunk, dit.cfg.audio_tokens_per_frame, dit.cfg.audio_dim)
    text, mask = avatar.encode_prompt(CALIBRATION_CAPTION)
    ways = ("separate", "batched") if batch is None else (("batched",) if batch else ("separate",))
    round_s: dict[str, dict[int, float]] = {w: {} for w in ways}
    fits = dict.fromkeys(ways, 0)  # the largest timed n that fitted, each way
    alive = dict.fromkeys(ways, True)  # no timed n has failed this way yet
    engines, decoders = [], []
    runner = batch_runner(dit, avatar.device, max(timed)) if "batched" in ways else None
    warm = 1 + -(-cfg.window // cfg.chunk)  # chunks until the window is full (steady state, as batches need)
    memory = 0.0
    for n in range(1, max(timed) + 1):
        e, d = avatar.start_engine(image, text, mask), ChunkDecoder(avatar.decoder)
        for _ in range(warm):
            d(e.next_chunk(audio).latents)
        engines.append(e)
        decoders.append(d)
        if n == 1:
            memory = session_memory_bound_mb(e, d.cache, avatar.size)
        if n not in timed:
            continue
        for w in ways:
            if not alive[w] and not measure_all:  # this way no longer fits
                continue
            if n == 1 and w == "batched" and 1 in round_s.get("separate", {}):
                s = round_s["separate"][1]  # one session: nothing to batch
            else:
                s = _round_time(engines, decoders, audio, w == "batched", rounds, runner if w == "batched" else None)
            round_s[w][n] = round(s, 4)
            if progress is not None:
                progress(f"capacity: {n} session(s) {w}: {s:.3f} s a round (budget {budget:.3f} s)")
            if s <= budget and alive[w]:
                fits[w] = n
            else:
                alive[w] = False
        if not any(alive.values()) and not measure_all:
            break
    best = max(fits.values())
    faster = "batched" in ways and fits["batched"] == best >= 2
    if faster and "separate" in ways and fits["separate"] == best:
        faster = round_s["batched"][best] < round_s["separate"][best]
    del engines, decoders
    sessions, verified = max(1, best), {}
    while verify_s > 0 and sessions >= 2:
        v = verify_sessions(avatar, image, sessions, bool(faster), verify_s, runner=runner)
        verified[sessions] = v["min_fps"]
        if progress is not None:
            progress(f"capacity: {sessions} live session(s): {v['fps']} frames/s")
        if v["min_fps"] >= REAL_TIME * FPS:
            break
        sessions = fewer_sessions(sessions, v["min_fps"])
    return Capacity(
        sessions=sessions,
        batch=bool(faster) and sessions >= 2,
        real_time=best >= 1,
        chunk_video_s=video_s,
        headroom=headroom,
        round_s=round_s,
        memory_per_session_mb=round(memory, 1),
        how="measured at start-up" + (" (rounds, then live sessions)" if verified else ""),
        verified_fps=verified,
    )


def given(sessions: int, batch: bool = False, memory_per_session_mb: float = 0.0) -> Capacity:
    """A capacity set by the operator (``--max-sessions``): not measured (the memory bound may be)."""
    if sessions < 1:
        raise ValueError(f"max sessions must be >= 1, got {sessions}")
    return Capacity(
        sessions, batch, True, 0.0, 0.0, memory_per_session_mb=memory_per_session_mb, how="given (--max-sessions)"
    )


def memory_ok(cap: Capacity, margin: float = 2.0, floor_mb: float = 256.0) -> tuple[bool, float | None]:
    """Whether a new session fits the machine's available memory (and what is available, MB)."""
    avail = available_memory_mb()
    if avail is None:
        return True, None
    return avail >= margin * cap.memory_per_session_mb + floor_mb, round(avail, 1)


__all__ = [
    "Capacity",
    "available_memory_mb",
    "calibrate",
    "fewer_sessions",
    "given",
    "memory_ok",
    "session_memory_bound_mb",
    "verify_sessions",
]
