"""Audio/text encoder cost on this machine: Whisper tiny.en encoder seconds per second of audio (offline and
live, hop by hop) and MiniLM per caption. JSON to benchmarks/results/encoder_speed_cpu.json."""

import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from talkstream.machine import describe, report  # noqa: E402
from talkstream.models.encoders import TextEncoder, WhisperFeatures  # noqa: E402
from talkstream.world.speech import SentenceGenerator, synthesize  # noqa: E402


def main() -> None:
    gen = SentenceGenerator(0)
    audio = np.concatenate([synthesize(gen.utterance(3)).audio for _ in range(6)])
    secs = len(audio) / 16000
    res = dict(machine=describe(), audio_seconds=round(secs, 2))
    for hop in (0.16, 0.48, 0.96):
        enc = WhisperFeatures(hop=hop)
        enc.encode(audio[:16000])
        t = time.perf_counter()
        enc.encode(audio)
        offline = (time.perf_counter() - t) / secs
        stream = enc.stream()
        lat = []
        for i in range(0, len(audio), enc.hop_samples):
            t = time.perf_counter()
            stream.push(audio[i : i + enc.hop_samples])
            lat.append(time.perf_counter() - t)
        res[f"whisper_hop_{hop}s"] = dict(
            window_s=enc.window,
            offline_s_per_audio_s=round(offline, 4),
            live_ms_per_hop_p50=round(1000 * float(np.median(lat)), 2),
            live_s_per_audio_s=round(sum(lat) / secs, 4),
        )
    te = TextEncoder()
    te.encode(["warm up"])
    t = time.perf_counter()
    for _ in range(20):
        te.encode(["smiles and speaks quickly while nodding"])
    res["minilm_ms_per_caption"] = round((time.perf_counter() - t) / 20 * 1000, 2)
    report(res, Path(__file__).parent / "results" / "encoder_speed_cpu.json")


if __name__ == "__main__":
    main()
