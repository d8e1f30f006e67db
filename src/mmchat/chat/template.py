"""Chat templates: the model's own Jinja template, rendered the way transformers' apply_chat_template renders it
(same sandbox, filters, globals and message clean-up), with ChatML when a model ships none."""
from __future__ import annotations

import json
from datetime import datetime

import jinja2
import jinja2.ext
import jinja2.nodes
import jinja2.utils
from jinja2.sandbox import ImmutableSandboxedEnvironment

from ..errors import MMChatError

# Used when a model ships no template: ChatML, which most small chat models were trained on.
CHATML = ("{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + "
          "'<|im_end|>' + '\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")

# Marks the end of the text to continue (continue_final_message); any string the template leaves alone works.
_CONTINUE_TAG = "\x00MMCHAT_CONTINUE\x00"


def _raise(message):
    raise jinja2.exceptions.TemplateError(message)


def _tojson(value, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    # Jinja's own tojson escapes HTML characters, which would change the prompt
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


class _Generation(jinja2.ext.Extension):
    """`{% generation %}...{% endgeneration %}` marks assistant text for training masks; rendering keeps its body."""
    tags = {"generation"}

    def parse(self, parser):
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

    def _body(self, caller):
        return caller()


class _Namespace(jinja2.utils.Namespace):
    """namespace() without underscore attributes, so a template cannot reach Python internals."""

    def __init__(*args, **kwargs):
        self, args = args[0], args[1:]
        attrs = dict(*args, **kwargs)
        for name in attrs:
            _Namespace._check(name)
        jinja2.utils.Namespace.__init__(self, attrs)

    def __setitem__(self, name, value):
        _Namespace._check(name)
        jinja2.utils.Namespace.__setitem__(self, name, value)

    @staticmethod
    def _check(name):
        if isinstance(name, str) and name.startswith("_"):
            raise jinja2.exceptions.SecurityError(f"chat templates cannot set '{name}' on a namespace")


def _environment() -> ImmutableSandboxedEnvironment:
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[_Generation, jinja2.ext.loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    env.globals["dict"] = dict
    env.globals["namespace"] = _Namespace
    return env


def _clean(message: dict) -> dict:
    """Keys whose value is None are dropped (OpenAI clients send content=None with tool calls; templates
    handle a missing key but print 'None'); reasoning is offered under the names templates read."""
    out = {k: v for k, v in message.items() if v is not None}
    reasoning = next((out[k] for k in ("reasoning_content", "thinking", "reasoning") if out.get(k) is not None), None)
    if reasoning is not None:
        out = {"thinking": reasoning, **out, "reasoning_content": reasoning}
    return out


class ChatTemplate:
    """One model's chat template. `render(messages)` gives the prompt text, special tokens written out."""

    def __init__(self, source: str | None, bos_token: str = "", eos_token: str = "", **special_tokens: str):
        self.is_fallback = not source
        self.source = source or CHATML
        try:
            self.template = _environment().from_string(self.source)
        except jinja2.TemplateSyntaxError as e:
            raise MMChatError(f"the model's chat template does not parse (line {e.lineno}: {e.message}); "
                              "give the model a valid template") from None
        self.bos_token, self.eos_token = bos_token, eos_token
        self.special_tokens = {"bos_token": bos_token, "eos_token": eos_token, **special_tokens}

    def render(self, messages: list[dict], add_generation_prompt: bool = True, continue_final_message: bool = False,
               tools: list[dict] | None = None, documents: list[dict] | None = None, **extra) -> str:
        """The prompt for `messages` (OpenAI-style dicts). add_generation_prompt opens the assistant's turn;
        continue_final_message leaves the last message open so the model goes on writing it."""
        for m in messages:
            if not isinstance(m, dict) or "role" not in m:
                raise MMChatError(f"a chat message must be a dict with a 'role' (and 'content'); got {m!r:.80}")
        chat = [_clean(m) for m in messages]
        if continue_final_message:
            if not chat or not isinstance(chat[-1].get("content"), str):
                raise MMChatError("continue_final_message needs a last message with text content")
            final = chat[-1]["content"]
            chat[-1] = {**chat[-1], "content": final + _CONTINUE_TAG}
            add_generation_prompt = False
        try:
            text = self.template.render(messages=chat, tools=tools, documents=documents,
                                        add_generation_prompt=add_generation_prompt,
                                        **{**self.special_tokens, **extra})
        except jinja2.exceptions.TemplateError as e:
            raise MMChatError(f"the chat template refused these messages: {e}") from None
        if continue_final_message:
            if _CONTINUE_TAG not in text:
                raise MMChatError("the chat template dropped the message to continue")
            text = text[: text.rindex(_CONTINUE_TAG)]
        return text

    def __repr__(self):
        return f"ChatTemplate({'ChatML fallback' if self.is_fallback else f'{len(self.source)} chars'})"
