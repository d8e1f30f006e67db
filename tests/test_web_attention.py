"""Attention for an answer on demand: POST /api/explain on a real server, and the web page's "Attention" button in
headless Chromium (Debian's chromium through playwright)."""
import io
import os
import shutil
import sys
from pathlib import Path

import httpx
import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).parent))
import tiny_models as tm  # noqa: E402
from test_serve import start_server, stop_server  # noqa: E402

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
TEXT = "The cat sat on the mat because it was warm."


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    folder = tm.workdir() / "llama-serve"  # the same tiny random Llama as test_serve.py
    if not folder.exists():
        tm.save_hf_folder(tm.llama_model(tm.tokenizer().get_vocab_size(), ctx=2048, seed=11), tm.tokenizer(), folder)
    mp = pytest.MonkeyPatch()
    mp.setenv("XDG_DATA_HOME", str(tmp_path_factory.mktemp("data")))
    try:
        proc, base = start_server(str(folder), "--slots", "2")
    finally:
        mp.undo()
    yield base, folder.name
    stop_server(proc)


def test_explain_endpoint_json_png_and_errors(served):
    base, model = served
    chat = {"model": model, "messages": [{"role": "user", "content": TEXT}], "max_tokens": 12, "temperature": 0}
    before = httpx.post(base + "/v1/chat/completions", json=chat, timeout=60).json()["choices"][0]["message"]
    r = httpx.post(base + "/api/explain", json={"text": TEXT, "format": "json", "layer": 1, "head": 3}, timeout=60)
    assert r.status_code == 200
    got = r.json()
    w = np.array(got["weights"])  # (T, T)
    T = len(got["tokens"])
    assert w.shape == (T, T) and T > 5 and (got["layer"], got["head"]) == (1, 3)
    assert np.allclose(w.sum(-1), 1, atol=1e-4) and np.allclose(np.triu(w, 1), 0)  # causal distributions
    png = httpx.post(base + "/api/explain", json={"text": TEXT}, timeout=60)
    assert png.headers["content-type"] == "image/png" and png.content.startswith(b"\x89PNG")
    assert png.headers["x-layer"] == str(got["layers"] - 1)  # the last layer by default
    grid = httpx.post(base + "/api/explain", json={"text": TEXT, "view": "grid"}, timeout=60)
    assert grid.content.startswith(b"\x89PNG") and grid.content != png.content
    for bad in ({"text": ""}, {"text": 5}, {"text": TEXT, "layer": 99}, {"text": TEXT, "format": "svg"}, []):
        r = httpx.post(base + "/api/explain", json=bad, timeout=60)
        assert r.status_code == 400 and r.json()["error"]["message"]
    # the pass did not disturb the engine's cached slots: the same greedy request gives the same answer
    after = httpx.post(base + "/v1/chat/completions", json=chat, timeout=60).json()["choices"][0]["message"]
    assert after == before


@pytest.mark.slow
@pytest.mark.skipif(CHROMIUM is None, reason="needs Debian's chromium (make test installs it)")
def test_attention_button_shows_the_map(served):
    playwright_api = pytest.importorskip("playwright.sync_api")
    from PIL import Image
    base, model = served
    out = Path(os.environ.get("MMCHAT_TEST_OUTPUT", Path(__file__).parent.parent / "test-output")) / "web"
    out.mkdir(parents=True, exist_ok=True)
    with playwright_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        page = browser.new_page(viewport={"width": 1200, "height": 900})
        errors = []
        page.on("pageerror", lambda e: errors.append(str(e)))
        try:
            page.goto(base + "/")
            page.wait_for_function(f"document.getElementById('model-name').textContent.includes('{model}')")
            page.click("#toggle-settings")
            page.fill("#max_tokens", "12")
            page.fill("#input", TEXT)
            page.click("#send")
            page.wait_for_function("!document.getElementById('send').hidden && "
                                   "document.querySelectorAll('.msg.assistant').length == 1", timeout=60_000)
            page.click(".msg.assistant .action-attention")
            page.wait_for_function("(() => { const i = document.querySelector('.msg.assistant img.attention-map');"
                                   " return i && i.complete && i.naturalWidth > 100; })()", timeout=60_000)
            caption = page.text_content(".msg.assistant .attention-caption")
            assert "layer 1, head 0" in caption
            src = page.get_attribute(".msg.assistant img.attention-map", "src")
            data = page.evaluate("async (u) => Array.from(new Uint8Array(await (await fetch(u)).arrayBuffer()))", src)
            img = Image.open(io.BytesIO(bytes(data)))
            low, high = img.convert("L").getextrema()
            assert img.width > 100 and high - low > 100  # a picture, not a blank
            page.screenshot(path=str(out / "attention.png"))
            page.click(".msg.assistant .attention-switch")  # all layers x heads
            page.wait_for_function("(document.querySelector('.msg.assistant .attention-caption') || {textContent: ''})"
                                   ".textContent.includes('every layer')", timeout=60_000)
            page.click(".msg.assistant .action-attention")  # and hidden again
            assert page.query_selector(".msg.assistant .attention") is None
            assert errors == []
        finally:
            browser.close()
