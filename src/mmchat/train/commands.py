"""The `mmchat train pretrain|sft` and `mmchat export` arguments and what they run (imported lazily by cli.py;
nothing heavy is imported at module level so `mmchat --help` stays fast)."""
from __future__ import annotations

import argparse
import os
import sys

# per-command defaults: (pretrain, sft full, sft LoRA)
DEFAULTS = {
    "lr": (1e-3, 2e-5, 2e-4),
    "min_lr": (1e-4, 2e-6, 2e-5),
    "batch_size": (16, 4, 4),
    "seq_len": (256, 512, 512),
    "max_steps": (2000, 200, 200),
    "warmup_steps": (100, 10, 10),
    "weight_decay": (0.1, 0.0, 0.0),
}


def _common(p: argparse.ArgumentParser):
    g = p.add_argument_group("training")
    g.add_argument("--out", "-o", default=None, help="output folder: checkpoint, TensorBoard logs (tb/), tokenizer "
                                                     "(default: runs/<command>)")
    g.add_argument("--max-steps", type=int, help="optimizer steps in all")
    g.add_argument("--batch-size", type=int, help="rows per micro-batch per process")
    g.add_argument("--grad-accum", type=int, default=1, help="micro-batches per optimizer step (default 1)")
    g.add_argument("--seq-len", type=int, help="tokens per row")
    g.add_argument("--lr", type=float, help="peak learning rate (AdamW)")
    g.add_argument("--min-lr", type=float, help="learning rate at the end of the cosine decay")
    g.add_argument("--warmup-steps", type=int, help="steps of linear warmup")
    g.add_argument("--weight-decay", type=float, help="AdamW weight decay on matrices")
    g.add_argument("--grad-clip", type=float, default=1.0, help="clip the gradient norm to this (0: off)")
    g.add_argument("--eval-every", type=int, default=100, help="eval loss and a sample every N steps (0: at the end)")
    g.add_argument("--eval-batches", type=int, default=8, help="batches per eval")
    g.add_argument("--save-every", type=int, default=200, help="checkpoint every N steps (and at the end, and on "
                                                                "Ctrl-C)")
    g.add_argument("--seed", type=int, default=1337)
    g.add_argument("--precision", choices=("auto", "fp32", "bf16"), default="auto",
                   help="bf16 autocast or fp32 (auto: bf16 where the hardware runs it faster: a GPU that has it, a CPU with bf16 units for models of 50M+ parameters; else fp32)")
    g.add_argument("--device", default="auto", help="cpu, cuda, or auto")
    g.add_argument("--compile", action="store_true",
                   help="torch.compile each transformer block for the training steps (the first step compiles; "
                        "cached for later runs). Off by default: no faster on SmolLM2-135M on a CPU")
    g.add_argument("--resume", action="store_true", help="continue the checkpoint in --out exactly where it stopped")
    g.add_argument("--stop-at", type=int, default=0, help="stop and save after step N, to continue later with "
                                                          "--resume (the schedule still runs to --max-steps)")
    g.add_argument("--no-progress", action="store_true", help="no progress bars")
    g.add_argument("--redact", action="store_true", help="replace personal data (e-mail, phone, card, IBAN, IP "
                   "addresses) in the training data with tags before it is tokenized")


def add_train_arguments(p: argparse.ArgumentParser):
    sub = p.add_subparsers(dest="train_command", required=True, metavar="KIND")
    pre = sub.add_parser("pretrain", help="train a GPT from scratch on text files",
                         description="Train a GPT from scratch: a byte-level BPE tokenizer learnt from the data "
                                     "(or --tokenizer MODEL's), token ids in memory-mapped shards, the next-token "
                                     "objective. Runs under `torchrun --nproc_per_node N` as well.")
    pre.add_argument("--config", "-c", required=True, help="a named shape (tiny, tiny-gpt2, small, gpt2, "
                                                           "smollm2-135m) or a JSON file of ModelConfig fields")
    pre.add_argument("--data", "-d", nargs="+", required=True, help="UTF-8 text files")
    pre.add_argument("--tokenizer", help="use this model's tokenizer (a name or path) instead of training one")
    _common(pre)
    sft = sub.add_parser("sft", help="fine-tune a model on chat conversations (full or LoRA)",
                         description="Fine-tune on OpenAI-style conversations (JSONL, one {\"messages\": [...]} per "
                                     "line), rendered with the model's chat template; only assistant tokens carry "
                                     "loss. Export the result with `mmchat export`.")
    sft.add_argument("--model", "-m", default="smollm2", help="a model name, GGUF file, HF folder or training "
                                                              "output folder (default: smollm2)")
    sft.add_argument("--data", "-d", required=True, help="conversations, JSONL")
    sft.add_argument("--lora", action="store_true", help="train low-rank adapters instead of every weight")
    sft.add_argument("--lora-rank", type=int, default=8)
    sft.add_argument("--lora-alpha", type=float, default=16.0)
    sft.add_argument("--lora-targets", default="q,k,v,o",
                     help="comma-separated: q,k,v,o,gate,up,down (or attn, mlp, all); default q,k,v,o")
    sft.add_argument("--eval-fraction", type=float, default=0.1, help="share of conversations held out for eval")
    _common(sft)
    from ..multimodal.commands import add_vision_arguments  # `mmchat train vision`: the image projector
    add_vision_arguments(sub, _common)


def add_export_arguments(p: argparse.ArgumentParser):
    p.add_argument("run_dir", metavar="DIR", help="a training output folder (--out of `mmchat train`)")
    p.add_argument("--to", required=True, choices=("hf", "gguf"), help="hf: a transformers folder; gguf: a llama.cpp "
                                                                       "file")
    p.add_argument("--out", "-o", required=True, help="the folder (hf) or .gguf file to write")
    p.add_argument("--outtype", choices=("f32", "f16"), default="f32", help="GGUF weight type (default f32)")


def train_config(args, column: int):
    from .loop import TrainConfig

    def pick(name):
        value = getattr(args, name)
        return DEFAULTS[name][column] if value is None else value
    return TrainConfig(max_steps=pick("max_steps"), batch_size=pick("batch_size"), grad_accum=args.grad_accum,
                       seq_len=pick("seq_len"), lr=pick("lr"), min_lr=pick("min_lr"),
                       warmup_steps=pick("warmup_steps"), weight_decay=pick("weight_decay"),
                       grad_clip=args.grad_clip, eval_every=args.eval_every, eval_batches=args.eval_batches,
                       save_every=args.save_every, seed=args.seed, precision=args.precision, device=args.device,
                       progress=not args.no_progress, stop_at=args.stop_at, compile=args.compile)


def _check_positive(args):
    from ..errors import MMChatError
    for name in ("max_steps", "batch_size", "grad_accum", "seq_len"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise MMChatError(f"--{name.replace('_', '-')} must be at least 1 (got {value})")


def run_train(args):
    _check_positive(args)
    if args.train_command == "vision":
        from ..multimodal.commands import run_vision
        return run_vision(args)
    if args.train_command == "pretrain":
        from .pretrain import pretrain
        out = args.out or "runs/pretrain"
        result = pretrain(args.config, args.data, out, train_config(args, 0), tokenizer_from=args.tokenizer,
                          resume=args.resume, redact=args.redact)
    else:
        from .sft import sft
        out = args.out or "runs/sft"
        lora = {"rank": args.lora_rank, "alpha": args.lora_alpha, "targets": args.lora_targets} if args.lora else None
        result = sft(args.model, args.data, out, train_config(args, 2 if args.lora else 1), lora=lora,
                     resume=args.resume, eval_fraction=args.eval_fraction, redact=args.redact)
    if result["evals"] and os.environ.get("RANK", "0") == "0":
        last = result["evals"][-1]
        print(f"done: step {result['step']}, eval loss {last['loss']:.3f} at step {last['step']} "
              f"(perplexity {last['ppl']:.1f}); "
              f"checkpoint in {out}; TensorBoard: tensorboard --logdir {out}/tb; "
              f"export: mmchat export {out} --to gguf --out model.gguf", file=sys.stderr)


def run_export(args):
    from .export import export
    path = export(args.run_dir, args.to, args.out, args.outtype)
    print(f"wrote {path}")
