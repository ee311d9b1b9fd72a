"""``talkstream serve`` under faults and hostile input, over real sockets on 127.0.0.1 (the real avatar at 64x64,
4 steps, espeak-ng, a local stand-in LLM): tokens, rate limits, oversized uploads and picture bombs, 1,000 malformed
messages from a hypothesis fuzzer, a client vanishing mid-reply, a worker that raises, a reader that falls behind."""

from __future__ import annotations

import asyncio
import json
import os
import struct
import threading
import time
import zlib

import pytest

pytest.importorskip("starlette")
pytest.importorskip("websockets")
pytest.importorskip("faster_whisper")

import httpx  # noqa: E402
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402
from test_agent_standins import chat_app, free_port, serve_in_thread  # noqa: E402
from test_serve import Client  # noqa: E402
from websockets.exceptions import ConnectionClosed  # noqa: E402

from talkstream.serve import protocol as P  # noqa: E402
from talkstream.serve.security import (  # noqa: E402
    RateLimiter,
    SecurityConfig,
    SecurityError,
    TokenBucket,
    check_bind,
    check_image_header,
    load_token,
    request_token,
    token_ok,
)

TOKEN = "s3cret-token-0123456789"
LOOSE = SecurityConfig(messages_per_s=10_000, message_burst=10_000, connects_per_min=10_000, connect_burst=1000)


@pytest.fixture(scope="module")
def stack():
    from talkstream.serve.app import Models, ServeConfig

    with serve_in_thread(chat_app("[smile] Fine, thanks. And you? I hope all is well today.")) as llm_url:
        cfg = ServeConfig(size=64, voice="espeak", llm_url=llm_url, stream_options={"steps": 4}, max_sessions=3)
        yield cfg, Models(cfg)


@pytest.fixture
def serve(stack):
    """serve(**ServeConfig changes) -> (url, app): a fresh app sharing the loaded models."""
    import dataclasses

    from talkstream.serve.app import build_app

    cfg, models = stack
    with_servers = []

    def start(**changes):
        app = build_app(dataclasses.replace(cfg, **{"security": LOOSE, **changes}), models)
        ctx = serve_in_thread(app)
        with_servers.append(ctx)
        return ctx.__enter__(), app

    yield start
    for ctx in reversed(with_servers):
        ctx.__exit__(None, None, None)


def sessions_of(app) -> dict:
    return app.state.talkstream["sessions"]


def wait_for(cond, limit: float, what: str):
    deadline = time.perf_counter() + limit
    while not (res := cond()):
        assert time.perf_counter() < deadline, f"timed out waiting for {what}"
        time.sleep(0.01)
    return res


def raw_client(url: str, path: str = "/ws"):
    from websockets.sync.client import connect

    return connect(url.replace("http", "ws") + path, max_size=2**22)


# -- pure parts ------------------------------------------------------------------------------------------------------


def test_tokens_binding_and_rate_buckets(tmp_path):
    assert token_ok(None, None) and token_ok("x", None)
    assert token_ok(TOKEN, TOKEN) and not token_ok(TOKEN[:-1], TOKEN) and not token_ok(None, TOKEN)
    assert not token_ok("ü" * 5, TOKEN)  # non-ASCII never raises
    check_bind("127.0.0.1", None)
    check_bind("0.0.0.0", TOKEN)
    with pytest.raises(SecurityError, match="--token"):
        check_bind("0.0.0.0", None)
    f = tmp_path / "token"
    f.write_text(TOKEN + "\n")
    assert load_token(None, f) == TOKEN and load_token(TOKEN, None) == TOKEN and load_token(None, None) is None
    for args, msg in [((TOKEN, f), "not both"), ((None, tmp_path / "nope"), "no such file"), (("short", None), "16")]:
        with pytest.raises(SecurityError, match=msg):
            load_token(*args)
    (tmp_path / "empty").write_text("\n")
    with pytest.raises(SecurityError, match="empty"):
        load_token(None, tmp_path / "empty")
    assert request_token([(b"Authorization", b"Bearer abc")], b"") == "abc"
    assert request_token([], b"a=1&token=xyz") == "xyz" and request_token([], b"") is None

    now = [0.0]
    b = TokenBucket(rate=2.0, burst=3, clock=lambda: now[0])
    assert [b.take() for _ in range(4)] == [True, True, True, False]
    now[0] = 0.5  # one token back
    assert b.take() and not b.take()
    lim = RateLimiter(1.0, 1, max_clients=2, clock=lambda: now[0])
    assert lim.take("a") and not lim.take("a") and lim.take("b") and lim.take("c")
    assert list(lim.buckets) == ["b", "c"]  # the least recently seen client is forgotten: memory stays bounded


def test_serve_refuses_other_hosts_without_a_token():
    import argparse

    from talkstream.serve import cli

    p = argparse.ArgumentParser()
    cli.register(p.add_subparsers())
    args = p.parse_args(["serve", "--host", "0.0.0.0"])
    with pytest.raises(SystemExit, match="--token"):
        args.func(args)
    args = p.parse_args(["serve", "--audio-workers", "0"])
    with pytest.raises(SystemExit, match="--audio-workers must be >= 1"):
        args.func(args)
    assert cli._config(p.parse_args(["serve", "--audio-workers", "3"])).audio_workers == 3


def _png_header(width: int, height: int) -> bytes:
    """A PNG whose header declares width x height (a decompression bomb's first bytes)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    idat = zlib.compress(b"\0" * 1000)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def test_picture_header_limit():
    from talkstream.media import MediaError

    check_image_header(_png_header(100, 100), 10_000)
    check_image_header(b"not a picture", 10)  # left to the decoder, which names it
    with pytest.raises(MediaError, match="server's limit"):
        check_image_header(_png_header(50_000, 50_000), 40_000_000)  # over PIL's own bomb limit too
    with pytest.raises(MediaError, match="8000x8000: more pixels than this server's limit of 40,000,000"):
        check_image_header(_png_header(8_000, 8_000), 40_000_000)


# -- over the socket -------------------------------------------------------------------------------------------------


def test_wrong_tokens_are_refused_with_the_reason(serve):
    url, app = serve(security=SecurityConfig(token=TOKEN))
    assert httpx.get(url + "/").status_code == 200  # the page holds nothing: served without the token
    assert httpx.get(url + "/static/app.js").status_code == 200
    for headers, query in [({}, ""), ({"Authorization": "Bearer wrong"}, ""), ({}, "?token=" + TOKEN[:-1])]:
        r = httpx.get(url + "/api/info" + query, headers=headers)
        assert r.status_code == 401 and r.json()["code"] == "unauthorized", r.text
        assert httpx.post(url + "/api/images" + query, content=b"x", headers=headers).status_code == 401
    assert httpx.get(url + "/api/info", headers={"Authorization": f"Bearer {TOKEN}"}).status_code == 200
    assert httpx.get(url + f"/api/info?token={TOKEN}").status_code == 200
    for path in ("/ws", "/ws?token=nope"):
        with raw_client(url, path) as ws:
            msg = json.loads(ws.recv(timeout=10))
            assert msg["code"] == "unauthorized" and msg["fatal"], msg
            with pytest.raises(ConnectionClosed):
                ws.recv(timeout=10)
            assert ws.close_code == 1008
    assert not sessions_of(app)
    with raw_client(url, f"/ws?token={TOKEN}") as ws:
        ws.send(json.dumps({"type": "ping", "t": 1}))
        assert json.loads(ws.recv(timeout=10)) == {"type": "pong", "t": 1}


def test_rate_limits_per_client(serve):
    sec = SecurityConfig(messages_per_s=5, message_burst=10, connects_per_min=6, connect_burst=3)
    url, app = serve(security=sec)
    with raw_client(url) as ws:
        for i in range(40):
            ws.send(json.dumps({"type": "ping", "t": i}))
        got = []
        with pytest.raises(TimeoutError):
            while True:
                got.append(json.loads(ws.recv(timeout=1.0)))
        pongs = [m for m in got if m["type"] == "pong"]
        limited = [m for m in got if m.get("code") == "rate_limited"]
        assert 10 <= len(pongs) <= 13 and len(limited) == 1, got  # told once per flood, not once per message
        time.sleep(0.5)
        ws.send(json.dumps({"type": "ping", "t": "after"}))
        assert json.loads(ws.recv(timeout=10))["t"] == "after"  # the session went on
    codes = [httpx.post(url + "/api/images", content=b"junk").status_code for _ in range(3)]  # 2 more connects
    assert codes[:2] == [400, 400] and codes[2] == 429, codes
    assert "retry later" in httpx.post(url + "/api/images", content=b"junk").json()["error"]


def test_oversized_uploads_picture_bombs_and_paths(serve):
    url, app = serve(upload_bytes=100_000, security=SecurityConfig(**{**LOOSE.__dict__, "max_pixels": 4_000_000}))
    r = httpx.post(url + "/api/images", content=b"\0" * 200_000)
    assert r.status_code == 413 and "100000" in r.json()["error"]

    def chunks():  # no content-length: the limit holds while streaming
        for _ in range(30):
            yield b"\0" * 10_000

    assert httpx.post(url + "/api/images", content=chunks()).status_code == 413
    bomb = httpx.post(url + "/api/images", content=_png_header(30_000, 30_000) + b"\0" * 100)
    assert bomb.status_code == 400 and "server's limit of 4,000,000" in bomb.json()["error"], bomb.text
    assert httpx.get(url + "/static/../app.py").status_code == 404
    assert httpx.get(url + "/api/images/..%2F..%2Fapp.png").status_code == 404
    with raw_client(url) as ws:
        for name in ("../../../etc/passwd", "/etc/passwd", "upload:../../x", "upload:"):
            ws.send(json.dumps({"type": "hello", "image": name}))
            err = json.loads(ws.recv(timeout=10))
            assert err["code"] == "image" and "\n" not in err["message"], err
    assert httpx.get(url + "/api/info").json()["sessions"] == 0


# -- the fuzzer ------------------------------------------------------------------------------------------------------

_json = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=10,
)


def _not_json(s: str) -> bool:
    try:
        json.loads(s)
    except ValueError:
        return True
    return False


RATES = (8000, 16000, 22050, 24000, 32000, 44100, 48000)

MALFORMED = st.one_of(
    st.text(max_size=60).filter(_not_json).map(lambda s: (s, {"bad_json"})),
    _json.filter(lambda v: not isinstance(v, dict)).map(lambda v: (json.dumps(v), {"bad_message"})),
    st.dictionaries(st.text(max_size=8), _json, max_size=4).map(lambda d: (json.dumps(d), {"unknown_type"})),
    st.text(max_size=12)
    .filter(lambda t: t not in P.CLIENT_TYPES)
    .map(lambda t: (json.dumps({"type": t}), {"unknown_type"})),
    _json.filter(lambda v: v != 1).map(lambda v: (json.dumps({"type": "hello", "version": v}), {"version"})),
    _json.filter(lambda v: v not in RATES or isinstance(v, bool)).map(
        lambda v: (json.dumps({"type": "hello", "sample_rate": v}), {"sample_rate"})
    ),
    st.text(max_size=80).map(lambda t: "../" + t).map(lambda t: (json.dumps({"type": "hello", "image": t}), {"image"})),
    st.sampled_from(["text", "interrupt"]).map(lambda t: (json.dumps({"type": t, "text": "hi"}), {"no_hello"})),
    st.integers(4_200, 9_000).map(lambda n: ("x" * n, {"too_large"})),
    st.binary(min_size=1, max_size=300).filter(lambda b: len(b) % 2).map(lambda b: (b, {"not_audio"})),
    st.sampled_from([b"\x89PNG", b"\xff\xd8\xff", b"RIFF", b"OggS", b"fLaC", b"PK\x03\x04"]).flatmap(
        lambda m: st.binary(max_size=200).map(lambda b: (m + b + b"\0" * ((len(m) + len(b)) % 2), {"not_audio"}))
    ),
    st.text(max_size=80).map(lambda t: (json.dumps({"type": "hello", "note": t}).encode(), {"not_audio"})),
    st.binary(min_size=2, max_size=400).map(lambda b: (b[: len(b) // 2 * 2], {"no_hello", "not_audio"})),
    st.just((b"", {"empty_audio"})),
    st.just((b"\0" * (P.MAX_AUDIO_BYTES + 2), {"too_large"})),
)


def test_a_thousand_malformed_messages_crash_nothing(serve):
    """Each message from the fuzzer is answered with one error naming why; the session, its neighbour and the server
    go on, and nothing is left behind (the server's own session count)."""
    url, app = serve()
    sent: list[set[str]] = []
    from websockets.sync.client import connect

    ws = connect(url.replace("http", "ws") + "/ws", max_size=2**22, legacy=True)
    received: list[dict] = []

    def read():
        try:
            while True:
                received.append(json.loads(ws.recv()))
        except Exception:
            pass

    reader = threading.Thread(target=read, daemon=True)
    reader.start()

    @settings(max_examples=1000, deadline=None, database=None, suppress_health_check=list(HealthCheck))
    @given(MALFORMED)
    def fuzz(case):
        msg, codes = case
        ws.send(msg)
        sent.append(codes)

    fuzz()
    assert len(sent) >= 1000
    wait_for(lambda: len(received) >= len(sent), 60, "an answer to every message")
    assert len(received) == len(sent)
    for m, codes in zip(received, sent, strict=True):
        assert m["type"] == "error" and m["code"] in codes and m["message"] and "\n" not in m["message"], (m, codes)
        assert not m.get("fatal")
    ws.send(json.dumps({"type": "ping", "t": "alive"}))
    wait_for(lambda: received[-1].get("t") == "alive", 10, "pong")
    assert len(sessions_of(app)) == 1
    ws.close()
    reader.join(10)
    wait_for(lambda: not sessions_of(app), 2, "the session freed")
    c = Client(url, voice="espeak")  # a new session starts after the flood
    try:
        c.wait(lambda: c.of("ready"), 60, "ready")
    finally:
        c.close()


# -- faults ----------------------------------------------------------------------------------------------------------


def _threads(name: str) -> int:
    return sum(t.name == name and t.is_alive() for t in threading.enumerate())


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        import os

        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def test_a_client_vanishing_mid_reply_is_freed_within_a_second(serve):
    """The server's own session count and the session's engine thread drop within 1 s of the network going away, and
    the session's objects (its conversation, avatar stream, queues) are garbage afterwards."""
    import gc
    import weakref

    url, app = serve()
    base_threads = _threads("avatar-loop")
    rss, freed_s = [], []
    for _ in range(4):
        c = Client(url, voice="espeak")
        c.wait(lambda c=c: c.of("ready"), 60, "ready")
        c.send({"type": "text", "text": "Hello there, how are you?"})
        c.wait(lambda c=c: "speaking" in [m["state"] for m in c.of("state")], 60, "the reply")
        assert len(sessions_of(app)) == 1 and _threads("avatar-loop") == base_threads + 1
        conv = weakref.ref(next(iter(sessions_of(app).values())).conv)
        c.ws.socket.close()  # no close handshake: the network just goes away
        t0 = time.perf_counter()
        wait_for(lambda: not sessions_of(app) and _threads("avatar-loop") == base_threads, 1.0, "the session freed")
        freed_s.append(time.perf_counter() - t0)
        c.thread.join(5)
        del c
        gc.collect()
        assert conv() is None, gc.get_referrers(conv())
        rss.append(_rss_mb())
    growth = rss[-1] - rss[1]
    assert growth < 60, f"RSS grew {growth:.1f} MB over 3 sessions dropped mid-reply: {rss} (freed in {freed_s} s)"


def test_a_worker_that_raises_ends_only_its_session(serve):
    url, app = serve()
    a, b = Client(url, voice="espeak"), Client(url, voice="espeak")
    try:
        for c in (a, b):
            c.wait(lambda c=c: c.of("ready") and c.frames, 120, "frames")
        sid = a.of("ready")[0]["session"]

        def broken(n):
            raise RuntimeError("injected failure in the engine")

        sessions_of(app)[sid].conv.loop_avatar._take = broken
        err = a.wait(lambda: [e for e in a.of("error") if e.get("fatal")], 60, "the fatal error")[0]
        assert err["code"] == "avatar" and "injected failure" in err["message"]
        a.thread.join(10)
        assert not a.thread.is_alive()  # the server closed that socket
        wait_for(lambda: sid not in sessions_of(app), 2, "the failed session freed")
        n = len(b.frames)
        b.wait(lambda: len(b.frames) > n + 12, 120, "the other session's frames")
        assert not b.of("error") and len(sessions_of(app)) == 1
        assert httpx.get(url + "/api/info").json()["sessions"] == 1
    finally:
        a.close()
        b.close()


def test_a_slow_reader_loses_video_images_before_any_audio(stack):
    """While nobody reads, the oldest queued frames lose their images (at most ``max_queue`` images are held) and no
    frame's audio is lost; a reader 4 x ``max_queue`` items behind loses its oldest frames too (bounded memory)."""
    from talkstream.agent.avatar_loop import MediaFrame
    from talkstream.agent.conversation import Conversation, ConversationConfig

    cfg, m = stack

    async def run():
        conv = Conversation(
            m.avatar, m.asr, m.llm, m.tts("espeak"), image=m.images["reference"], cfg=ConversationConfig(max_queue=12)
        )
        await conv.start()
        try:
            deadline = time.perf_counter() + 120
            while conv.frames_sent < 30 and time.perf_counter() < deadline:  # nobody reads
                await asyncio.sleep(0.02)
                assert sum(isinstance(x, MediaFrame) and x.image is not None for x in conv._out) <= 12
            snapshot = [x for x in conv._out if isinstance(x, MediaFrame)]
            made, dropped = conv.frames_sent, conv.dropped_images
            while conv.frames_sent < 60 and time.perf_counter() < deadline:  # far behind: audio goes too, bounded
                await asyncio.sleep(0.02)
                assert len(conv._out) <= 4 * 12
            tail = [x.index for x in conv._out if isinstance(x, MediaFrame)]
            assert conv.frames_sent >= 60 and len(tail) >= 4 * 12 - 2 and tail[-1] == conv.frames_sent - 1, tail
            assert tail == list(range(tail[0], tail[0] + len(tail)))  # the oldest went, the newest are all there
            return made, dropped, snapshot
        finally:
            await conv.close()

    made, dropped, frames = asyncio.run(run())
    assert made >= 30 and dropped >= made - 12, (made, dropped)
    assert len(frames) == made and all(len(f.audio) == 640 for f in frames)  # every frame's audio is still there
    imgs = [f.image is not None for f in frames]
    assert imgs == sorted(imgs) and sum(imgs) <= 12, imgs  # the oldest lost their images first
    assert [f.index for f in frames] == list(range(frames[0].index, frames[0].index + len(frames)))


def test_a_server_restart_ends_sessions_and_clients_start_new_ones(stack):
    from talkstream.serve.app import build_app

    cfg, models = stack
    app = build_app(cfg, models)
    port = free_port()
    with serve_in_thread(app, port) as url:
        c = Client(url, voice="espeak")
        first = c.wait(lambda: c.of("ready"), 60, "ready")[0]["session"]
    c.thread.join(10)
    assert not c.thread.is_alive() and not sessions_of(app)  # the stop closed the socket and freed the session
    app2 = build_app(cfg, models)
    with serve_in_thread(app2, port) as url:
        c2 = Client(url, voice="espeak")  # the client reconnects to the same address
        try:
            again = c2.wait(lambda: c2.of("ready") and c2.frames, 60, "ready and frames")
            assert c2.of("ready")[0]["session"] != first and again
        finally:
            c2.close()


@pytest.mark.slow
def test_the_page_passes_its_token_on(serve, tmp_path):
    """Headless Chromium opens ``/?token=...`` on a server that requires it: the page's API calls and its WebSocket
    carry the token (the session starts and frames are drawn); without it the server refuses them."""
    import shutil

    pytest.importorskip("playwright")
    chromium = shutil.which("chromium")
    if chromium is None:
        pytest.skip("Debian's chromium is not installed (make install installs it)")
    from playwright.sync_api import sync_playwright

    url, app = serve(security=SecurityConfig(**{**LOOSE.__dict__, "token": TOKEN}))
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=chromium, headless=True, args=["--no-sandbox", "--disable-gpu"])
        try:
            page = browser.new_page()
            errors: list[str] = []
            page.on("pageerror", lambda e: errors.append(str(e)))
            page.goto(f"{url}/?token={TOKEN}")
            page.wait_for_function("window.talkstream && window.talkstream.ready !== null", timeout=60_000)
            page.wait_for_function("window.talkstream.drawn.length > 3", timeout=120_000)
            assert page.evaluate("window.talkstream.errors") == [] and not errors, errors
            refused = page.evaluate("fetch('/api/info').then(r => r.status)")  # the same page without the token
            assert refused == 401
        finally:
            browser.close()


def test_the_client_past_capacity_or_memory_is_told_busy_and_why(serve, monkeypatch):
    """Admission: with the capacity at one conversation the second client is told busy (how many this server holds,
    retry later) and closed; with too little free memory for a session's bound, a client is told that instead; while a
    live session runs behind real time, a new one is refused for the load. The first session streams on untouched."""
    import talkstream.serve.app as app_module

    url, app = serve(max_sessions=1)
    a = Client(url, voice="espeak")
    try:
        a.wait(lambda: a.of("ready") and a.frames, 120, "frames")
        info = httpx.get(url + "/api/info").json()
        assert info["max_sessions"] == 1 and info["capacity"]["memory_per_session_mb"] > 0
        assert info["audio_workers"] == max(1, (os.cpu_count() or 2) // 4)
        with raw_client(url) as extra:
            busy = json.loads(extra.recv(timeout=10))
        assert busy["type"] == "busy" and busy["reason"] == "sessions" and busy["max_sessions"] == 1
        assert "holds 1 real-time conversation at a time" in busy["message"] and busy["retry_after_s"] > 0
        url2, app2 = serve(max_sessions=4)
        monkeypatch.setattr(app_module, "memory_ok", lambda cap: (False, 100.0))
        with raw_client(url2) as extra:
            low = json.loads(extra.recv(timeout=10))
        assert low["type"] == "busy" and low["reason"] == "memory" and "100 MB free" in low["message"]
        assert not sessions_of(app2) and len(sessions_of(app)) == 1
        monkeypatch.undo()
        # a live session running behind real time (here: its clock moved 10 s back): the next client is told so
        (live,) = sessions_of(app).values()
        loop = live.conv.loop_avatar
        assert loop.behind_s() < 2.0  # (real time, settled or not)
        url3, app3 = serve(max_sessions=4)
        sessions_of(app3)["live"] = live  # (that server's one session: the same conversation)
        loop.started_at -= 10.0
        try:
            assert 9.0 < live.behind_s() < 12.0 and httpx.get(url3 + "/api/info").json()["behind_s"] > 9.0
            with raw_client(url3) as extra:
                late = json.loads(extra.recv(timeout=10))
        finally:
            loop.started_at += 10.0
            sessions_of(app3).pop("live")
        assert late["type"] == "busy" and late["reason"] == "load" and "behind real time" in late["message"]
        n = len(a.frames)
        a.wait(lambda: len(a.frames) > n + 12, 60, "the admitted session's frames")
        assert not a.of("error")
    finally:
        a.close()


def test_the_load_tests_clients_read_from_a_process_of_their_own(serve):
    """benchmarks/serve_load.py's ``Clients``: N sessions opened, read and closed by a child process; the frames it
    hands back are the server's, in order, and the server frees the sessions when it closes them."""
    import runpy
    from pathlib import Path

    load = runpy.run_path(str(Path(__file__).resolve().parents[1] / "benchmarks" / "serve_load.py"))
    url, app = serve()
    clients = load["Clients"](url.replace("http", "ws") + "/ws", 2)
    try:
        assert clients.proc.pid != os.getpid()
        wait_for(lambda: len(sessions_of(app)) == 2 and clients.ready(), 120, "two sessions streaming")
        time.sleep(1.0)
    finally:
        received = clients.close()
    assert clients.proc.returncode == 0 and len(received) == 2
    for r in received:
        idx = [f[1] for f in r["frames"]]
        assert len(idx) >= 10 and idx == sorted(idx) and all(f[2] > 0 for f in r["frames"])
        assert any(m["type"] == "ready" for m in r["messages"])
        stats = load["session_stats"](r["frames"], r["messages"], r["frames"][0][0], r["frames"][-1][0])
        assert stats["frames_lost"] == 0 and stats["frames"] == len(idx)
    wait_for(lambda: not sessions_of(app), 10, "the sessions freed")


def test_the_load_tests_talking_clients_are_answered(serve, tmp_path):
    """``Clients`` with ``talk``: the child's microphone sends silence in real time and espeak's question; the server
    hears it (VAD, ASR), the stand-in model answers, and the reply's first voiced frame reaches the client: the turn
    is counted with its reply time at the client, as heard, and the server's own measure."""
    import runpy
    from pathlib import Path

    import numpy as np

    from talkstream.agent.tts import EspeakTTS

    load = runpy.run_path(str(Path(__file__).resolve().parents[1] / "benchmarks" / "serve_load.py"))
    question = tmp_path / "question.npy"
    np.save(question, EspeakTTS().synthesize(load["QUESTION"]))
    url, app = serve()
    clients = load["Clients"](url.replace("http", "ws") + "/ws", 1, talk_audio=str(question), period=30.0)
    try:
        wait_for(lambda: clients.ready(), 120, "the session streaming")
        time.sleep(9.0)  # 1 s, the question (~2 s), the turn's end, the reply's first chunks on 2 cores
    finally:
        (received,) = clients.close()
    frames, said = received["frames"], received["said"]
    assert len(said) == 1 and any(f[3] for f in frames if f[0] > said[0])  # one question, a voiced reply after it
    stats = load["session_stats"](frames, received["messages"], frames[0][0], frames[-1][0], said)
    assert stats["turns"] == stats["replied"] == 1 and 0 < stats["reply_s"][0] <= stats["reply_heard_s"][0] < 9
    assert len(stats["server_reply_frame_s"]) == 1 and stats["voiced_share"] > 0
    assert any(m["type"] == "transcript" and m.get("role") == "user" for m in received["messages"])
