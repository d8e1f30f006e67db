"""The conversation store: WAL, one transaction per message, survives a writer killed mid-way, exports."""
import json
import os
import signal
import sqlite3
import subprocess
import sys
import time

import pytest

from mmchat.chat.store import Store, StoredMessage, data_dir, export
from mmchat.errors import MMChatError


@pytest.fixture
def store(tmp_path):
    s = Store(tmp_path / "conversations.db")
    yield s
    s.close()


def test_wal_and_round_trip(store):
    assert store.db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    conv = store.create(model="smollm2", system="Be brief.", preset="writer", settings={"sampling": {"top_p": 0.5}})
    store.append(conv.id, "user", "Write a haiku about rain, please, something calm")
    store.append(conv.id, "assistant", "Soft rain on the roof", {"finish_reason": "stop", "new_tokens": 7})
    got = store.get(conv.id)
    assert [(m.role, m.content) for m in got.messages] == [("user", "Write a haiku about rain, please, something calm"),
                                                           ("assistant", "Soft rain on the roof")]
    assert got.messages[1].meta["new_tokens"] == 7
    assert got.title.startswith("Write a haiku") and got.system == "Be brief." and got.preset == "writer"
    assert got.settings == {"sampling": {"top_p": 0.5}}
    assert store.get(conv.id[:4]).id == conv.id  # a unique prefix is enough
    listed = store.list()
    assert listed[0]["id"] == conv.id and listed[0]["messages"] == 2


def test_truncate_update_delete(store):
    conv = store.create()
    for i in range(4):
        store.append(conv.id, "user" if i % 2 == 0 else "assistant", f"m{i}")
    store.truncate(conv.id, 2)
    assert [m.content for m in store.get(conv.id).messages] == ["m0", "m1"]
    assert store.append(conv.id, "user", "m2 again") == 2  # positions continue after the cut
    store.update(conv.id, title="Renamed", system="New system")
    assert (store.get(conv.id).title, store.get(conv.id).system) == ("Renamed", "New system")
    store.replace(conv.id, [StoredMessage("user", "only")])
    assert [m.content for m in store.get(conv.id).messages] == ["only"]
    store.delete(conv.id)
    with pytest.raises(MMChatError, match="no saved conversation"):
        store.get(conv.id)


def test_unknown_and_ambiguous_ids(store):
    with pytest.raises(MMChatError, match="no saved conversation 'nope'"):
        store.get("nope")
    ids = [store.create().id for _ in range(40)]
    # with 40 ids of 8 hex digits, some first digit is shared by two of them
    shared = next(i[0] for i in ids if sum(j.startswith(i[0]) for j in ids) > 1)
    with pytest.raises(MMChatError, match="matches"):
        store.get(shared)
    with pytest.raises(MMChatError, match="no saved conversation"):
        store.get("%")  # LIKE wildcards are not patterns here


def test_not_a_database_is_one_line(tmp_path):
    bad = tmp_path / "conversations.db"
    bad.write_bytes(b"this is not sqlite" * 100)
    with pytest.raises(MMChatError, match="not a usable conversation store"):
        Store(bad)


def test_failed_transaction_leaves_nothing(store):
    conv = store.create()
    store.append(conv.id, "user", "kept")
    with pytest.raises(sqlite3.IntegrityError):  # the second statement fails: the first is rolled back
        store._write(("INSERT INTO messages (conversation_id, position, role, content, meta, created) "
                      "VALUES (?, 5, 'user', 'half', '{}', 0)", (conv.id,)),
                     ("INSERT INTO messages (conversation_id, position, role, content, meta, created) "
                      "VALUES (?, 0, 'user', 'dup', '{}', 0)", (conv.id,)))
    assert [m.content for m in store.get(conv.id).messages] == ["kept"]
    assert store.integrity_ok()


WRITER = """
import sys, time
from mmchat.chat.store import Store
s = Store(sys.argv[1])
cid = s.create(model="m").id
print(cid, flush=True)
i = 0
while True:
    s.append(cid, "user" if i % 2 == 0 else "assistant", "message %d " % i + "x" * 2000)
    i += 1
"""


def test_kill_9_during_writes_loses_no_committed_message(tmp_path):
    """A writer appends as fast as it can and is killed with SIGKILL: every message it had written is there,
    in order, the database is consistent, and a new writer can go on."""
    path = tmp_path / "c.db"
    proc = subprocess.Popen([sys.executable, "-c", WRITER, str(path)], stdout=subprocess.PIPE, text=True)
    cid = proc.stdout.readline().strip()
    reader = Store(path)
    deadline = time.time() + 20
    while time.time() < deadline and len(reader.get(cid).messages) < 50:
        time.sleep(0.05)
    seen_before_kill = len(reader.get(cid).messages)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    messages = Store(path).get(cid).messages
    assert seen_before_kill >= 50 and len(messages) >= seen_before_kill
    assert [m.content.split()[1] for m in messages] == [str(i) for i in range(len(messages))]
    assert all(len(m.content) == len(f"message {i} ") + 2000 for i, m in enumerate(messages))
    s = Store(path)
    assert s.integrity_ok()
    s.append(cid, "user", "after the crash")
    assert s.get(cid).messages[-1].content == "after the crash"


def test_export_markdown_and_json(store, tmp_path):
    conv = store.create(model="smollm2", system="You are kind.")
    store.append(conv.id, "user", "Hello **there**")
    store.append(conv.id, "assistant", "Hi!\n\n- one\n- two", {"finish_reason": "stopped"})
    got = store.get(conv.id)
    md = export(got, tmp_path / "out" / "chat.md").read_text()
    assert "**System:** You are kind." in md and "## You" in md and "Hello **there**" in md
    assert "## Assistant *(stopped)*" in md and "- one\n- two" in md
    data = json.loads(export(got, tmp_path / "chat.json").read_text())
    assert [m["role"] for m in data["messages"]] == ["system", "user", "assistant"]
    assert data["messages"][2]["content"] == "Hi!\n\n- one\n- two" and data["id"] == conv.id
    assert not list(tmp_path.glob("**/*.tmp"))  # written through a temporary file, then renamed
    with pytest.raises(MMChatError, match=".md or .json"):
        export(got, tmp_path / "chat.txt")


def test_data_dir_follows_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("MMCHAT_HOME", str(tmp_path / "home"))
    assert data_dir() == tmp_path / "home"
    monkeypatch.delenv("MMCHAT_HOME")
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "xdg"))
    assert data_dir() == tmp_path / "xdg" / "mmchat"
