"""Training data: text -> token ids in memory-mapped shards, and chats -> packed rows with an assistant-only mask.

Pretraining batches are drawn from the shards by step number alone (a seeded generator per step), so a resumed run
sees exactly the batches an uninterrupted one would, and DDP ranks split each global batch by row.
"""
from __future__ import annotations

import functools
import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..errors import MMChatError
from ..tokenizer import Tokenizer

EOS_TEXT = "<|endoftext|>"
# ChatML markers are added to every tokenizer trained here, so a model pretrained from scratch can be fine-tuned on
# chats with the default template.
SPECIAL_TOKENS = [EOS_TEXT, "<|im_start|>", "<|im_end|>"]


# -- reading text -------------------------------------------------------------------------------------------------
def read_text(path: str | Path, redact: bool = False) -> str:
    """A UTF-8 text file's text; with `redact`, personal data replaced by tags (privacy.Redactor)."""
    path = Path(path)
    if not path.is_file():
        raise MMChatError(f"no such data file: {path}")
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise MMChatError(f"{path} is not UTF-8 text (bad byte at offset {e.start}); convert it with "
                          f"`iconv -t utf-8`") from None
    if not text.strip():
        raise MMChatError(f"{path} is empty; give a file with text in it")
    if redact:
        from ..privacy import Redactor
        text = Redactor().redact(text)
    return text


# -- tokenizers ---------------------------------------------------------------------------------------------------
def train_bpe(files: list[str | Path], vocab_size: int, out: str | Path, redact: bool = False) -> Tokenizer:
    """A byte-level BPE of `vocab_size` ids (the special tokens, 256 byte symbols, then merges) learnt from
    `files` (redacted first with `redact`, so no merge spells out personal data), saved as `out`."""
    from tokenizers import Tokenizer as HFTokenizer, decoders, models, pre_tokenizers, trainers
    n_fixed = 256 + len(SPECIAL_TOKENS)
    if vocab_size < n_fixed:
        raise MMChatError(f"vocab_size {vocab_size} is too small for a byte-level BPE (at least {n_fixed})")
    texts = [read_text(f, redact) for f in files]  # checks every file first: UTF-8, not empty
    tok = HFTokenizer(models.BPE())
    # GPT-2's split with digits one by one: the pre-tokenizer llama.cpp calls "smollm", so GGUF exports of models
    # trained here tokenize the same in llama.cpp, transformers and mmchat
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                                 pre_tokenizers.ByteLevel(add_prefix_space=False)])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer=trainer)
    tok.save(str(out))
    eos = tok.token_to_id(EOS_TEXT)
    return Tokenizer(tok, bos_token_id=None, eos_token_ids=[eos])


def load_tokenizer_file(path: str | Path) -> Tokenizer:
    from tokenizers import Tokenizer as HFTokenizer
    tok = HFTokenizer.from_file(str(path))
    eos = [tok.token_to_id(t) for t in (EOS_TEXT, "<|im_end|>") if tok.token_to_id(t) is not None]
    return Tokenizer(tok, bos_token_id=None, eos_token_ids=eos)


def token_dtype(vocab_size: int):
    return np.uint16 if vocab_size <= 1 << 16 else np.uint32


# -- pretraining shards -------------------------------------------------------------------------------------------
def tokenize_to_shards(files: list[str | Path], tokenizer: Tokenizer, out_dir: str | Path, eos_id: int | None,
                       progress: bool = True, redact: bool = False) -> Path:
    """Every file's ids (an eos id between documents) into one memory-mapped `tokens.bin` under `out_dir`,
    uint16 when the vocabulary fits, else uint32; `tokens.json` records dtype and length. Returns the .bin path."""
    from tqdm import tqdm
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    dtype = token_dtype(tokenizer.vocab_size)
    bin_path, tmp = out_dir / "tokens.bin", out_dir / "tokens.bin.tmp"
    total = 0
    bar = tqdm(total=sum(Path(f).stat().st_size for f in files), unit="B", unit_scale=True, desc="tokenizing",
               disable=not progress)
    with open(tmp, "wb") as f:
        for path in files:
            text = read_text(path, redact)
            # encode in paragraphs: bounded memory, and a progress bar that moves
            for para in _chunks(text, 1 << 16):
                ids = tokenizer.encode(para, add_bos=False)
                f.write(np.asarray(ids, dtype=dtype).tobytes())
                total += len(ids)
                bar.update(len(para.encode("utf-8")))
            if eos_id is not None:
                f.write(np.asarray([eos_id], dtype=dtype).tobytes())
                total += 1
        f.flush()
        os.fsync(f.fileno())
    bar.close()
    os.replace(tmp, bin_path)
    (out_dir / "tokens.json").write_text(json.dumps({"dtype": np.dtype(dtype).name, "tokens": total}))
    return bin_path


def _chunks(text: str, size: int):
    """Pieces of about `size` characters, cut after a newline so words are not split."""
    start = 0
    while start < len(text):
        end = min(len(text), start + size)
        if end < len(text):
            cut = text.rfind("\n", start, end)
            end = cut + 1 if cut > start else end
        yield text[start:end]
        start = end


class TokenShards:
    """Random windows of `seq_len + 1` ids from a memory-mapped token file, split into train and eval parts."""

    def __init__(self, bin_path: str | Path, seq_len: int, eval_fraction: float = 0.05, seed: int = 0):
        meta = json.loads((Path(bin_path).parent / "tokens.json").read_text())
        self.ids = np.memmap(bin_path, dtype=meta["dtype"], mode="r")  # (N,)
        self.seq_len, self.seed = seq_len, seed
        n = len(self.ids)
        n_eval = max(seq_len + 1, int(n * eval_fraction))
        if n - n_eval < 2 * (seq_len + 1):
            raise MMChatError(f"the data has only {n} tokens, too few for windows of {seq_len}; give more text or "
                              f"a smaller --seq-len")
        self.train_end = n - n_eval  # train: [0, train_end), eval: [train_end, n)

    @property
    def n_tokens(self) -> int:
        return len(self.ids)

    def _rows(self, starts) -> tuple[torch.Tensor, torch.Tensor]:
        rows = np.stack([self.ids[s: s + self.seq_len + 1].astype(np.int64) for s in starts])  # (B, T+1)
        rows = torch.from_numpy(rows)
        return rows[:, :-1], rows[:, 1:]  # inputs (B, T), targets (B, T)

    def train_batch(self, step: int, micro: int, n_micro: int, batch_size: int, rank: int = 0, world: int = 1):
        """Micro-batch `micro` (of `n_micro`) of optimizer step `step` for `rank`. A generator seeded with
        (seed, step) draws the step's batch_size * world * n_micro windows; micro-batch m takes the m-th slice of
        batch_size * world and each rank every world-th row of it. So 1 x 4 rows, 2 micro-batches x 2 rows and
        2 ranks x 2 rows all train on the same 4 windows per step."""
        rng = np.random.default_rng([self.seed, step])
        per_micro = batch_size * world
        starts = rng.integers(0, self.train_end - self.seq_len - 1, size=per_micro * n_micro)
        x, y = self._rows(starts[micro * per_micro:(micro + 1) * per_micro][rank::world])
        return x, y, torch.ones_like(y, dtype=torch.bool)

    def eval_batches(self, n_batches: int, batch_size: int):
        """The same eval windows every time: evenly spaced over the held-out part."""
        span = len(self.ids) - self.train_end - self.seq_len - 1
        starts = np.linspace(self.train_end, self.train_end + max(span, 0), n_batches * batch_size).astype(np.int64)
        for b in range(n_batches):
            x, y = self._rows(starts[b * batch_size:(b + 1) * batch_size])
            yield x, y, torch.ones_like(y, dtype=torch.bool)

    def unigram_entropy(self) -> float:
        """Entropy (nats per token) of the corpus's token frequencies: about what a model that ignores context
        reaches (counted over the whole corpus, as a small eval part alone would understate it)."""
        counts = np.bincount(np.asarray(self.ids, dtype=np.int64))
        p = counts[counts > 0] / counts.sum()
        return float(-(p * np.log(p)).sum())


# -- chats --------------------------------------------------------------------------------------------------------
ROLES = ("system", "user", "assistant", "tool")


def load_chats(path: str | Path, redact: bool = False) -> list[list[dict]]:
    """OpenAI-style conversations, one per JSONL line: {"messages": [{"role": ..., "content": ...}, ...]} or a bare
    list of messages. Each must have at least one assistant message. With `redact`, personal data in the messages
    is replaced by tags."""
    text = read_text(path)
    chats = []
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        where = f"{path}, line {n}"
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise MMChatError(f"{where}: not valid JSON ({e.msg})") from None
        messages = obj.get("messages") if isinstance(obj, dict) else obj
        if not isinstance(messages, list) or not messages:
            raise MMChatError(f"{where}: not a conversation; expected {{\"messages\": [{{\"role\": ..., "
                              f"\"content\": ...}}, ...]}}")
        for m in messages:
            if not isinstance(m, dict) or m.get("role") not in ROLES or not isinstance(m.get("content"), str):
                raise MMChatError(f"{where}: each message needs a role ({', '.join(ROLES)}) and a string content; "
                                  f"got {json.dumps(m)[:80]}")
        if not any(m["role"] == "assistant" for m in messages):
            raise MMChatError(f"{where}: the conversation has no assistant message, so nothing to learn from")
        if redact:
            from ..privacy import Redactor
            messages = Redactor().redact_messages(messages)
        chats.append(messages)
    if not chats:
        raise MMChatError(f"{path} holds no conversations")
    return chats


def render_chat(messages: list[dict], template, tokenizer: Tokenizer) -> tuple[list[int], list[bool]]:
    """Ids of the conversation rendered with the chat template, and per id whether it is assistant-written
    (the reply text and the end-of-turn marker, not the role header nor anything after the marker)."""
    full = template.render(messages, add_generation_prompt=False)
    spans = []  # character spans of assistant replies within `full`
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        before = template.render(messages[:i], add_generation_prompt=True)
        through = template.render(messages[:i + 1], add_generation_prompt=False)
        if not full.startswith(before) or not full.startswith(through) or len(through) <= len(before):
            raise MMChatError("the chat template does not render conversations prefix by prefix; mmchat cannot tell "
                              "assistant tokens from the rest with it")
        spans.append((len(before), len(through.rstrip())))  # the newline after the end marker is not learnt
    enc = tokenizer.tok.encode(full, add_special_tokens=False)
    ids = list(enc.ids)
    mask = [any(a <= start < b for a, b in spans) for start, _ in enc.offsets]
    if tokenizer.add_bos and tokenizer.bos_token_id is not None and (not ids or ids[0] != tokenizer.bos_token_id):
        ids, mask = [tokenizer.bos_token_id] + ids, [False] + mask
    return ids, mask


@dataclass
class PackedChats:
    """Conversations packed whole into rows of seq_len + 1 ids (first-fit, longest first), padded at the end.
    loss_mask marks the target positions that carry loss: assistant ids only, never padding."""
    ids: torch.Tensor        # (N, T+1)
    loss_mask: torch.Tensor  # (N, T) bool, aligned with ids[:, 1:]
    n_truncated: int

    def __len__(self):
        return self.ids.size(0)


def pack_chats(examples: list[tuple[list[int], list[bool]]], seq_len: int, pad_id: int) -> PackedChats:
    width = seq_len + 1
    rows: list[tuple[list[int], list[bool]]] = []
    truncated = 0
    for ids, mask in sorted(examples, key=lambda e: -len(e[0])):
        if len(ids) > width:
            ids, mask, truncated = ids[:width], mask[:width], truncated + 1
        for row in rows:  # first row with room
            if len(row[0]) + len(ids) <= width:
                row[0].extend(ids)
                row[1].extend(mask)
                break
        else:
            rows.append((list(ids), list(mask)))
    out_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    out_mask = torch.zeros(len(rows), width, dtype=torch.bool)
    for r, (ids, mask) in enumerate(rows):
        out_ids[r, :len(ids)] = torch.tensor(ids)
        out_mask[r, :len(mask)] = torch.tensor(mask, dtype=torch.bool)
    return PackedChats(out_ids, out_mask[:, 1:], truncated)


class ChatRows:
    """Batches of packed chat rows: each epoch a seeded permutation, indexed by step so resume is exact.
    Eval batches come from `eval_packed` (held-out conversations) when given."""

    def __init__(self, packed: PackedChats, seed: int = 0, eval_packed: PackedChats | None = None):
        self.packed, self.seed = packed, seed
        self.eval_packed = eval_packed if eval_packed is not None and len(eval_packed) else packed

    def train_batch(self, step: int, micro: int, n_micro: int, batch_size: int, rank: int = 0, world: int = 1):
        n = len(self.packed)
        global_b = batch_size * world
        first = (step * n_micro + micro) * global_b  # this micro-batch's first row in the endless row stream
        idx = []
        for k in range(first, first + global_b):
            epoch, pos = divmod(k, n)
            idx.append(int(self._order(epoch)[pos]))
        idx = idx[rank::world]
        rows = self.packed.ids[idx]  # (B, T+1)
        return rows[:, :-1], rows[:, 1:], self.packed.loss_mask[idx]

    @functools.lru_cache(maxsize=4)
    def _order(self, epoch: int) -> np.ndarray:
        return np.random.default_rng([self.seed, epoch]).permutation(len(self.packed))

    def eval_batches(self, n_batches: int, batch_size: int):
        ev = self.eval_packed
        n_batches = min(n_batches, -(-len(ev) // batch_size))  # each held-out row once
        for b in range(n_batches):
            idx = [(b * batch_size + i) % len(ev) for i in range(batch_size)]
            rows = ev.ids[idx]
            yield rows[:, :-1], rows[:, 1:], ev.loss_mask[idx]
