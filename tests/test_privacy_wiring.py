"""Redaction where personal data would be written down: the conversation store (when enabled) and training data
(`mmchat train ... --redact`). The server's request log is tested in test_serve_robustness.py."""
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from mmchat.chat.store import Store, StoredMessage
from mmchat.train.data import load_chats, load_tokenizer_file, tokenize_to_shards, train_bpe

PII = {  # raw text -> the tag it must become
    "jane.doe@example.com": "[EMAIL]",
    "+44 20 7946 0958": "[PHONE]",
    "4111 1111 1111 1111": "[CARD]",
    "GB82 WEST 1234 5698 7654 32": "[IBAN]",
    "192.168.10.20": "[IP]",
}
KEEP = ["order 12345", "version 1.2.3", "2024-05-01", "4111 1111 1111 1112"]  # look-alikes that stay
TEXT = "Hi, I am writing about " + ", ".join(KEEP) + ". Reach me at " + " or ".join(PII) + "."


def files_text(db: Path) -> bytes:
    """Every byte SQLite has on disk for this store: the database, its WAL and shared memory."""
    return b"".join(p.read_bytes() for p in db.parent.glob(db.name + "*"))


def write_everything(store: Store) -> str:
    conv = store.create(model="m", system=f"the user is {TEXT}", title="")
    store.append(conv.id, "user", TEXT)
    store.append(conv.id, "assistant", "noted: " + TEXT)
    other = store.create(title=TEXT)
    store.replace(other.id, [StoredMessage("user", TEXT), StoredMessage("assistant", "ok")])
    store.update(other.id, system=TEXT)
    return conv.id, other.id


def test_store_redacts_when_enabled_and_only_then(tmp_path):
    plain = Store(tmp_path / "plain.db", redact=False)
    write_everything(plain)
    assert all(raw.encode() in files_text(tmp_path / "plain.db") for raw in PII)  # the control: stored as given
    store = Store(tmp_path / "red.db", redact=True)
    cid, other = write_everything(store)
    on_disk = files_text(tmp_path / "red.db")
    for raw in PII:
        assert raw.encode() not in on_disk
    for kept in KEEP:
        assert kept.encode() in on_disk
    conv, titled = store.get(cid), store.get(other)
    for tag in set(PII.values()):
        assert tag in conv.messages[0].content and tag in conv.system and tag in titled.title and tag in titled.system
    assert conv.messages[1].content.startswith("noted: Hi, I am writing about order 12345")


def test_store_redaction_from_the_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("MMCHAT_REDACT", "1")
    store = Store(tmp_path / "env.db")
    conv = store.create()
    store.append(conv.id, "user", "mail jane.doe@example.com")
    assert store.get(conv.id).messages[0].content == "mail [EMAIL]"


def test_server_redact_flag_redacts_saved_conversations(tmp_path, monkeypatch):
    sys.path.insert(0, str(Path(__file__).parent))
    import httpx
    import tiny_models as tm
    from test_serve import start_server, stop_server
    folder = tm.workdir() / "llama-serve"
    if not folder.exists():
        tm.save_hf_folder(tm.llama_model(tm.tokenizer().get_vocab_size(), ctx=2048, seed=11), tm.tokenizer(), folder)
    monkeypatch.setenv("MMCHAT_HOME", str(tmp_path))
    proc, base = start_server(str(folder), "--redact")
    try:
        cid = httpx.post(base + "/api/conversations", json={"messages": [
            {"role": "user", "content": TEXT}, {"role": "assistant", "content": "fine"}]}).json()["id"]
        got = httpx.get(f"{base}/api/conversations/{cid}").json()
    finally:
        stop_server(proc)
    assert "[CARD]" in got["messages"][0]["content"] and "[EMAIL]" in got["messages"][0]["content"]
    on_disk = files_text(tmp_path / "conversations.db")
    assert all(raw.encode() not in on_disk for raw in PII) and b"order 12345" in on_disk


def test_sft_data_redacted(tmp_path):
    path = tmp_path / "chats.jsonl"
    path.write_text(json.dumps({"messages": [{"role": "user", "content": TEXT},
                                             {"role": "assistant", "content": "I'll mail jane.doe@example.com"}]})
                    + "\n")
    raw = load_chats(path)
    assert raw[0][0]["content"] == TEXT  # without --redact the data is used as given
    chats = load_chats(path, redact=True)
    assert chats[0][1]["content"] == "I'll mail [EMAIL]"
    text = chats[0][0]["content"]
    assert all(tag in text for tag in PII.values()) and all(raw not in text for raw in PII)
    assert all(kept in text for kept in KEEP)


def test_pretrain_data_redacted(tmp_path):
    path = tmp_path / "corpus.txt"
    path.write_text((TEXT + "\nThe cat sat on the mat and the dog slept by the door.\n") * 20)
    tok = train_bpe([path], 400, tmp_path / "tokenizer.json", redact=True)
    bin_path = tokenize_to_shards([path], tok, tmp_path / "data", eos_id=None, progress=False, redact=True)
    meta = json.loads((tmp_path / "data" / "tokens.json").read_text())
    ids = np.fromfile(bin_path, dtype=meta["dtype"]).tolist()
    text = load_tokenizer_file(tmp_path / "tokenizer.json").decode(ids)
    assert text.count("[EMAIL]") == 20 and "order 12345" in text
    assert all(raw not in text for raw in PII)
    vocab = (tmp_path / "tokenizer.json").read_text()
    assert "jane" not in vocab and "example" not in vocab  # the tokenizer never saw them either


@pytest.mark.slow
def test_train_cli_redact_flag(tmp_path):
    path = tmp_path / "corpus.txt"
    path.write_text((TEXT + "\nThe cat sat on the mat.\n") * 20)
    out = tmp_path / "run"
    r = subprocess.run([sys.executable, "-m", "mmchat", "train", "pretrain", "-c", "tiny", "-d", str(path), "--out",
                        str(out), "--max-steps", "1", "--batch-size", "2", "--seq-len", "32", "--redact",
                        "--no-progress"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    tok = load_tokenizer_file(out / "tokenizer.json")
    meta = json.loads((out / "data" / "tokens.json").read_text())
    text = tok.decode(np.fromfile(out / "data" / "tokens.bin", dtype=meta["dtype"]).tolist())
    assert "[CARD]" in text and "4111 1111 1111 1111" not in text
    help_ = subprocess.run([sys.executable, "-m", "mmchat", "train", "sft", "--help"], capture_output=True, text=True)
    assert "--redact" in help_.stdout
