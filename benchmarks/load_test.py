"""Load test of `mmchat serve` on loopback: many requests from many concurrent clients, mixed prompt lengths and
answer lengths, some streaming, some cancelled mid-way. Checks that

  - no request gets a 5xx (and counts every other status);
  - every completed answer is intact: greedy decoding, so each answer must equal the answer the same server gave
    to that (prompt, max_tokens) alone before the run, whether it came whole or as a stream (whose chunks must
    end with a finish_reason and [DONE]);
  - the server's RSS is flat: sampled after a warm-up and again after the run.

    python benchmarks/load_test.py [--model smollm2 | --tiny] [--requests 1000] [--clients 32] [--max-tokens 16]

--tiny serves a tiny random Llama (2 layers, made by tests/tiny_models.py; needs transformers): its text is
gibberish, but exact, and it runs 1000 requests in minutes on 2 cores, where the HTTP layer, the engine's
queue, cancellation and memory are what is tested. The embedded SmolLM2 is the realistic case and far slower.

Appends its figures, with the machine, to benchmarks/RESULTS-robustness.md (--no-write to skip). The model runs in
float32 without weight quantization by default: the answer check compares batched, prefix-cached decoding with a
lone request token for token, and lower precisions can flip a near tie between those two ways of computing.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import random
import socket
import subprocess
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import httpx

HERE = Path(__file__).parent
TOPICS = ["a lighthouse keeper", "how a bicycle works", "the moon", "bees and honey", "a busy market",
          "learning to program", "the history of tea", "a rainy afternoon", "volcanoes", "chess openings",
          "the water cycle", "a train journey"]
PARAGRAPH = ("The committee met on Tuesday to discuss the budget for the coming year. After a long debate about "
             "the cost of repairs to the old library, the members agreed to postpone the decision until the "
             "engineers had finished their survey of the roof and the foundations. ")


def prompts() -> list[str]:
    """Short questions, medium requests and long pasted texts (about 15, 60 and 300 tokens)."""
    out = []
    for i, topic in enumerate(TOPICS):
        if i % 3 == 0:
            out.append(f"Tell me about {topic}.")
        elif i % 3 == 1:
            out.append(f"Write a few friendly sentences about {topic} for a children's magazine, using simple "
                       f"words, a cheerful tone and one surprising fact that a ten-year-old would enjoy.")
        else:
            out.append(f"Here are some notes: {PARAGRAPH * 6}Now, ignoring the notes, tell me about {topic}.")
    return out


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def start_server(model: str, extra: list[str], log_path: Path):
    port = free_port()
    log = open(log_path, "w")
    proc = subprocess.Popen([sys.executable, "-m", "mmchat", "serve", "--model", model, "--port", str(port), *extra],
                            stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    base = f"http://127.0.0.1:{port}"
    end = time.time() + 600
    while time.time() < end:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}; see {log_path}")
        try:
            if httpx.get(base + "/health", timeout=2).status_code == 200:
                return proc, base
        except httpx.HTTPError:
            pass
        time.sleep(0.3)
    proc.kill()
    raise RuntimeError("server did not come up")


@dataclass
class Results:
    statuses: Counter = field(default_factory=Counter)
    kinds: Counter = field(default_factory=Counter)        # whole / stream / cancelled
    checked: int = 0                                       # completed answers compared with their reference
    mismatches: list = field(default_factory=list)
    broken_streams: int = 0                                # no finish_reason or no [DONE]
    errors: list = field(default_factory=list)             # transport errors (not cancellations)
    latencies: list = field(default_factory=list)

    @property
    def server_errors(self) -> int:
        return sum(n for s, n in self.statuses.items() if isinstance(s, int) and s >= 500)


async def request(client: httpx.AsyncClient, base: str, model: str, prompt: str, max_tokens: int, kind: str,
                  cancel_after: int, res: Results) -> str | None:
    """One request; returns the answer text when it completed."""
    body = {"model": model, "messages": [{"role": "user", "content": prompt}], "max_tokens": max_tokens,
            "temperature": 0, "seed": 1}
    url = base + "/v1/chat/completions"
    start = time.perf_counter()
    if kind == "whole":
        r = await client.post(url, json=body)
        res.statuses[r.status_code] += 1
        if r.status_code != 200:
            return None
        res.latencies.append(time.perf_counter() - start)
        return r.json()["choices"][0]["message"]["content"]
    text, finish, done, seen = "", None, False, 0
    async with client.stream("POST", url, json={**body, "stream": True}) as r:
        res.statuses[r.status_code] += 1
        if r.status_code != 200:
            await r.aread()
            return None
        async for line in r.aiter_lines():
            if not line.startswith("data: "):
                continue
            if line == "data: [DONE]":
                done = True
                continue
            seen += 1
            choice = json.loads(line[6:])["choices"][0]
            text += choice["delta"].get("content") or ""
            finish = choice.get("finish_reason") or finish
            if kind == "cancelled" and seen >= cancel_after:
                return None  # leaving the block closes the connection mid-answer
    if finish is None or not done:
        res.broken_streams += 1
        return None
    res.latencies.append(time.perf_counter() - start)
    return text


async def run_load(base: str, model: str, n_requests: int, clients: int, lengths: list[int], seed: int,
                   refs: dict, res: Results):
    rng = random.Random(seed)
    ps = prompts()
    plan = []
    for _ in range(n_requests):
        kind = rng.choices(["whole", "stream", "cancelled"], weights=[4, 4, 2])[0]
        plan.append((rng.randrange(len(ps)), rng.choice(lengths), kind, rng.randint(1, 4)))
    queue: asyncio.Queue = asyncio.Queue()
    for item in plan:
        queue.put_nowait(item)

    async def worker():
        async with httpx.AsyncClient(timeout=httpx.Timeout(300)) as client:
            while True:
                try:
                    pi, mt, kind, cancel_after = queue.get_nowait()
                except asyncio.QueueEmpty:
                    return
                res.kinds[kind] += 1
                try:
                    text = await request(client, base, model, ps[pi], mt, kind, cancel_after, res)
                except httpx.HTTPError as e:
                    res.errors.append(f"{type(e).__name__}: {e}")
                    continue
                if text is not None:
                    res.checked += 1
                    if text != refs[(pi, mt)]:
                        res.mismatches.append({"prompt": pi, "max_tokens": mt, "kind": kind, "got": text,
                                               "expected": refs[(pi, mt)]})

    await asyncio.gather(*(worker() for _ in range(clients)))


async def references(base: str, model: str, lengths: list[int]) -> dict:
    """Each (prompt, max_tokens) alone, one at a time: the answers every later one must equal."""
    refs = {}
    async with httpx.AsyncClient(timeout=300) as client:
        for pi, p in enumerate(prompts()):
            for mt in lengths:
                r = await client.post(base + "/v1/chat/completions", json={
                    "model": model, "messages": [{"role": "user", "content": p}], "max_tokens": mt,
                    "temperature": 0, "seed": 1})
                r.raise_for_status()
                refs[(pi, mt)] = r.json()["choices"][0]["message"]["content"]
    return refs


def load_test(model: str = "smollm2", requests: int = 1000, clients: int = 32, max_tokens: int = 16,
              server_args: list[str] | None = None, seed: int = 0, log_path: Path | None = None) -> dict:
    """Run the whole test against a fresh server; returns the figures (see the module docstring)."""
    lengths = sorted({max(1, max_tokens // 4), max(1, max_tokens // 2), max_tokens})
    log_path = log_path or Path(os.environ.get("TMPDIR", "/tmp")) / "mmchat-load-test-server.log"
    args = ["--slots", "8", "--queue", "64", "--max-concurrent", str(max(128, clients * 2)), *(server_args or [])]
    proc, base = start_server(model, args, log_path)
    name = httpx.get(base + "/v1/models").json()["data"][0]["id"]
    try:
        t0 = time.perf_counter()
        refs = asyncio.run(references(base, name, lengths))
        # warm-up under the same concurrency, so that allocator pools and caches reach their working size
        warm = Results()
        asyncio.run(run_load(base, name, min(requests, 4 * clients), clients, lengths, seed + 1, refs, warm))
        time.sleep(1.0)
        rss_warm = rss_mb(proc.pid)
        res = Results()
        start = time.perf_counter()
        samples = []

        async def main():
            async def sampler():
                while True:
                    samples.append(rss_mb(proc.pid))
                    await asyncio.sleep(1.0)
            task = asyncio.create_task(sampler())
            await run_load(base, name, requests, clients, lengths, seed, refs, res)
            task.cancel()

        asyncio.run(main())
        duration = time.perf_counter() - start
        time.sleep(2.0)  # let cancelled requests drain
        health = httpx.get(base + "/health").json()
        rss_after = rss_mb(proc.pid)
        generated = 0
        for line in httpx.get(base + "/metrics").text.splitlines():
            if line.startswith("mmchat_engine_generated_tokens_total "):
                generated = float(line.split()[1])
    finally:
        proc.terminate()
        exit_code = proc.wait(60)
    lat = sorted(res.latencies)
    return {
        "model": model, "server_args": args, "requests": requests, "clients": clients, "max_tokens": lengths,
        "kinds": dict(res.kinds), "statuses": {str(k): v for k, v in sorted(res.statuses.items())},
        "server_errors_5xx": res.server_errors, "transport_errors": len(res.errors),
        "transport_error_examples": res.errors[:3], "checked_answers": res.checked,
        "mismatches": len(res.mismatches), "mismatch_examples": res.mismatches[:3],
        "broken_streams": res.broken_streams, "duration_s": round(duration, 1),
        "requests_per_s": round(requests / duration, 2), "generated_tokens_total": int(generated),
        "latency_p50_s": round(lat[len(lat) // 2], 2) if lat else None,
        "latency_p95_s": round(lat[int(len(lat) * 0.95)], 2) if lat else None,
        "rss_warm_mb": round(rss_warm, 1), "rss_after_mb": round(rss_after, 1),
        "rss_peak_during_mb": round(max(samples), 1) if samples else None,
        "rss_growth_mb": round(rss_after - rss_warm, 1), "idle_after": health["running"] == 0 and health["waiting"] == 0,
        "server_exit_code": exit_code, "setup_s": round(start - t0, 1),
    }


def tiny_model_folder() -> str:
    """The tiny random Llama the server tests use, saved as an HF folder (2048-token context)."""
    sys.path.insert(0, str(HERE.parent / "tests"))
    import tiny_models as tm
    folder = Path(os.environ.get("TMPDIR", "/tmp")) / "mmchat-load-test-tiny-llama"
    if not (folder / "config.json").exists():
        tm.save_hf_folder(tm.llama_model(tm.tokenizer().get_vocab_size(), ctx=2048, seed=11), tm.tokenizer(), folder)
    return str(folder)


def machine() -> str:
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    return f"{cpu}, {os.cpu_count()} cores, Python {platform.python_version()}, load average " \
           f"{' '.join(f'{x:.1f}' for x in os.getloadavg())} at the end"


def write_results(r: dict, path: Path):
    lines = [f"\n## Load test, {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}", "",
             f"`python benchmarks/load_test.py --model {r['model']} --requests {r['requests']} --clients "
             f"{r['clients']} --max-tokens {max(r['max_tokens'])}`; server flags `{' '.join(r['server_args'])}`.",
             f"Machine: {machine()}.", "",
             "| figure | value |", "|---|---|"]
    for key in ("requests", "clients", "max_tokens", "kinds", "statuses", "server_errors_5xx", "transport_errors",
                "checked_answers", "mismatches", "broken_streams", "duration_s", "requests_per_s",
                "generated_tokens_total", "latency_p50_s", "latency_p95_s", "rss_warm_mb", "rss_after_mb",
                "rss_peak_during_mb", "rss_growth_mb", "idle_after", "server_exit_code"):
        lines.append(f"| {key} | {r[key]} |")
    if r["mismatch_examples"]:
        lines += ["", "Mismatches (first ones):", "```", json.dumps(r["mismatch_examples"], indent=1), "```"]
    with open(path, "a") as f:
        f.write("\n".join(lines) + "\n")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--tiny", action="store_true", help="serve a tiny random Llama instead of --model")
    ap.add_argument("--requests", type=int, default=1000)
    ap.add_argument("--clients", type=int, default=32)
    ap.add_argument("--max-tokens", type=int, default=16, help="the longest answer; also 1/4 and 1/2 of it")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--quant", default="none")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--no-write", action="store_true")
    a = ap.parse_args()
    model = tiny_model_folder() if a.tiny else a.model
    r = load_test(model, a.requests, a.clients, a.max_tokens, ["--dtype", a.dtype, "--quant", a.quant], a.seed)
    print(json.dumps(r, indent=1))
    if not a.no_write:
        path = HERE / "RESULTS-robustness.md"
        if not path.exists():
            path.write_text("# Robustness figures\n\nWritten by benchmarks/load_test.py.\n")
        write_results(r, path)
        print(f"appended to {path}")
    ok = r["server_errors_5xx"] == 0 and r["mismatches"] == 0 and r["broken_streams"] == 0
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
