"""Tools and a knowledge base inside a conversation (mmchat.Chat, the terminal chat, the server's presets).

A turn with a knowledge base retrieves first: with no relevant passage the answer is that the shop's documents do
not say (the model is not asked); otherwise the model answers from the numbered passages and the answer cites
them ([1], kept in the message's meta as sources). A turn with tools lets the model call them: the calls run,
their results go back through the chat template, and the model answers from them. Each call is shown as it
happens (`Chat.on_tool`) and kept in the answer's meta.

A 135M model picks among tools almost at random, so the tool for a message is first looked up among the tools'
example requests (word overlap, as a user would phrase them); a clear match makes that tool the named
tool_choice, otherwise the model chooses (auto). The arguments always come from the model, under the grammar.

    chat = mmchat.Chat(llm, preset="personal-assistant")     # the calendar, the clock and the calculator
    chat.send("Add Dentist on 2026-12-03 at 09:30.")
    chat = mmchat.Chat(llm, preset="customer-service")       # retrieves from the knowledge base
"""
from __future__ import annotations

import json
import re
from dataclasses import replace
from datetime import date
from typing import Iterator

from ..errors import MMChatError
from .knowledge import DONT_KNOW, KnowledgeBase, Passage, grounded_messages
from .tools import (CALL_OPEN, ToolRegistry, parse_tool_calls, prepare_messages, resolve_choice,
                    tool_constraint)

BUILTIN_TOOLS = ("calendar", "datetime", "calculator")  # what a preset's `tools = [...]` may name
_WORD = re.compile(r"[a-z]+|[0-9]+")
# words that say nothing about which tool is meant
_FILLER = set("""a an the i me my you your is are was be do does did have has on at in of for to and or it this
that what which when please can could would will with from by about""".split())


# -- what a preset asks for ------------------------------------------------------------------------------------
def builtin_tools(names=BUILTIN_TOOLS, calendar_path=None) -> ToolRegistry:
    """The built-in tools by name: calendar (events and reminders in $MMCHAT_HOME/calendar.db, or
    calendar_path), datetime, calculator."""
    from .calendar import Calendar
    from .store import data_dir
    unknown = set(names) - set(BUILTIN_TOOLS)
    if unknown:
        raise MMChatError(f"unknown built-in tool(s) {', '.join(sorted(unknown))}; known: {', '.join(BUILTIN_TOOLS)}")
    every = ToolRegistry.builtin(Calendar(calendar_path or data_dir() / "calendar.db") if "calendar" in names
                                 else None)
    keep = {"datetime": ["current_datetime"], "calculator": ["calculator"],
            "calendar": ["add_event", "list_events", "move_event", "delete_event", "add_reminder", "list_reminders"]}
    wanted = {t for n in names for t in keep[n]}
    return ToolRegistry([t for name, t in every.tools.items() if name in wanted])


def open_knowledge(where: str | None) -> tuple[KnowledgeBase, str | None]:
    """A preset's `knowledge`: "sample" (the sample shop), "default" (the user's $MMCHAT_HOME/kb.db, or the sample
    shop while that is empty) or a path to a kb.db. -> (the knowledge base, a notice or None)."""
    from pathlib import Path

    from .knowledge import default_path
    if where == "sample":
        return KnowledgeBase.sample(), None
    if where in (None, "", "default"):
        path = default_path()
        if path.exists():
            kb = KnowledgeBase(path)
            if kb.documents():
                return kb, None
            kb.close()
        return KnowledgeBase.sample(), (f"the knowledge base {path} is empty: answering from the sample shop's "
                                        "documents (mmchat kb add DIR adds yours)")
    path = Path(where).expanduser()
    if not path.exists():
        raise MMChatError(f"knowledge base {path} does not exist; create it with: mmchat kb add DIR --db {path}")
    return KnowledgeBase(path), None


# -- choosing a tool -------------------------------------------------------------------------------------------
def _words(text: str) -> set[str]:
    # numbers all look alike ("on 2026-12-03 at 09:30" is the shape of a date and a time, whatever the values)
    return {"0" if w.isdigit() else w for w in _WORD.findall(text.lower()) if w not in _FILLER}


def route(tools: ToolRegistry, message: str, threshold: float = 0.5) -> str | None:
    """The tool whose example requests the message resembles most (Dice overlap of their words, 2|A&B| / (|A| +
    |B|), at least `threshold` and ahead of every other tool), or None: let the model choose."""
    said = _words(message)
    scores = []
    for tool in tools.tools.values():
        best = max((2 * len(said & w) / (len(said) + len(w)) for req, _ in tool.examples for w in [_words(req)]
                    if said or w), default=0.0)
        scores.append((best, tool.name))
    scores.sort(reverse=True)
    if not scores or scores[0][0] < threshold or (len(scores) > 1 and scores[1][0] >= scores[0][0]):
        return None
    return scores[0][1]


def _pieces(gen, hold_calls: bool) -> Iterator[tuple[str, str]]:
    """(kind, text) from an answer's pieces: ("text", piece) live, or, when the answer is a tool call (it begins
    with the call tag), ("call", whole text) once at the end."""
    buffer, kind = "", None
    for piece in gen:
        if kind == "text":
            yield "text", piece
            continue
        buffer += piece
        if kind is None and buffer.strip():
            kind = "call" if hold_calls and buffer.lstrip().startswith(CALL_OPEN[0]) else "text"
            if kind == "text":
                yield "text", buffer
    if kind == "call":
        yield "call", buffer
    elif kind is None and buffer:
        yield "text", buffer


# -- one turn ---------------------------------------------------------------------------------------------------
def cite(text: str, passages: list[Passage]) -> tuple[str, list[int]]:
    """The answer with its citations: the passage numbers it gives, or [1] added when it gives none (the answer
    came from what it was shown)."""
    cited = sorted({int(n) for n in re.findall(r"\[(\d+)\]", text) if 1 <= int(n) <= len(passages)})
    if not cited:
        return f"{text} [1]".strip(), [1]
    return text, cited


def knowledge_turn(chat, question: str, params, dropped: int) -> Iterator[str]:
    """Retrieve, then answer from the passages with citations; decline when nothing relevant is found."""
    from .session import TurnStats
    passages = chat.knowledge.retrieve(question, 3)
    if not passages:
        chat.last = TurnStats(finish_reason="stop", dropped_turns=dropped)
        chat._finish(DONT_KNOW, chat.last, {"declined": True, "sources": []})
        yield DONT_KNOW
        return
    history = [m for m in chat.context_messages if m["role"] != "system"][:-1]  # examples and earlier turns
    system = chat.system or ""
    ids = chat._render(grounded_messages(question, passages, system, history))

    def finish(text: str):
        text, cited = cite(text, passages)
        return text, {"sources": [{"n": n, "cite": passages[n - 1].cite(), "text": passages[n - 1].text}
                                  for n in cited]}
    said = ""
    for piece in chat._answer(ids, params, dropped, finish_text=finish):
        said += piece
        yield piece
    final = chat.messages[-1].content if chat.messages and chat.messages[-1].role == "assistant" else said
    if final.startswith(said.strip()) and len(final) > len(said.strip()):
        yield final[len(said.strip()):]  # the citation added at the end


def tools_turn(chat, params, dropped: int, max_rounds: int = 2) -> Iterator[str]:
    """Let the model call tools: a round that calls runs them and shows them; the next round answers from their
    results (the last round may not call)."""
    question = chat.messages[-1].content
    named = route(chat.tools, question)
    choice = {"type": "function", "function": {"name": named}} if named else "auto"
    exchange: list[dict] = []   # assistant tool_calls and tool results of this turn
    shown: list[dict] = []      # what ran, for the answer's meta
    for round_ in range(max_rounds):
        last = round_ == max_rounds - 1
        mode, allowed = resolve_choice(chat.tools, "none" if last else choice)
        base = chat.context_messages
        today = f"Today is {date.today().isoformat()}, {date.today().strftime('%A')}."
        if exchange:  # the answer round: say what the results are for
            today += " Answer the user in one short sentence from the function results in <tool_response>."
        intro = {"role": "system", "content": today}
        head = [intro] if not base or base[0]["role"] != "system" else \
            [{"role": "system", "content": f"{base[0]['content']}\n{intro['content']}"}]
        # a message that asks for a tool, and the answer from its results, see only that message (and the calls):
        # a small model copies dates and names from earlier turns, and from its own earlier answers, into its
        # arguments and its answer; any other message sees the whole conversation
        turns = [m for m in base if m["role"] != "system"]
        messages = head + (turns[-1:] if named or exchange else turns) + exchange
        offered = allowed if mode != "none" else []
        chat_msgs, specs = prepare_messages(messages, offered, chat.llm.template)
        text = chat.llm.template.render(chat_msgs, add_generation_prompt=True, tools=specs)
        ids = chat.llm.tokenizer.encode(text, add_bos=False)
        constraint = tool_constraint(allowed, mode, False, chat.llm.tokenizer, chat.llm.config.vocab_size,
                                     chat.llm.eos_token_ids)
        round_params = replace(params, constraint=constraint) if constraint is not None else params
        outcome = {}

        def finish(answer: str, outcome=outcome):
            if answer.lstrip().startswith(CALL_OPEN):
                outcome["call"] = answer
                return None  # a call is not an answer: not kept as a message
            return answer, ({"tools": shown} if shown else {})
        for kind, piece in _pieces(chat._answer(ids, round_params, dropped, finish_text=finish), hold_calls=True):
            if kind == "text":
                yield piece
        if "call" not in outcome:
            return
        _, calls = parse_tool_calls(outcome["call"])
        if not calls:  # cut off by max_tokens inside the call
            chat._finish("(the tool call did not fit in max_tokens)", chat.last, {"tools": shown})
            yield "(the tool call did not fit in max_tokens)"
            return
        exchange.append({"role": "assistant", "content": None, "tool_calls": calls})
        for call in calls:
            fn = call["function"]
            result = chat.tools.call(fn["name"], fn["arguments"])
            exchange.append({"role": "tool", "tool_call_id": call["id"], "name": fn["name"], "content": result})
            shown.append({"name": fn["name"], "arguments": json.loads(fn["arguments"]), "result": result})
            if chat.on_tool:
                chat.on_tool(fn["name"], fn["arguments"], result)


def attach(tools, knowledge, current_tools: ToolRegistry | None, current_kb: KnowledgeBase | None,
           notice) -> tuple[ToolRegistry | None, KnowledgeBase | None]:
    """Chat's tools and knowledge base from what was asked: a ToolRegistry or built-in names ("calendar",
    "datetime", "calculator"; "builtin" for all), a KnowledgeBase or "sample"/"default"/a kb.db path."""
    if tools is not None:
        if not isinstance(tools, ToolRegistry):
            names = tools.split(",") if isinstance(tools, str) else list(tools)
            names = list(BUILTIN_TOOLS) if names in (["builtin"], ["all"]) else [n.strip() for n in names]
            tools = builtin_tools(names)
        current_tools = tools
    if knowledge is not None:
        if isinstance(knowledge, KnowledgeBase):
            current_kb = knowledge
        else:
            current_kb, message = open_knowledge(str(knowledge))
            if message:
                notice(message)
    return current_tools, current_kb


def turn(chat, params, dropped: int) -> Iterator[str]:
    """The answer to the chat's last user message: from its knowledge base if it has one, else with its tools."""
    if chat.knowledge is not None:
        return knowledge_turn(chat, chat.messages[-1].content, params, dropped)
    return tools_turn(chat, params, dropped)
