"""Training throughput, side by side in one process: mmchat's training step against HF transformers (and peft for
LoRA) on the same model (SmolLM2-135M, dequantized to fp32), the same token rows, the same batch.

    python benchmarks/train_speed.py --steps 6 --batch 4 --seq 256

Each variant runs --warmup untimed steps, then --steps timed ones; the table shows the median tokens/s of a step
(forward, loss, backward, gradient clipping, AdamW step), and per second of the process's CPU time (less moved by
other processes on a busy machine). Both precisions run by default where the CPU has bf16 units (on one without,
both libraries emulate bf16 matmuls ~10x slower than fp32, so only fp32 runs unless --precision asks): the same-precision
ratios compare the training steps, and the last lines compare what each gives by default (mmchat's `auto`,
which is bf16 autocast on a CPU with bf16 units for a model this size, against HF Trainer's CPU default, fp32).
With --compile mmchat's blocks run under torch.compile (its --compile); the first step, which compiles, is timed
apart and shown, and counts as one of the --warmup steps. The variants mmchat-full-torch and mmchat-lora-torch run
mmchat with torch's own matmuls and layers (MMCHAT_BLAS=torch) instead of its default choice (mmchat.train.cpu_step).
--rounds runs every variant that many times, in turn, and takes the median of the rounds; --json writes every
figure, the machine and its load average to a file. Every variant runs in a fresh process of its own, so that no
process-wide setting one makes (malloc's, OpenBLAS's threads, $MMCHAT_BLAS) or memory it leaves reaches another.
--data chooses the rows: `random` (the default) random token ids with every position scored, as in pretraining;
`shop` the shipped shop dialogues (mmchat/data/shop_support.jsonl) rendered with the model's chat template and
packed as `mmchat train sft` does (mmchat's load_chats, render_chat, pack_chats; the first --batch rows), where
only assistant tokens carry loss: mmchat trains with that loss mask (its head and loss run only at those
positions), HF gets the other positions as labels -100 and computes its loss as HF Trainer does, over the whole
logits with F.cross_entropy(..., ignore_index=-100). Both losses are the mean over the same positions.
Other processes on the machine change the figures, so compare the rows of one run, not runs of different days.
"""
from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import statistics
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor

import torch
import torch.nn.functional as F


def rows(vocab: int, batch: int, seq: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (batch, seq + 1), generator=g)  # (B, T+1)
    return ids[:, :-1], ids[:, 1:], torch.ones(batch, seq, dtype=torch.bool)  # every position scored


def shop_rows(llm, batch: int, seq: int):
    """The first `batch` rows of the shipped shop dialogues packed as `mmchat train sft` packs them, and their loss
    mask (assistant tokens only)."""
    from importlib import resources
    from mmchat.train.data import load_chats, pack_chats, render_chat
    chats = load_chats(str(resources.files("mmchat") / "data" / "shop_support.jsonl"))
    pad = llm.eos_token_ids[0] if llm.eos_token_ids else 0
    packed = pack_chats([render_chat(m, llm.template, llm.tokenizer) for m in chats], seq, pad)
    if len(packed) < batch:
        sys.exit(f"the shop dialogues pack into {len(packed)} rows of {seq}; lower --batch or --seq")
    ids = packed.ids[:batch]  # (B, T+1)
    return ids[:, :-1], ids[:, 1:], packed.loss_mask[:batch]


def timed(step, warmup: int, steps: int, tokens: int) -> tuple[tuple[float, float], float]:
    """Median tokens/s of the timed steps (wall clock, and per CPU-second of this process), and the loss of the last
    one (the same rows every step, so the loss falls; equal losses across variants show they train the same)."""
    for _ in range(warmup):
        step()
    speeds, cpu_speeds = [], []
    for _ in range(steps):
        t0, c0 = time.perf_counter(), time.process_time()
        loss = step()
        speeds.append(tokens / (time.perf_counter() - t0))
        cpu_speeds.append(tokens / (time.process_time() - c0))
    return (statistics.median(speeds), statistics.median(cpu_speeds)), loss


def mmchat_variant(folder: str, lora: bool, x, y, mask, args, precision: str, blas: str = "") -> tuple[float, float]:
    if blas:  # the matmul library the Trainer picks (read when it is made)
        os.environ["MMCHAT_BLAS"] = blas
    else:
        os.environ.pop("MMCHAT_BLAS", None)
    import mmchat
    from mmchat.train.loop import Trainer, TrainConfig
    from mmchat.train.lora import apply_lora, lora_state

    llm = mmchat.load(folder, dtype=torch.float32, quant=None, progress=False, cache=False)
    model = llm.model.train()
    for p in model.parameters():
        p.requires_grad_(True)
    if lora:
        apply_lora(model, rank=8, alpha=16, targets="q,k,v,o")

    class Rows:  # the same rows every step
        def train_batch(self, step, micro, n_micro, batch_size, rank=0, world=1):
            return x, y, mask

    cfg = TrainConfig(batch_size=x.size(0), seq_len=x.size(1), lr=1e-5, warmup_steps=1, precision=precision,
                      device="cpu", progress=False, compile=args.compile)
    with tempfile.TemporaryDirectory() as out:
        trainer = Trainer(model, Rows(), cfg, out, meta={}, state_fn=lora_state if lora else None)
        step = iter(range(10**9))
        if trainer.compiled:  # the first step compiles the blocks: timed apart, then counted as a warmup step
            t0 = time.perf_counter()
            trainer._train_step(next(step))
            print(f"  (mmchat's first step, compiling the blocks: {time.perf_counter() - t0:.1f} s)", flush=True)
            args = argparse.Namespace(**{**vars(args), "warmup": max(0, args.warmup - 1)})
        return timed(lambda: trainer._train_step(next(step))["loss"], args.warmup, args.steps, x.numel())


def hf_variant(folder: str, lora: bool, x, y, mask, args, precision: str) -> tuple[float, float]:
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, attn_implementation="sdpa")
    model.train()
    if lora:
        from peft import LoraConfig, get_peft_model
        model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0,
                                                 target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]))
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-5)
    autocast = torch.autocast("cpu", dtype=torch.bfloat16) if precision == "bf16" else torch.autocast(
        "cpu", enabled=False)
    labels = y.masked_fill(~mask, -100)  # (B, T): positions without loss are ignored, as HF's collators mark them

    def step():
        with autocast:
            logits = model(input_ids=x).logits  # (B, T, V)
        loss = F.cross_entropy(logits.float().flatten(0, 1), labels.flatten(), ignore_index=-100)  # as Trainer's
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.item()
    return timed(step, args.warmup, args.steps, x.numel())


VARIANTS = {"mmchat-full": (mmchat_variant, False, ""), "hf-full": (hf_variant, False),
            "mmchat-lora": (mmchat_variant, True, ""), "hf-peft-lora": (hf_variant, True),
            "mmchat-full-torch": (mmchat_variant, False, "torch"), "mmchat-lora-torch": (mmchat_variant, True, "torch")}


def variant_in_child(name: str, precision: str, folder: str, x, y, mask, args):
    """Runs in a fresh process (see run_variant): the variant `name` at `precision`."""
    torch.set_num_threads(int(os.environ["MMCHAT_THREADS"]))
    fn, lora, *blas = VARIANTS[name]
    return fn(folder, lora, x, y, mask, args, precision, *blas)


def run_variant(name: str, precision: str, folder: str, x, y, mask, args):
    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
        return pool.submit(variant_in_child, name, precision, folder, x, y, mask, args).result()


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--precision", default="",
                    help="fp32, bf16 or both (comma-separated); default: both where the CPU has bf16 units, else fp32")
    ap.add_argument("--compile", action="store_true", help="mmchat's --compile: each block under torch.compile")
    ap.add_argument("--only", default="mmchat-full,hf-full,mmchat-lora,hf-peft-lora")
    ap.add_argument("--rounds", type=int, default=1, help="run every variant this many times, in turn")
    ap.add_argument("--json", default="", help="write the figures, the machine and the load average here")
    ap.add_argument("--data", default="random", choices=["random", "shop"],
                    help="random rows, every position scored, or the shop dialogues, assistant tokens scored")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if not args.precision:
        from mmchat.quantize import cpu_has_bf16
        args.precision = "fp32,bf16" if cpu_has_bf16() else "fp32"
        if not cpu_has_bf16():
            print("this CPU has no bf16 units (AVX-512 BF16, AMX): fp32 only (--precision fp32,bf16 to run both)")
    # every variant runs on the same threads: mmchat.load would otherwise pick them anew from the load average
    os.environ["MMCHAT_THREADS"] = str(torch.get_num_threads())
    import mmchat
    from mmchat.train.export import write_hf
    base = mmchat.load(args.model, dtype=torch.float32, quant=None, progress=False)
    x, y, mask = rows(base.config.vocab_size, args.batch, args.seq) if args.data == "random" else \
        shop_rows(base, args.batch, args.seq)
    print(f"{args.data} rows: {int(mask.sum())} of {mask.numel()} positions carry loss "
          f"({100 * mask.float().mean():.0f}%)")
    rounds: list[dict] = []
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory() as tmp:
        folder = f"{tmp}/hf"
        write_hf(base, folder)  # one fp32 copy of the weights that both libraries load
        del base
        for r in range(args.rounds):
            figures = {}
            for precision in args.precision.split(","):
                for name in args.only.split(","):
                    (wall, cpu), loss = run_variant(name, precision, folder, x, y, mask, args)
                    figures[name, precision] = {"tok_s": wall, "tok_cpu_s": cpu, "last_loss": loss,
                                                "load_avg": os.getloadavg()[0]}
                    print(f"{name:<17} {precision:<5} {wall:8.1f} tok/s {cpu:8.1f} tok/CPU-s   last loss {loss:.4f}"
                          + (f"   (round {r + 1})" if args.rounds > 1 else ""), flush=True)
            rounds.append(figures)
    # the median over rounds of each figure
    results = {key: (statistics.median(f[key]["tok_s"] for f in rounds),
                     statistics.median(f[key]["tok_cpu_s"] for f in rounds)) for key in rounds[0]}
    print(f"\nbatch {args.batch} x {args.seq} ({args.data} rows), {torch.get_num_threads()} threads, "
          f"median of {args.steps} steps"
          f"{f' and of {args.rounds} rounds' if args.rounds > 1 else ''}, mmchat {'compiled' if args.compile else 'eager'}")
    from mmchat.train.loop import use_bf16
    auto = "bf16" if use_bf16("auto", torch.device("cpu"), 135_000_000) else "fp32"
    ratios = {}
    for kind, ours, theirs in (("full", "mmchat-full", "hf-full"), ("lora", "mmchat-lora", "hf-peft-lora"),
                               ("full, torch's matmuls", "mmchat-full-torch", "hf-full"),
                               ("lora, torch's matmuls", "mmchat-lora-torch", "hf-peft-lora")):
        for p_ours, p_theirs, label in [(p, p, p) for p in args.precision.split(",")] + ([] if "torch" in kind else [
                (auto, "fp32", f"defaults: mmchat auto ({auto}) vs HF fp32")]):
            if (ours, p_ours) in results and (theirs, p_theirs) in results:
                (a, a_cpu), (b, b_cpu) = results[ours, p_ours], results[theirs, p_theirs]
                # the median of each round's ratio: the two sides of a round ran minutes apart, under like load
                ratio, cpu_ratio = (statistics.median(f[ours, p_ours][k] / f[theirs, p_theirs][k] for f in rounds)
                                    for k in ("tok_s", "tok_cpu_s"))
                print(f"{kind} {label}: mmchat {a:.1f} tok/s, HF {b:.1f} tok/s, {ratio:.2f}x "
                      f"(per CPU-second {cpu_ratio:.2f}x)")
                ratios[f"{kind} {label}"] = {"tok_s": ratio, "tok_cpu_s": cpu_ratio}
    if args.json:
        info = open("/proc/cpuinfo").read() if os.path.exists("/proc/cpuinfo") else ""
        cpu_name = next((line.split(":", 1)[1].strip() for line in info.splitlines() if line.startswith("model name")),
                        "")
        flags = next((line for line in info.splitlines() if line.startswith("flags")), "") + " "
        with open(args.json, "w") as f:
            json.dump({"command": "python benchmarks/train_speed.py " + " ".join(sys.argv[1:]),
                       "machine": {"cpu": cpu_name, "cpus": os.cpu_count(), "avx2": " avx2 " in flags,
                                   "avx512f": " avx512f " in flags, "avx512_bf16": " avx512_bf16 " in flags,
                                   "torch": torch.__version__},
                       "load_avg_before": load_before, "load_avg_after": os.getloadavg(),
                       "threads": torch.get_num_threads(), "batch": args.batch, "seq": args.seq,
                       "data": args.data, "loss_positions": int(mask.sum()),
                       "steps": args.steps, "warmup": args.warmup,
                       "rounds": [{f"{n} {p}": v for (n, p), v in r.items()} for r in rounds],
                       "median": {f"{n} {p}": {"tok_s": w, "tok_cpu_s": c} for (n, p), (w, c) in results.items()},
                       "ratios": ratios}, f, indent=1)
        print(f"figures written to {args.json}")


if __name__ == "__main__":
    main()
