"""``talkstream serve`` (the page + WebSocket sessions) and ``talkstream bench-conversation`` (latency by stage)."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

LOOPBACK = ("127.0.0.1", "localhost", "::1")


def _add_stack_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--image", help="the default reference image (default: the bundled one)")
    p.add_argument("--weights", help="a folder with your own causal / vae safetensors (default: the embedded model)")
    p.add_argument("--device", default="cpu", help="the avatar's device: cpu | cuda")
    p.add_argument("--size", type=int, default=256, help="video side in pixels (default 256)")
    p.add_argument("--decoder", choices=["tiny", "vae"], default="tiny")
    p.add_argument("--steps", type=int, help="denoising steps per chunk (default: the model's; implies quality)")
    p.add_argument(
        "--speed",
        choices=["auto", "fast", "quality"],
        default="auto",
        help="fast: one denoising pass with timestep forcing (what is live on a CPU; softer lips, docs/serve.md); "
        "quality: the model's own sampling; auto (default): fast on CPU, quality elsewhere",
    )
    p.add_argument("--llm-url", help="an OpenAI-compatible endpoint (llama.cpp server, Ollama, vLLM); default: local")
    p.add_argument("--llm-model", default="default", help="the model name sent to --llm-url / --audio-chat-url")
    p.add_argument("--llm-timeout", type=float, default=10.0, help="seconds to the first token before apologising")
    p.add_argument(
        "--audio-chat-url", help="an audio-native endpoint (OpenAI-style audio chat: speech in, speech + text out)"
    )
    p.add_argument("--voice", choices=["piper", "espeak"], default="piper")
    p.add_argument(
        "--avatar-nice",
        type=int,
        default=0,
        help="run the avatar's threads this much nicer than speech recognition, the LLM and the voice (default 0)",
    )
    p.add_argument(
        "--preemptive-silence",
        type=float,
        default=0.1,
        help="seconds of the user's silence after which the reply is prepared, shown only if the turn then ends "
        "(0: prepare it at the turn's end; default 0.1)",
    )


def _config(args):
    from .app import ServeConfig

    if args.image and not Path(args.image).is_file():
        raise ValueError(f"--image {args.image}: no such file")
    if args.preemptive_silence < 0:
        raise ValueError(f"--preemptive-silence {args.preemptive_silence}: must be >= 0 seconds")
    opts = {"steps": args.steps} if args.steps else {}
    return ServeConfig(
        weights=args.weights,
        device=args.device,
        size=args.size,
        decoder=args.decoder,
        image=args.image,
        llm_url=args.llm_url,
        llm_model=args.llm_model,
        llm_api_key=os.environ.get("TALKSTREAM_LLM_API_KEY"),
        llm_timeout=args.llm_timeout,
        audio_chat_url=args.audio_chat_url,
        voice=args.voice,
        speed=args.speed,
        avatar_nice=args.avatar_nice,
        preemptive_silence=args.preemptive_silence or None,
        max_sessions=getattr(args, "max_sessions", 1),
        batch={"on": True, "off": False}.get(getattr(args, "batch", "auto")),
        audio_workers=getattr(args, "audio_workers", None),
        stream_options=opts,
    )


def _serve(args) -> None:
    import uvicorn

    from ..machine import check_device
    from .app import build_app
    from .security import SecurityConfig, SecurityError, check_bind, load_token

    check_device(args.device)
    if args.max_sessions is not None and args.max_sessions < 1:
        sys.exit(f"talkstream serve: error: --max-sessions must be >= 1, got {args.max_sessions}")
    if args.audio_workers is not None and args.audio_workers < 1:
        sys.exit(f"talkstream serve: error: --audio-workers must be >= 1, got {args.audio_workers}")
    try:
        token = load_token(args.token, args.token_file)
        check_bind(args.host, token)
    except SecurityError as e:
        sys.exit(f"talkstream serve: error: {e}")
    cfg = _config(args)
    cfg.security = SecurityConfig(token=token)
    app = build_app(cfg)
    print(f"talkstream serve: loading models, then open http://{args.host}:{args.port}/", flush=True)
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning", ws_max_size=1 << 20)


def _bench_conversation(args) -> None:
    from ..machine import check_device
    from .bench import run_bench

    check_device(args.device)
    res = run_bench(_config(args), turns=args.turns, progress=not args.quiet)
    print(json.dumps(res, indent=2))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(res, indent=2) + "\n")
        print(f"wrote {args.out}")


def register(sub) -> None:
    s = sub.add_parser("serve", help="talk to the avatar in a browser: a local page with microphone, video and voice")
    s.add_argument("--host", default="127.0.0.1")
    s.add_argument("--port", type=int, default=8000)
    s.add_argument(
        "--max-sessions",
        type=int,
        help="concurrent conversations (default: what this machine holds in real time, measured at start-up)",
    )
    s.add_argument(
        "--batch",
        choices=["auto", "on", "off"],
        default="auto",
        help="denoise several sessions' chunks in one pass (auto: where it measured faster at start-up)",
    )
    s.add_argument(
        "--audio-workers",
        type=int,
        help="speech recognitions / audio-feature encodings run at once, shared by the sessions (default: cores // 4)",
    )
    s.add_argument("--token", help="required from every client (needed for any --host other than 127.0.0.1)")
    s.add_argument("--token-file", help="read the token from this file (keeps it out of the process list)")
    _add_stack_args(s)
    s.set_defaults(func=_serve)

    b = sub.add_parser(
        "bench-conversation",
        help="reply latency by stage (VAD, ASR, LLM first token, TTS first audio, avatar first frame) for spoken turns "
        "(also spelled: talkstream bench conversation)",
    )
    _add_stack_args(b)
    b.add_argument("--turns", type=int, default=3, help="spoken questions (each waits for the whole reply)")
    b.add_argument("--out", type=Path, help="write the JSON here (e.g. benchmarks/results/...)")
    b.add_argument("--quiet", action="store_true")
    b.set_defaults(func=_bench_conversation)
