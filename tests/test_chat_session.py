"""The Chat object with the real SmolLM2: history, presets, the context window, KV reuse, stop, save/resume."""
import pytest

import mmchat
from mmchat.api import LLM
from mmchat.chat.session import Chat, Message, model_defaults
from mmchat.chat.store import Store
from mmchat.chat.template import ChatTemplate
from mmchat.errors import MMChatError

FAST = dict(temperature=0, max_tokens=12)


@pytest.mark.slow
def test_turns_reuse_the_cache_and_history_is_kept(smollm2):
    chat = mmchat.Chat(smollm2, system="You are a friendly assistant.", **FAST)
    questions = ["Hello!", "What is the capital of France?", "And of Italy?", "Thanks. Name a fruit.",
                 "Name a colour."]
    stats = []
    for q in questions:
        answer = chat.send(q)
        assert answer and chat.last.new_tokens > 0
        stats.append(chat.last)
    assert [m["role"] for m in chat.history] == ["system"] + ["user", "assistant"] * 5
    assert [m["content"] for m in chat.history[1::2]] == questions
    assert stats[0].cached_tokens == 0 or stats[0].cached_tokens < stats[0].prompt_tokens
    for before, now in zip(stats, stats[1:]):
        assert now.prompt_tokens > before.prompt_tokens + before.new_tokens  # the whole conversation is sent
        # ... but only the new turn is computed: what was sent and answered before comes from the cache
        assert now.cached_tokens >= before.prompt_tokens
        assert now.prefilled_tokens < 40
    assert stats[-1].prefilled_tokens < stats[-1].prompt_tokens / 3


def test_stream_stop_undo_regenerate(smollm2):
    chat = Chat(smollm2, temperature=0, max_tokens=40)
    pieces = chat.stream("Tell me a story about a cat.")
    first = next(pieces)
    pieces.close()  # the caller stops early (what Ctrl-C does in the terminal)
    assert chat.last.finish_reason == "stopped"
    assert chat.messages[-1].role == "assistant" and chat.messages[-1].content.startswith(first.strip())
    assert chat.messages[-1].meta["finish_reason"] == "stopped"
    again = "".join(chat.regenerate(max_tokens=6))
    assert len(chat.messages) == 2 and chat.messages[-1].content == again.strip()
    removed = chat.undo()
    assert [m.role for m in removed] == ["user", "assistant"] and chat.messages == []
    with pytest.raises(MMChatError, match="nothing to undo"):
        chat.undo()
    with pytest.raises(MMChatError, match="empty"):
        chat.send("   ")


@pytest.mark.slow
def test_context_window_drops_oldest_turns_openly(smollm2):
    notices = []
    chat = Chat(smollm2, system="You are Bob.", context=200, on_notice=notices.append, **FAST)
    for i in range(8):
        chat.send(f"Turn {i}: tell me something about the number {i}.")
    assert any("oldest turn" in n and "left out" in n for n in notices)
    assert len(chat.history) == 1 + 16  # nothing is lost from the history
    seen = chat.context_messages
    assert seen[0] == {"role": "system", "content": "You are Bob."}  # the system prompt stays
    assert seen[1]["role"] == "user" and "Turn 0" not in seen[1]["content"]
    assert chat.last.prompt_tokens <= 200
    with pytest.raises(MMChatError, match="context window holds 200"):
        chat.send("word " * 400)
    assert len(chat.history) == 17  # the refused message was not added; the session goes on
    assert chat.send("Hi")


def test_presets_and_model_defaults(smollm2):
    d = model_defaults(smollm2)
    assert d["repetition_penalty"] > 1 and 0 < d["temperature"] < 1  # SmolLM2 gets its anti-loop settings
    chat = Chat(smollm2, preset="translator", preset_vars={"target": "German"})
    assert "into German" in chat.history[0]["content"] and chat.params().temperature == 0.1
    chat.set_sampling(temperature=0.5)
    assert chat.params().temperature == 0.5
    with pytest.raises(MMChatError, match="unknown sampling setting"):
        chat.set_sampling(temprature=1)
    chat.set_preset("customer-service")
    assert "order number" in chat.system and chat.params().max_tokens == 256
    assert [m["role"] for m in chat.context_messages] == ["system", "user", "assistant", "user", "assistant"]
    chat.system = "Only say yes."
    assert chat.history[0]["content"] == "Only say yes."
    with pytest.raises(MMChatError, match="no preset"):
        chat.set_preset("nope")


def test_save_resume_and_export(smollm2, tmp_path):
    store = Store(tmp_path / "c.db")
    idle = Chat(smollm2, store=store)
    assert idle.conversation_id and store.list() == []  # a conversation is written with its first message
    chat = Chat(smollm2, preset="writer", preset_vars={"form": "a poem"}, **FAST)
    chat.send("Write about the sea.")
    cid = chat.save(store=store, title="Sea")  # everything so far is written, later turns as they happen
    chat.send("Shorter, please.")
    back = Chat.resume(cid[:6], smollm2, store)
    assert back.history == chat.history and back.preset.name == "writer"
    assert "a poem" in back.system and back.sampling == chat.sampling
    back.send("One more line.")
    assert len(store.get(cid).messages) == 6 and store.get(cid).title == "Sea"
    md = back.save(tmp_path / "sea.md")
    assert "Write about the sea." in md.read_text()
    with pytest.raises(MMChatError, match="no saved conversation"):
        Chat.resume("ffffffff", smollm2, store)


def test_template_without_system_role_gets_the_prompt_in_the_first_turn(smollm2):
    gemma_like = ("{% for m in messages %}{% if m['role'] == 'system' %}{{ raise_exception('System role not "
                  "supported') }}{% endif %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n' }}"
                  "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
    llm = LLM(smollm2.model, smollm2.tokenizer, ChatTemplate(gemma_like), name="no-system")
    chat = Chat(llm, system="Always answer in French.", context=128)
    ids, _ = chat._prompt([Message("user", "Hello")], reserve=16)
    text = smollm2.tokenizer.decode(ids, skip_special=False)
    assert text.startswith("<|im_start|>user\nAlways answer in French.\n\nHello")


def test_a_model_without_template_says_it_uses_chatml(smollm2):
    notices = []
    llm = LLM(smollm2.model, smollm2.tokenizer, ChatTemplate(None), name="no-template")
    chat = Chat(llm, on_notice=notices.append, context=128)
    assert notices == ["this model has no chat template; using ChatML"]
    ids, _ = chat._prompt([Message("user", "Hi")], reserve=16)
    assert smollm2.tokenizer.decode(ids, skip_special=False) == "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
