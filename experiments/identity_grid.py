"""docs/identities.png: 8 world identities, each at rest, speaking, turning and blinking."""

import sys
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from talkstream.world.identity import Identity  # noqa: E402
from talkstream.world.render import FrameState, Renderer  # noqa: E402

states = [
    FrameState(),
    FrameState(jaw_open=0.8, teeth=0.6, tongue=0.3, smile=0.4),
    FrameState(yaw=22, pitch=5),
    FrameState(blink=1.0, roll=8),
]
rows = [np.concatenate([Renderer(Identity.sample(i), 192).render(s) for s in states], 1) for i in range(8)]
grid = np.concatenate([np.concatenate(rows[:4], 0), np.concatenate(rows[4:], 0)], 1)
out = Path(__file__).resolve().parents[1] / "docs" / "identities.png"
Image.fromarray(grid).save(out, optimize=True)
print(out, grid.shape)
