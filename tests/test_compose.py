"""mmchat write and translate: requests built from the writer/translator presets, paragraphs kept."""
import pytest

from mmchat.chat.compose import language, paragraphs, translate, write_request
from mmchat.errors import MMChatError


def test_paragraphs_round_trip():
    text = "First line.\nstill first.\n\nSecond.\n   \n\nThird, after blank lines.\n"
    parts = paragraphs(text)
    assert "".join(p + s for p, s in parts) == text
    assert [p for p, _ in parts] == ["First line.\nstill first.", "Second.", "Third, after blank lines.\n"]


def test_write_request_knobs_and_errors():
    messages, sampling = write_request("poem", "the sea", "short", "funny")
    assert "poem" in messages[-1]["content"] and "the sea" in messages[-1]["content"]
    assert "funny" in messages[0]["content"] and "about 80 words" in messages[0]["content"]
    _, long = write_request("article", "tea", "long")
    assert long["max_tokens"] > sampling["max_tokens"]
    assert write_request("story", "x", 150)[1]["max_tokens"] == int(150 * 1.4) + 48
    for bad in [("essay", "x", "short"), ("poem", " ", "short"), ("poem", "x", "huge"), ("poem", "x", 3)]:
        with pytest.raises(MMChatError):
            write_request(*bad)
    assert language("fr") == "French" and language("klingon") == "Klingon"


@pytest.mark.slow
def test_translate_streams_and_keeps_paragraphs(smollm2):
    text = "Good morning.\n\nThe shop opens at nine.\n\n\nThank you!"
    pieces = list(translate(smollm2, text, "fr", seed=0, max_tokens=32))
    out = "".join(pieces)
    assert len(pieces) > 3  # streamed, not one block
    parts = paragraphs(out)
    assert [s for _, s in parts] == ["\n\n", "\n\n\n", ""]
    assert all(p.strip() for p, _ in parts)
    assert out != text
    with pytest.raises(MMChatError, match="empty"):
        list(translate(smollm2, "  \n", "fr"))
