"""Does turn N of a chat prefill the whole conversation again? Per turn of one conversation: prompt tokens,
tokens actually prefilled and time to first token, with the engine's prefix reuse and without it (the slot's
cache is overwritten by an unrelated request between turns, so every turn starts cold). Same engine code path,
same settings, one process.

    python benchmarks/chat_reuse.py [--model smollm2] [--turns 8] [--max-tokens 48]
"""
from __future__ import annotations

import argparse
import statistics

import mmchat
from mmchat.api import LLM
from mmchat.chat.session import Chat
from mmchat.generate import SamplingParams

QUESTIONS = [
    "Hi! I am planning a garden. Which vegetables are easy for a beginner?",
    "How much sun do tomatoes need?",
    "And how often should I water them?",
    "What about carrots? Can they grow next to tomatoes?",
    "Which pests should I watch out for?",
    "Can you suggest a natural way to keep slugs away?",
    "When should I plant everything if I live in northern Europe?",
    "Please summarize the plan in five bullet points.",
    "Thank you! One more: what herbs go well with this garden?",
    "Great. How do I store the harvest?",
]


def conversation(base: LLM, turns: int, max_tokens: int, reuse: bool) -> list:
    llm = LLM(base.model, base.tokenizer, base.template, base.name)  # its own engine: one slot, nothing shared
    llm.start_engine(slots=1, max_len=4097)
    chat = Chat(llm, system="You are a helpful gardening assistant.", temperature=0, max_tokens=max_tokens)
    stats = []
    for q in QUESTIONS[:turns]:
        if not reuse:  # overwrite the slot's cached tokens with an unrelated one-token request
            llm.engine.submit(llm.encode("zebra")[:1], SamplingParams(max_tokens=1, temperature=0)).tokens()
        chat.send(q)
        stats.append(chat.last)
    llm.engine.close()
    return stats


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--turns", type=int, default=8)
    ap.add_argument("--max-tokens", type=int, default=48)
    ap.add_argument("--repeats", type=int, default=2)
    args = ap.parse_args()
    base = mmchat.load(args.model, progress=False)
    conversation(base, 2, 4, True)  # warm-up
    runs = {True: [], False: []}
    for _ in range(args.repeats):  # interleaved, so machine noise hits both alike
        for reuse in (True, False):
            runs[reuse].append(conversation(base, args.turns, args.max_tokens, reuse))
    print(f"{'turn':>4} | {'prompt':>6} | {'prefilled (reuse)':>17} | {'TTFT reuse':>10} | "
          f"{'prefilled (none)':>16} | {'TTFT none':>9}")
    for t in range(args.turns):
        r = [run[t] for run in runs[True]]
        n = [run[t] for run in runs[False]]
        print(f"{t + 1:>4} | {r[0].prompt_tokens:>6} | {r[0].prefilled_tokens:>17} | "
              f"{statistics.median(s.ttft_s for s in r) * 1000:>8.0f}ms | {n[0].prefilled_tokens:>16} | "
              f"{statistics.median(s.ttft_s for s in n) * 1000:>7.0f}ms")
    print("decode tokens/s (median over turns): reuse "
          f"{statistics.median(s.tokens_per_s for run in runs[True] for s in run):.1f}, none "
          f"{statistics.median(s.tokens_per_s for run in runs[False] for s in run):.1f}")


if __name__ == "__main__":
    main()
