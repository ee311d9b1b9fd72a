"""End to end in real headless Chromium (Debian's, driven by Playwright): ``talkstream serve``'s page loads, a fake
microphone plays a question spoken by espeak-ng, the transcript shows it, the answer arrives, and the canvas shows
moving frames whose mouth region changes while the answer's audio plays. The real avatar runs (64x64 and 4 steps to
keep the CPU run short; ``TALKSTREAM_BROWSER_SIZE`` changes the size); screenshots go to ``TALKSTREAM_SCREENSHOTS``
(the docs' ``docs/img/serve_*.png`` are made that way at 256x256) or the test's temporary folder."""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("playwright")
httpx = pytest.importorskip("httpx")
pytest.importorskip("faster_whisper")
CHROMIUM = shutil.which("chromium")
if CHROMIUM is None:
    pytest.skip("Debian's chromium is not installed (make install installs it)", allow_module_level=True)

from test_agent_standins import chat_app, free_port, serve_in_thread, spoken  # noqa: E402

from talkstream.agent.audio import wav_bytes  # noqa: E402

MOUTH_BOX = [0.62, 0.44, 0.2, 0.16]  # the lips of the bundled reference image (x, y, w, h as fractions)
VIEWPORT = {"width": 1100, "height": 760}
REPLY = "[smile] I am doing very well, thank you for asking!"


@contextlib.contextmanager
def talkstream_serve(size: int, llm_url: str, tmp_path: Path):
    """``talkstream serve`` started as a user starts it (its own process, 127.0.0.1), stopped at the end."""
    port = free_port()
    cmd = [sys.executable, "-m", "talkstream.cli", "serve", "--port", str(port), "--size", str(size), "--steps", "4"]
    cmd += ["--voice", "espeak", "--llm-url", llm_url]
    log = open(tmp_path / "serve.log", "w")  # closed below
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.time() + 300
        while True:
            assert proc.poll() is None, (tmp_path / "serve.log").read_text()[-2000:]
            assert time.time() < deadline, "talkstream serve did not come up"
            try:
                if httpx.get(f"http://127.0.0.1:{port}/api/info", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.5)
        yield f"http://127.0.0.1:{port}"
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


@pytest.mark.slow
def test_browser_conversation_end_to_end(tmp_path):
    from playwright.sync_api import sync_playwright

    size = int(os.environ.get("TALKSTREAM_BROWSER_SIZE", "64"))
    shots = Path(os.environ.get("TALKSTREAM_SCREENSHOTS", tmp_path))
    shots.mkdir(parents=True, exist_ok=True)
    question = np.concatenate([np.zeros(24000, np.float32), spoken("Hello, how are you today?"), np.zeros(80000)])
    wav = tmp_path / "question.wav"
    wav.write_bytes(wav_bytes(question))
    flags = [
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--use-fake-ui-for-media-stream",
        "--use-fake-device-for-media-stream",
        f"--use-file-for-fake-audio-capture={wav}%noloop",
        "--autoplay-policy=no-user-gesture-required",
    ]
    with serve_in_thread(chat_app(REPLY)) as llm_url, talkstream_serve(size, llm_url, tmp_path) as url:
        with sync_playwright() as pw:
            browser = pw.chromium.launch_persistent_context(  # --user-data-dir=<tmp>: Playwright passes it
                tmp_path / "profile", executable_path=CHROMIUM, headless=True, args=flags, viewport=VIEWPORT
            )
            try:
                page = browser.new_page()
                logs: list[str] = []
                page.on("console", lambda m: logs.append(f"{m.type}: {m.text}"))
                page.on("pageerror", lambda e: logs.append(f"pageerror: {e}"))
                page.goto(url + "/")
                page.wait_for_function("window.talkstream && window.talkstream.ready !== null", timeout=60_000)
                page.wait_for_function("window.talkstream.drawn.length > 5", timeout=240_000)
                page.screenshot(path=str(shots / "serve_idle.png"))
                page.evaluate(f"window.talkstream.mouthBox = {MOUTH_BOX}")
                page.click("#mic")  # the fake microphone starts playing the question
                page.wait_for_function("window.talkstream.states.includes('listening')", timeout=60_000)
                page.screenshot(path=str(shots / "serve_listening.png"))
                page.wait_for_function(
                    "window.talkstream.transcripts.some(t => t.role === 'user' && t.final)", timeout=120_000
                )
                page.wait_for_function(
                    "window.talkstream.drawn.filter(d => d.rms > 0.01).length >= 12", timeout=300_000
                )
                page.screenshot(path=str(shots / "serve_speaking.png"))
                ts = page.evaluate("window.talkstream")
            finally:
                browser.close()
    assert not [x for x in logs if x.startswith("pageerror")], logs
    # (a starved fake microphone may deliver the question with a gap, as two turns: the words must all be there)
    user = " ".join(t["text"] for t in ts["transcripts"] if t["role"] == "user" and t["final"])
    assert "how are you" in user.lower(), ts["transcripts"]
    answer = [t["text"] for t in ts["transcripts"] if t["role"] == "assistant"]
    assert answer and answer[-1].startswith("I am doing very well"), answer
    assert not ts["errors"], ts["errors"]
    states = ts["states"]
    assert states[0] == "idle", states
    assert states.index("speaking", states.index("thinking", states.index("listening"))), states  # in this order
    assert ts["latency"]["reply_frame_s"] > 0
    drawn = ts["drawn"]
    idx = [d["index"] for d in drawn]
    assert idx == sorted(idx) and len(set(idx)) > 20  # frames move on: a video, not a still
    speech = [d for d in drawn if d["rms"] > 0.01]
    mouth = np.array([d["mouth"] for d in speech])
    steps = np.abs(np.diff(mouth))
    assert mouth.std() > 0.3 and (steps > 0.2).mean() > 0.3, mouth  # the mouth region changes while it speaks
    print(f"drawn {len(drawn)} frames, {len(speech)} with speech; mouth std {mouth.std():.2f}; ts {time.time()}")
