"""SmolLM2's tokenizer as mmchat builds it from the GGUF vocabulary and merges, against transformers' tokenizer
for the same file and llama.cpp's own (when llama-cpp-python is installed)."""
import pytest

from mmchat.formats import gguf as gguf_format
from mmchat.tokenizer import StreamDecoder, Tokenizer

pytestmark = pytest.mark.slow  # reading the 49k-entry vocabulary three ways takes ~15 s

TEXTS = [
    "Hello world! The capital of France is Paris. I'm sure you're right; it's what we'll see.",
    "你好，世界！今天天气很好，我们去公园散步吧。",
    "def fib(n: int) -> int:\n    return n if n < 2 else fib(n - 1) + fib(n - 2)  # naïve\n\n\tprint(fib(10))\n",
    "emoji 😀🚀🎉 👍🏽 👨‍👩‍👧 and flags 🇫🇷",
    "   three leading spaces,    four inside,\n\n\n\nfour newlines,\r\nCRLF, \t\ttabs, trailing   ",
    "digits 1234567890 3.14159 2026-11-28 $1,000,000 and 007",
    "<|im_start|>system\nYou are helpful.<|im_end|>\n<|im_start|>user\nHi!<|im_end|>\n<|im_start|>assistant\n",
    "<|endoftext|>text after an end token<repo_name>mmchat<file_sep>",
    "Ünïcödé ÅÄÖ русский Ελληνικά العربية हिन्दी",
    " ", "\n", "  \n  ", "a  b", "x" * 50,
]
VARIED = "".join(TEXTS)


@pytest.fixture(scope="module")
def ours(smollm2_path):
    return Tokenizer.from_gguf_data(gguf_format.read_tokenizer_data(gguf_format.open_gguf(str(smollm2_path))))


@pytest.fixture(scope="module")
def hf_tok(smollm2_path):
    transformers = pytest.importorskip("transformers")
    return transformers.AutoTokenizer.from_pretrained(str(smollm2_path.parent), gguf_file=smollm2_path.name)


@pytest.fixture(scope="module")
def llama_cpp_vocab(smollm2_path):
    try:
        import llama_cpp
    except ImportError:
        pytest.skip("llama_cpp (llama-cpp-python) is not installed: it is a benchmark dependency, not a test one")
    return llama_cpp.Llama(str(smollm2_path), vocab_only=True, verbose=False)


@pytest.mark.parametrize("text", TEXTS + [VARIED])
def test_ids_equal_transformers(ours, hf_tok, text):
    assert ours.encode(text) == hf_tok(text, add_special_tokens=False)["input_ids"]


@pytest.mark.parametrize("text", TEXTS + [VARIED])
def test_ids_equal_llama_cpp(ours, llama_cpp_vocab, text):
    assert ours.encode(text) == llama_cpp_vocab.tokenize(text.encode(), add_bos=False, special=True)


def test_special_tokens_are_single_ids(ours):
    ids = ours.encode("<|im_start|>user\nhi<|im_end|>")
    assert ids[0] == ours.token_to_id("<|im_start|>") == 1 and ids[-1] == ours.token_to_id("<|im_end|>") == 2
    assert ours.eos_token_ids == [2] and ours.bos_token_id == 1 and not ours.add_bos
    # digits are split one by one (SmolLM2's pre-tokenizer), so no id covers two digits
    assert len(ours.encode("1234567890")) == 10


@pytest.mark.parametrize("text", TEXTS + [VARIED])
def test_decode_round_trips(ours, text):
    ids = ours.encode(text)
    assert ours.decode(ids, skip_special=False) == text
    # streaming: deltas joined are the whole text, and no delta carries a broken UTF-8 sequence
    stream = StreamDecoder(ours, skip_special=False)
    deltas = [stream.push(i) for i in ids]
    assert "".join(deltas) == text and not any("\ufffd" in d for d in deltas)


def test_decode_skips_special_tokens_by_default(ours):
    assert ours.decode(ours.encode("<|im_start|>assistant\nParis<|im_end|>")) == "assistant\nParis"
