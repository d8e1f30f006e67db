"""The web page's Image button in real headless Chromium against a real server: the picked file is scaled in the
browser, sent as an OpenAI image_url part (a PNG data URI) with the typed question, and shown as a thumbnail.
The tiny served model has no projector, so the server's one-line refusal must reach the page's status line."""
import json
import shutil

import pytest

from mmchat.multimodal import scenes
from test_serve import start_server, stop_server
from test_web import web_model

playwright_api = pytest.importorskip("playwright.sync_api")
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="needs Debian's chromium (make test installs it)")


@pytest.mark.slow
def test_image_upload(tmp_path):
    folder = web_model("llama-web-vision", ctx=512, seed=13)
    picture = tmp_path / "scene.png"
    scenes.draw(scenes.make_scene("val", 3)).resize((600, 600)).save(picture)
    proc, base = start_server(str(folder), "--slots", "2", env={"MMCHAT_HOME": str(tmp_path / "home")})
    sent = []
    try:
        with playwright_api.sync_playwright() as p:
            browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
            page = browser.new_page(viewport={"width": 1100, "height": 800})
            errors = []
            page.on("pageerror", lambda e: errors.append(str(e)))

            def capture(route):
                sent.append(json.loads(route.request.post_data))
                route.continue_()
            page.route("**/v1/chat/completions", capture)
            page.goto(base + "/")
            page.wait_for_function("document.getElementById('model-name').textContent.includes('llama-web-vision')")
            page.set_input_files("#image-file", str(picture))
            page.wait_for_selector("#image-pending:not([hidden])")
            assert "scene.png" in page.text_content("#image-pending")
            page.fill("#input", "What colour are the shapes?")
            page.click("#send")
            page.wait_for_function("document.getElementById('status').textContent.includes('image projector')",
                                   timeout=60_000)
            page.screenshot(path=str(tmp_path / "image-upload.png"))
            thumb = page.query_selector(".msg.user img.thumb")
            assert thumb is not None and page.is_hidden("#image-pending")
            size = page.evaluate("() => { const i = document.querySelector('.msg.user img.thumb'); "
                                 "return [i.naturalWidth, i.naturalHeight]; }")
            browser.close()
            assert size == [448, 448]  # scaled down in the browser before sending
            assert not errors, errors
    finally:
        stop_server(proc)
    user = sent[-1]["messages"][-1]
    assert user["role"] == "user" and isinstance(user["content"], list)
    kinds = [part["type"] for part in user["content"]]
    assert kinds == ["image_url", "text"] and user["content"][1]["text"] == "What colour are the shapes?"
    assert user["content"][0]["image_url"]["url"].startswith("data:image/png;base64,")
