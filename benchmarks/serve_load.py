"""Concurrent streaming clients against `mmchat serve` and llama-cpp-python's server on the same GGUF file.

    python benchmarks/serve_load.py [--model smollm2] [--tokens 64] [--clients 8] [--skip-llama-cpp]

Both servers are started and stay up; each of --rounds rounds loads them in turn: one streaming client alone, then
N at once (each with its own chat prompt), every answer exactly --tokens long (end-of-sequence tokens are biased
away, so both servers do the same work). Reports the median round's aggregate completion tokens per second, time
to first token, whether the streams were served together (every stream got its first token before any stream
finished) and the server's CPU per token, and the ratio at N clients per round. Appends a table to
benchmarks/RESULTS.md.
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


class Server:
    """One server under test, started in its own process and kept up for every round."""

    def __init__(self, name: str, cmd: list[str], base: str, model: str, threads: int):
        self.name, self.base, self.model = name, base, model
        print(f"starting {name}: {' '.join(cmd)}", file=sys.stderr)
        # mmchat on `threads` threads, fixed as llama.cpp's --n_threads (not following the load: mmchat.threads)
        env = {**os.environ, "MMCHAT_THREADS": str(threads)}
        self.proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)

    def ready(self, bias: dict):
        wait_up(self.base, self.proc)
        asyncio.run(load(self.base, self.model, 1, 8, bias))  # warm-up

    def measure(self, clients: int, tokens: int, bias: dict) -> dict:
        before = cpu_seconds(self.proc.pid)
        row = asyncio.run(load(self.base, self.model, clients, tokens, bias))
        after = cpu_seconds(self.proc.pid)
        # the server's own CPU per token: less sensitive than tokens/s to other jobs on a shared machine
        row["cpu_ms_per_token"] = None if before is None else (after - before) / row["tokens"] * 1e3
        return row

    def stop(self):
        self.proc.terminate()
        try:
            self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.proc.kill()


def median_row(rows: list[dict]) -> dict:
    """The round whose aggregate tokens/s is the median (the upper one of an even count)."""
    return sorted(rows, key=lambda r: r["tok_s"])[len(rows) // 2]


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--rounds", type=int, default=3, help="each round loads every server in turn; medians reported")
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

    mmchat_name = "mmchat" + (f" ({args.serve_args})" if args.serve_args else "")
    port = free_port()
    servers = [Server(mmchat_name, [sys.executable, "-m", "mmchat", "serve", "--model", str(gguf), "--port", str(port),
                                    "--slots", str(max(args.clients, 1)), *args.serve_args.split()],
                      f"http://127.0.0.1:{port}", Path(gguf).stem, args.threads)]
    if not args.skip_llama_cpp:
        port = free_port()
        servers.append(Server("llama-cpp-python server",
                              [sys.executable, "-m", "llama_cpp.server", "--model", str(gguf), "--port", str(port),
                               "--host", "127.0.0.1", "--n_threads", str(args.threads), "--n_ctx", "2048",
                               "--interrupt_requests", "False"],  # by default a new request cuts off the running one
                              f"http://127.0.0.1:{port}", str(gguf), args.threads))
    rounds: dict[tuple[str, int], list[dict]] = {}
    try:
        for server in servers:  # both up at once (an idle one takes no CPU), so the rounds can alternate
            server.ready(bias)
        for r in range(args.rounds):
            for server in servers:
                for clients in (1, args.clients):
                    row = server.measure(clients, args.tokens, bias)
                    print(f"round {r + 1}/{args.rounds} {server.name}: {row}", file=sys.stderr)
                    rounds.setdefault((server.name, clients), []).append(row)
    finally:
        for server in servers:
            server.stop()

    load_avg = os.getloadavg()
    lines = [f"\n## Serving: {args.clients} concurrent streaming clients ({time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())})",
             "", f"`python benchmarks/serve_load.py {' '.join(sys.argv[1:])}`; "
             f"{Path(gguf).name}; {os.cpu_count()} CPUs; load average during the run "
             f"{load_avg[0]:.1f} (other processes share these cores, so absolute numbers vary between runs). "
             f"{args.rounds} rounds, each loading every server in turn; the median round of each:", "",
             "| server | clients | tokens | wall s | aggregate tok/s | mean time to first token s | served together "
             "| server CPU ms/token |",
             "|---|---|---|---|---|---|---|---|"]
    for (name, clients), rows in rounds.items():
        m = median_row(rows)
        lines.append(f"| {name} | {clients} | {m['tokens']} | {m['wall_s']:.1f} | {m['tok_s']:.1f} | "
                     f"{m['ttft_s']:.2f} | {'yes' if m['together'] else 'no'} | "
                     f"{'-' if m['cpu_ms_per_token'] is None else format(m['cpu_ms_per_token'], '.1f')} |")
    ours = rounds.get((mmchat_name, args.clients))
    if ours and (mmchat_name, 1) in rounds:
        scaling = median_row(ours)["tok_s"] / median_row(rounds[(mmchat_name, 1)])["tok_s"]
        lines.append(f"\nmmchat: {args.clients} clients / 1 client = {scaling:.2f}x aggregate throughput (medians).")
    other = rounds.get(("llama-cpp-python server", args.clients))
    if ours and other:
        ratios = sorted(a["tok_s"] / b["tok_s"] for a, b in zip(ours, other))
        lines.append(f"mmchat / llama-cpp-python server at {args.clients} clients, round by round: "
                     f"{', '.join(f'{x:.2f}x' for x in ratios)} (sorted); median {ratios[len(ratios) // 2]:.2f}x.")
    text = "\n".join(lines) + "\n"
    print(text)
    with open(args.results, "a") as f:
        f.write(text)


if __name__ == "__main__":
    main()
