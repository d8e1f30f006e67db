"""mmchat, llama.cpp (llama-cpp-python) and HF transformers side by side on the same GGUF, in one run.

    python benchmarks/speed_vs_peers.py [--model PATH.gguf] [--rounds 5] [--new-tokens 128] [--threads N]

Each engine runs in its own worker process (so each one's peak memory is its own) and the rounds interleave
the engines: mmchat, llama.cpp, transformers, mmchat, ... so a noisy shared machine slows them alike. Reported
are medians over rounds and the ratios mmchat / peer. A peer that is not installed is skipped with a note
(pip install 'mmchat[bench]' brings both).

Per round and engine: a chat prompt (ChatML, ~40 tokens) at batch 1, prefill time then greedy decode of
--new-tokens tokens with end-of-sequence ignored; a 512-token prompt's prefill; and (mmchat, transformers)
8 copies of the chat prompt decoding together in one batched forward pass per step; and the process's CPU time
per decoded token (all its threads), which other jobs on a shared machine disturb far less than tokens/s.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

CHAT = [{"role": "user", "content": "Write a short story about a robot who learns to paint. Make it warm and a "
                                    "little funny."}]
ENGINES = ("mmchat", "llama.cpp", "transformers")  # and "mmchat-compiled": mmchat with --compile on


# -- workers: one per engine, each its own process; commands on stdin, one JSON line per answer on stdout --------
def peak_rss_mb() -> float:
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def token_ids() -> tuple[list[int], list[int]]:
    """The chat prompt and the 512-token prompt, tokenized once by the coordinator (so no worker but mmchat's
    carries mmchat and torch in its memory): the same ids for every engine."""
    with open(os.environ["BENCH_IDS"]) as f:
        ids = json.load(f)
    return ids["chat"], ids["long"]


def write_token_ids(model: str, path: str):
    import mmchat
    from mmchat.bench import prompt_of
    llm = mmchat.load(model, progress=False)
    with open(path, "w") as f:
        json.dump({"chat": llm.render_chat(CHAT), "long": prompt_of(llm.tokenizer, 512)}, f)


class MMChatWorker:
    def __init__(self, model: str, threads: int, compile: str = "auto"):
        import torch

        import mmchat
        os.environ["MMCHAT_THREADS"] = str(threads)  # fixed, as llama.cpp's: not following the load (mmchat.threads)
        t = time.perf_counter()
        self.llm = mmchat.load(model, progress=False, compile=compile)
        self.load_s = time.perf_counter() - t
        torch.set_num_threads(threads)
        self.chat, self.long = token_ids()
        self.info = {"dtype": str(self.llm.model.norm.weight.dtype), "torch": torch.__version__}

    def decode_cpu_ms(self, new_tokens: int) -> float:
        """CPU time per decoded token (this process, all threads), from the first token on."""
        from mmchat.generate import SamplingParams, generate
        first = None
        for _ in generate(self.llm.model, [self.chat], SamplingParams(max_tokens=new_tokens, temperature=0.0,
                                                                       ignore_eos=True)):
            first = first if first is not None else time.process_time()
        return (time.process_time() - first) * 1000 / (new_tokens - 1)

    def round(self, new_tokens: int, batch: int) -> dict:
        from mmchat.bench import time_generate
        prefill_s, decode = time_generate(self.llm.model, [self.chat], new_tokens)
        long_s, _ = time_generate(self.llm.model, [self.long], 1)
        _, batched = time_generate(self.llm.model, [self.chat] * batch, new_tokens)
        return {"prefill_ms": prefill_s * 1000, "decode_tok_s": decode, "prefill512_tok_s": len(self.long) / long_s,
                "batch_tok_s": batched, "decode_cpu_ms": self.decode_cpu_ms(new_tokens)}


class LlamaCppWorker:
    def __init__(self, model: str, threads: int):
        from llama_cpp import Llama
        t = time.perf_counter()
        self.llm = Llama(model_path=model, n_threads=threads, n_threads_batch=threads, n_ctx=1024, n_batch=512,
                         verbose=False)
        self.load_s = time.perf_counter() - t
        self.chat, self.long = token_ids()
        import llama_cpp
        self.info = {"llama_cpp_python": llama_cpp.__version__}

    def _run(self, ids: list[int], new_tokens: int) -> tuple[float, float, float]:
        """(prefill s, decode tok/s, decode CPU ms per token)"""
        self.llm.reset()  # no prefix reuse between runs
        t = time.perf_counter()
        self.llm.eval(ids)
        token = self.llm.sample(top_k=1, temp=0.0)
        first, first_cpu = time.perf_counter(), time.process_time()
        for _ in range(new_tokens - 1):
            self.llm.eval([token])
            token = self.llm.sample(top_k=1, temp=0.0)
        end, end_cpu = time.perf_counter(), time.process_time()
        if new_tokens < 2:
            return first - t, float("nan"), float("nan")
        return first - t, (new_tokens - 1) / (end - first), (end_cpu - first_cpu) * 1000 / (new_tokens - 1)

    def round(self, new_tokens: int, batch: int) -> dict:
        prefill_s, decode, cpu_ms = self._run(self.chat, new_tokens)
        long_s, _, _ = self._run(self.long, 1)
        return {"prefill_ms": prefill_s * 1000, "decode_tok_s": decode, "prefill512_tok_s": len(self.long) / long_s,
                "batch_tok_s": None, "decode_cpu_ms": cpu_ms}


class TransformersWorker:
    """HF transformers reading the same GGUF, sdpa attention, in the dtype it runs fastest here: float32 (its
    GGUF loader keeps the weights packed and computes in float32, and says so when asked for another dtype),
    or $BENCH_HF_DTYPE."""

    def __init__(self, model: str, threads: int):
        import torch
        import transformers
        from transformers import AutoModelForCausalLM

        torch.set_num_threads(threads)
        dtype = os.environ.get("BENCH_HF_DTYPE", "float32")
        t = time.perf_counter()
        self.model = AutoModelForCausalLM.from_pretrained(os.path.dirname(model), gguf_file=os.path.basename(model),
                                                          dtype=getattr(torch, dtype)).eval()
        self.load_s = time.perf_counter() - t
        self.chat, self.long = token_ids()
        self.torch = torch
        self.info = {"transformers": transformers.__version__, "dtype": dtype}

    def _gen(self, ids: list[list[int]], n: int) -> float:
        x = self.torch.tensor(ids)
        t = time.perf_counter()
        with self.torch.inference_mode():
            self.model.generate(x, attention_mask=self.torch.ones_like(x), max_new_tokens=n, min_new_tokens=n,
                                do_sample=False, pad_token_id=0)
        return time.perf_counter() - t

    def round(self, new_tokens: int, batch: int) -> dict:
        c0 = time.process_time()
        first = self._gen([self.chat], 1)
        c1 = time.process_time()
        total = self._gen([self.chat], new_tokens)
        cpu_ms = ((time.process_time() - c1) - (c1 - c0)) * 1000 / (new_tokens - 1)
        long_s = self._gen([self.long], 1)
        b_first = self._gen([self.chat] * batch, 1)
        b_total = self._gen([self.chat] * batch, new_tokens)
        return {"prefill_ms": first * 1000, "decode_tok_s": (new_tokens - 1) / (total - first),
                "prefill512_tok_s": len(self.long) / long_s,
                "batch_tok_s": batch * (new_tokens - 1) / (b_total - b_first), "decode_cpu_ms": cpu_ms}


WORKERS = {"mmchat": MMChatWorker, "llama.cpp": LlamaCppWorker, "transformers": TransformersWorker,
           "mmchat-compiled": lambda model, threads: MMChatWorker(model, threads, compile="on")}


def worker_main(engine: str, model: str, threads: int):
    w = WORKERS[engine](model, threads)
    print(json.dumps({"ready": True, "load_s": w.load_s, "info": w.info}), flush=True)
    for line in sys.stdin:
        cmd = json.loads(line)
        if cmd["op"] == "round":
            print(json.dumps(w.round(cmd["new_tokens"], cmd["batch"])), flush=True)
        elif cmd["op"] == "load":  # a second load in a fresh process is the fair load time; see main()
            print(json.dumps({"peak_rss_mb": peak_rss_mb()}), flush=True)
        elif cmd["op"] == "quit":
            print(json.dumps({"peak_rss_mb": peak_rss_mb()}), flush=True)
            return


# -- the coordinator ------------------------------------------------------------------------------------------
def available(engine: str) -> str | None:
    """None when the engine can run here, else why not."""
    import importlib.util
    need = {"mmchat": "mmchat", "mmchat-compiled": "mmchat", "llama.cpp": "llama_cpp",
            "transformers": "transformers"}[engine]
    if importlib.util.find_spec(need) is None:
        return f"{need} is not installed (pip install 'mmchat[bench]')"
    if engine == "transformers" and importlib.util.find_spec("gguf") is None:
        return "transformers needs the gguf package to read GGUF files"
    return None


class Worker:
    def __init__(self, engine: str, model: str, threads: int):
        self.engine = engine
        self.proc = subprocess.Popen([sys.executable, __file__, "--worker", engine, "--model", model,
                                      "--threads", str(threads)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     text=True)
        self.hello = self._read()

    def _read(self) -> dict:
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"the {self.engine} worker died (see its error above)")
        return json.loads(line)

    def ask(self, **cmd) -> dict:
        self.proc.stdin.write(json.dumps(cmd) + "\n")
        self.proc.stdin.flush()
        return self._read()

    def close(self) -> dict:
        out = self.ask(op="quit")
        self.proc.wait(timeout=60)
        return out


def load_time(engine: str, model: str, threads: int) -> float:
    """Load time in a fresh process once caches are warm (mmchat's converted weights, the OS page cache)."""
    w = Worker(engine, model, threads)
    w.close()
    return w.hello["load_s"]


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="a GGUF file (default: the embedded SmolLM2-135M-Instruct Q4_1)")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--threads", type=int, default=None, help="threads per engine (default: physical cores)")
    ap.add_argument("--engines", default=",".join(ENGINES),
                    help=f"comma-separated, from {', '.join(ENGINES)}, mmchat-compiled (default: the first three)")
    ap.add_argument("--json", help="also write the medians here")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.model is None:
        from mmchat import registry
        args.model = str(registry.resolve("smollm2", progress=True))
    if args.threads is None:
        from mmchat.threads import physical_cores
        args.threads = physical_cores()
    if args.worker:
        return worker_main(args.worker, args.model, args.threads)

    engines = []
    for e in args.engines.split(","):
        why = available(e)
        if why:
            print(f"skipping {e}: {why}", file=sys.stderr)
        else:
            engines.append(e)
    print(f"model {args.model}, {args.threads} threads, {args.rounds} rounds, engines: {', '.join(engines)}",
          file=sys.stderr)
    import tempfile
    os.environ["BENCH_IDS"] = os.path.join(tempfile.mkdtemp(), "ids.json")  # the workers inherit it
    write_token_ids(args.model, os.environ["BENCH_IDS"])
    loads = {e: load_time(e, args.model, args.threads) for e in engines}  # also warms mmchat's cache
    loads = {e: load_time(e, args.model, args.threads) for e in engines}
    workers = {e: Worker(e, args.model, args.threads) for e in engines}
    rounds: dict[str, list[dict]] = {e: [] for e in engines}
    for r in range(args.rounds):
        for e in engines:
            res = workers[e].ask(op="round", new_tokens=args.new_tokens, batch=args.batch)
            rounds[e].append(res)
            print(f"round {r + 1}/{args.rounds} {e:>12}: " + ", ".join(
                f"{k} {v:.1f}" for k, v in res.items() if v is not None), file=sys.stderr, flush=True)
    rss = {e: workers[e].close()["peak_rss_mb"] for e in engines}
    med = {e: {k: statistics.median(x[k] for x in rounds[e]) if rounds[e][0][k] is not None else None
               for k in rounds[e][0]} for e in engines}
    for e in engines:
        med[e]["load_s"], med[e]["peak_rss_mb"] = loads[e], rss[e]
        med[e]["info"] = workers[e].hello["info"]
    print(table(med, args))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "medians": med, "rounds": rounds}, f, indent=1)


def table(med: dict, args) -> str:
    cols = [("decode_tok_s", "decode tok/s", "{:.1f}"), ("prefill_ms", "chat prefill ms", "{:.0f}"),
            ("prefill512_tok_s", "prefill 512 tok/s", "{:.0f}"),
            ("batch_tok_s", f"batch {args.batch} tok/s", "{:.1f}"), ("load_s", "load s", "{:.2f}"),
            ("peak_rss_mb", "peak RSS MB", "{:.0f}"), ("decode_cpu_ms", "decode CPU ms/token", "{:.1f}")]
    lines = ["| engine | " + " | ".join(c[1] for c in cols) + " |", "|---" * (len(cols) + 1) + "|"]
    for e, m in med.items():
        lines.append(f"| {e} | " + " | ".join("-" if m[k] is None else fmt.format(m[k]) for k, _, fmt in cols) + " |")
    for name in [e for e in med if e.startswith("mmchat")]:
        ours = med[name]
        for peer in [e for e in med if not e.startswith("mmchat")]:
            p = med[peer]
            parts = [f"decode {ours['decode_tok_s'] / p['decode_tok_s']:.2f}x",
                     f"prefill-512 {ours['prefill512_tok_s'] / p['prefill512_tok_s']:.2f}x",
                     f"batch-{args.batch} total vs its single stream "
                     f"{ours['batch_tok_s'] / p['decode_tok_s']:.2f}x",
                     f"peak RSS {ours['peak_rss_mb'] / p['peak_rss_mb']:.2f}x",
                     f"decode in CPU time per token {p['decode_cpu_ms'] / ours['decode_cpu_ms']:.2f}x"]
            lines.append(f"{name} / {peer}: " + ", ".join(parts))
    return "\n".join(lines)


if __name__ == "__main__":
    main()
