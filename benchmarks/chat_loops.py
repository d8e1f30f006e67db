"""How often does a chat model loop? On 20 varied prompts, the share of answers in which some 3-word sequence
occurs more than 3 times, for greedy decoding and for sampling settings (mmchat's chat defaults and others).

    python benchmarks/chat_loops.py [--model smollm2] [--max-tokens 192] [--seeds 1] [--json out.json]
"""
from __future__ import annotations

import argparse
import json
import re
import statistics
import time
from collections import Counter

import mmchat
from mmchat.api import CHAT_DEFAULTS
from mmchat.chat.session import model_defaults
from mmchat.generate import SamplingParams, generate_ids

PROMPTS = [
    "What is the capital of France?",
    "Explain photosynthesis to a ten-year-old.",
    "Write a short poem about the sea.",
    "Give me three tips for sleeping better.",
    "How do I boil an egg?",
    "Tell me a story about a dragon who is afraid of the dark.",
    "What are the main causes of climate change?",
    "Write a Python function that reverses a string.",
    "Translate 'Good morning, how are you?' into French.",
    "What is the difference between a virus and a bacterium?",
    "Plan a one-day trip to London for a family with two children.",
    "Why is the sky blue?",
    "Write an e-mail to my landlord asking to fix the heating.",
    "List five healthy breakfast ideas.",
    "What is machine learning?",
    "Describe your ideal weekend.",
    "How can I improve my public speaking?",
    "Summarize the plot of Romeo and Juliet.",
    "What should I do if my laptop does not turn on?",
    "Write a product description for a reusable water bottle.",
]


def words(text: str) -> list[str]:
    return [w for w in (re.sub(r"[^\w']+", "", t.lower()) for t in text.split()) if w]


def loops(text: str, n: int = 3, more_than: int = 3) -> bool:
    """Some n-word sequence occurs more than `more_than` times."""
    w = words(text)
    counts = Counter(tuple(w[i:i + n]) for i in range(len(w) - n + 1))
    return bool(counts) and max(counts.values()) > more_than


def run(llm, settings: dict, max_tokens: int, seed: int | None) -> list[dict]:
    prompts = [llm.render_chat([{"role": "user", "content": p}]) for p in PROMPTS]
    params = SamplingParams(**{**settings, "max_tokens": max_tokens, "seed": seed}).validate()
    # one batch of 20: each row has its own random stream (seed + row)
    rows = [SamplingParams(**{**params.__dict__, "seed": None if seed is None else seed + i})
            for i in range(len(prompts))]
    out = generate_ids(llm.model, prompts, rows, llm.eos_token_ids)
    return [{"prompt": p, "answer": llm.decode(ids), "tokens": len(ids), "loops": loops(llm.decode(ids))}
            for p, ids in zip(PROMPTS, out)]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--max-tokens", type=int, default=192)
    ap.add_argument("--seeds", type=int, default=1, help="runs of each sampled setting (different seeds)")
    ap.add_argument("--json", help="write every answer here")
    args = ap.parse_args()
    llm = mmchat.load(args.model, progress=False)
    chosen = {k: v for k, v in model_defaults(llm).items() if k != "max_tokens"}
    configs = {
        "greedy": dict(temperature=0.0),
        "api.CHAT_DEFAULTS": {k: v for k, v in CHAT_DEFAULTS.items() if k != "max_tokens"},
        "chosen (model_defaults)": chosen,
        "t0.3 p0.9 rep1.2": dict(temperature=0.3, top_p=0.9, repetition_penalty=1.2),
    }
    seen, results = {}, {}
    for name, settings in configs.items():
        key = json.dumps(settings, sort_keys=True)
        if key in seen:  # the chosen defaults may equal CHAT_DEFAULTS: measure once
            results[name] = results[seen[key]]
            continue
        seen[key] = name
        runs = [None] if settings.get("temperature", 1) == 0 else list(range(1000, 1000 + args.seeds))
        answers, start = [], time.perf_counter()
        for seed in runs:
            answers += run(llm, settings, args.max_tokens, seed)
            print(f"  ({name}, seed {seed}: {time.perf_counter() - start:.0f} s)", flush=True)
        share = sum(a["loops"] for a in answers) / len(answers)
        results[name] = dict(settings=settings, answers=answers, share=share,
                             mean_tokens=statistics.mean(a["tokens"] for a in answers),
                             seconds=time.perf_counter() - start)
        print(f"{name:<26} {json.dumps(settings):<70} loops in {sum(a['loops'] for a in answers):>3}/"
              f"{len(answers):<3} = {share:5.0%}   mean answer {results[name]['mean_tokens']:.0f} tokens", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
