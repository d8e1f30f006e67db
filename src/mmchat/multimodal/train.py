"""Alignment, the LLaVA way, through mmchat's one training loop (train/loop.py):

  stage 1  the projector alone learns to caption generated scenes (the LM and the encoder stay frozen);
  stage 2  the projector and LoRA adapters on the LM's attention learn questions and answers (captions mixed in).

The frozen encoder's grids of every scene are computed once and cached (multimodal/features.py), so a step costs
one LM forward and backward. Rows are token ids in which an image slot holds vocab_size + (scene * 49 + cell);
VisionLM turns those into projected features, so the loop sees an ordinary (B, T) batch.

    mmchat train vision --stage 1 --out runs/vision1
    mmchat train vision --stage 2 --init runs/vision1 --out runs/vision2 --ship
"""
from __future__ import annotations

import random
import sys
import time
from pathlib import Path

import torch
import torch.nn as nn

from ..errors import MMChatError
from . import projector as P
from . import scenes, vision

STAGE_DEFAULTS = {  # stage -> (lr, max_steps, batch_size)
    1: (2e-3, 80, 8),
    2: (1e-3, 120, 8),
}
LORA = {"rank": 8, "alpha": 16.0, "targets": "q,k,v,o"}


class VisionLM(nn.Module):
    """The frozen LM reading a batch whose image slots are indices into a bank of feature cells."""

    def __init__(self, lm: nn.Module, proj: P.Projector, bank: torch.Tensor):
        super().__init__()
        self.lm, self.projector = lm, proj
        self.bank = bank  # (N, 49, 1283) float16, not a parameter or buffer: never saved, never trained
        self.cfg = lm.cfg

    @property
    def layers(self):  # the loop logs the last layer's attention
        return self.lm.layers

    @property
    def lm_head(self):  # the loop's CPU step runs the head with the loss
        return self.lm.lm_head

    def set_reference_attention(self, on: bool = True):
        self.lm.set_reference_attention(on)

    def forward(self, x: torch.Tensor, keep: torch.Tensor | None = None, head: bool = True) -> torch.Tensor:
        V = self.cfg.vocab_size
        img = x >= V  # (B, T)
        emb = self.lm.embed(x.masked_fill(img, 0))  # (B, T, d)
        if img.any():
            cell = x[img] - V  # (M,) in row-major order, as masked_scatter fills
            feats = self.bank[cell // P.IMAGE_TOKENS, cell % P.IMAGE_TOKENS].float()  # (M, 1283)
            emb = emb.masked_scatter(img[..., None], self.projector(feats).to(emb.dtype))  # (B, T, d)
        # (B, T, V), or (N, V) where keep (B, T) is true; the final norm's output (..., d) with head=False
        return self.lm(None, None, embeds=emb, keep=keep, head=head)


# stage 2 asks these kinds twice per scene (with two of their phrasings): the model learns shape from a few hundred
# steps, colour and count much slower
EXTRA_QUESTIONS = ("colour", "count")


def examples(stage: int, split: str, n_scenes: int, seed: int) -> list[tuple[int, str, str, str]]:
    """(scene index, question, answer, text hint) rows: captions for stage 1; every question kind plus a caption
    for 2. Half the scenes with a word carry the OCR line after the image, as chat adds it when the `ocr` extra is
    installed (OCR reads these words exactly, so the true word stands in for it); the other half teach reading the
    word without it."""
    from .ocr import text_hint
    rng = random.Random(f"{seed}-{split}-{stage}")
    rows = []
    for i in range(n_scenes):
        s = scenes.make_scene(split, i)
        if not s.clean:
            continue
        hint = text_hint([s.word]) if s.word and rng.random() < 0.5 else ""
        rows.append((i, rng.choice(scenes.CAPTION_PROMPTS), scenes.caption(s), hint))
        if stage == 2:
            rows += [(i, q, a, hint) for _, q, a in scenes.questions(s, rng)]
            rows += [(i, rng.choice(scenes.QUESTIONS[k]), scenes.answer(s, k), hint) for k in EXTRA_QUESTIONS]
    rng.shuffle(rows)
    return rows


class SceneData:
    """The loop's data: token rows with image slots, next-token targets, a loss mask on the answer only."""

    def __init__(self, tokenizer, template, rows_train, rows_eval, vocab_size: int, eval_offset: int):
        self.tok, self.template, self.V = tokenizer, template, vocab_size
        self.turn_ends = set(tokenizer.eos_token_ids) | {tokenizer.special_ids[t] for t in
                                                          ("<|im_end|>", "<|eot_id|>", "<|end|>", "<end_of_turn>")
                                                          if t in tokenizer.special_ids}
        self.train = [self._encode(r, 0) for r in rows_train]
        self.eval = [self._encode(r, eval_offset) for r in rows_eval]

    def _encode(self, row, offset: int):
        scene, question, answer, hint = row
        chat = [{"role": "system", "content": P.IMAGE_SYSTEM},
                {"role": "user", "content": P.IMAGE_MARK + "\n" + question}]  # as projector.chat_prompt renders
        prompt = self.template.render(chat, add_generation_prompt=True)
        full = self.template.render(chat + [{"role": "assistant", "content": answer}], add_generation_prompt=False)
        if not full.startswith(prompt):
            raise MMChatError("the chat template renders a prompt that the full conversation does not start with")
        ids_p, starts = P.tokenize_with_images(prompt, self.tok, [hint])
        ids, _ = P.tokenize_with_images(full, self.tok, [hint])
        ends = [i for i in range(len(ids_p), len(ids)) if ids[i] in self.turn_ends]
        ids = ids[: ends[0] + 1] if ends else ids  # the answer and its end-of-turn token, nothing after
        base = self.V + (offset + scene) * P.IMAGE_TOKENS
        ids[starts[0]: starts[0] + P.IMAGE_TOKENS] = range(base, base + P.IMAGE_TOKENS)
        return ids, len(ids_p)

    def _batch(self, rows):
        T = max(len(ids) for ids, _ in rows) - 1
        x = torch.zeros(len(rows), T, dtype=torch.long)
        y = torch.zeros(len(rows), T, dtype=torch.long)
        mask = torch.zeros(len(rows), T, dtype=torch.bool)
        for i, (ids, n_prompt) in enumerate(rows):
            t = torch.tensor(ids)
            x[i, : len(ids) - 1], y[i, : len(ids) - 1] = t[:-1], t[1:].masked_fill(t[1:] >= self.V, 0)
            mask[i, n_prompt - 1: len(ids) - 1] = True  # predict every answer token (and the end of turn)
        return x, y, mask

    def train_batch(self, step, micro, n_micro, batch_size, rank, world):
        start = ((step * n_micro + micro) * world + rank) * batch_size
        rows = [self.train[(start + k) % len(self.train)] for k in range(batch_size)]
        return self._batch(rows)

    def eval_batches(self, n, batch_size):
        for b in range(n):
            rows = self.eval[b * batch_size: (b + 1) * batch_size]
            if rows:
                yield self._batch(rows)


def _lora_factors(lm) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Each LoRALinear of the LM as one (A (rK, in), B (out, rK)) pair covering all its adapted slices, B scaled."""
    from ..train.lora import LoRALinear
    out = {}
    for name, mod in lm.named_modules():
        if not isinstance(mod, LoRALinear):
            continue
        A = torch.cat(list(mod.lora_A), dim=0).detach().float()  # (r K, in)
        B = torch.zeros(mod.base.out_features, A.size(0))
        k = 0
        for (s, e), on in zip(mod.slices, mod.adapted):
            if on:
                B[s:e, k * mod.rank:(k + 1) * mod.rank] = mod.lora_B[k].detach().float() * mod.scale
                k += 1
        out[name] = (A, B)
    return out


def align(stage: int, out: str | Path, cfg, model: str = "smollm2", init: str | None = None,
          n_train: int = 2400, n_eval: int = 300, resume: bool = False, ship: bool = False,
          hidden: int | None = None) -> dict:
    """Run one stage; writes out/checkpoint.pt (the loop's) and out/adapter.safetensors (what chat loads)."""
    from .. import registry
    from ..api import build_model
    from ..chat.template import ChatTemplate
    from ..formats.load import load_checkpoint
    from ..train.loop import Trainer
    from ..train.lora import apply_lora, lora_state, load_lora_state
    from .features import scene_features

    if stage not in (1, 2):
        raise MMChatError(f"--stage must be 1 or 2 (got {stage})")
    out = Path(out)
    start = P.Adapter.load(Path(init) / "adapter.safetensors" if Path(init).is_dir() else init) if init else None
    if start is not None and start.projector.d_in != vision.FEATURES:
        raise MMChatError(f"{start.path} reads {start.projector.d_in} feature channels per cell, this version "
                          f"{vision.FEATURES} (the encoder's and the cell's mean colour); train stage 1 again "
                          "(`mmchat train vision --stage 1`) and start stage 2 from its output, or leave out --init")
    torch.manual_seed(cfg.seed)
    ckpt = load_checkpoint(registry.resolve(model, progress=cfg.progress))
    lm = build_model(ckpt.config, ckpt.tensors, torch.float32)
    for p in lm.parameters():
        p.requires_grad_(False)
    tok, template = ckpt.tokenizer, ckpt.chat_template
    del ckpt
    bos = tok.id_to_token(tok.bos_token_id) if tok.bos_token_id is not None else ""
    eos = tok.id_to_token(tok.eos_token_ids[0]) if tok.eos_token_ids else ""
    template = ChatTemplate(template, bos or "", eos or "")

    proj = P.Projector(lm.cfg.d_model, hidden=hidden)  # reads vision.FEATURES channels, as the cache holds
    if start is not None:
        proj.load_state_dict(start.projector.state_dict())
    if stage == 2:
        apply_lora(lm, rank=LORA["rank"], alpha=LORA["alpha"], targets=LORA["targets"], seed=cfg.seed)
    for p in proj.parameters():
        p.requires_grad_(True)

    grids = torch.cat([scene_features("train", n_train, cfg.progress), scene_features("val", n_eval, cfg.progress)])
    bank = grids.flatten(2).transpose(1, 2).contiguous()  # (N, 49, 1283) float16
    data = SceneData(tok, template, examples(stage, "train", n_train, cfg.seed),
                     examples(stage, "val", n_eval, cfg.seed)[: cfg.eval_batches * cfg.batch_size],
                     lm.cfg.vocab_size, eval_offset=n_train)
    net = VisionLM(lm, proj, bank)
    meta = {"kind": "vision", "stage": stage, "model": model, "n_train": n_train}

    def state(m):
        return {"projector": m.projector.state_dict(), "lora": lora_state(m.lm)}

    def load_state(m, sd):
        m.projector.load_state_dict(sd["projector"])
        if sd["lora"]:
            load_lora_state(m.lm, sd["lora"])

    trainer = Trainer(net, data, cfg, out, meta, state_fn=state, load_state_fn=load_state)
    t0 = time.perf_counter()
    result = trainer.fit(resume=resume)
    adapter = P.Adapter(proj.eval(), _lora_factors(lm),
                        {"d_model": lm.cfg.d_model, "n_layer": lm.cfg.n_layer, "vocab_size": lm.cfg.vocab_size,
                         "hidden": proj.fc1.out_features, "stage": stage, "steps": result["step"],
                         "model": model, "lora": LORA if stage == 2 else None,
                         "train_seconds": round(time.perf_counter() - t0)})
    adapter.save(out / "adapter.safetensors")
    if ship:
        adapter.save(P.WEIGHTS_DIR / f"{model}-vision.safetensors")
    result["adapter"] = str(out / "adapter.safetensors")
    return result


# -- held-out accuracy ---------------------------------------------------------------------------------------------
def evaluate(llm, n_scenes: int = 60, kinds=("colour", "shape", "count", "position", "word"), seed: int = 0,
             progress: bool = True, batch: int = 4) -> dict:
    """Ask the chat model about held-out scenes (the val split) through the real chat path (images as content
    parts, greedy answers, `batch` questions decoded together) and grade each reply.
    Returns {kind: {"correct", "total", "accuracy"}, "examples": [...]}."""
    from tqdm import tqdm

    from ..api import sampling_params
    rng = random.Random(seed)
    asks = []
    for i in range(n_scenes):
        s = scenes.make_scene("val", i)
        if not s.clean:
            continue
        image = scenes.draw(s)
        asks += [(s, kind, q, image) for kind, q, _ in scenes.questions(s, rng) if kind in kinds]
    params = sampling_params({}, temperature=0.0, max_tokens=24)
    results = {k: {"correct": 0, "total": 0} for k in kinds}
    shown = []
    with tqdm(total=len(asks), desc="asking", disable=not progress, file=sys.stderr) as bar:
        for at in range(0, len(asks), batch):
            group = asks[at: at + batch]
            prompts = [llm.chat_prompt([{"role": "user", "content": [{"type": "image", "image": image},
                                                                     {"type": "text", "text": q}]}])
                       for _, _, q, image in group]
            replies = [""] * len(group)
            for seq, text, _ in llm.stream_ids([ids for ids, _ in prompts], params, images=[b for _, b in prompts]):
                replies[seq] += text
            for (s, kind, q, _), reply in zip(group, replies):
                ok = scenes.grade(kind, s, reply)
                results[kind]["correct"] += ok
                results[kind]["total"] += 1
                if len(shown) < 15:
                    shown.append({"kind": kind, "question": q, "reply": reply.strip(),
                                  "truth": scenes.answer(s, kind), "correct": ok})
            bar.update(len(group))
    for r in results.values():
        r["accuracy"] = r["correct"] / r["total"] if r["total"] else None
    return {**results, "examples": shown}
