"""The conversation loop around the avatar: voice activity, speech recognition, a language model, speech synthesis.

Each stage is a small interface with a local default and a remote option (``vad``, ``asr``, ``llm``, ``tts``,
``audio_chat``); ``Conversation`` joins them to a streaming avatar (``avatar_loop``) with listening / thinking /
speaking / idle states and barge-in. Heavy packages are imported only when a stage is built.
"""
