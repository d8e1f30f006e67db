"""Text in images: OCR (rapidocr-onnxruntime, the `ocr` extra) reads words drawn by Pillow, and its line follows the
image in the prompt, so the real SmolLM2 answers with the word."""
import logging

import pytest

import mmchat
from mmchat.errors import MMChatError
from mmchat.multimodal import ocr, scenes
from mmchat.multimodal import projector as P

needs_ocr = pytest.mark.skipif(not ocr.available(), reason=ocr.missing())


def scene_with_word(word: str, index: int = 0) -> scenes.Scene:
    s = next(s for s in (scenes.make_scene("val", i) for i in range(index, 200)) if s.word)
    s.word = word
    return s


@needs_ocr
@pytest.mark.parametrize("word", ["milk", "door", "house"])  # "house" is not one of the training words
def test_reads_the_word_of_a_scene(word):
    image = scenes.draw(scene_with_word(word))
    assert ocr.read_text(image) == [word]
    assert ocr.text_hint([word]) == f'(Text in the image: "{word}".)'


@needs_ocr
def test_reads_lines_in_order_and_nothing_in_scenes_without_text():
    from PIL import Image, ImageDraw, ImageFont
    im = Image.new("RGB", (320, 160), (250, 250, 245))
    d = ImageDraw.Draw(im)
    font = ImageFont.load_default(size=30)
    d.text((20, 20), "Open", fill=(0, 0, 0), font=font)
    d.text((20, 90), "Monday", fill=(0, 0, 0), font=font)
    assert ocr.read_text(im) == ["Open", "Monday"]
    plain = [s for s in (scenes.make_scene("val", i) for i in range(12)) if not s.word]
    assert plain and all(ocr.read_text(scenes.draw(s)) == [] for s in plain)  # shapes are not read as letters


def test_without_the_extra_images_still_work_and_it_is_said_once(monkeypatch, caplog):
    monkeypatch.setattr(ocr, "missing", lambda: ocr.MISSING)  # as without the extra
    monkeypatch.setattr(P, "_no_ocr_said", P.threading.Event())
    with pytest.raises(MMChatError, match=r"pip install 'mmchat\[ocr\]'"):
        ocr.read_text(scenes.draw(scene_with_word("cat")))
    with caplog.at_level(logging.WARNING, logger="mmchat.vision"):
        assert P.text_in(scenes.draw(scene_with_word("cat"))) == ""
        assert P.text_in(scenes.draw(scene_with_word("cat"))) == ""
    notices = [r.getMessage() for r in caplog.records if r.name == "mmchat.vision"]
    assert notices == [f"text in images is not read: {ocr.MISSING}"]


@needs_ocr
@pytest.mark.slow
def test_the_ocr_line_follows_the_image_in_the_chat_prompt(smollm2_path):
    llm = mmchat.load(str(smollm2_path), progress=False)
    for k, word in enumerate(["fish", "lamp"]):
        image = scenes.draw(scene_with_word(word, index=k * 10))
        ids, blocks = llm.chat_prompt("What word is written in the image?", images=[image])
        text = llm.decode(ids)
        assert f'(Text in the image: "{word}".)' in text  # after the image's 49 slots, before the question
        assert text.index("(Text in the image") < text.index("What word")
