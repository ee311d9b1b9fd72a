"""The avatar stage of the conversation loop alone, on any device: reply speech handed to a running ``AvatarLoop``
(paced at real time, idling on silence, as ``talkstream serve`` runs it) -> the first frame carrying that speech.

For a machine without the audio / text encoders' packages (a remote GPU machine), ``--make-inputs`` (run where they are
installed) writes the Whisper features of the reply and of silence and the encoded captions; the timed run reads them
back (the encoders' cost is measured on the CPU by ``talkstream bench-conversation``). The engine's work per chunk does
not depend on the features' values, so the timing is the one the live encoders would give.

    python benchmarks/conversation_avatar.py --make-inputs out/conv_inputs.npz
    python benchmarks/conversation_avatar.py --inputs out/conv_inputs.npz --device cuda --out results.json
"""

from __future__ import annotations

import argparse
import random
import statistics
import threading
import time

import numpy as np
import torch

from talkstream.agent.actions import ACTION_CAPTIONS, STATE_CAPTIONS
from talkstream.agent.avatar_loop import DECODE_MODES, AvatarLoop
from talkstream.machine import describe, report

REPLY = "I am doing very well, thank you for asking!"


def make_inputs(path: str) -> None:
    from talkstream.agent.tts import PiperTTS
    from talkstream.models.encoders import TextEncoder, WhisperFeatures

    enc = WhisperFeatures()
    audio = PiperTTS().synthesize(REPLY)
    hop = enc.hop_samples
    audio = np.pad(audio, (0, -len(audio) % hop))
    lead = -(-enc.window_samples // hop)  # whole hops of silence before the reply (its features see silence)
    reply = enc.encode(np.concatenate([np.zeros(lead * hop, np.float32), audio]))[lead * 24 :]
    silence = enc.encode(np.zeros(hop, np.float32))
    captions = sorted(set(STATE_CAPTIONS.values()) | set(ACTION_CAPTIONS.values()))
    emb, mask = TextEncoder().encode(captions)
    np.savez(path, audio=audio, reply=reply, silence=silence, captions=np.array(captions), emb=emb, mask=mask)
    print(f"wrote {path}: {len(audio) / 16000:.2f} s of reply, {len(captions)} captions")


class TableStream:
    """Stands for ``WhisperStream``: features of whole hops read from precomputed tables (speech hops in order)."""

    def __init__(self, silence: np.ndarray, reply: np.ndarray, hop: int) -> None:
        self.silence, self.reply, self.hop = silence, reply, hop
        self.pending = np.zeros(0, np.float32)
        self.at = 0
        self.enc = self

    @property
    def hop_samples(self) -> int:
        return self.hop

    def push(self, a: np.ndarray) -> np.ndarray:
        self.pending = np.concatenate([self.pending, a])
        out = []
        while len(self.pending) >= self.hop:
            h, self.pending = self.pending[: self.hop], self.pending[self.hop :]
            if not h.any():
                self.at = 0
                out.append(self.silence)
            else:
                n = len(self.silence)
                rows = self.reply[self.at * n : (self.at + 1) * n]
                out.append(rows if len(rows) == n else self.silence)
                self.at += 1
        return np.concatenate(out) if out else np.zeros((0, self.silence.shape[1]), np.float32)


class TableWhisper:
    def __init__(self, silence, reply, hop) -> None:
        self.args = (silence, reply, hop)

    def stream(self) -> TableStream:
        return TableStream(*self.args)


def run(args) -> dict:
    from talkstream.stream.avatar import Avatar

    data = np.load(args.inputs)
    from talkstream.serve.app import FAST

    opts = {"steps": args.steps} if args.steps else dict(FAST) if args.speed == "fast" else {}
    t = time.perf_counter()
    avatar = Avatar.from_pretrained(device=args.device, size=args.size, decoder="tiny", **opts)
    load_s = time.perf_counter() - t
    avatar._whisper = TableWhisper(data["silence"], data["reply"], 7680)
    loop = AvatarLoop(avatar, avatar_reference(), decode=args.decode)
    for i, c in enumerate(data["captions"]):
        loop._encoded[str(c)] = (torch.from_numpy(data["emb"][i : i + 1]), torch.from_numpy(data["mask"][i : i + 1]))
    frames: list = []
    arrived = threading.Condition()

    def on_frame(f) -> None:
        with arrived:
            frames.append((time.perf_counter(), f.index, f.reply))
            arrived.notify_all()

    loop.start(on_frame)
    t0 = time.perf_counter()
    with arrived:
        arrived.wait_for(lambda: len(frames) > 0, timeout=600)
    first_frame_s = time.perf_counter() - t0
    time.sleep(args.warm)
    rng = random.Random(0)
    latencies = []
    for trial in range(args.trials):
        time.sleep(rng.uniform(0.3, 1.2))  # the reply lands anywhere inside a chunk
        t = time.perf_counter()
        loop.say(data["audio"], "speaks calmly", trial)
        with arrived:
            arrived.wait_for(lambda trial=trial: any(r == trial for _, _, r in frames), timeout=600)
        latencies.append(next(ts for ts, _, r in frames if r == trial) - t)
        while loop.pending_speech(trial):
            time.sleep(0.05)
    elapsed = time.perf_counter() - t0
    loop.close()
    gaps = np.diff([ts for ts, _, _ in frames[len(frames) // 4 :]])
    return dict(
        what="reply speech handed to the running avatar loop -> first frame carrying it (the avatar stage of "
        "end of speech -> first reply frame); encoders' features read from precomputed tables",
        device=args.device,
        size=args.size,
        decode=loop.decode,
        stream_config=str(avatar.cfg),
        dtype=str(next(avatar.dit.parameters()).dtype),
        model_load_s=round(load_s, 2),
        first_frame_s=round(first_frame_s, 3),
        avatar_first_frame_s=[round(x, 3) for x in latencies],
        median_avatar_first_frame_s=round(statistics.median(latencies), 3),
        engine_fps=round(len(frames) / elapsed, 2),
        inter_frame_p50_ms=round(float(np.percentile(gaps, 50)) * 1000, 1),
        inter_frame_p99_ms=round(float(np.percentile(gaps, 99)) * 1000, 1),
        machine=describe(),
    )


def avatar_reference():
    from pathlib import Path

    import talkstream

    return Path(talkstream.__file__).parent / "assets" / "reference.png"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--make-inputs", metavar="NPZ")
    p.add_argument("--inputs", metavar="NPZ")
    p.add_argument("--device", default="cpu")
    p.add_argument("--size", type=int, default=256)
    p.add_argument("--steps", type=int)
    p.add_argument("--trials", type=int, default=5)
    p.add_argument("--warm", type=float, default=3.0, help="seconds of idle streaming before the first reply")
    p.add_argument("--decode", default="auto", choices=[*DECODE_MODES, "auto"], help="AvatarLoop's decode mode")
    p.add_argument("--speed", default="fast", choices=["fast", "quality"], help="the server's --speed path")
    p.add_argument("--out")
    args = p.parse_args()
    if args.make_inputs:
        return make_inputs(args.make_inputs)
    report(run(args), args.out)


if __name__ == "__main__":
    main()
