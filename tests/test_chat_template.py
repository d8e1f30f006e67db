"""Chat templates render exactly what transformers' apply_chat_template renders for the same messages."""
import json

import pytest

from mmchat.chat.template import CHATML, ChatTemplate
from mmchat.errors import MMChatError
from mmchat.formats.hf import read_chat_template

# Templates as published in the tokenizer_config.json of well-known chat models (Llama 3, Zephyr, Gemma, Qwen2.5):
# they exercise trim_blocks/lstrip_blocks, whitespace control, filters, namespaces, raise_exception, tools.
LLAMA3 = ("{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = "
          "'<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim + "
          "'<|eot_id|>' %}{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}{{ content }}"
          "{% endfor %}{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}"
          "{% endif %}")
ZEPHYR = ("{% for message in messages %}\n{% if message['role'] == 'user' %}\n{{ '<|user|>\n' + message['content'] + "
          "eos_token }}\n{% elif message['role'] == 'system' %}\n{{ '<|system|>\n' + message['content'] + eos_token }}"
          "\n{% elif message['role'] == 'assistant' %}\n{{ '<|assistant|>\n'  + message['content'] + eos_token }}\n"
          "{% endif %}\n{% if loop.last and add_generation_prompt %}\n{{ '<|assistant|>' }}\n{% endif %}\n{% endfor %}")
GEMMA = ("{{ bos_token }}{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') }}"
         "{% endif %}{% for message in messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
         "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
         "{% if (message['role'] == 'assistant') %}{% set role = 'model' %}{% else %}{% set role = message['role'] %}"
         "{% endif %}{{ '<start_of_turn>' + role + '\n' + message['content'] | trim + '<end_of_turn>\n' }}"
         "{% endfor %}{% if add_generation_prompt %}{{'<start_of_turn>model\n'}}{% endif %}")
QWEN25 = """{%- if tools %}
    {{- '<|im_start|>system\\n' }}
    {%- if messages[0]['role'] == 'system' %}
        {{- messages[0]['content'] }}
    {%- else %}
        {{- 'You are Qwen, created by Alibaba Cloud. You are a helpful assistant.' }}
    {%- endif %}
    {{- "\\n\\n# Tools\\n\\nYou may call one or more functions to assist with the user query.\\n\\nYou are provided with function signatures within <tools></tools> XML tags:\\n<tools>" }}
    {%- for tool in tools %}
        {{- "\\n" }}
        {{- tool | tojson }}
    {%- endfor %}
    {{- "\\n</tools>\\n\\nFor each function call, return a json object with function name and arguments within <tool_call></tool_call> XML tags:\\n<tool_call>\\n{\\"name\\": <function-name>, \\"arguments\\": <args-json-object>}\\n</tool_call><|im_end|>\\n" }}
{%- else %}
    {%- if messages[0]['role'] == 'system' %}
        {{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}
    {%- else %}
        {{- '<|im_start|>system\\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\\n' }}
    {%- endif %}
{%- endif %}
{%- set ns = namespace(turns=0) %}
{%- for message in messages %}
    {%- if (message.role == "user") or (message.role == "system" and not loop.first) or (message.role == "assistant" and not message.tool_calls) %}
        {%- set ns.turns = ns.turns + 1 %}
        {{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}
    {%- elif message.role == "assistant" %}
        {{- '<|im_start|>' + message.role }}
        {%- if message.content %}
            {{- '\\n' + message.content }}
        {%- endif %}
        {%- for tool_call in message.tool_calls %}
            {%- if tool_call.function is defined %}
                {%- set tool_call = tool_call.function %}
            {%- endif %}
            {{- '\\n<tool_call>\\n{"name": "' }}
            {{- tool_call.name }}
            {{- '", "arguments": ' }}
            {{- tool_call.arguments | tojson }}
            {{- '}\\n</tool_call>' }}
        {%- endfor %}
        {{- '<|im_end|>\\n' }}
    {%- elif message.role == "tool" %}
        {%- if (loop.index0 == 0) or (messages[loop.index0 - 1].role != "tool") %}
            {{- '<|im_start|>user' }}
        {%- endif %}
        {{- '\\n<tool_response>\\n' }}
        {{- message.content }}
        {{- '\\n</tool_response>' }}
        {%- if loop.last or (messages[loop.index0 + 1].role != "tool") %}
            {{- '<|im_end|>\\n' }}
        {%- endif %}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\\n' }}
{%- endif %}
"""

SYSTEM = {"role": "system", "content": "You are terse. Answer in one line."}
TURNS = [
    {"role": "user", "content": "  Hello there!  "},
    {"role": "assistant", "content": "Hi. What do you need?"},
    {"role": "user", "content": "Name 3 colours, with \"quotes\" & <tags>."},
]
TOOL_TURNS = [
    {"role": "user", "content": "Weather in Paris?"},
    {"role": "assistant", "content": None,
     "tool_calls": [{"type": "function", "function": {"name": "weather", "arguments": {"city": "Paris"}}}]},
    {"role": "tool", "content": "{\"temp_c\": 18}"},
    {"role": "assistant", "content": "It is 18 °C in Paris."},
    {"role": "user", "content": "Thanks"},
]
TOOLS = [{"type": "function", "function": {"name": "weather", "description": "Current weather",
                                           "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}]

# (name, template, special tokens, conversations it accepts)
CASES = [
    ("llama3", LLAMA3, {"bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>"},
     [[SYSTEM, *TURNS], TURNS, TURNS[:1]]),
    ("zephyr", ZEPHYR, {"bos_token": "<s>", "eos_token": "</s>"}, [[SYSTEM, *TURNS], TURNS, TURNS[:2]]),
    ("gemma", GEMMA, {"bos_token": "<bos>", "eos_token": "<eos>"}, [TURNS, TURNS[:1]]),
    ("qwen2.5", QWEN25, {"bos_token": None, "eos_token": "<|im_end|>"}, [[SYSTEM, *TURNS], TURNS, TOOL_TURNS]),
    ("no template (ChatML)", None, {"bos_token": "<s>", "eos_token": "</s>"}, [[SYSTEM, *TURNS], TURNS]),
]


def _tokenizer_folder(path, template, special):
    """A real tokenizer folder (tokenizer.json + tokenizer_config.json) that transformers loads."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    words = ["<unk>"] + [t for t in special.values() if t] + ["hello", "world"]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(dict.fromkeys(words))}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    path.mkdir()
    tok.save(str(path / "tokenizer.json"))
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "unk_token": "<unk>",
              **{k: v for k, v in special.items() if v}}
    if template is not None:
        config["chat_template"] = template
    (path / "tokenizer_config.json").write_text(json.dumps(config))
    return path


@pytest.mark.parametrize("name,template,special,conversations", CASES, ids=[c[0] for c in CASES])
def test_same_text_as_transformers(tmp_path, name, template, special, conversations):
    transformers = pytest.importorskip("transformers")
    folder = _tokenizer_folder(tmp_path / "tok", template, special)
    hf = transformers.AutoTokenizer.from_pretrained(str(folder))
    ours = ChatTemplate(read_chat_template(folder), special.get("bos_token") or "", special.get("eos_token") or "")
    assert ours.is_fallback == (template is None)
    if template is None:
        hf.chat_template = CHATML  # transformers has no default any more; ChatML is ours
    for messages in conversations:
        tools = TOOLS if messages is TOOL_TURNS else None
        for add in (True, False):
            want = hf.apply_chat_template(messages, tools=tools, tokenize=False, add_generation_prompt=add)
            got = ours.render(messages, add_generation_prompt=add, tools=tools)
            assert got == want, (name, add)
        assert ours.render(messages, True) != ours.render(messages, False)


def test_continue_final_message_matches_transformers(tmp_path):
    transformers = pytest.importorskip("transformers")
    folder = _tokenizer_folder(tmp_path / "tok", LLAMA3, CASES[0][2])
    hf = transformers.AutoTokenizer.from_pretrained(str(folder))
    messages = [*TURNS, {"role": "assistant", "content": "Red, green and"}]
    want = hf.apply_chat_template(messages, tokenize=False, continue_final_message=True)
    got = ChatTemplate(LLAMA3, "<|begin_of_text|>", "<|eot_id|>").render(messages, continue_final_message=True)
    assert got == want and got.endswith("Red, green and")


@pytest.mark.slow
def test_smollm2_template_from_gguf_matches_transformers(smollm2_path):
    """The embedded model's own template, read from the GGUF by mmchat and by transformers."""
    transformers = pytest.importorskip("transformers")
    from mmchat.formats.load import load_checkpoint
    hf = transformers.AutoTokenizer.from_pretrained(str(smollm2_path.parent), gguf_file=smollm2_path.name)
    ckpt = load_checkpoint(smollm2_path)
    ours = ChatTemplate(ckpt.chat_template, "<|im_start|>", "<|im_end|>")
    assert not ours.is_fallback and ours.source == hf.chat_template
    for messages in ([SYSTEM, *TURNS], TURNS, TURNS[:1]):
        for add in (True, False):
            assert ours.render(messages, add) == hf.apply_chat_template(messages, tokenize=False,
                                                                        add_generation_prompt=add)
    assert "SmolLM" in ours.render(TURNS[:1])  # its default system prompt when none is given


def test_template_errors_are_one_line():
    with pytest.raises(MMChatError, match="does not parse"):
        ChatTemplate("{% for m in messages %}")
    with pytest.raises(MMChatError, match="System role not supported"):
        ChatTemplate(GEMMA, "<bos>").render([SYSTEM, *TURNS])
    with pytest.raises(MMChatError, match="role"):
        ChatTemplate(None).render([{"content": "no role"}])


def test_generation_tag_and_sandbox():
    t = ChatTemplate("{% for m in messages %}{% generation %}[{{ m.content }}]{% endgeneration %}{% endfor %}")
    assert t.render([{"role": "assistant", "content": "x"}], False) == "[x]"
    with pytest.raises(MMChatError):  # the sandbox refuses Python internals
        ChatTemplate("{{ messages.__class__.__mro__ }}").render(TURNS)
