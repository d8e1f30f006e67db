"""Per-token cost of constrained decoding (JSON schema) against free sampling, same model, same run.

    python benchmarks/constrain_overhead.py [--batch 1 8] [--steps 48] [--repeats 3]

Two figures per batch size:
  * mask: the host time of the constraint alone per decode step (llguidance computes each row's allowed-token
    bitmask, we unpack it and mask the logits, then each matcher consumes its token), timed inside the Sampler;
  * step: the wall time of a whole decode step (forward + sampling) with and without the constraint,
    runs alternated so that machine noise hits both alike.
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

import mmchat
from mmchat.generate import Sampler, SamplingParams, generate

SCHEMA = {"type": "object", "properties": {
    "name": {"type": "string", "maxLength": 24},
    "age": {"type": "integer", "minimum": 0, "maximum": 120},
    "city": {"type": "string", "maxLength": 24},
    "tags": {"type": "array", "maxItems": 4, "items": {"type": "string", "maxLength": 12}}},
    "required": ["name", "age", "city", "tags"]}


class TimedSampler(Sampler):
    """The Sampler with its constraint work timed (mask before sampling, consume after)."""
    mask_seconds = 0.0
    mask_calls = 0

    def constrain(self, logits, rows=None):
        start = time.perf_counter()
        out = super().constrain(logits, rows)
        TimedSampler.mask_seconds += time.perf_counter() - start
        TimedSampler.mask_calls += 1
        return out

    def observe(self, tokens, rows=None):
        start = time.perf_counter()
        super().observe(tokens, rows)
        TimedSampler.mask_seconds += time.perf_counter() - start


def run(llm, prompt, batch, steps, constraint):
    params = [SamplingParams(max_tokens=steps, temperature=0.8, top_p=0.95, seed=s, ignore_eos=constraint is None,
                             constraint=constraint) for s in range(batch)]
    times, tokens = [], 0
    gen = generate(llm.model, [prompt] * batch, params, llm.eos_token_ids)
    last = time.perf_counter()
    for i, step in enumerate(gen):
        now = time.perf_counter()
        if i:  # the first yield includes the prefill
            times.append(now - last)
        last = now
        tokens += len(step)
    return times, tokens


def mask_only(llm, c, batch, repeats=20):
    """The constraint's host work alone, replayed along real constrained outputs: per decode step, every row's
    mask filled, unpacked and applied to (B, V) logits, then each matcher consumes its token. No model runs,
    so the figure barely depends on how busy the machine is."""
    text = '{"name": "Alice Martin", "age": 34, "city": "Lyon", "tags": ["reader", "cyclist"]}'
    ids = llm.encode(text) + [llm.eos_token_ids[0]]
    params = [SamplingParams(constraint=c) for _ in range(batch)]
    logits = torch.randn(batch, llm.config.vocab_size)
    per_step = []
    for _ in range(repeats):
        s = Sampler(params, llm.config.vocab_size, "cpu")
        for t in ids:
            start = time.perf_counter()
            s.constrain(logits)
            s.observe(torch.full((batch,), t))
            per_step.append(time.perf_counter() - start)
        free = Sampler([SamplingParams()] * batch, llm.config.vocab_size, "cpu")
    del free
    return statistics.median(per_step) * 1e6, len(ids)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--steps", type=int, default=48)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--mask-only", action="store_true", help="time the constraint's host work alone (no model)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    import mmchat.generate as g
    g.Sampler = TimedSampler  # generate() builds its sampler by this name
    llm = mmchat.load("smollm2", progress=False)
    c = llm.constraint(json_schema=SCHEMA)
    prompt = llm.render_chat([{"role": "user", "content": "Describe a person as JSON: name, age, city, tags."}])
    if args.mask_only:
        print("| batch | mask+consume us per step (median) | us per token |\n|---|---|---|")
        for b in args.batch:
            us, n = mask_only(llm, c, b)
            print(f"| {b} | {us:.0f} | {us / b:.0f} |")
        return
    run(llm, prompt, 1, 4, None)  # warm-up
    print(f"torch threads {torch.get_num_threads()}, {args.steps} steps, {args.repeats} repeats")
    print("| batch | free ms/step | constrained ms/step | mask+consume us/step | us/token | share of step |")
    print("|---|---|---|---|---|---|")
    for b in args.batch:
        free, tied = [], []
        TimedSampler.mask_seconds, TimedSampler.mask_calls = 0.0, 0
        tied_steps = 0
        for _ in range(args.repeats):
            t, _ = run(llm, prompt, b, args.steps, None)
            free += t
            t, _ = run(llm, prompt, b, args.steps, c)
            tied += t
            tied_steps += len(t) + 1
        mask_us = TimedSampler.mask_seconds / max(TimedSampler.mask_calls, 1) * 1e6
        f, c_ms = statistics.median(free) * 1e3, statistics.median(tied) * 1e3
        print(f"| {b} | {f:.1f} | {c_ms:.1f} | {mask_us:.0f} | {mask_us / b:.0f} | {mask_us / 1e3 / f:.1%} |")


if __name__ == "__main__":
    main()
