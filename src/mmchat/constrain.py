"""Constrained decoding: JSON schemas, regular expressions and Lark grammars as a per-sequence token mask.

Built on llguidance: a Rust Earley parser with a lazy lexer that computes the set of allowed next tokens for
a 49k vocabulary in tens of microseconds, takes JSON schemas ($ref, anyOf, enums, numeric bounds, patterns),
regular expressions and Lark grammars (which may embed JSON schemas), reads a HuggingFace `tokenizers` JSON
directly, and ships as one abi3 wheel with no Python dependencies.

A `Constraint` is a grammar compiled for one tokenizer. It is immutable and shared by every sequence that uses
it (n samples, retries); the sampler asks it for a fresh `Matcher` per row. A matcher follows that row's parse,
writes the allowed next tokens into a row of a bitmask and consumes the token sampled. Once the grammar is
complete the mask allows only the end-of-sequence tokens, so a constrained answer always ends on its own.

    c = Constraint.json_schema({"type": "object", ...}, llm.tokenizer, llm.config.vocab_size, llm.eos_token_ids)
    llm.chat(messages, response_format={"type": "json_schema", "json_schema": {"name": "x", "schema": {...}}})
"""
from __future__ import annotations

import copy
import json
import re
import threading
import weakref

import llguidance
import torch

from .errors import MMChatError

# Compact but readable JSON, and no free whitespace: a small model given the choice pads with newlines and spaces
# until it runs out of tokens.
JSON_OPTIONS = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}

_ll_tokenizers: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()
_ll_lock = threading.Lock()


def ll_tokenizer(tokenizer, vocab_size: int, eos_token_ids: list[int]) -> llguidance.LLTokenizer:
    """llguidance's view of an mmchat Tokenizer (built once per tokenizer, vocabulary size and eos set: ~0.5 s)."""
    key = (vocab_size, tuple(sorted(eos_token_ids)))
    with _ll_lock:
        per_tok = _ll_tokenizers.setdefault(tokenizer, {})
        if key not in per_tok:
            per_tok[key] = llguidance.LLTokenizer(tokenizer.tok.to_str(), n_vocab=vocab_size,
                                                  eos_token=list(key[1]) or None)
        return per_tok[key]


_SCHEMA_MAPS = ("properties", "patternProperties", "$defs", "definitions", "dependentSchemas")
_SCHEMA_LISTS = ("anyOf", "oneOf", "allOf", "prefixItems")
_SCHEMA_ONE = ("items", "additionalProperties", "not", "if", "then", "else", "contains", "unevaluatedProperties")


def _strict(schema):
    """The schema with `additionalProperties: false` wherever an object leaves it open (OpenAI's strict mode):
    the grammar then offers only the declared keys, instead of letting the model invent more."""
    if not isinstance(schema, dict):
        return schema
    out = dict(schema)
    for k in _SCHEMA_MAPS:
        if isinstance(out.get(k), dict):
            out[k] = {name: _strict(s) for name, s in out[k].items()}
    for k in _SCHEMA_LISTS:
        if isinstance(out.get(k), list):
            out[k] = [_strict(s) for s in out[k]]
    for k in _SCHEMA_ONE:
        if isinstance(out.get(k), (dict, list)):
            out[k] = [_strict(s) for s in out[k]] if isinstance(out[k], list) else _strict(out[k])
    if "properties" in out and "additionalProperties" not in out:  # a free-form {"type": "object"} stays free
        out["additionalProperties"] = False
    return out


def check_json_schema(schema, what: str = "the JSON schema") -> dict:
    """A JSON schema given as a dict or JSON text, checked against its meta-schema; MMChatError if it is not one."""
    import jsonschema
    if isinstance(schema, (str, bytes)):
        try:
            schema = json.loads(schema)
        except json.JSONDecodeError as e:
            raise MMChatError(f"{what} is not valid JSON ({e.msg} at line {e.lineno} column {e.colno})") from None
    if not isinstance(schema, dict):
        raise MMChatError(f"{what} must be a JSON object (got {type(schema).__name__})")
    try:
        jsonschema.validators.validator_for(schema).check_schema(schema)
    except jsonschema.SchemaError as e:
        where = "/".join(str(p) for p in e.absolute_path) or "top level"
        raise MMChatError(f"{what} is not a valid JSON schema at {where}: {e.message}") from None
    return schema


class Constraint:
    """A compiled grammar for one tokenizer: `matcher()` gives each sequence its own parse state."""

    def __init__(self, grammar: str, tokenizer, vocab_size: int, eos_token_ids: list[int], kind: str = "grammar",
                 schema: dict | None = None, what: str = "the grammar"):
        self.kind, self.schema = kind, schema  # schema: the JSON schema the output must validate against
        self.vocab_size = vocab_size
        self.eos_token_ids = sorted(eos_token_ids)
        self.tokenizer = ll_tokenizer(tokenizer, vocab_size, eos_token_ids)
        is_error, messages = llguidance.LLMatcher.validate_grammar_with_warnings(grammar, self.tokenizer)
        if is_error:
            message = " ".join((messages[0] if messages else "unknown error").split())
            raise MMChatError(f"{what} cannot be used for constrained output: {message[:300]}")
        self.grammar = grammar

    # -- building ---------------------------------------------------------------------------------------------
    @classmethod
    def json_schema(cls, schema, tokenizer, vocab_size: int, eos_token_ids: list[int], strict: bool = True,
                    what: str = "the JSON schema") -> "Constraint":
        """Output that parses as JSON and validates against `schema` (a dict or JSON text)."""
        schema = check_json_schema(schema, what)
        grammar = llguidance.LLMatcher.grammar_from_json_schema(_strict(schema) if strict else schema,
                                                                overrides=JSON_OPTIONS)
        return cls(grammar, tokenizer, vocab_size, eos_token_ids, "json_schema", schema, what)

    @classmethod
    def json_object(cls, tokenizer, vocab_size: int, eos_token_ids: list[int]) -> "Constraint":
        """Any JSON object (OpenAI's response_format json_object)."""
        grammar = llguidance.LLMatcher.grammar_from_json_schema({"type": "object"}, overrides=JSON_OPTIONS)
        return cls(grammar, tokenizer, vocab_size, eos_token_ids, "json_schema", {"type": "object"})

    @classmethod
    def regex(cls, pattern: str, tokenizer, vocab_size: int, eos_token_ids: list[int]) -> "Constraint":
        """Output that matches the regular expression as a whole (Rust `regex` syntax)."""
        return cls(llguidance.LLMatcher.grammar_from_regex(pattern), tokenizer, vocab_size, eos_token_ids,
                   "regex", what=f"the regular expression {pattern!r:.60}")

    @classmethod
    def lark(cls, grammar: str, tokenizer, vocab_size: int, eos_token_ids: list[int]) -> "Constraint":
        """A context-free grammar in Lark syntax; `%json {...}` embeds a JSON schema."""
        return cls(llguidance.LLMatcher.grammar_from_lark(grammar), tokenizer, vocab_size, eos_token_ids, "lark")

    @classmethod
    def choice(cls, options: list[str], tokenizer, vocab_size: int, eos_token_ids: list[int]) -> "Constraint":
        """Exactly one of the given strings."""
        if not options or not all(isinstance(o, str) and o for o in options):
            raise MMChatError("a choice needs a list of non-empty strings")
        return cls.regex("|".join(re.escape(o) for o in options), tokenizer, vocab_size, eos_token_ids)

    # -- use --------------------------------------------------------------------------------------------------
    def matcher(self) -> "Matcher":
        return Matcher(self)

    def parse(self, text: str):
        """The value of a JSON-constrained output, validated; MMChatError when it is incomplete (cut off by
        max_tokens) or does not validate. Other kinds return the text."""
        if self.kind != "json_schema":
            return text
        try:
            value = json.loads(text)
        except json.JSONDecodeError as e:
            raise MMChatError(f"the output is not complete JSON ({e.msg}); raise max_tokens") from None
        validate(value, self.schema)
        return value

    def __repr__(self):
        return f"Constraint({self.kind})"


def validate(value, schema: dict, what: str = "the output"):
    """MMChatError unless `value` validates against `schema`."""
    import jsonschema
    try:
        jsonschema.validate(value, schema)
    except jsonschema.ValidationError as e:
        where = "/".join(str(p) for p in e.absolute_path) or "top level"
        raise MMChatError(f"{what} does not match its schema at {where}: {e.message}") from None


class Matcher:
    """One sequence's parse state. The sampler calls `fill(bitmask, row)` before sampling and `consume(token)`
    after; both are host work, tens of microseconds per token."""

    def __init__(self, constraint: Constraint):
        self.constraint = constraint
        self.m = llguidance.LLMatcher(constraint.tokenizer, constraint.grammar, log_level=0)

    def fill(self, bitmask: torch.Tensor, row: int):
        """Write the allowed next tokens into row `row` of an int32 CPU bitmask (N, ceil(V / 32))."""
        if self.m.is_error():  # cannot happen with tokens from our own mask; end the sequence if it does
            bitmask[row] = 0
            for t in self.constraint.eos_token_ids:
                bit = t % 32
                bitmask[row, t // 32] |= -(1 << 31) if bit == 31 else 1 << bit  # int32: bit 31 is the sign
            return
        # straight into our tensor's memory (llguidance.torch does the same, but importing it runs torch.compile)
        target = bitmask[row]
        self.m.unsafe_compute_mask_ptr(target.data_ptr(), target.numel() * target.element_size())

    def consume(self, token: int) -> bool:
        return self.m.consume_token(token)

    @property
    def accepting(self) -> bool:
        return self.m.is_accepting()

    @property
    def error(self) -> str:
        return self.m.get_error()


def allocate_bitmask(rows: int, vocab_size: int) -> torch.Tensor:
    """(N, W) int32 on the CPU, contiguous (the matchers write its rows in place), all tokens allowed."""
    return torch.full((rows, (vocab_size + 31) // 32), -1, dtype=torch.int32)


_BITS = torch.arange(32, dtype=torch.int32)


def unpack_bitmask(bitmask: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """int32 bitmask (B, W) -> bool allowed (B, V); bit j of word w is token 32 w + j."""
    bits = (bitmask[:, :, None] >> _BITS) & 1  # (B, W, 32)
    return bits.reshape(bitmask.size(0), -1)[:, :vocab_size].bool()  # (B, V)


def from_response_format(response_format: dict | None, tokenizer, vocab_size: int,
                         eos_token_ids: list[int]) -> Constraint | None:
    """OpenAI's response_format: {"type": "text"}, {"type": "json_object"}, or {"type": "json_schema",
    "json_schema": {"name": ..., "schema": {...}, "strict": true}}. None for plain text."""
    if response_format is None:
        return None
    if not isinstance(response_format, dict) or "type" not in response_format:
        raise MMChatError('response_format must be an object with a "type": text, json_object or json_schema')
    kind = response_format["type"]
    if kind == "text":
        return None
    if kind == "json_object":
        return Constraint.json_object(tokenizer, vocab_size, eos_token_ids)
    if kind == "json_schema":
        spec = response_format.get("json_schema")
        if not isinstance(spec, dict) or "schema" not in spec:
            raise MMChatError('response_format json_schema needs "json_schema": {"name": ..., "schema": {...}}')
        name = spec.get("name", "")
        return Constraint.json_schema(copy.deepcopy(spec["schema"]), tokenizer, vocab_size, eos_token_ids,
                                      strict=spec.get("strict", True) is not False,
                                      what=f"the JSON schema {name!r}" if name else "the JSON schema")
    raise MMChatError(f"unknown response_format type {kind!r}; use text, json_object or json_schema")
