"""mmchat forget: deleted conversations leave no trace of their text in the database files."""
import os
import subprocess
import sys

from mmchat.chat.store import Store

SECRET = "zebra-crossing-4321-secret"


def file_bytes(path) -> bytes:
    """The database and whatever sits beside it (-wal, -shm)."""
    return b"".join(p.read_bytes() for p in path.parent.iterdir() if p.name.startswith(path.name))


def filled_store(tmp_path) -> tuple[Store, str, str]:
    store = Store(tmp_path / "conversations.db")
    keep = store.create(model="m")
    store.append(keep.id, "user", "what is the weather like")
    gone = store.create(model="m")
    store.append(gone.id, "user", f"my password is {SECRET}")
    store.append(gone.id, "assistant", f"noted: {SECRET}")
    return store, keep.id, gone.id


def test_plain_delete_is_not_enough_but_forget_wipes_the_text(tmp_path):
    store, keep, gone = filled_store(tmp_path)
    assert SECRET.encode() in file_bytes(store.path)  # the check below could fail: the text is on disk
    assert store.forget(gone) == 1
    assert SECRET.encode() not in file_bytes(store.path)
    assert [c["id"] for c in store.list()] == [keep]  # the other conversation is untouched
    assert store.get(keep).messages[0].content == "what is the weather like"
    assert store.integrity_ok()


def test_forget_all(tmp_path):
    store, keep, gone = filled_store(tmp_path)
    assert store.forget() == 2
    assert store.list() == [] and SECRET.encode() not in file_bytes(store.path)


def run_cli(tmp_path, *args):
    env = {**os.environ, "MMCHAT_HOME": str(tmp_path)}
    return subprocess.run([sys.executable, "-m", "mmchat", "forget", *args], capture_output=True, text=True, env=env)


def test_forget_cli(tmp_path):
    store, keep, gone = filled_store(tmp_path)
    store.close()
    r = run_cli(tmp_path, gone[:8])
    assert r.returncode == 0 and "forgot 1 conversation" in r.stdout
    assert SECRET.encode() not in file_bytes(tmp_path / "conversations.db")
    for bad in (["no-such-id"], [], [keep, "--all"]):
        r = run_cli(tmp_path, *bad)
        assert r.returncode == 2 and "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1
    r = run_cli(tmp_path, "--all")
    assert r.returncode == 0 and "forgot 1 conversation" in r.stdout
