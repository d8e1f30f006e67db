"""Training data: BPE + memory-mapped shards, step-indexed batches, chat rendering with the assistant-only mask,
packing, and clear errors for bad input."""
import json
from importlib import resources

import numpy as np
import pytest
import torch

from mmchat.chat.template import ChatTemplate
from mmchat.errors import MMChatError
from mmchat.train.data import (ChatRows, TokenShards, load_chats, pack_chats, render_chat, tokenize_to_shards,
                               train_bpe)

CORPUS = resources.files("mmchat") / "data" / "tiny_corpus.txt"
CHATS = resources.files("mmchat") / "data" / "shop_support.jsonl"


@pytest.fixture(scope="module")
def bpe(tmp_path_factory):
    out = tmp_path_factory.mktemp("bpe")
    return train_bpe([str(CORPUS)], 512, out / "tokenizer.json")


def test_bpe_and_shards_round_trip(bpe, tmp_path):
    assert bpe.vocab_size == 512
    text = CORPUS.read_text()
    bin_path = tokenize_to_shards([str(CORPUS)], bpe, tmp_path, eos_id=bpe.eos_token_ids[0], progress=False)
    meta = json.loads((tmp_path / "tokens.json").read_text())
    assert meta["dtype"] == "uint16" and bin_path.stat().st_size == 2 * meta["tokens"]
    ids = np.memmap(bin_path, dtype=np.uint16, mode="r")
    assert ids[-1] == bpe.eos_token_ids[0]
    assert bpe.decode(ids[:-1].tolist()) == text  # byte-level BPE is lossless
    assert len(ids) < len(text) / 2  # merges were learnt: well under one id per character


def test_batches_depend_only_on_step_and_split_by_rank(bpe, tmp_path):
    bin_path = tokenize_to_shards([str(CORPUS)], bpe, tmp_path, eos_id=None, progress=False)
    shards = TokenShards(bin_path, seq_len=32, seed=3)
    x1, y1, m1 = shards.train_batch(step=5, micro=0, n_micro=1, batch_size=4)
    x2, _, _ = shards.train_batch(step=5, micro=0, n_micro=1, batch_size=4)
    x3, _, _ = shards.train_batch(step=6, micro=0, n_micro=1, batch_size=4)
    assert torch.equal(x1, x2) and not torch.equal(x1, x3)
    assert torch.equal(x1[:, 1:], y1[:, :-1]) and m1.all()  # targets are the inputs shifted by one
    # two ranks with 2 rows each see exactly the rows one process with 4 rows sees
    r0, _, _ = shards.train_batch(5, 0, 1, batch_size=2, rank=0, world=2)
    r1, _, _ = shards.train_batch(5, 0, 1, batch_size=2, rank=1, world=2)
    assert torch.equal(torch.cat([r0, r1]).sort(dim=0).values, x1.sort(dim=0).values)
    # and so do two micro-batches of 2 rows
    m0, _, _ = shards.train_batch(5, 0, 2, batch_size=2)
    m1_, _, _ = shards.train_batch(5, 1, 2, batch_size=2)
    assert torch.equal(torch.cat([m0, m1_]), x1)
    # eval windows come from the held-out tail only
    ex, _, _ = next(shards.eval_batches(1, 2))
    tail = torch.from_numpy(np.asarray(shards.ids[shards.train_end:], dtype=np.int64))
    assert any(torch.equal(ex[0], tail[i:i + 32]) for i in range(len(tail) - 31))


def test_bad_text_files(tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("  \n")
    latin1 = tmp_path / "latin1.txt"
    latin1.write_bytes("caf\xe9 cr\xe8me".encode("latin-1"))
    with pytest.raises(MMChatError, match="empty"):
        train_bpe([str(empty)], 512, tmp_path / "t.json")
    with pytest.raises(MMChatError, match="not UTF-8"):
        train_bpe([str(latin1)], 512, tmp_path / "t.json")
    with pytest.raises(MMChatError, match="no such data file"):
        train_bpe([str(tmp_path / "missing.txt")], 512, tmp_path / "t.json")


@pytest.mark.parametrize("line, message", [
    ('{"messages": [{"role": "user", "content": "hi"}', "line 2: not valid JSON"),
    ('{"text": "hello"}', "line 2: not a conversation"),
    ('{"messages": [{"role": "robot", "content": "hi"}]}', "line 2: each message needs a role"),
    ('{"messages": [{"role": "user", "content": "hi"}]}', "line 2: the conversation has no assistant message"),
])
def test_bad_chat_lines_name_the_line(tmp_path, line, message):
    path = tmp_path / "chats.jsonl"
    good = '{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}'
    path.write_text(good + "\n" + line + "\n")
    with pytest.raises(MMChatError, match=message):
        load_chats(path)


def test_shipped_chats_load():
    chats = load_chats(CHATS)
    assert len(chats) >= 50
    assert all(any(m["role"] == "assistant" for m in c) for c in chats)


def _check_mask(messages, template, tok):
    ids, mask = render_chat(messages, template, tok)
    assert len(ids) == len(mask)
    learnt = tok.decode([i for i, m in zip(ids, mask) if m], skip_special=False)
    not_learnt = tok.decode([i for i, m in zip(ids, mask) if not m], skip_special=False)
    replies = [m["content"] for m in messages if m["role"] == "assistant"]
    end = template.render([{"role": "assistant", "content": "X"}], add_generation_prompt=False).split("X")[1].strip()
    # exactly the replies, each followed by the end-of-turn marker, carry loss
    assert learnt == "".join(r + end for r in replies)
    for m in messages:
        if m["role"] != "assistant":
            assert m["content"] in not_learnt
    assert "assistant" in not_learnt  # the role header is prompt, not reply
    return ids, mask


def test_assistant_tokens_and_only_they_carry_loss(bpe):
    template = ChatTemplate(None)  # ChatML, which the trained BPE knows as special tokens
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Is shipping free?"},
                {"role": "assistant", "content": "Yes, over $50."}, {"role": "user", "content": "And returns?"},
                {"role": "assistant", "content": "Within 30 days."}]
    _check_mask(messages, template, bpe)


@pytest.mark.slow
def test_assistant_mask_with_smollm2_template(smollm2):
    chats = load_chats(CHATS)
    for messages in chats[:3] + [c for c in chats if sum(m["role"] == "assistant" for m in c) > 1][:2]:
        _check_mask(messages, smollm2.template, smollm2.tokenizer)


def test_packing_keeps_conversations_whole(bpe):
    template = ChatTemplate(None)
    examples = [render_chat(c, template, bpe) for c in load_chats(CHATS)]
    packed = pack_chats(examples, seq_len=511, pad_id=0)
    assert packed.n_truncated == 0
    assert packed.ids.shape[1] == 512 and len(packed) < len(examples)  # several conversations share a row
    # every assistant id is still a loss target (a row's first id never is one: it opens a conversation)
    assert int(packed.loss_mask.sum()) == sum(sum(m) for _, m in examples)
    # every conversation's ids appear contiguously in some row
    rows = [r.tolist() for r in packed.ids]
    for ids, _ in examples[:10]:
        assert any(any(r[i:i + len(ids)] == ids for i in range(len(r) - len(ids) + 1)) for r in rows)
    # padding never carries loss
    pad_targets = packed.ids[:, 1:] == 0
    assert not (packed.loss_mask & pad_targets).any()
    rows_data = ChatRows(packed, seed=1)
    x, y, m = rows_data.train_batch(0, 0, 1, batch_size=3)
    assert x.shape == (3, 511) and torch.equal(x[:, 1:], y[:, :-1]) and m.shape == (3, 511)
