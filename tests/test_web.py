"""The web chat page in real headless Chromium (Debian's chromium, driven by playwright) against a real server:
send a message and watch it stream, stop an answer, regenerate, edit, the token-probability view, then reload
and find the conversation in the searchable list. Screenshots go to test-output/web/ (or $MMCHAT_TEST_OUTPUT)."""
import json
import os
import shutil
import time
from pathlib import Path

import httpx
import pytest

from test_serve import start_server, stop_server, tm

playwright_api = pytest.importorskip("playwright.sync_api")
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="needs Debian's chromium (make test installs it)")


def web_model(name: str = "llama-web", ctx: int = 2048, seed: int = 12) -> Path:
    """The tiny random model the page tests serve, saved once."""
    folder = tm.workdir() / name
    if not folder.exists():
        tm.save_hf_folder(tm.llama_model(tm.tokenizer().get_vocab_size(), ctx=ctx, seed=seed), tm.tokenizer(), folder)
    return folder


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    folder = web_model()
    home = tmp_path_factory.mktemp("home")  # the conversation store lives here
    proc, base = start_server(str(folder), "--slots", "4", env={"MMCHAT_HOME": str(home)})
    import mmchat
    eos = mmchat.load(str(folder), progress=False).eos_token_ids
    yield base, eos
    stop_server(proc)


@pytest.fixture(scope="module")
def shots():
    out = Path(os.environ.get("MMCHAT_TEST_OUTPUT", Path(__file__).parent.parent / "test-output")) / "web"
    out.mkdir(parents=True, exist_ok=True)
    return out


@pytest.mark.slow
def test_chat_page(served, shots):
    base, eos = served
    with playwright_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        page = browser.new_page(viewport={"width": 1200, "height": 800})
        errors = []
        page.on("pageerror", lambda e: errors.append(str(e)))
        requests = []

        def no_eos(route):
            # the tiny random model could end an answer at any token; this keeps answers running to max_tokens
            body = json.loads(route.request.post_data)
            body["logit_bias"] = {str(i): -100 for i in eos}
            requests.append(body)
            route.continue_(post_data=json.dumps(body))

        try:
            page.route("**/v1/chat/completions", no_eos)
            page.goto(base + "/")
            page.wait_for_function("document.getElementById('model-name').textContent.includes('llama-web')")

            # 1. send a message; the answer streams in (its text is seen growing) and ends with Send back
            page.click("#toggle-settings")
            page.fill("#max_tokens", "300")
            page.fill("#input", "Hello there, how are you?")
            # every change of the answer's text, as the page sees it
            page.evaluate("""() => {
                window.seenLengths = [];
                new MutationObserver(() => {
                    const el = document.querySelector('.msg.assistant .content');
                    if (el) window.seenLengths.push(el.textContent.length);
                }).observe(document.getElementById('messages'), {childList: true, subtree: true, characterData: true});
            }""")
            page.click("#send")
            page.wait_for_function("!document.getElementById('send').hidden && "
                                   "document.querySelectorAll('.msg.assistant').length == 1", timeout=60_000)
            lengths = sorted(set(page.evaluate("window.seenLengths")))
            final = len(page.text_content(".msg.assistant .content"))
            assert final > 0 and lengths[-1] == final
            # seen part-way before the end (how many times depends on how the browser batches network reads)
            assert len([n for n in lengths if 0 < n < final]) >= 1, lengths
            assert requests[-1]["stream"] is True and requests[-1]["max_tokens"] == 300
            page.screenshot(path=str(shots / "1-streamed.png"))

            # 2. a long answer, stopped part-way: marked stopped, and the server frees the slot
            page.fill("#max_tokens", "1000")
            page.fill("#input", "Tell me a very long story")
            page.click("#send")
            page.wait_for_function("document.querySelectorAll('.msg.assistant').length == 2 && "
                                   "document.querySelectorAll('.msg.assistant')[1].textContent.length > 20")
            page.click("#stop")
            page.wait_for_selector(".msg.assistant .note")
            stopped = page.text_content(".msg.assistant >> nth=1")
            assert "(stopped)" in stopped
            end = time.time() + 10
            while time.time() < end and httpx.get(base + "/health").json()["running"]:
                time.sleep(0.05)
            assert httpx.get(base + "/health").json()["running"] == 0
            page.screenshot(path=str(shots / "2-stopped.png"))

            # 3. regenerate the stopped answer: same number of messages, a finished answer in its place
            page.fill("#max_tokens", "40")
            page.click(".msg.assistant >> nth=1 >> .action-regenerate")
            page.wait_for_function("!document.getElementById('send').hidden")
            assert page.locator(".msg").count() == 4
            assert page.locator(".msg .note").count() == 0
            assert requests[-1]["messages"][-1] == {"role": "user", "content": "Tell me a very long story"}
            page.screenshot(path=str(shots / "3-regenerated.png"))

            # 4. the token-probability view: one coloured span per token, alternatives on hover
            page.check("#show-probs")
            spans = page.locator(".msg.assistant >> nth=1 >> .tok")
            assert spans.count() == 40
            assert "%" in spans.first.get_attribute("title")
            page.screenshot(path=str(shots / "4-probabilities.png"))
            page.uncheck("#show-probs")

            # 5. edit the first question: what followed it is replaced by a new answer
            page.click(".msg.user >> nth=0 >> .action-edit")
            page.fill(".edit-box", "An edited question about penguins")
            page.click(".action-save")
            page.wait_for_function("!document.getElementById('send').hidden && "
                                   "document.querySelectorAll('.msg').length == 2")
            assert page.text_content(".msg.user") .endswith("An edited question about penguins")

            # 6. reload: the conversation is in the list (saved on the server), searchable, and opens again
            page.reload()
            page.wait_for_selector("#conversations li")
            page.fill("#search", "penguins")
            page.wait_for_function("document.querySelectorAll('#conversations li').length == 1")
            page.fill("#search", "no-such-words-anywhere")
            page.wait_for_function("document.querySelectorAll('#conversations li').length == 0")
            page.fill("#search", "")
            page.wait_for_selector("#conversations li")
            page.click("#conversations li >> nth=0")
            page.wait_for_function("document.querySelectorAll('.msg').length == 2")
            assert "penguins" in page.text_content(".msg.user")
            page.screenshot(path=str(shots / "5-reloaded.png"))
        except Exception:
            page.screenshot(path=str(shots / "failed.png"))  # what the page showed when it went wrong
            raise
        assert errors == []
        browser.close()


def test_markdown_renders_code_and_escapes_html(served):
    base, _ = served
    with playwright_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        page = browser.new_page()
        page.goto(base + "/")
        source = ("# Title\n\nSome **bold** and `code` <script>x</script>\n\n"
                  "```python\ndef f(x):\n    return 'hi'  # note\n```\n- one\n- two")
        html = page.evaluate("(src) => Markdown.render(src)", source)
        browser.close()
    assert "<h1>Title</h1>" in html and "<strong>bold</strong>" in html and "<code>code</code>" in html
    assert "<script>" not in html and "&lt;script&gt;" in html
    assert '<span class="hl-kw">def</span>' in html and '<span class="hl-str">\'hi\'</span>' in html.replace(
        "&#39;", "'")
    assert '<span class="hl-com"># note</span>' in html and "<ul><li>one</li><li>two</li></ul>" in html
