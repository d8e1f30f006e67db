"""Tools and the knowledge base inside a conversation: the personal-assistant preset's tools in a scripted terminal
session (events added by chat land in the calendar store, "what do I have on ...?" lists them), the
customer-service preset retrieving, citing and declining through mmchat.Chat, a tool that raises, routing."""
import json
import os
import sys

import pytest

from mmchat.chat import presets
from mmchat.chat.assistant import attach, builtin_tools, route
from mmchat.chat.calendar import Calendar
from mmchat.chat.knowledge import DONT_KNOW, KnowledgeBase
from mmchat.chat.session import Chat
from mmchat.chat.tools import ToolRegistry, make_tool
from mmchat.errors import MMChatError

sys.path.insert(0, os.path.dirname(__file__))
from test_knowledge import HELD_OUT, OUT_OF_SCOPE  # noqa: E402


def test_route_picks_the_tool_whose_examples_the_message_resembles():
    tools = ToolRegistry.builtin(Calendar(":memory:"))
    assert route(tools, "Add Dentist on 2026-12-03 at 09:30.") == "add_event"
    assert route(tools, "Put Piano lesson in my calendar for 2026-12-04, 17:00.") == "add_event"
    assert route(tools, "What do I have on 2026-12-03?") == "list_events"
    assert route(tools, "What is 17 times 23?") == "calculator"
    assert route(tools, "What time is it?") == "current_datetime"
    assert route(tools, "Hi, how are you?") is None  # the model chooses (auto)
    assert route(tools, "Write a poem about the sea") is None


def test_presets_name_tools_and_a_knowledge_base(tmp_path):
    assert presets.get("personal-assistant").tools == ["calendar", "datetime", "calculator"]
    assert presets.get("customer-service").knowledge == "default"
    bad = tmp_path / "p.toml"
    bad.write_text('system = "x"\ntools = ["calendar", "teleport"]\n')
    with pytest.raises(MMChatError, match=r"p.toml:2: unknown tool 'teleport'"):
        presets.load_preset_file(bad)
    tools = builtin_tools(["calculator"])
    assert list(tools.tools) == ["calculator"]
    with pytest.raises(MMChatError, match="unknown built-in tool"):
        builtin_tools(["teleport"])
    with pytest.raises(MMChatError, match="does not exist"):
        attach(None, str(tmp_path / "missing.db"), None, None, print)


def test_default_knowledge_is_the_users_kb_or_the_sample_shop(tmp_path, monkeypatch):
    monkeypatch.setenv("MMCHAT_HOME", str(tmp_path))
    notes = []
    _, kb = attach(None, "default", None, None, notes.append)
    assert len(kb.documents()) == 5 and "empty" in notes[0]  # nothing added yet: the sample shop, said so
    doc = tmp_path / "faq.md"
    doc.write_text("# FAQ\n\n## Gift wrapping\n\nWe wrap gifts in recycled paper for 3 EUR.\n")
    KnowledgeBase(tmp_path / "kb.db").add(doc)
    notes.clear()
    _, kb = attach(None, "default", None, None, notes.append)
    assert [d["title"] for d in kb.documents()] == ["FAQ"] and not notes


@pytest.mark.slow
def test_customer_service_chat_retrieves_cites_and_declines(smollm2, tmp_path, monkeypatch):
    monkeypatch.setenv("MMCHAT_HOME", str(tmp_path))  # an empty kb.db: the sample shop answers
    chat = Chat(smollm2, preset="customer-service", seed=0, max_tokens=60)
    for q, f, s in [HELD_OUT[3], HELD_OUT[9], HELD_OUT[13]]:
        answer = chat.send(q)
        sources = chat.messages[-1].meta["sources"]
        assert sources and all(f"[{src['n']}]" in answer for src in sources)
        assert any(src["cite"].startswith(f) and s in src["cite"] for src in sources), (q, answer, sources)
    for q in OUT_OF_SCOPE[:3]:
        assert chat.send(q) == DONT_KNOW and chat.messages[-1].meta["declined"]
    assert [m["role"] for m in chat.history[1:]] == ["user", "assistant"] * 6


@pytest.mark.slow
def test_a_tool_that_raises_is_shown_and_the_conversation_goes_on(smollm2):
    tools = ToolRegistry()
    tools.add(make_tool("order_status", "The status of an order.",
                        {"type": "object", "properties": {"order": {"type": "integer", "minimum": 1}},
                         "required": ["order"]},
                        lambda order: 1 / 0, [("Where is my order 1234?", {"order": 1234})]))
    seen = []
    chat = Chat(smollm2, tools=tools, on_tool=lambda *call: seen.append(call), seed=0, max_tokens=48)
    answer = chat.send("Where is my order 5521?")
    name, arguments, result = seen[0]
    assert name == "order_status" and json.loads(arguments) == {"order": 5521}
    assert "order_status failed: division by zero" in json.loads(result)["error"]
    assert answer and chat.messages[-1].meta["tools"][0]["name"] == "order_status"
    assert chat.send("Thanks. Say hello.")  # and the conversation goes on
    assert [m.role for m in chat.messages] == ["user", "assistant"] * 2


pexpect = pytest.importorskip("pexpect")


@pytest.mark.slow
def test_personal_assistant_in_the_terminal(smollm2_path, tmp_path):
    """A scripted terminal session: three events added by chat, then "what do I have on 2026-12-03?"; the
    calendar store holds the three, the list_events call shows the two of that day."""
    from test_chat_terminal import ANSWERED, PROMPT, spawn
    child, _ = spawn(smollm2_path, tmp_path, "--preset", "personal-assistant", "--no-save", "--plain",
                     "--temperature", "0", "--max-tokens", "64")
    asks = [("Dentist", "2026-12-03", "09:30"), ("Lunch with Anna", "2026-12-03", "12:30"),
            ("Piano lesson", "2026-12-04", "17:00")]
    for title, day, time in asks:
        child.sendline(f"Add {title} on {day} at {time}.")
        child.expect(r"tool add_event\((\{.*?\})\) -> ")
        assert json.loads(child.match.group(1)) == {"title": title, "day": day, "time": time}
        child.expect(ANSWERED)
        child.expect_exact(PROMPT)
    cal = Calendar(tmp_path / "calendar.db")
    assert [(e["title"], e["day"], e["time"]) for e in cal.events_between("2026-12-01", "2026-12-31")] == asks
    child.sendline("What do I have on 2026-12-03?")
    child.expect(r"tool list_events\((\{.*?\})\) -> (\{.*\})")  # greedy to the line's last brace
    assert json.loads(child.match.group(1)) == {"day": "2026-12-03"}
    listed = json.loads(child.match.group(2))
    assert [e["title"] for e in listed["events"]] == ["Dentist", "Lunch with Anna"]
    child.expect(ANSWERED)
    child.expect_exact(PROMPT)
    child.sendline("/exit")
    child.expect(pexpect.EOF)
