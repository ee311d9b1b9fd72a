"""``talkstream serve``'s app over real HTTP and WebSockets on 127.0.0.1 (uvicorn in a thread), with the real avatar
(64x64, 4 steps), Silero VAD, Whisper, espeak-ng and a local stand-in LLM: the page, uploads, a spoken turn at 48 kHz,
every kind of bad input answered with an error while the session and a second one go on, a 10-minute monologue."""

from __future__ import annotations

import io
import json
import threading
import time

import numpy as np
import pytest

pytest.importorskip("starlette")
pytest.importorskip("websockets")
pytest.importorskip("faster_whisper")

import httpx  # noqa: E402
from test_agent_standins import chat_app, serve_in_thread, spoken  # noqa: E402
from websockets.sync.client import connect  # noqa: E402

from talkstream.agent.audio import float_to_pcm16  # noqa: E402
from talkstream.media import resample  # noqa: E402
from talkstream.serve import protocol as P  # noqa: E402


@pytest.fixture(scope="module")
def server():
    from talkstream.serve.app import Models, ServeConfig, build_app

    with serve_in_thread(chat_app("[smile] I am well, thank you!")) as llm_url:
        cfg = ServeConfig(size=64, voice="espeak", llm_url=llm_url, stream_options={"steps": 4}, max_sessions=3)
        app = build_app(cfg, Models(cfg))
        with serve_in_thread(app) as url:
            yield url, app


class Client:
    """A WebSocket session that reads in a thread: JSON messages and decoded frames, with arrival times."""

    def __init__(self, url: str, **hello) -> None:
        self.ws = connect(url.replace("http", "ws") + "/ws", max_size=2**22, legacy=True)
        self.messages: list[dict] = []
        self.frames: list[tuple[float, int, float, bytes, np.ndarray]] = []
        self.thread = threading.Thread(target=self._read, daemon=True)
        self.thread.start()
        self.send({"type": "hello", "version": 1, **hello})

    def _read(self) -> None:
        try:
            while True:
                msg = self.ws.recv()
                if isinstance(msg, str):
                    self.messages.append(json.loads(msg))
                else:
                    self.frames.append((time.perf_counter(), *P.decode_frame(msg)))
        except Exception:  # closed
            pass

    def send(self, obj) -> None:
        self.ws.send(obj if isinstance(obj, (bytes, str)) else json.dumps(obj))

    def wait(self, cond, limit: float = 120.0, what: str = ""):
        deadline = time.perf_counter() + limit
        while not (res := cond()):
            assert time.perf_counter() < deadline, f"timed out waiting for {what}; got {self.messages[-8:]}"
            time.sleep(0.05)
        return res

    def of(self, type: str) -> list[dict]:
        return [m for m in self.messages if m["type"] == type]

    def close(self) -> None:
        self.ws.close()
        self.thread.join(10)


def test_page_info_images_and_uploads(server):
    url, app = server
    page = httpx.get(url + "/")
    assert page.status_code == 200 and "talkstream" in page.text and "/static/app.js" in page.text
    assert "AudioWorkletProcessor" in httpx.get(url + "/static/mic-worklet.js").text
    info = httpx.get(url + "/api/info").json()
    assert info["version"] == P.VERSION and "reference" in info["images"] and info["voices"] == ["piper", "espeak"]
    png = httpx.get(url + "/api/images/reference.png")
    assert png.headers["content-type"] == "image/png" and png.content[:4] == b"\x89PNG"
    assert httpx.get(url + "/api/images/nope.png").status_code == 404
    bad = httpx.post(url + "/api/images", content=b"not an image at all")
    assert bad.status_code == 400 and "not an image" in bad.json()["error"]
    assert httpx.post(url + "/api/images", content=b"\0" * 9_000_000).status_code == 413
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray((np.random.default_rng(0).random((80, 60, 3)) * 255).astype(np.uint8)).save(buf, "PNG")
    up = httpx.post(url + "/api/images", content=buf.getvalue()).json()
    assert up["id"].startswith("upload:") and "does not look like" in up["warning"]  # noise is no world face
    world = io.BytesIO()
    Image.fromarray(app.state.talkstream["models"].images["ada"]).save(world, "PNG")
    assert httpx.post(url + "/api/images", content=world.getvalue()).json()["warning"] is None
    c = Client(url, image=up["id"], voice="espeak")
    try:
        assert c.wait(lambda: c.of("ready") or c.of("error"))[0]["type"] == "ready"
    finally:
        c.close()


def test_spoken_turn_at_48k_over_the_socket(server):
    url, _ = server
    c = Client(url, sample_rate=48_000, voice="espeak")
    try:
        c.wait(lambda: c.of("ready"), what="ready")
        c.wait(lambda: c.frames, 180, "the first frame")
        question = np.concatenate([np.zeros(8000, np.float32), spoken("Hello, how are you?"), np.zeros(16000)])
        pcm = float_to_pcm16(resample(question.astype(np.float32), 16_000, 48_000))
        t0, step = time.perf_counter(), 48_000 * 2 // 50  # 20 ms messages, in real time
        for k in range(0, len(pcm), step):
            c.send(pcm[k : k + step])
            time.sleep(max(0.0, t0 + (k + step) / 96_000 - time.perf_counter()))
        final = c.wait(lambda: [m for m in c.of("transcript") if m["role"] == "user" and m["final"]], 120, "ASR")
        assert "how are you" in final[0]["text"].lower()
        c.wait(lambda: any(np.abs(f[4]).max() > 0.05 for f in c.frames), 240, "reply audio")
        answer = c.wait(lambda: [m for m in c.of("transcript") if m["role"] == "assistant" and m["final"]])
        assert answer[0]["text"] == "I am well, thank you!"
        states = [m["state"] for m in c.of("state")]
        assert states[:4] == ["idle", "listening", "thinking", "speaking"], states
        idx = [f[1] for f in c.frames]
        assert idx == sorted(idx) and all(abs(f[2] - f[1] / 25) < 1e-9 for f in c.frames)  # pts = index / 25
        assert all(len(f[4]) == 640 and f[3][:2] == b"\xff\xd8" for f in c.frames)  # 40 ms of audio + a JPEG each
        assert not c.of("error")
    finally:
        c.close()


def test_bad_input_gets_an_error_and_sessions_go_on(server):
    url, _ = server
    other = Client(url, voice="espeak")  # a second session that must not notice anything
    c = Client(url, sample_rate=12_345)  # a wrong sample rate in the hello
    try:
        c.wait(lambda: c.of("error"), what="sample-rate error")
        assert c.of("error")[0]["code"] == "sample_rate" and "12345" in c.of("error")[0]["message"]
        c.send(b"\x01\x00" * 160)  # audio before a valid hello
        c.send({"type": "hello", "version": 1, "sample_rate": 16_000, "voice": "espeak"})
        c.wait(lambda: c.of("ready"), what="ready")
        png = io.BytesIO()
        from PIL import Image

        Image.new("RGB", (4, 4)).save(png, "PNG")
        bad = [
            "this is not json",
            json.dumps([1, 2]),
            json.dumps({"type": "launch_missiles"}),
            json.dumps({"type": "hello", "version": 1}),  # a second hello
            json.dumps({"type": "text", "text": ""}),
            "x" * 10_000,
            png.getvalue(),  # an image where audio belongs
            b"\x00\x01\x02",  # odd byte count
            b"",  # empty
            b"\x00" * (P.MAX_AUDIO_BYTES + 2),  # too large
            b"RIFF\x00\x00\x00\x00WAVEfmt ",  # a WAV header
        ]
        n0 = len(c.of("error"))
        for m in bad:
            c.send(m)
        errors = c.wait(lambda: c.of("error")[n0:] if len(c.of("error")) >= n0 + len(bad) else None, 30, "errors")
        codes = [e["code"] for e in errors]
        assert codes == [
            "bad_json",
            "bad_message",
            "unknown_type",
            "hello_again",
            "bad_text",
            "too_large",
            "not_audio",
            "not_audio",
            "empty_audio",
            "too_large",
            "not_audio",
        ], codes
        assert all(e["message"] and "\n" not in e["message"] for e in errors)
        assert "PNG" in errors[6]["message"] and "WAV" in errors[10]["message"]
        assert c.of("error")[1]["code"] == "no_hello"
        c.send({"type": "ping", "t": 7})
        assert c.wait(lambda: c.of("pong"))[0]["t"] == 7
        n = len(c.frames)
        c.wait(lambda: len(c.frames) > n + 12, 180, "frames after the bad input")  # this session streams on
        m = len(other.frames)
        other.wait(lambda: len(other.frames) > m + 12, 180, "the other session's frames")
        assert not other.of("error")
    finally:
        c.close()
        other.close()
    sessions = server[1].state.talkstream["sessions"]
    deadline = time.perf_counter() + 60
    while sessions and time.perf_counter() < deadline:  # a closed socket frees its session (and its avatar stream)
        time.sleep(0.1)
    assert not sessions


def test_a_ten_minute_monologue_is_cut_into_turns_and_memory_stays_bounded(server):
    url, app = server
    c = Client(url, voice="espeak")
    try:
        c.wait(lambda: c.of("ready"), what="ready")
        talk = spoken("I have so much to say and I will keep on saying it without ever stopping for a breath")
        audio = np.tile(talk, int(np.ceil(600 * 16000 / len(talk))))[: 600 * 16000]
        pcm = float_to_pcm16(audio)
        for k in range(0, len(pcm), 32_000):  # one second per message, as fast as the socket takes it
            c.send(pcm[k : k + 32_000])
        cuts = c.wait(lambda: [m for m in c.of("notice") if m["code"] == "utterance_cut"], 120, "a cut")
        assert cuts
        c.send({"type": "ping"})
        c.wait(lambda: c.of("pong"), 120, "pong after the monologue")
        sessions = app.state.talkstream["sessions"]
        for s in sessions.values():  # nothing holds more than one turn's audio
            assert s.conv.segmenter.utterance_len <= 30 * 16000 + 16000
        assert not [e for e in c.of("error") if e.get("fatal")]
    finally:
        c.close()
