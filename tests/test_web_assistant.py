"""The web page's tools and knowledge base in headless Chromium against a real server: with Tools on, a message
that asks for a calendar event makes the model call add_event (named by the tools' examples, arguments under the
grammar), the page runs it on the server, shows the call and its result, and the model answers from it; the
customer-service preset's answers list the passages they cite, and an out-of-scope question is declined."""
import json

import pytest

from mmchat.chat.calendar import Calendar
from mmchat.chat.knowledge import DONT_KNOW
from test_serve import start_server, stop_server
from test_web import CHROMIUM, playwright_api, shots, web_model  # noqa: F401 - shots: the screenshots folder fixture

pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="needs Debian's chromium (make test installs it)")


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    home = tmp_path_factory.mktemp("home")  # the calendar and the conversations live here
    proc, base = start_server(str(web_model()), "--slots", "2", env={"MMCHAT_HOME": str(home)})
    yield base, home
    stop_server(proc)


@pytest.mark.slow
def test_tools_and_knowledge_on_the_page(served, shots):
    base, home = served
    with playwright_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        page = browser.new_page(viewport={"width": 1200, "height": 800})
        errors, requests = [], []
        page.on("pageerror", lambda e: errors.append(str(e)))
        page.on("request", lambda r: requests.append(json.loads(r.post_data))
                if r.url.endswith("/v1/chat/completions") else None)
        page.goto(base + "/")
        page.wait_for_function("document.getElementById('model-name').textContent.includes('llama-web')")
        page.click("#toggle-settings")
        page.fill("#max_tokens", "200")  # room for a call with a random model's 40-character title
        page.fill("#temperature", "0")

        # 1. tools: the call and its result are shown, then the answer from the result
        page.check("#use-tools")
        page.fill("#input", "Add Dentist on 2026-12-03 at 09:30.")
        page.click("#send")
        page.wait_for_function("!document.getElementById('send').hidden && "
                               "document.querySelectorAll('.msg.assistant').length == 1", timeout=120_000)
        box = page.text_content(".msg.assistant .tool")
        assert box.startswith("🔧 add_event({") and "→" in box
        first, second = requests[-2], requests[-1]
        assert first["tool_choice"] == {"type": "function", "function": {"name": "add_event"}}
        assert {t["function"]["name"] for t in first["tools"]} >= {"add_event", "list_events", "calculator"}
        call = second["messages"][-2]["tool_calls"][0]
        assert call["function"]["name"] == "add_event" and second["tool_choice"] == "none"
        assert second["messages"][-1]["tool_call_id"] == call["id"]
        result = json.loads(second["messages"][-1]["content"])
        assert result.get("id") or "add_event failed" in result["error"]  # e.g. a valid-looking 2026-13-45
        if "error" not in result:  # the random model's (valid) arguments were a real day: it is in the calendar
            args = json.loads(call["function"]["arguments"])
            stored = Calendar(home / "calendar.db").events_on(args["day"])
            assert [e["title"] for e in stored] == [args["title"]]
        assert page.text_content(".msg.assistant .content").strip()  # and an answer followed
        page.screenshot(path=str(shots / "6-tool-call.png"))

        # 2. the customer-service preset: retrieved, cited, listed; out of scope declined
        page.click("#new-chat")
        page.select_option("#preset", "customer-service")
        assert not page.is_checked("#use-tools")
        page.fill("#input", "Do you deliver to Switzerland?")
        page.click("#send")
        page.wait_for_function("!document.getElementById('send').hidden && "
                               "document.querySelectorAll('.msg.assistant').length == 1", timeout=120_000)
        assert requests[-1]["knowledge"] == "default" and "tools" not in requests[-1]
        sources = page.text_content(".msg.assistant .sources")
        assert "shipping.md" in sources and "International shipping" in sources
        assert "[1]" in page.text_content(".msg.assistant .content") or "[2]" in page.text_content(
            ".msg.assistant .content")
        page.fill("#input", "What is the capital of France?")
        page.click("#send")
        page.wait_for_function("!document.getElementById('send').hidden && "
                               "document.querySelectorAll('.msg.assistant').length == 2", timeout=120_000)
        assert page.text_content(".msg.assistant >> nth=1 >> .content").strip() == DONT_KNOW
        page.screenshot(path=str(shots / "7-knowledge.png"))
        assert errors == []
        browser.close()
