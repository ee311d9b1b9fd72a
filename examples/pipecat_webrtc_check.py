"""Checks a running ``examples/pipecat_bot.py`` from the command line, as a browser would: connects over WebRTC
(aiortc), plays a wav file as the microphone, records the avatar's video and audio, and writes what it measured
as JSON (+ a strip of frames as PNG).

    python examples/pipecat_bot.py -t webrtc --host 127.0.0.1 --port 7860 &
    python examples/pipecat_webrtc_check.py --url http://127.0.0.1:7860 --mic me.wav --seconds 60 --out check

On a machine without a network interface other than loopback, start both with ``--loopback`` (bot: run it through
this file's ``serve`` mode, below): aioice leaves 127.0.0.1 out of its ICE candidates unless told otherwise.

    python examples/pipecat_webrtc_check.py --serve --port 7860 &      # the bot, ICE on 127.0.0.1 only
"""

from __future__ import annotations

import argparse
import asyncio
import json
import runpy
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np


def loopback_only() -> None:
    import aioice.ice

    aioice.ice.get_host_addresses = lambda *args, **kwargs: ["127.0.0.1"]


async def check(url: str, mic: str, seconds: float) -> tuple[dict, list[np.ndarray]]:
    from aiortc import RTCConfiguration, RTCPeerConnection, RTCSessionDescription
    from aiortc.contrib.media import MediaPlayer

    pc = RTCPeerConnection(RTCConfiguration(iceServers=[]))  # no STUN: host candidates only
    pc.addTrack(MediaPlayer(mic).audio)
    pc.addTransceiver("video", direction="recvonly")
    video: list[tuple[float, np.ndarray]] = []
    audio: list[tuple[float, int, np.ndarray]] = []
    t0 = time.perf_counter()

    async def read(track) -> None:
        while True:
            try:
                f = await track.recv()
            except Exception:
                return
            now = time.perf_counter() - t0
            if track.kind == "video":
                video.append((now, f.to_ndarray(format="rgb24")))
            else:
                a = f.to_ndarray().reshape(-1, len(f.layout.channels))[:, 0]
                audio.append((now, f.sample_rate, a))

    pc.on("track", lambda track: asyncio.ensure_future(read(track)))
    await pc.setLocalDescription(await pc.createOffer())
    body = json.dumps({"sdp": pc.localDescription.sdp, "type": pc.localDescription.type}).encode()
    req = urllib.request.Request(url + "/api/offer", body, {"Content-Type": "application/json"})
    answer = json.loads(await asyncio.to_thread(lambda: urllib.request.urlopen(req, timeout=60).read()))
    await pc.setRemoteDescription(RTCSessionDescription(answer["sdp"], answer["type"]))
    await asyncio.sleep(seconds)
    await pc.close()

    result: dict = {"seconds": seconds, "video_frames": len(video)}
    if video:
        ts = np.array([t for t, _ in video])
        result |= {
            "video_size": list(video[0][1].shape[:2]),
            "first_video_s": round(float(ts[0]), 3),
            "video_fps": round((len(ts) - 1) / max(ts[-1] - ts[0], 1e-9), 2),
        }
    if audio:
        rate = audio[0][1]
        pcm = np.concatenate([a for _, _, a in audio]).astype(np.float32)
        win = rate // 10
        voiced = [i for i in range(0, len(pcm) - win, win) if np.sqrt(np.mean(pcm[i : i + win] ** 2)) > 100]
        result |= {
            "audio_rate": rate,
            "audio_s": round(len(pcm) / rate, 2),
            "speech_s": round(len(voiced) * win / rate, 2),  # 100 ms windows with RMS over 100 (int16)
            "first_speech_s": round(float(audio[0][0] + voiced[0] / rate), 2) if voiced else None,
        }
    frames = [video[i][1] for i in np.linspace(0, len(video) - 1, 8).astype(int)] if video else []
    return result, frames


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--url", default="http://127.0.0.1:7860")
    p.add_argument("--mic", help="wav file played as the microphone")
    p.add_argument("--seconds", type=float, default=60)
    p.add_argument("--out", default="pipecat_check", help="writes OUT.json and OUT_strip.png")
    p.add_argument("--serve", action="store_true", help="run examples/pipecat_bot.py with ICE on loopback only")
    p.add_argument("--port", type=int, default=7860)
    args = p.parse_args()
    loopback_only()
    if args.serve:
        sys.argv = ["pipecat_bot.py", "-t", "webrtc", "--host", "127.0.0.1", "--port", str(args.port)]
        runpy.run_path(str(Path(__file__).with_name("pipecat_bot.py")), run_name="__main__")
        return
    if not args.mic:
        p.error("--mic WAV is needed")
    result, frames = asyncio.run(check(args.url, args.mic, args.seconds))
    from talkstream.machine import describe

    result["machine"] = describe()
    Path(args.out + ".json").write_text(json.dumps(result, indent=2) + "\n")
    if frames:
        from PIL import Image

        Image.fromarray(np.concatenate(frames, axis=1)).save(args.out + "_strip.png")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
