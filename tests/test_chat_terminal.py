"""`mmchat chat` driven for real in a pseudo-terminal (pexpect) with the embedded SmolLM2: a conversation that
remembers its first turn, /regenerate, Ctrl-C during an answer, /save, quit and resume, kill -9 mid-answer."""
import os
import re
import signal
import sys
import time

import pytest

from mmchat.chat.store import Store

pexpect = pytest.importorskip("pexpect")
ANSWERED = re.compile(r"tokens/s · first token after [\d.]+ s \(prefilled (\d+) of (\d+) prompt tokens\)")
PROMPT = ">>> "


def spawn(model_path, home, *args):
    from mmchat import registry
    shared = registry.home() / "converted"  # converted weights: made once, shared with the other tests
    shared.mkdir(parents=True, exist_ok=True)
    if not (home / "converted").exists():
        (home / "converted").symlink_to(shared, target_is_directory=True)
    env = {**os.environ, "MMCHAT_HOME": str(home), "PYTHONUNBUFFERED": "1", "TERM": "xterm-256color"}
    child = pexpect.spawn(sys.executable, ["-m", "mmchat", "chat", "--model", str(model_path), *args], env=env,
                          encoding="utf-8", timeout=120, dimensions=(50, 200))
    child.expect(r"conversation ([0-9a-f]{8}|not saved)")
    cid = child.match.group(1)
    child.expect_exact(PROMPT)
    return child, cid


def say(child, text) -> str:
    """Send a message, wait for the answer and its statistics line; the screen output in between."""
    child.sendline(text)
    child.expect(ANSWERED)
    out, prefilled, total = child.before, int(child.match.group(1)), int(child.match.group(2))
    child.expect_exact(PROMPT)
    return out, prefilled, total


def wait_for(cond, timeout=60.0):
    end = time.time() + timeout
    while time.time() < end:
        if cond():
            return True
        time.sleep(0.1)
    return False


@pytest.mark.slow
def test_terminal_chat_remembers_saves_stops_and_resumes(smollm2_path, tmp_path):
    # greedy and short answers keep it quick; the memory check needs the first turn in the second prompt
    child, cid = spawn(smollm2_path, tmp_path, "--temperature", "0", "--max-tokens", "24")
    say(child, "Please remember that my name is Rex.")
    second, prefilled, total = say(child, "What is my name?")
    assert "Rex" in second
    assert prefilled < total / 2  # the first turn came from the cache, not prefilled again

    say(child, "/regenerate")
    child.sendline("/set max_tokens 400")
    child.expect_exact(PROMPT)
    store = Store(tmp_path / "conversations.db")
    child.sendline("Write a long story about a dragon who loves books.")
    assert wait_for(lambda: len(store.get(cid).messages) == 5)  # the question is saved before the answer
    time.sleep(2.0)
    child.sendintr()  # Ctrl-C: stops the answer, not the program
    child.expect(r"\(stopped")
    child.expect_exact(PROMPT)
    child.sendline("/save Rex chat")
    child.expect(r"saved as ([0-9a-f]{8})")
    assert child.match.group(1) == cid
    child.expect_exact(PROMPT)
    child.sendline("/exit")
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0

    assert "What is my name?" in (tmp_path / "input_history").read_text()  # up-arrow history, next time
    conv = store.get(cid)
    roles = [m.role for m in conv.messages]
    assert conv.title == "Rex chat"
    assert [m.content for m in conv.messages[:3:2]] == ["Please remember that my name is Rex.", "What is my name?"]
    # /regenerate replaced answer 2; Ctrl-C kept a partial answer 3, or took the question back if none had begun
    assert roles in (["user", "assistant"] * 3, ["user", "assistant"] * 2)
    if len(roles) == 6:
        assert conv.messages[5].meta["finish_reason"] == "stopped"
    before = [(m.role, m.content) for m in conv.messages]

    # resume, then kill -9 in the middle of an answer
    child, cid2 = spawn(smollm2_path, tmp_path, "--resume", cid[:5], "--max-tokens", "400")
    assert cid2 == cid and "What is my name?" in child.before
    child.sendline("Tell me everything you know about dogs.")
    assert wait_for(lambda: len(store.get(cid).messages) == len(before) + 1)
    time.sleep(1.5)
    os.kill(child.pid, signal.SIGKILL)
    child.expect(pexpect.EOF)
    child.close()

    conv = Store(tmp_path / "conversations.db").get(cid)
    assert [(m.role, m.content) for m in conv.messages[: len(before)]] == before  # every earlier turn intact
    assert conv.messages[-1].content == "Tell me everything you know about dogs."
    assert store.integrity_ok()

    # resume once more: the history is there, the unanswered question is pointed out and can be answered
    child, _ = spawn(smollm2_path, tmp_path, "--resume", cid, "--max-tokens", "8")
    assert "Tell me everything you know about dogs." in child.before and "has no answer" in child.before
    say(child, "/regenerate")
    child.sendline("/exit")
    child.expect(pexpect.EOF)
    conv = Store(tmp_path / "conversations.db").get(cid)
    assert len(conv.messages) == len(before) + 2 and conv.messages[-1].role == "assistant"


@pytest.mark.slow
def test_terminal_bad_input_is_one_line_and_the_session_goes_on(smollm2_path, tmp_path):
    child, cid = spawn(smollm2_path, tmp_path, "--context", "64", "--max-tokens", "8", "--no-save")
    assert cid == "not saved"
    for line, message in [("/preset nope", "no preset 'nope'"), ("/load deadbeef", "no saved conversation"),
                          ("/frobnicate", "unknown command /frobnicate"), ("/set temperature -1", "temperature"),
                          ("word " * 200, "context window holds 64")]:
        child.sendline(line)
        child.expect(r"error: ([^\r\n]*)")
        assert message in child.match.group(1)
        child.expect_exact(PROMPT)
    child.sendline('"""')
    child.sendline("Say hi")
    child.sendline('in one word"""')
    child.expect(ANSWERED)
    child.expect_exact(PROMPT)
    child.sendline("/export " + str(tmp_path / "out.json"))
    child.expect("written to")
    child.sendline("/exit")
    child.expect(pexpect.EOF)
    import json
    data = json.loads((tmp_path / "out.json").read_text())
    assert data["messages"][0] == {"role": "user", "content": "Say hi\nin one word"}
    assert Store(tmp_path / "conversations.db").list() == []  # --no-save kept nothing
    assert not (tmp_path / "input_history").exists()  # nor what was typed


def test_cli_errors_before_loading(tmp_path, monkeypatch, capsys):
    """Unknown preset, malformed preset file, unknown conversation: exit 2 with one line, before any model loads."""
    from mmchat import cli
    monkeypatch.setenv("MMCHAT_HOME", str(tmp_path))
    (tmp_path / "presets").mkdir()
    (tmp_path / "presets" / "bad.toml").write_text('system = "x"\n[sampling]\ntemperature = "warm"\n')
    for args, message in [(["--preset", "nope"], "no preset 'nope'"),
                          (["--preset", "bad"], "bad.toml:3: sampling.temperature must be float"),
                          (["--resume", "0000"], "no saved conversation '0000'"),
                          (["--set", "target=German"], "name the preset with --preset"),
                          (["--temperature", "-2"], "temperature must be >= 0")]:
        assert cli.main(["chat", "--model", str(tmp_path / "missing.gguf"), *args]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and message in err, err


def test_markdown_keeps_line_breaks_outside_code():
    from rich.console import Console

    from mmchat.chat.terminal import as_markdown
    console = Console(width=60, record=True, force_terminal=False)
    console.print(as_markdown("**Rain**\nsoft on the roof\ngrey on the sea\n\n```\nx = 1\ny = 2\n```"))
    lines = [line.strip() for line in console.export_text().splitlines() if line.strip()]
    assert lines == ["Rain", "soft on the roof", "grey on the sea", "x = 1", "y = 2"]
