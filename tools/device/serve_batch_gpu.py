"""serve's batched-vs-separate capacity (`benchmarks/serve_load.py --batch-bench`) on a machine without the MiniLM
package (its wheel is 83.5 MB, over a call's carry): the calibration's caption is embedded here beforehand and read
from a file there; everything else is the benchmark as it runs anywhere.

    python tools/device/serve_batch_gpu.py embed data/carry_init/prompt_listens.pt          # here
    python tools/device/serve_batch_gpu.py run data/carry_init/prompt_listens.pt OUT.json   # on the GPU machine
"""

import runpy
import sys
from pathlib import Path

import torch

CAPTION = "listens attentively"  # what talkstream.serve.capacity.calibrate captions its sessions with


def main() -> None:
    if len(sys.argv) < 3 or sys.argv[1] not in ("embed", "run"):
        raise SystemExit(__doc__)
    if sys.argv[1] == "embed":
        from talkstream.models.encoders import TextEncoder

        text, mask = TextEncoder().encode([CAPTION])
        torch.save(dict(caption=CAPTION, text=text, mask=mask), sys.argv[2])
        return
    from talkstream.stream.avatar import Avatar

    saved = torch.load(sys.argv[2])

    def encode_prompt(self: Avatar, prompt: str | None) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        if not prompt:
            return None, None
        if prompt != saved["caption"]:
            raise SystemExit(f"serve_batch_gpu: only {saved['caption']!r} was embedded, not {prompt!r}")
        return saved["text"], saved["mask"]

    Avatar.encode_prompt = encode_prompt
    root, out = Path(__file__).resolve().parents[2], sys.argv[3]
    # (batching keeps a round near-flat on a GPU: counts doubling up to 256 find the edge in a few minutes; each way
    # stops at its first round over the budget)
    points = "1,2,3,4,6,8,12,16,24,32,48,64,96,128,192,256"
    sys.argv = ["serve_load.py", "--batch-bench", "--device", "cuda", "--sizes", "256,512", "--max-batch", "256"]
    sys.argv += ["--points", points, "--until-over"]
    sys.argv += ["--out", out]
    runpy.run_path(str(root / "benchmarks" / "serve_load.py"), run_name="__main__")


if __name__ == "__main__":
    main()
