"""`mmchat train vision` arguments and what they run (argparse only at import, so `mmchat --help` stays fast)."""
from __future__ import annotations

import json
import sys


def add_vision_arguments(sub, common):
    p = sub.add_parser("vision", help="align the image projector (stage 1) and LoRA (stage 2) on generated scenes",
                       description="LLaVA-style alignment on Pillow-drawn scenes: stage 1 trains the projector "
                                   "alone on captions, stage 2 adds LoRA on the LM for questions and answers. "
                                   "The encoder's features are computed once and cached.")
    p.add_argument("--stage", type=int, choices=(1, 2), required=True)
    p.add_argument("--model", "-m", default="smollm2", help="the language model (default: smollm2)")
    p.add_argument("--init", help="start from this adapter (a stage-1 output folder or .safetensors)")
    p.add_argument("--scenes", type=int, default=2400, help="training scenes (default 2400)")
    p.add_argument("--eval-scenes", type=int, default=300, help="held-out scenes for the eval loss (default 300)")
    p.add_argument("--ship", action="store_true", help="also write the adapter into the package (what chat loads)")
    p.add_argument("--accuracy", type=int, default=0, metavar="N",
                   help="afterwards, ask about N held-out scenes and print accuracy per question kind")
    p.add_argument("--threads", type=int, default=0, help="CPU threads (default: all, or 1 on a busy machine)")
    common(p)


def _cpu_has_bf16() -> bool:
    try:
        flags = open("/proc/cpuinfo").read()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def run_vision(args):
    from ..train.loop import TrainConfig
    from . import projector as P
    from .train import STAGE_DEFAULTS, align, evaluate
    lr, steps, batch = STAGE_DEFAULTS[args.stage]
    pick = lambda v, d: d if v is None else v  # noqa: E731
    cfg = TrainConfig(max_steps=pick(args.max_steps, steps), batch_size=pick(args.batch_size, batch),
                      grad_accum=args.grad_accum, seq_len=pick(args.seq_len, 128), lr=pick(args.lr, lr),
                      min_lr=pick(args.min_lr, lr / 10), warmup_steps=pick(args.warmup_steps, 20),
                      weight_decay=pick(args.weight_decay, 0.0), grad_clip=args.grad_clip,
                      eval_every=args.eval_every, eval_batches=args.eval_batches, save_every=args.save_every,
                      seed=args.seed, precision=args.precision, device=args.device, progress=not args.no_progress,
                      stop_at=args.stop_at)
    import os

    import torch
    if args.threads:
        torch.set_num_threads(args.threads)
    elif os.getloadavg()[0] > (os.cpu_count() or 1):
        # a busy machine: one thread per process; two threads that wait on each other under contention run
        # several times slower than one
        torch.set_num_threads(1)
    if args.precision == "auto" and _cpu_has_bf16() and args.device in ("auto", "cpu") \
            and not torch.cuda.is_available():
        cfg.precision = "bf16"  # bf16 autocast: 1.4x faster here than fp32 on a CPU with bf16 instructions
    out = args.out or f"runs/vision{args.stage}"
    result = align(args.stage, out, cfg, model=args.model, init=args.init, n_train=args.scenes,
                   n_eval=args.eval_scenes, resume=args.resume, ship=args.ship)
    last = result["evals"][-1] if result["evals"] else None
    print(f"done: step {result['step']}" + (f", eval loss {last['loss']:.3f}" if last else "") +
          f"; adapter in {result['adapter']}", file=sys.stderr)
    if args.accuracy:
        import mmchat
        llm = mmchat.load(args.model, progress=False)
        llm.vision_adapter = P.Adapter.load(result["adapter"])
        report = evaluate(llm, args.accuracy, progress=not args.no_progress)
        print(json.dumps({k: v for k, v in report.items() if k != "examples"}, indent=1))
