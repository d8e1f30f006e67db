"""Images over HTTP: OpenAI image_url content parts (data URIs) through `mmchat serve`, driven by the official
`openai` client; bad images and a model without a projector get one-line 400s, a 50 MB upload a clear 413."""
import base64
import io
import sys
from pathlib import Path

import httpx
import openai
import pytest

from mmchat.multimodal import scenes

sys.path.insert(0, str(Path(__file__).parent))
import tiny_models as tm  # noqa: E402
from test_serve import start_server, stop_server  # noqa: E402


def data_uri(image, fmt="PNG") -> str:
    buf = io.BytesIO()
    image.save(buf, format=fmt)
    return f"data:image/{fmt.lower()};base64," + base64.b64encode(buf.getvalue()).decode()


def image_message(url: str, text: str = "What colour are the shapes?") -> list[dict]:
    return [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}},
                                         {"type": "text", "text": text}]}]


@pytest.fixture(scope="module")
def tiny_server():
    path = tm.workdir() / "llama-serve-vision"
    if not path.exists():
        tm.save_hf_folder(tm.llama_model(tm.tokenizer().get_vocab_size(), ctx=512, seed=12), tm.tokenizer(), path)
    proc, base = start_server(str(path))
    yield base
    stop_server(proc)


def error_of(r: httpx.Response) -> dict:
    return r.json()["error"]


def test_image_url_is_refused_not_fetched(tiny_server):
    r = httpx.post(tiny_server + "/v1/chat/completions", timeout=30,
                   json={"model": "llama-serve-vision", "messages": image_message("https://example.com/cat.png")})
    assert r.status_code == 400
    err = error_of(r)
    assert "not fetched" in err["message"] and "data:image/png;base64" in err["message"]
    assert err["code"] == "image_url_not_supported"


def test_model_without_projector(tiny_server):
    client = openai.OpenAI(base_url=tiny_server + "/v1", api_key="none", max_retries=0)
    img = scenes.draw(scenes.make_scene("val", 0))
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="llama-serve-vision", messages=image_message(data_uri(img)))
    assert "has no image projector" in str(e.value) and e.value.status_code == 400


def test_fifty_megabyte_upload(tiny_server):
    blob = base64.b64encode(b"\x89PNG" + bytes(50 * 1024 * 1024)).decode()
    r = httpx.post(tiny_server + "/v1/chat/completions", timeout=120, json={
        "model": "llama-serve-vision", "messages": image_message("data:image/png;base64," + blob)})
    assert r.status_code == 413
    assert "bytes" in error_of(r)["message"] and "\n" not in error_of(r)["message"]


@pytest.mark.slow
def test_smollm2_reads_an_image_over_http(smollm2_path):
    """The real model with the shipped projector: the answer names the scene's shape; a corrupt image is a 400."""
    proc, base = start_server(str(smollm2_path), "--slots", "2")
    try:
        client = openai.OpenAI(base_url=base + "/v1", api_key="none", max_retries=0)
        right = 0
        for i in range(4):
            s = scenes.make_scene("val", i)
            r = client.chat.completions.create(model=smollm2_path.stem, temperature=0, max_tokens=16,
                                               messages=image_message(data_uri(scenes.draw(s), "JPEG"),
                                                                      "What shape is in the image?"))
            right += scenes.grade("shape", s, r.choices[0].message.content)
            assert r.usage.prompt_tokens > 49  # the image's 49 slots are part of the prompt
        assert right >= 3
        with pytest.raises(openai.BadRequestError) as e:
            client.chat.completions.create(model=smollm2_path.stem, messages=image_message(
                "data:image/png;base64," + base64.b64encode(b"\x89PNG\r\n\x1a\nbroken").decode()))
        assert "not a readable image" in str(e.value)
    finally:
        stop_server(proc)
