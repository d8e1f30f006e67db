"""Speech on the web page, in real headless Chromium against a real server: a message recorded from the
microphone (Chromium's fake capture device plays a clip spoken here by espeak-ng), one from an audio file, and
the Speak button on an answer."""
import json
import shutil

import numpy as np
import pytest

from test_serve import start_server, stop_server
from test_web import web_model

from mmchat.multimodal import audio, speech, speech_eval

playwright_api = pytest.importorskip("playwright.sync_api")
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
pytestmark = [
    pytest.mark.skipif(CHROMIUM is None, reason="needs Debian's chromium (make test installs it)"),
    pytest.mark.skipif(audio.missing() is not None, reason=f"{audio.missing()} (the speech extra)"),
    pytest.mark.skipif(speech.espeak_missing() is not None, reason=str(speech.espeak_missing())),
]
QUESTION = "How many green shapes can you see on the left?"


@pytest.fixture(scope="module")
def served():
    folder = web_model()  # the same tiny model as test_web.py's
    proc, base = start_server(str(folder), "--slots", "2")
    import mmchat
    eos = mmchat.load(str(folder), progress=False).eos_token_ids
    yield base, eos
    stop_server(proc)


@pytest.fixture(scope="module")
def clip(tmp_path_factory):
    """QUESTION spoken, then a second of silence (the fake microphone plays the file in a loop), at 48 kHz."""
    x, rate = speech.synthesize(QUESTION, "espeak")
    x = np.concatenate([audio.resample(x, rate, 48000), np.zeros(48000, np.float32)])
    path = tmp_path_factory.mktemp("speech") / "question.wav"
    path.write_bytes(speech.encode(x, 48000, "wav"))
    return path, len(x) / 48000


def user_messages(page) -> list[str]:
    return page.eval_on_selector_all(".msg.user .content", "els => els.map(e => e.textContent)")


@pytest.mark.slow
def test_record_upload_and_speak(served, clip):
    base, eos = served
    path, seconds = clip
    with playwright_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=[
            "--no-sandbox", "--use-fake-ui-for-media-stream", "--use-fake-device-for-media-stream",
            f"--use-file-for-fake-audio-capture={path}", "--autoplay-policy=no-user-gesture-required"])
        page = browser.new_page()
        errors = []
        page.on("pageerror", lambda e: errors.append(str(e)))

        def no_eos(route):  # keep the tiny model from ending its answer before it says anything
            body = json.loads(route.request.post_data)
            body["logit_bias"] = {str(i): -100 for i in eos}
            route.continue_(post_data=json.dumps(body))

        try:
            page.route("**/v1/chat/completions", no_eos)
            page.goto(base + "/")
            page.wait_for_function("document.getElementById('model-name').textContent.includes('llama-web')")
            page.click("#toggle-settings")
            page.fill("#max_tokens", "12")

            # 1. record from the microphone for one pass of the clip; what was heard is sent as the message
            page.click("#record")
            page.wait_for_function("document.getElementById('record').textContent === 'Stop recording'")
            page.wait_for_timeout(int(seconds * 1000))
            page.click("#record")
            page.wait_for_function("document.querySelectorAll('.msg.user').length === 1", timeout=120_000)
            heard = user_messages(page)[0]
            assert speech_eval.word_errors(QUESTION, heard)[0] <= 3, heard
            page.wait_for_function("!document.getElementById('send').hidden", timeout=120_000)

            # 2. an audio file, through the same route
            page.set_input_files("#audio-file", str(path))
            page.wait_for_function("document.querySelectorAll('.msg.user').length === 2", timeout=120_000)
            assert speech_eval.word_errors(QUESTION, user_messages(page)[1])[0] <= 2
            page.wait_for_function("!document.getElementById('send').hidden", timeout=120_000)

            # 3. Speak plays the answer: the page fetches it from /v1/audio/speech and starts playing
            with page.expect_response("**/v1/audio/speech", timeout=120_000) as spoken:
                page.locator(".msg.assistant .action-speak").last.click()
            r = spoken.value
            assert r.status == 200 and r.headers["content-type"] == "audio/wav"
            assert int(r.headers["content-length"]) > 22050  # more than half a second of 22 kHz 16-bit sound
            page.wait_for_function("Speech.isPlaying() || document.getElementById('status').textContent"
                                   ".startsWith('error')")
            assert page.evaluate("Speech.isPlaying()"), page.text_content("#status")

            # 4. a file that is not audio: the server's one-line error shows, nothing is sent
            bad = path.parent / "notes.txt"
            bad.write_text("not a sound")
            page.set_input_files("#audio-file", str(bad))
            page.wait_for_function("document.getElementById('status').textContent.includes('not in a supported')")
            assert len(user_messages(page)) == 2
            assert errors == []
        finally:
            browser.close()
