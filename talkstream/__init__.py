"""talkstream: real-time streaming talking avatars."""

__version__ = "0.1.0"
