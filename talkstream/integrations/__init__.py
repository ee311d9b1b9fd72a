"""Adapters that put the avatar where voice agents are built. Each framework's module is imported on its own
(it needs that framework's extra); importing this package imports nothing heavy:

- ``talkstream.integrations.live``: ``LiveAvatar``, speech segments in, frames with their 40 ms of audio out
  (no framework; the two adapters below are built on it);
- ``talkstream.integrations.livekit``: a LiveKit Agents ``VideoGenerator`` and ``AvatarSession``
  (``pip install talkstream[livekit]``);
- ``talkstream.integrations.pipecat``: a Pipecat video service (``pip install talkstream[pipecat]``).
"""
