"""Concurrent streaming clients against `mmchat serve` and llama-cpp-python's server on the same GGUF file.

    python benchmarks/serve_load.py [--model smollm2] [--tokens 64] [--clients 8] [--skip-llama-cpp]

For each server: one streaming client alone, then N at once (each with its own chat prompt), every answer
exactly --tokens long (end-of-sequence tokens are biased away, so both servers do the same work). Reports
aggregate completion tokens per second, time to first token, and whether the streams were served together
(every stream got its first token before any stream finished). Appends a table to benchmarks/RESULTS.md.
Needs the bench extra for the llama.cpp side: pip install 'llama-cpp-python[server]'.
"""
from __future__ import annotations

import argparse
import asyncio
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx

PROMPTS = ["Write a short story about a lighthouse keeper.", "Explain how a bicycle works.",
           "Describe your ideal weekend.", "What makes a good cup of tea?", "Tell me about the moon.",
           "How do bees make honey?", "Give advice to a new programmer.", "Describe a busy market in the morning."]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_up(base: str, proc, timeout: float = 600):
    end = time.time() + timeout
    while time.time() < end:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}")
        try:
            if httpx.get(base + "/v1/models", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise RuntimeError("server did not come up")


async def one_stream(client: httpx.AsyncClient, base: str, model: str, prompt: str, tokens: int, bias: dict):
    body = {"model": model, "messages": [{"role": "user", "content": prompt}], "max_tokens": tokens,
            "temperature": 0.7, "stream": True, "logit_bias": bias}
    start = time.perf_counter()
    times = []
    async with client.stream("POST", base + "/v1/chat/completions", json=body) as r:
        r.raise_for_status()
        async for line in r.aiter_lines():
            if line.startswith("data: ") and '"content"' in line and line != "data: [DONE]":
                times.append(time.perf_counter())
    return start, times


async def load(base: str, model: str, clients: int, tokens: int, bias: dict):
    async with httpx.AsyncClient(timeout=3600, limits=httpx.Limits(max_connections=clients + 2)) as client:
        start = time.perf_counter()
        results = await asyncio.gather(*(one_stream(client, base, model, PROMPTS[i % len(PROMPTS)], tokens, bias)
                                         for i in range(clients)))
        wall = time.perf_counter() - start
    chunks = sum(len(t) for _, t in results)
    firsts = [t[0] - s for s, t in results if t]
    together = max(t[0] for _, t in results) < min(t[-1] for _, t in results)
    return {"clients": clients, "wall_s": wall, "tokens": clients * tokens, "tok_s": clients * tokens / wall,
            "chunks": chunks, "ttft_s": sum(firsts) / len(firsts), "together": together}


def cpu_seconds(pid: int) -> float | None:
    """User + system CPU time of a process (Linux /proc), or None elsewhere."""
    try:
        fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except OSError:
        return None


def run_server(name: str, cmd: list[str], base: str, model: str, args, bias: dict) -> list[dict]:
    print(f"starting {name}: {' '.join(cmd)}", file=sys.stderr)
    # mmchat on --threads threads, fixed as llama.cpp's --n_threads (not following the load: mmchat.threads)
    env = {**os.environ, "MMCHAT_THREADS": str(args.threads)}
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    try:
        wait_up(base, proc)
        asyncio.run(load(base, model, 1, 8, bias))  # warm-up
        rows = []
        for clients in (1, args.clients):
            before = cpu_seconds(proc.pid)
            row = asyncio.run(load(base, model, clients, args.tokens, bias))
            after = cpu_seconds(proc.pid)
            # the server's own CPU per token: less sensitive than tokens/s to other jobs on a shared machine
            row["cpu_ms_per_token"] = None if before is None else (after - before) / row["tokens"] * 1e3
            row["server"] = name + (f" ({args.serve_args})" if name == "mmchat" and args.serve_args else "")
            print(row, file=sys.stderr)
            rows.append(row)
        return rows
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--skip-llama-cpp", action="store_true")
    ap.add_argument("--serve-args", default="", help="more `mmchat serve` options, e.g. '--dtype bfloat16 --quant none'")
    ap.add_argument("--results", default=str(Path(__file__).parent / "RESULTS.md"))
    args = ap.parse_args()

    from mmchat import registry
    from mmchat.formats.load import load_checkpoint
    gguf = registry.resolve(args.model, progress=True)
    ckpt = load_checkpoint(gguf)
    eos = ckpt.tokenizer.eos_token_ids
    # the chat models' end-of-turn token too: what both servers would stop at
    end = [ckpt.tokenizer.special_ids[t] for t in ("<|im_end|>", "<|endoftext|>") if t in ckpt.tokenizer.special_ids]
    bias = {str(i): -100 for i in sorted(set(eos) | set(end))}

    rows = []
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    rows += run_server("mmchat", [sys.executable, "-m", "mmchat", "serve", "--model", str(gguf), "--port", str(port),
                                  "--slots", str(max(args.clients, 1)), *args.serve_args.split()],
                     base, Path(gguf).stem, args, bias)
    if not args.skip_llama_cpp:
        port = free_port()
        base = f"http://127.0.0.1:{port}"
        rows += run_server("llama-cpp-python server",
                           [sys.executable, "-m", "llama_cpp.server", "--model", str(gguf), "--port", str(port),
                            "--host", "127.0.0.1", "--n_threads", str(args.threads), "--n_ctx", "2048",
                            "--interrupt_requests", "False"],  # by default a new request cuts off the running one
                           base, str(gguf), args, bias)

    load_avg = os.getloadavg()
    lines = [f"\n## Serving: {args.clients} concurrent streaming clients ({time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())})",
             "", f"`python benchmarks/serve_load.py {' '.join(sys.argv[1:])}`; "
             f"{Path(gguf).name}; {os.cpu_count()} CPUs; load average during the run "
             f"{load_avg[0]:.1f} (other processes share these cores, so absolute numbers vary between runs).", "",
             "| server | clients | tokens | wall s | aggregate tok/s | mean time to first token s | served together "
             "| server CPU ms/token |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['server']} | {r['clients']} | {r['tokens']} | {r['wall_s']:.1f} | {r['tok_s']:.1f} | "
                     f"{r['ttft_s']:.2f} | {'yes' if r['together'] else 'no'} | "
                     f"{'-' if r['cpu_ms_per_token'] is None else format(r['cpu_ms_per_token'], '.1f')} |")
    by = {(r["server"].split(" (")[0], r["clients"]): r["tok_s"] for r in rows}
    if ("mmchat", 1) in by and ("mmchat", args.clients) in by:
        lines.append(f"\nmmchat: {args.clients} clients / 1 client = "
                     f"{by[('mmchat', args.clients)] / by[('mmchat', 1)]:.2f}x aggregate throughput.")
    other = ("llama-cpp-python server", args.clients)
    if other in by and ("mmchat", args.clients) in by:
        lines.append(f"mmchat / llama-cpp-python server at {args.clients} clients = "
                     f"{by[('mmchat', args.clients)] / by[other]:.2f}x.")
    text = "\n".join(lines) + "\n"
    print(text)
    with open(args.results, "a") as f:
        f.write(text)


if __name__ == "__main__":
    main()
