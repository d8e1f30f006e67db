"""Content generation and translation on top of the writer and translator presets: `mmchat write` and
`mmchat translate`. Both stream; translation goes paragraph by paragraph, so the paragraphs (and the blank lines
between them) of the input survive, and a long text never outgrows the context window."""
from __future__ import annotations

import re
from typing import Iterator

from ..errors import MMChatError
from . import presets

FORMS = {"poem": "a poem", "story": "a short story", "article": "an article"}
LENGTHS = {"short": 80, "medium": 200, "long": 400}  # words
LANGUAGES = {"en": "English", "fr": "French", "de": "German", "es": "Spanish", "it": "Italian", "pt": "Portuguese",
             "nl": "Dutch", "pl": "Polish", "sv": "Swedish", "da": "Danish", "no": "Norwegian", "fi": "Finnish",
             "cs": "Czech", "ru": "Russian", "uk": "Ukrainian", "tr": "Turkish", "el": "Greek", "ja": "Japanese",
             "zh": "Chinese", "ko": "Korean", "ar": "Arabic", "hi": "Hindi"}


def words_for(length: str | int) -> int:
    """short/medium/long or a number of words -> words."""
    if isinstance(length, int) or str(length).isdigit():
        n = int(length)
        if not 10 <= n <= 2000:
            raise MMChatError(f"--length in words must be between 10 and 2000 (got {n})")
        return n
    if length not in LENGTHS:
        raise MMChatError(f"--length must be short, medium, long or a number of words (got {length!r})")
    return LENGTHS[length]


def write_request(form: str, topic: str, length: str | int = "medium", style: str | None = None
                  ) -> tuple[list[dict], dict]:
    """(messages, sampling settings) for writing `form` about `topic` with the writer preset."""
    if form not in FORMS:
        raise MMChatError(f"write what? choose {', '.join(FORMS)} (got {form!r})")
    if not topic or not topic.strip():
        raise MMChatError("give a --topic to write about")
    words = words_for(length)
    values = {"form": FORMS[form], "length": f"about {words} words"}
    if style:
        values["style"] = style
    preset = presets.get("writer", **values)
    messages = [{"role": "system", "content": preset.system_prompt}, *preset.example_messages,
                {"role": "user", "content": f"Write {FORMS[form]} of about {words} words about {topic.strip()}."}]
    # about 1.4 tokens per English word, plus the title and some room to finish the last sentence
    sampling = {**preset.sampling, "max_tokens": int(words * 1.4) + 48}
    return messages, sampling


def write(llm, form: str, topic: str, length: str | int = "medium", style: str | None = None,
          **sampling) -> Iterator[str]:
    messages, settings = write_request(form, topic, length, style)
    return llm.chat(messages, stream=True, **{**settings, **sampling})


def language(code: str) -> str:
    """fr -> French; a full name passes through."""
    if not code or not code.strip():
        raise MMChatError("give a target language, e.g. --to fr")
    return LANGUAGES.get(code.strip().lower(), code.strip().capitalize())


def paragraphs(text: str) -> list[tuple[str, str]]:
    """Text -> [(paragraph, the blank-line separator after it)]; joining them gives the text back."""
    parts = re.split(r"(\n[ \t]*\n\s*)", text)
    out = []
    for i in range(0, len(parts), 2):
        sep = parts[i + 1] if i + 1 < len(parts) else ""
        out.append((parts[i], sep))
    return out


def translate(llm, text: str, target: str, source: str = "English", **sampling) -> Iterator[str]:
    """Stream the translation of `text`, one paragraph at a time, separators kept as they were."""
    if not text.strip():
        raise MMChatError("nothing to translate: the text is empty")
    preset = presets.get("translator", source=language(source), target=language(target))
    settings = {**preset.sampling, **sampling}
    for para, sep in paragraphs(text):
        if para.strip():
            lead = para[: len(para) - len(para.lstrip())]
            messages = [{"role": "system", "content": preset.system_prompt}, *preset.example_messages,
                        {"role": "user", "content": para.strip()}]
            settings["max_tokens"] = min(settings.get("max_tokens", 512), 3 * len(llm.encode(para)) + 16)
            yield lead
            first = True
            for piece in llm.chat(messages, stream=True, stop=["\n\n"], **settings):
                if first:
                    piece, first = piece.lstrip(), False
                yield piece
        else:
            yield para
        yield sep
