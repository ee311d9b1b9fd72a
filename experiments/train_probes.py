"""Train the world-truth probes and write talkstream/weights/{frame,behaviour}_probe.safetensors + a card.

python experiments/train_probes.py --device cuda --workers 16 --n-train 40000 --epochs 12 --out DIR
"""

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from talkstream.eval import probes  # noqa: E402
from talkstream.machine import describe  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--n-train", type=int, default=40000)
    ap.add_argument("--epochs", type=int, default=12)
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--out", type=Path, default=probes.WEIGHTS_DIR)
    ap.add_argument(
        "--only",
        choices=["frame", "behaviour"],
        default=None,
        help="train one probe (the behaviour probe needs espeak-ng; the frame probe wants a GPU)",
    )
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    card_file = args.out / "probes_card.json"
    card = json.loads(card_file.read_text()) if card_file.exists() else {}
    if args.only in (None, "frame"):
        t0 = time.perf_counter()
        frame, info = probes.train_frame_probe(
            args.n_train, args.epochs, batch=args.batch, lr=3e-3, workers=args.workers, device=args.device
        )
        save_file({k: v.contiguous() for k, v in frame.state_dict().items()}, str(args.out / "frame_probe.safetensors"))
        acc = probes.evaluate_frame_probe(frame)
        print(json.dumps(acc.to_dict()), flush=True)
        card["frame_probe"] = dict(
            training=info,
            held_out=acc.to_dict(),
            machine=describe(),
            params=sum(p.numel() for p in frame.parameters()),
            seconds=round(time.perf_counter() - t0, 1),
            command=" ".join(sys.argv),
        )
    if args.only in (None, "behaviour"):
        t0 = time.perf_counter()
        beh, binfo = probes.train_behaviour_probe()
        save_file(
            {k: v.contiguous() for k, v in beh.state_dict().items()}, str(args.out / "behaviour_probe.safetensors")
        )
        bacc = probes.evaluate_behaviour_probe(beh)
        print("behaviour accuracy", bacc, flush=True)
        card["behaviour_probe"] = dict(
            training=binfo,
            held_out_frame_accuracy=bacc,
            machine=describe(),
            seconds=round(time.perf_counter() - t0, 1),
            command=" ".join(sys.argv),
        )
    card_file.write_text(json.dumps(card, indent=2))
    print(json.dumps(card, indent=2))


if __name__ == "__main__":
    main()
