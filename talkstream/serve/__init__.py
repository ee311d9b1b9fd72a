"""``talkstream serve``: an ASGI app (Starlette + uvicorn) with a WebSocket session protocol and a static page where a
person talks to the avatar. The protocol is in ``protocol.py`` and ``docs/serve.md``."""
