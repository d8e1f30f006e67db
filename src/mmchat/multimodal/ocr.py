"""Reading text in images: PP-OCRv4 text detection and recognition (ONNX) through rapidocr-onnxruntime, the
optional extra `ocr` (`pip install 'mmchat[ocr]'`; its wheel carries the models, so nothing is downloaded).

The small projector sees a word as a few blurry cells and rarely spells it; OCR reads it exactly. The recognized
lines follow the image in the prompt as one line of text, as the image classifier's guesses do for photos:

    read_text(image)   # ["milk"]
    text_hint(lines)   # '(Text in the image: "milk".)'
"""
from __future__ import annotations

import threading
from functools import lru_cache

from ..errors import MMChatError

MIN_SCORE = 0.8      # recognition confidence below this is mostly texture read as letters (a cat's fur, a rocket)
MAX_CHARS = 400      # a page of text is cut here: the hint is context, not a document
MISSING = "reading text in images needs rapidocr-onnxruntime: pip install 'mmchat[ocr]'"

_lock = threading.Lock()


@lru_cache(maxsize=1)
def missing() -> str:
    """Why text in images cannot be read here, in one line ("" when it can)."""
    try:
        import rapidocr_onnxruntime  # noqa: F401
    except ImportError as e:  # not installed, or a library under it (OpenCV's libGL) is not
        return MISSING if e.name == "rapidocr_onnxruntime" else f"{MISSING} ({e})"
    return ""


def available() -> bool:
    return not missing()


@lru_cache(maxsize=1)
def _engine():
    from rapidocr_onnxruntime import RapidOCR

    from ..threads import choose_threads
    threads = choose_threads()  # as many as the model's matmuls use ($MMCHAT_THREADS, or 1 on a busy machine)
    return RapidOCR(intra_op_num_threads=threads, inter_op_num_threads=1)


def read_text(image) -> list[str]:
    """The lines of text in an image (anything vision.open_image reads), top to bottom; [] if there is none.
    Without the `ocr` extra: a one-line MMChatError saying how to install it."""
    from . import vision
    if not available():
        raise MMChatError(missing())
    picture = vision.open_image(image)
    with _lock:  # one ONNX session, not re-entrant across threads
        result, _ = _engine()(picture)
    # rapidocr returns the lines in reading order: [box, text, score] each
    return [text.strip() for _, text, score in (result or []) if score >= MIN_SCORE and text.strip()]


def text_hint(lines: list[str]) -> str:
    """Recognized lines -> the line of context that follows the image ("" when there are none)."""
    text = " / ".join(lines)[:MAX_CHARS]
    return f'(Text in the image: "{text}".)' if text else ""
