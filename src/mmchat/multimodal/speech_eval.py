"""Word error rate of speech in, on clips spoken here by speech out (Piper and espeak-ng), with known text.

    python -m mmchat.multimodal.speech_eval          # WER per voice, as a Markdown table
"""
from __future__ import annotations

import re
import time

from . import audio, speech

# Questions and captions of the kind mmchat is asked about pictures, plus everyday requests; no digits, so the
# reference and Whisper's spelling of a number cannot disagree.
SENTENCES = [
    "What color is the triangle in the picture?",
    "There are three red circles above a blue square.",
    "How many green shapes can you see on the left?",
    "Please remind me to call my sister tomorrow morning.",
    "Translate this sentence into French for me.",
    "The small yellow star is next to the large purple rectangle.",
    "Can you write a short poem about the ocean?",
    "My order has not arrived yet and I would like a refund.",
]


def normalize(text: str) -> list[str]:
    """Lower case, no punctuation; hyphenated words split, apostrophes kept inside words."""
    text = text.lower().replace("-", " ")
    return re.sub(r"[^a-z0-9' ]+", " ", text).replace(" '", " ").split()


def word_errors(reference: str, hypothesis: str) -> tuple[int, int]:
    """(substitutions + deletions + insertions, words in the reference): Levenshtein distance over words."""
    ref, hyp = normalize(reference), normalize(hypothesis)
    row = list(range(len(hyp) + 1))  # distances from the empty reference prefix
    for i, r in enumerate(ref, 1):
        prev, row[0] = row[0], i
        for j, h in enumerate(hyp, 1):
            prev, row[j] = row[j], min(row[j] + 1, row[j - 1] + 1, prev + (r != h))
    return row[-1], len(ref)


def evaluate(voice: str, sentences: list[str] = SENTENCES, beam_size: int = 5) -> dict:
    """Speak each sentence with `voice`, transcribe it, and count word errors over all of them."""
    errors = words = 0
    spoken = seconds = 0.0
    samples = []
    for text in sentences:
        x, rate = speech.synthesize(text, voice)
        clip = speech.encode(x, rate, "wav")  # through a file's bytes, as a user's upload arrives
        spoken += len(x) / rate
        start = time.perf_counter()
        heard = audio.transcribe(clip, beam_size=beam_size).text
        seconds += time.perf_counter() - start
        e, n = word_errors(text, heard)
        errors, words = errors + e, words + n
        samples.append((text, heard, e))
    return {"voice": voice, "wer": errors / words, "errors": errors, "words": words, "audio_s": spoken,
            "transcribe_s": seconds, "samples": samples}


def main():
    import argparse
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--voices", nargs="+", default=["joe", "espeak"])
    p.add_argument("--beam-size", type=int, default=5)
    p.add_argument("--show", action="store_true", help="print every sentence and what was heard")
    args = p.parse_args()
    print("| voice | WER | errors / words | audio s | transcription s | real-time factor |")
    print("|---|---|---|---|---|---|")
    results = [evaluate(v, beam_size=args.beam_size) for v in args.voices]
    for r in results:
        print(f"| {r['voice']} | {r['wer']:.1%} | {r['errors']} / {r['words']} | {r['audio_s']:.1f} | "
              f"{r['transcribe_s']:.1f} | {r['transcribe_s'] / r['audio_s']:.2f} |")
    if args.show:
        for r in results:
            for text, heard, e in r["samples"]:
                print(f"{r['voice']}\t{e}\t{text}\t{heard}")


if __name__ == "__main__":
    main()
