"""Supervised fine-tuning on chats: the model's own chat template, loss on assistant tokens only, packed rows,
full fine-tuning or LoRA (merged into the weights when exported)."""
from __future__ import annotations

import json
from pathlib import Path

import torch

from .data import ChatRows, load_chats, pack_chats, render_chat
from .loop import CHECKPOINT, Trainer, TrainConfig, setup_distributed
from .lora import DEFAULT_TARGETS, apply_lora, load_lora_state, lora_state, parse_targets


def load_base(model: str):
    """An LLM from a model name or path, or from a training output folder (its latest checkpoint, merged)."""
    from ..api import LLM
    path = Path(model).expanduser()
    if path.is_dir() and (path / CHECKPOINT).exists():
        from .export import load_run
        return load_run(path)
    # trained in float32 with plain weights: no bf16 or weight-only quantization, which inference may choose;
    # no converted-weights cache either (a float32 copy of every base model would fill it)
    return LLM.load(model, dtype=torch.float32, quant=None, device="cpu", progress=False, cache=False)


def tokenizer_meta(tokenizer) -> dict:
    return {"bos": tokenizer.bos_token_id, "eos": list(tokenizer.eos_token_ids), "add_bos": bool(tokenizer.add_bos)}


def split_chats(chats: list, eval_fraction: float, seed: int):
    """Hold out every k-th conversation for eval (none when there are fewer than 10)."""
    if len(chats) < 10 or eval_fraction <= 0:
        return chats, chats
    k = max(2, round(1 / eval_fraction))
    train = [c for i, c in enumerate(chats) if i % k != k - 1]
    held = [c for i, c in enumerate(chats) if i % k == k - 1]
    return train, held


def answer(llm, messages: list[dict], max_tokens: int = 64) -> str:
    """A greedy answer straight from generate(), which sets up and clears its own cache (the engine behind
    llm.chat keeps one on the model, which training forwards must not see)."""
    from ..generate import SamplingParams, generate_ids
    was_training = llm.model.training
    llm.model.eval()
    try:
        params = SamplingParams(max_tokens=max_tokens, temperature=0, repetition_penalty=1.1)
        out = generate_ids(llm.model, [llm.render_chat(messages)], params, llm.eos_token_ids)[0]
    finally:
        llm.model.train(was_training)
    return llm.decode(out).strip()


def make_chat_sampler(llm, messages: list[dict], max_tokens: int = 64):
    return lambda model: f"{messages[-1]['content']} |> {answer(llm, messages, max_tokens)}"


def sft(model: str, data: str | Path, out: str | Path, train_cfg: TrainConfig, lora: dict | None = None,
        resume: bool = False, eval_fraction: float = 0.1, redact: bool = False) -> dict:
    """Fine-tune `model` on the conversations in `data` (JSONL). lora: {"rank", "alpha", "targets"} or None."""
    chats = load_chats(data, redact)  # bad input fails before the (slow) model load
    if lora is not None:
        lora = {"rank": int(lora.get("rank", 8)), "alpha": float(lora.get("alpha", 16)),
                "targets": ",".join(parse_targets(lora.get("targets", DEFAULT_TARGETS)))}
    d = setup_distributed("cuda" if train_cfg.device in ("auto", "cuda") and torch.cuda.is_available() else "cpu")
    llm = load_base(model)
    tok, template = llm.tokenizer, llm.template
    seq_len = min(train_cfg.seq_len, llm.config.max_seq_len - 1)
    train_cfg.seq_len = seq_len
    train_chats, eval_chats = split_chats(chats, eval_fraction, train_cfg.seed)
    pad = llm.eos_token_ids[0] if llm.eos_token_ids else 0
    packed = pack_chats([render_chat(m, template, tok) for m in train_chats], seq_len, pad)
    eval_packed = pack_chats([render_chat(m, template, tok) for m in eval_chats], seq_len, pad)
    if packed.n_truncated and d.main:
        print(f"note: {packed.n_truncated} conversations are longer than {seq_len} tokens and were cut; "
              f"raise --seq-len to keep them whole")
    data_rows = ChatRows(packed, seed=train_cfg.seed, eval_packed=eval_packed)

    net = llm.model
    net.train()
    for p in net.parameters():
        p.requires_grad_(True)
    state_fn = load_state_fn = None
    if lora is not None:
        n_train = apply_lora(net, lora["rank"], lora["alpha"], lora["targets"], seed=train_cfg.seed)
        state_fn, load_state_fn = lora_state, load_lora_state
    else:
        n_train = sum(p.numel() for p in net.parameters())
    meta = {"kind": "sft", "base": str(model), "lora": lora, "config": llm.config.to_dict(),
            "tokenizer": tokenizer_meta(tok), "chat_template": None if template.is_fallback else template.source,
            "data": str(data)}
    out = Path(out)
    if d.main:
        out.mkdir(parents=True, exist_ok=True)
        tok.tok.save(str(out / "tokenizer.json"))
        (out / "tokenizer_meta.json").write_text(json.dumps(tokenizer_meta(tok)))
    question = eval_chats[0][:next(i for i, m in enumerate(eval_chats[0]) if m["role"] == "assistant")]
    trainer = Trainer(net, data_rows, train_cfg, out, meta, sample_fn=make_chat_sampler(llm, question),
                      state_fn=state_fn, load_state_fn=load_state_fn, dist_info=d)
    if d.main:
        n_loss = int(packed.loss_mask.sum())
        print(f"{len(train_chats)} conversations ({len(eval_chats)} for eval) in {len(packed)} packed rows of "
              f"{seq_len + 1} tokens, {n_loss:,} assistant tokens carry loss; training "
              f"{n_train / 1e6:.2f}M of {llm.config.n_params / 1e6:.1f}M parameters"
              f"{' (LoRA r=%d on %s)' % (lora['rank'], lora['targets']) if lora else ''}; "
              f"{'bf16 autocast' if trainer.bf16 else 'fp32'} on {trainer.device}")
    result = trainer.fit(resume=resume)
    result["llm"] = llm
    return result
