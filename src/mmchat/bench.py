"""`mmchat bench`: how fast a model loads, reads a prompt (prefill) and writes (decode) on this machine, and the
process's peak memory. Medians of several runs; the machine may be shared, so compare engines side by side in
one run (benchmarks/compare.py) rather than against numbers from another day."""
from __future__ import annotations

import math
import resource
import statistics
import sys
import time

import torch

from .generate import SamplingParams, generate

CHAT_PROMPT = "Write a short story about a robot who learns to paint. Make it warm and a little funny."
FILLER = ("The history of computing is a story of people who wanted machines to do the tedious parts of "
          "thinking for them, from the abacus and the slide rule to the mechanical calculators of the "
          "seventeenth century, the punched cards of the Jacquard loom and the difference engine. ")


def peak_rss_mb() -> float:
    """The process's peak resident memory so far, in MB (Linux reports KiB, macOS bytes)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (1024 * 1024 if sys.platform == "darwin" else 1024)


def prompt_of(tokenizer, n_tokens: int) -> list[int]:
    """A prompt of exactly n_tokens ids of ordinary text."""
    ids: list[int] = []
    while len(ids) < n_tokens:
        ids += tokenizer.encode(FILLER, add_bos=False)
    return ids[:n_tokens]


def time_generate(model, prompts: list[list[int]], new_tokens: int) -> tuple[float, float]:
    """Greedy decoding of all prompts together for exactly new_tokens steps (end-of-sequence ignored).
    Returns (prefill seconds: until the first token, decode tokens/s over the remaining steps, all rows)."""
    params = SamplingParams(max_tokens=new_tokens, temperature=0.0, ignore_eos=True)
    start = time.perf_counter()
    first = None
    steps = 0
    for _ in generate(model, prompts, params):
        steps += 1
        if first is None:
            first = time.perf_counter()
    end = time.perf_counter()
    decode_s = end - first
    return first - start, (steps - 1) * len(prompts) / decode_s if steps > 1 and decode_s > 0 else float("nan")


@torch.inference_mode()
def perplexity(model, ids: list[int], chunk: int = 512) -> float:
    """exp(mean next-token loss) of a token sequence, in one pass per `chunk` tokens (no cache)."""
    losses = []
    for start in range(0, len(ids) - 1, chunk):
        piece = torch.tensor([ids[start: start + chunk + 1]])  # (1, T+1)
        logits = model(piece[:, :-1]).float()  # (1, T, V)
        losses.append(torch.nn.functional.cross_entropy(logits[0], piece[0, 1:], reduction="sum"))
    return math.exp(float(sum(losses)) / (len(ids) - 1))


def run(model_name: str, dtype=None, quant="auto", new_tokens: int = 128, prefill_tokens: int = 512,
        batch: int = 8, repeats: int = 3, progress: bool = True, compile="auto") -> dict:
    """Load (twice when the first load converted the weights), then `repeats` rounds of: the chat prompt at
    batch 1, a prefill_tokens prompt, and `batch` copies of the chat prompt decoding together."""
    from .api import LLM

    def say(msg):
        if progress:
            print(msg, file=sys.stderr, flush=True)

    say(f"loading {model_name} ...")
    llm = LLM.load(model_name, dtype=dtype, quant=quant, progress=progress, compile=compile)
    first_load = llm.load_seconds
    del llm
    # from the converted-weights cache (and inductor's, when compiling)
    llm = LLM.load(model_name, dtype=dtype, quant=quant, progress=progress, compile=compile)
    say(f"loaded in {first_load:.2f} s, again (cached) in {llm.load_seconds:.2f} s")
    model, tok = llm.model, llm.tokenizer
    chat = llm.render_chat([{"role": "user", "content": CHAT_PROMPT}])
    long = prompt_of(tok, prefill_tokens)
    time_generate(model, [chat], 4)  # warm-up: first-call allocations and lazy imports
    runs = {"prefill_s": [], "decode_tok_s": [], "prefill_long_tok_s": [], "batch_tok_s": []}
    for r in range(repeats):
        prefill_s, decode = time_generate(model, [chat], new_tokens)
        long_s, _ = time_generate(model, [long], 1)
        _, batched = time_generate(model, [chat] * batch, new_tokens) if batch > 1 else (0, float("nan"))
        runs["prefill_s"].append(prefill_s)
        runs["decode_tok_s"].append(decode)
        runs["prefill_long_tok_s"].append(len(long) / long_s)
        runs["batch_tok_s"].append(batched)
        say(f"run {r + 1}/{repeats}: decode {decode:.1f} tok/s, prefill {len(chat)} tokens {prefill_s * 1000:.0f} ms, "
            f"{len(long)} tokens {len(long) / long_s:.0f} tok/s, batch {batch} {batched:.1f} tok/s")
    med = {k: statistics.median(v) for k, v in runs.items()}
    return {
        "model": model_name, "dtype": str(model.norm.weight.dtype).removeprefix("torch."),
        "quant": _quant_of(model), "threads": torch.get_num_threads(),
        "compiled": model._compiled_block is not None,
        "decode_tok_s": med["decode_tok_s"], "prefill_tok_s": med["prefill_long_tok_s"],
        "prefill_tokens": len(long), "chat_prompt_tokens": len(chat), "chat_prefill_ms": med["prefill_s"] * 1000,
        "batch": batch, "batch_decode_tok_s": med["batch_tok_s"], "new_tokens": new_tokens, "repeats": repeats,
        "load_s": llm.load_seconds, "first_load_s": first_load, "peak_rss_mb": peak_rss_mb(),
        "torch": torch.__version__,
    }


def _quant_of(model) -> str:
    from . import quantize
    kinds = {type(m).__name__ for m in model.modules()
             if isinstance(m, tuple(quantize.LINEARS.values()))}
    return "+".join(sorted(k.removesuffix("Linear").lower() for k in kinds)) or "none"


def report(result: dict) -> str:
    r = result
    return "\n".join([
        f"model        {r['model']}  ({r['dtype']}, weights {r['quant']}, {r['threads']} threads, torch {r['torch']}"
        f"{', decode step compiled' if r.get('compiled') else ''})",
        f"load         {r['load_s']:.2f} s (first load, converting: {r['first_load_s']:.2f} s)",
        f"prefill      {r['prefill_tok_s']:.0f} tok/s on a {r['prefill_tokens']}-token prompt; "
        f"{r['chat_prefill_ms']:.0f} ms for a {r['chat_prompt_tokens']}-token chat prompt",
        f"decode       {r['decode_tok_s']:.1f} tok/s (1 sequence, {r['new_tokens']} new tokens)",
        f"batch decode {r['batch_decode_tok_s']:.1f} tok/s in total ({r['batch']} sequences together)",
        f"peak memory  {r['peak_rss_mb']:.0f} MB resident",
        f"(medians of {r['repeats']} runs)",
    ])
