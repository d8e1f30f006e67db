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


def make_clips(voice: str, sentences: list[str] = SENTENCES) -> list[tuple[str, bytes]]:
    """(text, WAV file bytes) per sentence, spoken by `voice` (Piper's output varies a little from run to run)."""
    return [(text, speech.encode(*speech.synthesize(text, voice), "wav")) for text in sentences]


def score(clips: list[tuple[str, bytes]], transcribe=None) -> dict:
    """Transcribe each clip (`transcribe`: WAV bytes -> text; default Whisper tiny.en as mmchat runs it) and count
    word errors over all of them."""
    transcribe = transcribe or (lambda wav: audio.transcribe(wav).text)
    errors = words = 0
    spoken = seconds = 0.0
    samples = []
    for text, wav in clips:
        spoken += len(audio.decode_audio(wav)) / audio.SAMPLE_RATE
        start = time.perf_counter()
        heard = transcribe(wav)
        seconds += time.perf_counter() - start
        e, n = word_errors(text, heard)
        errors, words = errors + e, words + n
        samples.append((text, heard, e))
    return {"wer": errors / words, "errors": errors, "words": words, "audio_s": spoken, "transcribe_s": seconds,
            "samples": samples}


def evaluate(voice: str, sentences: list[str] = SENTENCES) -> dict:
    """Speak each sentence with `voice`, transcribe it back, count the word errors."""
    return {"voice": voice, **score(make_clips(voice, sentences))}


def main():
    import argparse
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--voices", nargs="+", default=["joe", "espeak"])
    p.add_argument("--show", action="store_true", help="print every sentence and what was heard")
    args = p.parse_args()
    results = [evaluate(v) for v in args.voices]
    print("| voice | WER | errors / words | audio s | transcription s |")
    print("|---|---|---|---|---|")
    for r in results:
        print(f"| {r['voice']} | {r['wer']:.1%} | {r['errors']} / {r['words']} | {r['audio_s']:.1f} | "
              f"{r['transcribe_s']:.1f} |")
    if args.show:
        for r in results:
            for text, heard, e in r["samples"]:
                print(f"{r['voice']}\t{e}\t{text}\t{heard}")


if __name__ == "__main__":
    main()
