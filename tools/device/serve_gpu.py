"""serve's benchmarks on a GPU machine without the MiniLM package (its wheel is 83.5 MB, over a call's carry): every
caption the server can give its avatar (the conversation states', the reply actions', the calibration's) is encoded
here beforehand and read from a file there; everything else is the benchmark as it runs anywhere.

    python tools/device/serve_gpu.py embed data/carry_init/captions.pt                  # here (MiniLM)
    python tools/device/serve_gpu.py batch data/carry_init/captions.pt OUT.json         # there: batched vs separate
    python tools/device/serve_gpu.py load data/carry_init/captions.pt -- ARGS   # there: the server load test

``batch`` is ``benchmarks/serve_load.py --batch-bench`` at 256 and 512 on CUDA (session counts doubling up to 256,
each way stopped at its first round over the budget); ``load`` runs ``benchmarks/serve_load.py`` with the arguments
after ``--`` (the server on 127.0.0.1, websocket clients; it needs the server's own packages there:
``tools/device/serve_load_gpu.sh``). A caption that was not embedded stops the run with its name.
"""

import runpy
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]


def captions() -> list[str]:
    """Every caption the server encodes: the states' (the start-up's is the speaking one), the actions' and the
    calibration's."""
    from talkstream.agent.actions import ACTION_CAPTIONS, STATE_CAPTIONS
    from talkstream.serve.capacity import CALIBRATION_CAPTION

    return sorted({*STATE_CAPTIONS.values(), *ACTION_CAPTIONS.values(), CALIBRATION_CAPTION})


def embed(path: str) -> None:
    from talkstream.models.encoders import TextEncoder

    enc, out = TextEncoder(), {}
    for c in captions():
        text, mask = enc.encode([c])
        out[c] = dict(text=text, mask=mask)
    torch.save(out, path)
    print(f"{len(out)} captions -> {path}")


def use_embedded(path: str) -> None:
    """Avatar.encode_prompt reads the embedded captions instead of running MiniLM."""
    from talkstream.stream.avatar import Avatar

    saved = torch.load(path)

    def encode_prompt(self: Avatar, prompt: str | None) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        if not prompt:
            return None, None
        if prompt not in saved:
            raise SystemExit(f"serve_gpu: caption {prompt!r} was not embedded (embedded: {sorted(saved)})")
        return saved[prompt]["text"], saved[prompt]["mask"]

    Avatar.encode_prompt = encode_prompt


def main() -> None:
    if len(sys.argv) < 3 or sys.argv[1] not in ("embed", "batch", "load"):
        raise SystemExit(__doc__)
    what, path = sys.argv[1], sys.argv[2]
    if what == "embed":
        return embed(path)
    use_embedded(path)
    if what == "batch":
        if len(sys.argv) != 4:
            raise SystemExit(__doc__)
        points = "1,2,3,4,6,8,12,16,24,32,48,64,96,128,192,256"
        args = ["--batch-bench", "--device", "cuda", "--sizes", "256,512", "--max-batch", "256"]
        args += ["--points", points, "--until-over", "--out", sys.argv[3]]
    else:
        if sys.argv[3:4] != ["--"]:
            raise SystemExit(__doc__)
        args = sys.argv[4:]
    sys.argv = ["serve_load.py", *args]
    runpy.run_path(str(ROOT / "benchmarks" / "serve_load.py"), run_name="__main__")


if __name__ == "__main__":
    main()
