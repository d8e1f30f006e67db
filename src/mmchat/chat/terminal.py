"""`mmchat chat`: a conversation in the terminal. Answers stream in as Markdown, slash commands steer the
session, every turn is saved as it happens (SQLite, see store.py) so `--resume ID` picks up where it left off."""
from __future__ import annotations

import contextlib
import os
import shlex
import sys
import time
from pathlib import Path

from rich.console import Console
from rich.live import Live
from rich.markdown import Markdown
from rich.table import Table

from ..errors import MMChatError
from . import presets as presets_mod
from .session import Chat
from .store import Store, data_dir

HELP = [
    ("/help", "this list"),
    ("/reset", "start a new conversation (same model, preset and system prompt)"),
    ("/system [TEXT]", "show the system prompt, or set it"),
    ("/preset [NAME [KEY=VALUE ...]]", "list presets, or switch to one (none: no preset), e.g. /preset translator target=German"),
    ("/set [KEY VALUE]", "show the sampling settings, or change one, e.g. /set temperature 0.7"),
    ("/regenerate", "answer your last message again"),
    ("/undo", "take back your last message and its answer"),
    ("/save [TITLE]", "keep this conversation (it is saved as you go unless --no-save) and give it a title"),
    ("/load ID", "continue a saved conversation"),
    ("/list", "the saved conversations"),
    ("/export [FILE.md|FILE.json]", "write this conversation to a file (default mmchat-ID.md)"),
    ("/image PATH [TEXT]", "send an image (PNG, JPEG...) with a question about it, e.g. /image cat.jpg What is this?"),
    ("/audio PATH [TEXT]", "send a spoken message (WAV, MP3, FLAC, OGG...): transcribed, then answered; TEXT goes "
                           "before it"),
    ("/exit", "quit (also /quit, /bye or Ctrl-D)"),
]
MULTILINE = '"""'


def as_markdown(text: str) -> Markdown:
    """Markdown that keeps the answer's line breaks (poems, addresses): outside code blocks a single newline
    becomes a hard break, as chat pages render it, instead of joining the lines into one paragraph."""
    out, fenced = [], False
    lines = text.split("\n")
    for i, line in enumerate(lines):
        if line.lstrip().startswith("```"):
            fenced = not fenced
        nxt = lines[i + 1] if i + 1 < len(lines) else ""
        out.append(line + "  " if not fenced and line.strip() and nxt.strip() else line)
    return Markdown("\n".join(out))


class AnswerView:
    """Shows an answer while it streams. In a terminal, finished Markdown blocks (up to a blank line outside a
    code fence) are printed for good and only the block being written is redrawn, so long answers scroll
    normally; elsewhere the text is written as it comes."""

    def __init__(self, console: Console, markdown: bool):
        self.console, self.markdown = console, markdown
        self.text, self.done = "", 0
        self.live = Live(console=console, auto_refresh=False, vertical_overflow="visible") if markdown else None
        self.last_refresh = 0.0

    def __enter__(self):
        if self.live:
            self.live.start()
        return self

    def feed(self, piece: str):
        self.text += piece
        if not self.live:
            self.console.file.write(piece)
            self.console.file.flush()
            return
        cut = self._block_end()
        if cut > self.done:
            self.live.update("", refresh=True)
            self.live.console.print(as_markdown(self.text[self.done:cut]))
            self.done = cut
        now = time.perf_counter()
        if now - self.last_refresh > 0.05:  # redraw at most 20 times a second
            self.live.update(as_markdown(self.text[self.done:]), refresh=True)
            self.last_refresh = now

    def _block_end(self) -> int:
        end = self.text.rfind("\n\n")
        while end > self.done:
            if self.text.count("```", 0, end) % 2 == 0:  # not inside a code block
                return end + 2
            end = self.text.rfind("\n\n", 0, end)
        return self.done

    def __exit__(self, *exc):
        if self.live:
            self.live.update(as_markdown(self.text[self.done:]), refresh=True)
            self.live.stop()
        elif not self.text.endswith("\n"):
            self.console.file.write("\n")
            self.console.file.flush()


class Terminal:
    def __init__(self, chat: Chat, console: Console, markdown: bool, store: Store | None):
        self.chat, self.console, self.markdown, self.store = chat, console, markdown, store
        self.speaker = None  # multimodal.speech.Speaker with --speak: answers are said aloud
        self.commands = {
            "help": self.cmd_help, "reset": self.cmd_reset, "system": self.cmd_system, "preset": self.cmd_preset,
            "set": self.cmd_set, "regenerate": self.cmd_regenerate, "undo": self.cmd_undo, "save": self.cmd_save,
            "load": self.cmd_load, "list": self.cmd_list, "export": self.cmd_export, "audio": self.cmd_audio,
            "image": self.cmd_image,
            "exit": None, "quit": None, "bye": None,
        }

    # -- output -----------------------------------------------------------------------------------------------
    def note(self, text: str, style: str = "dim"):
        self.console.print(text, style=style, markup=False, highlight=False)

    def error(self, text: str):
        self.console.print(f"error: {text}", style="bold red", markup=False, highlight=False)

    def banner(self):
        c, llm = self.chat, self.chat.llm
        where = f"conversation {c.conversation_id} (saved as you go)" if c.conversation_id else \
            "conversation not saved (/save keeps it)"
        preset = f" · preset {c.preset.name}" if c.preset else ""
        self.note(f"mmchat · {llm.name} ({llm.config.n_params / 1e6:.0f}M parameters) · context {c.context} "
                  f"tokens{preset} · {where}", "bold")
        self.note(f'Type a message; {MULTILINE} starts and ends a multi-line one. /help lists commands. '
                  "Ctrl-C stops an answer, Ctrl-D quits.")

    def show_history(self):
        for m in self.chat.messages:
            if m.role == "user":
                self.console.print(f"> {m.content}", style="bold", markup=False, highlight=False)
            else:
                self.console.print(as_markdown(m.content) if self.markdown else m.content, markup=False)
                if m.meta.get("finish_reason") == "stopped":
                    self.note("(stopped)")

    # -- input ------------------------------------------------------------------------------------------------
    def read(self) -> str | None:
        """One message: a line, or several between triple quotes. None at end of input."""
        line = input(">>> ")
        if not line.lstrip().startswith(MULTILINE):
            return line
        rest = line.lstrip()[len(MULTILINE):]
        lines = []
        while True:
            if rest.rstrip().endswith(MULTILINE):
                lines.append(rest.rstrip()[: -len(MULTILINE)])
                return "\n".join(lines).strip("\n")
            lines.append(rest)
            rest = input("... ")

    def loop(self):
        while True:
            try:
                text = self.read()
            except KeyboardInterrupt:
                print()
                self.note("(Ctrl-D or /exit quits)")
                continue
            except EOFError:
                print()
                return
            text = text.strip()
            if not text:
                continue
            try:
                if text.startswith("/") and not text.startswith("//"):
                    name, _, arg = text[1:].partition(" ")
                    if name.lower() not in self.commands:
                        raise MMChatError(f"unknown command /{name}; /help lists them (start with // to send a /)")
                    command = self.commands[name.lower()]
                    if command is None:
                        return
                    command(arg.strip())
                else:
                    self.answer(self.chat.stream(text[1:] if text.startswith("//") else text))
            except MMChatError as e:
                self.error(str(e))

    def answer(self, pieces):
        """Stream an answer; Ctrl-C stops it (what was said is kept) and returns to the prompt."""
        stopped = False
        with contextlib.closing(pieces), AnswerView(self.console, self.markdown) as view:
            try:
                for piece in pieces:
                    view.feed(piece)
            except KeyboardInterrupt:
                stopped = True
        s = self.chat.last
        if s is None:
            return
        last = self.chat.messages[-1] if self.chat.messages else None
        for source in (last.meta.get("sources") or []) if last is not None and last.role == "assistant" else ():
            self.note(f"[{source['n']}] {source['cite']}", "cyan")  # the passages the answer cites
        if stopped:
            self.note("(stopped)" if s.new_tokens else "(stopped before the answer began; your message was taken back)")
        self.note(f"{s.new_tokens} tokens · {s.tokens_per_s:.1f} tokens/s · first token after {s.ttft_s:.2f} s "
                  f"(prefilled {s.prefilled_tokens} of {s.prompt_tokens} prompt tokens)")
        if self.speaker and not stopped and view.text.strip():
            note = self.speaker.say(view.text)
            if note:
                self.note(note)

    # -- commands ---------------------------------------------------------------------------------------------
    def cmd_help(self, arg):
        table = Table(show_header=False, box=None, padding=(0, 2))
        for usage, what in HELP:
            table.add_row(usage, what)
        self.console.print(table)

    def cmd_reset(self, arg):
        self.chat.reset()
        self.note("(new conversation" + (f" {self.chat.conversation_id})" if self.chat.conversation_id else ")"))

    def cmd_system(self, arg):
        if not arg:
            self.note(f"system prompt: {self.chat.system}" if self.chat.system else
                      "no system prompt (the model's default, if it has one); /system TEXT sets one")
            return
        self.chat.system = arg
        self.note("(system prompt set; it applies from the next answer)")

    def cmd_preset(self, arg):
        if not arg:
            current = self.chat.preset.name if self.chat.preset else None
            for name, p in presets_mod.available().items():
                mark = "*" if name == current else " "
                settings = f" [{', '.join(f'{k}={v}' for k, v in p.variables.items())}]" if p.variables else ""
                self.console.print(f"{mark} {name:<20} {p.description}{settings}", markup=False, highlight=False)
            self.note(f"your own: {presets_mod.user_presets_dir()}/NAME.toml")
            return
        name, *assignments = shlex.split(arg)
        if name == "none":
            self.chat.set_preset(None)
            self.note("(no preset)")
            return
        self.chat.set_preset(name, **presets_mod.parse_assignments(assignments))
        self.note(f"(preset {name}: {self.chat.preset.description})")

    def cmd_set(self, arg):
        if not arg:
            params = self.chat.params()
            shown = {k: getattr(params, k) for k in ("temperature", "top_p", "top_k", "min_p",
                                                      "repetition_penalty", "max_tokens", "seed")}
            self.note(" ".join(f"{k}={v}" for k, v in shown.items()))
            return
        key, _, value = arg.partition(" ")
        if not value.strip():
            raise MMChatError("/set needs a name and a value, e.g. /set temperature 0.7")
        parsed: object = value.strip()
        for kind in (int, float):
            try:
                parsed = kind(value)
                break
            except ValueError:
                pass
        if parsed in ("none", "default"):
            parsed = None
        self.chat.set_sampling(**{key.replace("-", "_"): parsed})
        self.note(f"({key} = {parsed})")

    def cmd_regenerate(self, arg):
        self.answer(self.chat.regenerate())

    def cmd_image(self, arg):
        words = shlex.split(arg)
        if not words:
            raise MMChatError("/image needs the path of an image file, e.g. /image photo.jpg What is in it?")
        text = " ".join(words[1:]) or "Describe this image."
        self.note(f"(reading {words[0]} ...)")
        self.answer(self.chat.stream(text, images=[words[0]]))

    def cmd_audio(self, arg):
        from ..multimodal import audio
        words = shlex.split(arg)
        if not words:
            raise MMChatError("/audio needs the path of an audio file, e.g. /audio question.wav")
        self.note("(transcribing ...)")
        heard = audio.transcribe(words[0]).text
        if not heard:
            raise MMChatError(f"no speech was heard in {words[0]}")
        text = " ".join([*words[1:], heard])
        self.console.print(f"> {text}", style="bold", markup=False, highlight=False)
        self.answer(self.chat.stream(text))

    def cmd_undo(self, arg):
        removed = self.chat.undo()
        self.note(f"(took back: {removed[0].content[:60]!r}" + (" and its answer)" if len(removed) > 1 else ")"))

    def cmd_save(self, arg):
        cid = self.chat.save(title=arg or None, store=self.store)
        self.note(f"(saved as {cid}; continue it later with: mmchat chat --resume {cid})")

    def cmd_load(self, arg):
        if not arg:
            raise MMChatError("/load needs a conversation id; /list shows them")
        chat = Chat.resume(arg, self.chat.llm, self._store())
        chat.on_notice, self.chat = self.chat.on_notice, chat
        self.note(f"(conversation {chat.conversation_id})")
        self.show_history()
        for text in chat.notices:
            chat.on_notice(text)

    def cmd_list(self, arg):
        rows = self._store().list()
        if not rows:
            self.note("(no saved conversations yet)")
        for r in rows:
            self.console.print(f"{r['id']}  {r['updated']}  {r['messages']:>3} messages  {r['title']}",
                               markup=False, highlight=False)

    def cmd_export(self, arg):
        path = Path(arg or f"mmchat-{self.chat.conversation_id or 'conversation'}.md")
        self.note(f"(written to {self.chat.export(path)})")

    def _store(self) -> Store:
        if self.store is None:
            self.store = Store()
        return self.store


def run(args) -> None:
    """The `mmchat chat` command (arguments from cli.py)."""
    console = Console(highlight=False)
    markdown = console.is_terminal and not getattr(args, "plain", False)
    store = None if args.no_save else Store()
    if args.list:
        Terminal(None, console, markdown, store or Store()).cmd_list("")  # type: ignore[arg-type]
        return
    preset_vars = presets_mod.parse_assignments(args.set or [])
    if preset_vars and not args.preset:
        raise MMChatError("--set gives values to a preset's settings; name the preset with --preset")
    if args.preset:  # a bad preset fails before the model is loaded
        presets_mod.get(args.preset, **preset_vars)
    if args.resume:
        (store or Store()).get(args.resume)  # an unknown id fails before the model is loaded, too
    speaker = None
    if getattr(args, "speak", None):  # a voice that is not installed fails before the model is loaded
        from ..multimodal.speech import Speaker
        speaker = Speaker(None if args.speak == "default" else args.speak)

    from ..api import load
    print(f"loading {args.model} ...", file=sys.stderr, flush=True)
    options = {k: getattr(args, k) for k in ("dtype", "quant") if getattr(args, k, None) is not None}
    llm = load(args.model, progress=True, **options)
    sampling = {k: getattr(args, k) for k in ("max_tokens", "temperature", "top_k", "top_p", "min_p",
                                              "repetition_penalty", "seed") if getattr(args, k, None) is not None}
    terminal = Terminal(None, console, markdown, store)  # type: ignore[arg-type]
    notice = lambda text: terminal.note(f"note: {text}", "yellow")  # noqa: E731
    if args.resume:
        chat = Chat.resume(args.resume, llm, store or Store(), context=args.context, stop=args.stop)
        chat.on_notice = notice  # notices from resuming are shown after the history
        if args.preset:
            chat.set_preset(args.preset, **preset_vars)
        if args.system:
            chat.system = args.system
        chat.set_sampling(**sampling)
    else:
        chat = Chat(llm, system=args.system, preset=args.preset, preset_vars=preset_vars, store=store,
                    context=args.context, stop=args.stop, on_notice=notice, **sampling)
    # a tool call is shown as it runs: its arguments and its result
    chat.on_tool = lambda name, arguments, result: console.print(
        f"tool {name}({arguments}) -> {result}", style="cyan", markup=False, highlight=False, soft_wrap=True)
    if getattr(args, "tools", None) or getattr(args, "kb", None):
        from . import assistant
        chat.tools, chat.knowledge = assistant.attach(args.tools, args.kb, chat.tools, chat.knowledge, notice)
    terminal.chat = chat
    terminal.speaker = speaker
    terminal.banner()
    if speaker:
        terminal.note(speaker.describe())
    if args.resume:
        terminal.show_history()
        for text in chat.notices:
            notice(text)
    _input_history(terminal.loop, keep=not args.no_save)


def _input_history(loop, keep: bool = True):
    """Run `loop` with line editing and input history across sessions (readline, where there is one); with
    keep=False (--no-save) what is typed now is not written down."""
    try:
        import readline
    except ImportError:  # e.g. Windows without pyreadline: plain input() still works
        return loop()
    path = data_dir() / "input_history"
    with contextlib.suppress(OSError):
        readline.read_history_file(path)
    readline.set_history_length(1000)
    try:
        return loop()
    finally:
        if keep:
            with contextlib.suppress(OSError):
                path.parent.mkdir(parents=True, exist_ok=True)
                readline.write_history_file(path)
                os.chmod(path, 0o600)  # what you typed is private
