"""Text <-> token ids with HF `tokenizers`, built from a GGUF vocabulary and merges or from tokenizer files."""
from __future__ import annotations

import json
from pathlib import Path

from tokenizers import AddedToken, Regex, Tokenizer as HFTokenizer, decoders, models, pre_tokenizers

from .errors import MMChatError

# Pre-tokenizer split patterns of the BPE families llama.cpp names in `tokenizer.ggml.pre`.
LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                r"|\s*[\r\n]+|\s+(?!\S)|\s+")
QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
               r"|\s*[\r\n]+|\s+(?!\S)|\s+")


def _byte_level_pre_tokenizer(pre: str | None):
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    if pre in (None, "gpt2", "gpt-2", "default"):  # llama.cpp's converter names GPT-2's own split "gpt-2"
        return byte_level
    if pre in ("smollm", "starcoder", "refact"):  # GPT-2's split, digits one by one
        return pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
    split = {"llama-bpe": LLAMA3_SPLIT, "llama3": LLAMA3_SPLIT, "smaug-bpe": LLAMA3_SPLIT, "qwen2": QWEN2_SPLIT}
    if pre in split:
        return pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(split[pre]), behavior="isolated"),
                                        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    raise MMChatError(f"unsupported tokenizer pre-type '{pre}'; supported: gpt2, smollm, starcoder, llama-bpe, qwen2")


class Tokenizer:
    """A thin wrapper: encode/decode plus the ids of the special tokens the engine needs."""

    def __init__(self, tok: HFTokenizer, bos_token_id: int | None = None, eos_token_ids: list[int] | None = None,
                 add_bos: bool = False):
        self.tok = tok
        self.bos_token_id = bos_token_id
        self.eos_token_ids = list(eos_token_ids or [])
        self.add_bos = add_bos
        self.special_ids = {t.content: i for i, t in tok.get_added_tokens_decoder().items() if t.special}

    # -- building -------------------------------------------------------------------------------------------
    @classmethod
    def from_gguf_data(cls, data: dict) -> "Tokenizer":
        kind = data.get("model")
        if kind != "gpt2":
            raise MMChatError(f"unsupported GGUF tokenizer model '{kind}'; mmchat reads byte-level BPE ('gpt2')")
        tokens = data["tokens"]
        vocab = {t: i for i, t in enumerate(tokens)}
        merges = [tuple(m.split(" ", 1)) for m in data["merges"] or []]
        tok = HFTokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False, byte_fallback=False))
        tok.pre_tokenizer = _byte_level_pre_tokenizer(data.get("pre"))
        tok.decoder = decoders.ByteLevel()
        types = data.get("token_type") or []
        # control (3) and user-defined (4) tokens are matched whole in text, like <|im_start|>
        specials = [AddedToken(tokens[i], special=True, normalized=False)
                    for i, t in enumerate(types) if t in (3, 4)]
        tok.add_special_tokens(specials)
        eos = [data[k] for k in ("eos_token_id", "eot_token_id") if data.get(k) is not None]
        return cls(tok, data.get("bos_token_id"), sorted(set(eos)), bool(data.get("add_bos_token")))

    @classmethod
    def from_folder(cls, folder: Path) -> "Tokenizer":
        config = _read_json(folder / "tokenizer_config.json")
        config.update({k: v for k, v in _read_json(folder / "special_tokens_map.json").items() if k not in config})
        if (folder / "tokenizer.json").exists():
            tok = HFTokenizer.from_file(str(folder / "tokenizer.json"))
        elif (folder / "vocab.json").exists() and (folder / "merges.txt").exists():
            tok = HFTokenizer(models.BPE.from_file(str(folder / "vocab.json"), str(folder / "merges.txt")))
            tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
            tok.decoder = decoders.ByteLevel()
        else:
            raise MMChatError(f"{folder} has no tokenizer.json (or vocab.json + merges.txt)")

        def token_id(key):
            value = config.get(key)
            if isinstance(value, dict):
                value = value.get("content")
            if value is None:
                return None
            tid = tok.token_to_id(value)
            if tid is not None:
                tok.add_special_tokens([AddedToken(value, special=True, normalized=False)])
            return tid
        bos, eos = token_id("bos_token"), token_id("eos_token")
        return cls(tok, bos, [eos] if eos is not None else [], False)

    # -- use ------------------------------------------------------------------------------------------------
    @property
    def vocab_size(self) -> int:
        return self.tok.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str, add_bos: bool | None = None) -> list[int]:
        """Text -> ids. Special tokens written in the text (e.g. <|im_start|>) become their ids."""
        ids = self.tok.encode(text, add_special_tokens=True).ids
        if (self.add_bos if add_bos is None else add_bos) and self.bos_token_id is not None:
            if not ids or ids[0] != self.bos_token_id:
                ids = [self.bos_token_id] + ids
        return ids

    def decode(self, ids: list[int], skip_special: bool = True) -> str:
        return self.tok.decode(list(ids), skip_special_tokens=skip_special)

    def id_to_token(self, i: int) -> str:
        return self.tok.id_to_token(i)

    def token_to_id(self, token: str) -> int | None:
        return self.tok.token_to_id(token)

    def token_text(self, i: int) -> str:
        """How one token reads on its own (byte-level symbols turned back into text where possible)."""
        return self.tok.decode([i], skip_special_tokens=False)


class StreamDecoder:
    """Turns a growing list of ids into text deltas, holding back incomplete UTF-8 sequences."""

    def __init__(self, tokenizer: Tokenizer, skip_special: bool = True):
        self.tokenizer = tokenizer
        self.skip_special = skip_special
        self.ids: list[int] = []
        self.text = ""

    def push(self, token_id: int) -> str:
        self.ids.append(token_id)
        text = self.tokenizer.decode(self.ids, self.skip_special)
        if text.endswith("\ufffd"):
            return ""  # a multi-byte character is not complete yet
        delta, self.text = text[len(self.text):], text
        return delta


def _read_json(path: Path) -> dict:
    if not path.exists():
        return {}
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise MMChatError(f"{path} is not valid JSON ({e}); fix or replace it") from None
