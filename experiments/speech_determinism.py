"""Does a text and voice give the same samples however often a process speaks it? Speaks one sentence several
times in one process through one in-process espeak-ng (``Espeak.speak``, what ``synthesize`` used at first)
and through ``speak_fresh`` (a fresh engine per utterance, what it uses now): lengths at 22050 Hz, whether every
repeat equals the first, and the time per utterance.

    python experiments/speech_determinism.py --out benchmarks/results/speech_determinism_cpu.json
"""

import argparse
import time

import numpy as np

from talkstream.machine import describe, report
from talkstream.world.speech import Espeak, Voice, speak_fresh

TEXT = "Nobody ordered the golden station at home. Nobody painted the heavy library last week."  # clip 900005's
VOICE = Voice(name="en", rate=198, pitch=72, range=43)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--out")
    a = ap.parse_args()
    rows = {}
    for name, speak in (("fresh_engine_per_utterance", speak_fresh), ("one_engine_per_process", Espeak.get().speak)):
        t0, audio = time.perf_counter(), [speak(TEXT, VOICE)[0] for _ in range(a.repeats)]
        rows[name] = dict(
            lengths=[len(x) for x in audio],
            all_equal_first=all(np.array_equal(audio[0], x) for x in audio),
            seconds_per_utterance=(time.perf_counter() - t0) / a.repeats,
        )
    report(dict(text=TEXT, voice=vars(VOICE), rows=rows, machine=describe()), a.out)


if __name__ == "__main__":
    main()
