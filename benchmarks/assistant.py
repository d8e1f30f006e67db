"""Assistant figures on the embedded SmolLM2: the customer-service preset over the sample knowledge base (held-out
questions: retrieval hit rate and whether the answer cites the right passage; out-of-scope questions declined),
and tool calls (how many parse and validate against their tool's schema; how often the right tool is called when
the model chooses alone, and with the tool picked by its example requests).

    python benchmarks/assistant.py [--seeds 2] [--json]
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import jsonschema

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))


def knowledge(llm) -> dict:
    from test_knowledge import HELD_OUT, OUT_OF_SCOPE, _hit

    from mmchat.chat.knowledge import DONT_KNOW, KnowledgeBase
    from mmchat.chat.session import Chat
    kb = KnowledgeBase.sample()
    top1 = sum(bool(r) and _hit(r[0], f, s) for q, f, s in HELD_OUT for r in [kb.retrieve(q, 3)])
    top3 = sum(any(_hit(p, f, s) for p in kb.retrieve(q, 3)) for q, f, s in HELD_OUT)
    cited_right, answered, seconds = 0, 0, []
    for q, f, s in HELD_OUT:
        chat = Chat(llm, knowledge=kb, preset="customer-service", seed=0, max_tokens=80)  # one question each
        start = time.perf_counter()
        text = chat.send(q)
        seconds.append(time.perf_counter() - start)
        sources = chat.messages[-1].meta.get("sources") or []
        answered += text != DONT_KNOW
        cited_right += any(src["cite"].startswith(f) and s in src["cite"] for src in sources)
    declined = sum(Chat(llm, knowledge=kb, seed=0).send(q) == DONT_KNOW for q in OUT_OF_SCOPE)
    n = len(HELD_OUT)
    return {"held_out": n, "retrieval_top1": top1 / n, "retrieval_top3": top3 / n, "answered": answered / n,
            "answer_cites_right_passage": cited_right / n, "out_of_scope": len(OUT_OF_SCOPE),
            "declined": declined / len(OUT_OF_SCOPE), "median_answer_s": sorted(seconds)[n // 2]}


# (request, the tool that answers it)
REQUESTS = [
    ("Add Dentist on 2026-12-03 at 09:30.", "add_event"),
    ("Put a meeting with Sara in my calendar for 2026-12-08, 14:00.", "add_event"),
    ("Add Yoga class on friday at 18:00.", "add_event"),
    ("What do I have on 2026-12-03?", "list_events"),
    ("What is on my calendar tomorrow?", "list_events"),
    ("What is 17 times 23?", "calculator"),
    ("How much is 1250 divided by 5?", "calculator"),
    ("What time is it?", "current_datetime"),
    ("What is the date today?", "current_datetime"),
    ("Remind me to call mum tomorrow at 18:00.", "add_reminder"),
    ("Delete event 3.", "delete_event"),
    ("Which reminders do I have?", "list_reminders"),
]


def tools(llm, seeds: int) -> dict:
    from mmchat.chat.assistant import route
    from mmchat.chat.calendar import Calendar
    from mmchat.chat.tools import ToolRegistry, chat_once
    registry = ToolRegistry.builtin(Calendar(":memory:"))
    system = {"role": "system", "content": "You are a personal assistant. Today is 2026-11-30."}
    calls = valid = 0
    right = {"auto": 0, "routed": 0}
    asked = 0
    for request, want in REQUESTS:
        for seed in range(seeds):
            asked += 1
            for how in ("auto", "routed"):
                named = route(registry, request) if how == "routed" else None
                choice = {"type": "function", "function": {"name": named}} if named else "required"
                r = chat_once(llm, [system, {"role": "user", "content": request}], registry, choice,
                              parallel_tool_calls=False, seed=seed, temperature=0.3, max_tokens=96)
                for c in r.tool_calls:
                    calls += 1
                    try:
                        jsonschema.validate(json.loads(c["function"]["arguments"]),
                                            registry.tools[c["function"]["name"]].parameters)
                        valid += 1
                    except (jsonschema.ValidationError, json.JSONDecodeError, KeyError):
                        pass
                right[how] += bool(r.tool_calls) and r.tool_calls[0]["function"]["name"] == want
    return {"requests": asked, "calls": calls, "valid_calls": valid, "validity": valid / max(calls, 1),
            "right_tool_model_alone": right["auto"] / asked, "right_tool_routed": right["routed"] / asked}


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seeds", type=int, default=2)
    p.add_argument("--json", action="store_true")
    p.add_argument("--only", choices=["knowledge", "tools"], help="run one part")
    args = p.parse_args()
    os.environ.setdefault("MMCHAT_HOME", tempfile.mkdtemp())  # nothing of the user's is read or written
    import mmchat
    llm = mmchat.load("smollm2", progress=False)
    out = {"knowledge": knowledge(llm) if args.only != "tools" else None,
           "tools": tools(llm, args.seeds) if args.only != "knowledge" else None}
    k, t = out["knowledge"], out["tools"]
    if k:
        print(f"knowledge base, {k['held_out']} held-out questions: retrieval top-1 {k['retrieval_top1']:.0%}, top-3 "
              f"{k['retrieval_top3']:.0%}; answered {k['answered']:.0%}, citing the right passage "
              f"{k['answer_cites_right_passage']:.0%}; out of scope declined {k['declined']:.0%} of "
              f"{k['out_of_scope']}; median answer {k['median_answer_s']:.1f} s")
    if t:
        print(f"tools, {t['requests']} requests x 2: {t['valid_calls']}/{t['calls']} calls validate "
              f"({t['validity']:.0%}); right tool: model alone (required) {t['right_tool_model_alone']:.0%}, "
              f"picked by example requests {t['right_tool_routed']:.0%}")
    if args.json:
        print(json.dumps(out))


if __name__ == "__main__":
    main()
