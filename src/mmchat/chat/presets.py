"""Presets: a named system prompt, example exchanges and sampling settings, like an Ollama Modelfile.

Built-in presets ship as TOML files in mmchat/data/presets; users add their own (or override a built-in by
name) as NAME.toml in $MMCHAT_HOME/presets, else $XDG_CONFIG_HOME/mmchat/presets (~/.config/mmchat/presets):

    description = "Answers like a pirate"
    system = "You are a pirate. Answer in {{length}} sentences."
    [variables]              # optional: {{name}} placeholders and their defaults
    length = "two"
    [sampling]               # any of mmchat.SamplingParams' fields
    temperature = 0.7
    [[messages]]             # optional example exchanges shown to the model before the conversation
    role = "user"
    content = "Hello"

and, before any table, `tools = ["calendar", "datetime", "calculator"]` (built-in tools the model may call) and
`knowledge = "default"` (answer from the knowledge base: "default" is `mmchat kb add`'s, "sample" the sample shop,
or a path to a kb.db).
"""
from __future__ import annotations

import os
import re
import tomllib
from dataclasses import dataclass, field, fields, replace
from importlib import resources
from pathlib import Path

from ..errors import MMChatError
from ..generate import SamplingParams
from ..registry import user_dir

SAMPLING_FIELDS = {f.name: f.type for f in fields(SamplingParams)}
TOP_LEVEL = {"description": str, "system": str, "model": str, "variables": dict, "sampling": dict, "messages": list,
             "tools": list, "knowledge": str}
_PLACEHOLDER = re.compile(r"\{\{\s*([A-Za-z_][A-Za-z0-9_]*)\s*\}\}")
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


def config_dir() -> Path:
    """$MMCHAT_HOME, else $XDG_CONFIG_HOME/mmchat, else ~/.config/mmchat."""
    return user_dir("XDG_CONFIG_HOME", ".config")


def user_presets_dir() -> Path:
    return config_dir() / "presets"


@dataclass
class Preset:
    name: str
    system: str = ""
    description: str = ""
    model: str | None = None
    sampling: dict = field(default_factory=dict)
    variables: dict[str, str] = field(default_factory=dict)   # placeholder -> value (defaults until `with_vars`)
    messages: list[dict] = field(default_factory=list)       # example exchanges
    source: str = ""                                          # the file it came from
    tools: list[str] = field(default_factory=list)            # built-in tools the model may call (chat/assistant.py)
    knowledge: str | None = None                              # a knowledge base to answer from: sample, default, path

    def with_vars(self, /, **values: str) -> "Preset":
        """The same preset with some {{placeholders}} set, e.g. translator's source and target languages."""
        unknown = set(values) - set(self.variables)
        if unknown:
            known = ", ".join(sorted(self.variables)) or "none"
            raise MMChatError(f"preset '{self.name}' has no setting {', '.join(sorted(unknown))}; it has: {known}")
        return replace(self, variables={**self.variables, **{k: str(v) for k, v in values.items()}})

    def _fill(self, text: str) -> str:
        return _PLACEHOLDER.sub(lambda m: self.variables.get(m.group(1), m.group(0)), text)

    @property
    def system_prompt(self) -> str:
        return self._fill(self.system)

    @property
    def example_messages(self) -> list[dict]:
        return [{"role": m["role"], "content": self._fill(m["content"])} for m in self.messages]


def _line_of(text: str, key: str, table: str | None = None) -> int | None:
    """The line where `key = ...` is written (inside [table], or at the top level), for error messages."""
    current = None
    for n, line in enumerate(text.splitlines(), 1):
        stripped = line.strip()
        if stripped.startswith("["):
            current = stripped.strip("[]").strip()
        elif current == table and re.match(rf"^\s*{re.escape(key)}\s*=", line):
            return n
    return None


def _type_ok(value, want) -> bool:
    if want in (float, "float"):
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if want in (int, "int", "int | None"):
        return (isinstance(value, int) and not isinstance(value, bool)) or (want == "int | None" and value is None)
    if want in (bool, "bool"):
        return isinstance(value, bool)
    if want == "list[int]":
        return isinstance(value, list) and all(isinstance(v, int) for v in value)
    if want == "dict[int, float]":
        return isinstance(value, dict)
    return isinstance(value, want) if isinstance(want, type) else True


def parse_preset(text: str, name: str, source: str = "<preset>") -> Preset:
    """A preset from TOML text. Every mistake is one line naming the file, the line and the field."""
    def fail(message: str, key: str | None = None, table: str | None = None, line: int | None = None):
        line = line or (key and _line_of(text, key, table))
        raise MMChatError(f"{source}{f':{line}' if line else ''}: {message}")

    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        at = re.search(r"\s*\(at line (\d+), column (\d+)\)", str(e))
        if at:
            fail(f"not valid TOML: {str(e)[:at.start()]} (column {at.group(2)})", line=int(at.group(1)))
        fail(f"not valid TOML: {e}")
    for key, value in data.items():
        if key not in TOP_LEVEL:
            fail(f"unknown field '{key}'; a preset has: {', '.join(TOP_LEVEL)}", key)
        if not isinstance(value, TOP_LEVEL[key]):
            kind = {str: "text", dict: "a table", list: "an array of tables"}[TOP_LEVEL[key]]
            fail(f"'{key}' must be {kind}", key)
    sampling = data.get("sampling", {})
    for key, value in sampling.items():
        if key not in SAMPLING_FIELDS:
            fail(f"unknown sampling setting '{key}'; known: {', '.join(sorted(SAMPLING_FIELDS))}", key, "sampling")
        if not _type_ok(value, SAMPLING_FIELDS[key]):
            fail(f"sampling.{key} must be {SAMPLING_FIELDS[key]}, not {value!r}", key, "sampling")
    try:
        SamplingParams(**sampling).validate()
    except MMChatError as e:
        bad = next((k for k in sampling if str(e).startswith(k)), None)
        fail(f"sampling.{e}", bad, "sampling")
    variables = data.get("variables", {})
    for key, value in variables.items():
        if not isinstance(value, (str, int, float)):
            fail(f"variables.{key} must be text (its default value)", key, "variables")
    messages = data.get("messages", [])
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in ("user", "assistant", "system") \
                or not isinstance(m.get("content"), str):
            fail(f"messages[{i}] needs role = \"user\" or \"assistant\" and content = \"...\"")
    from .assistant import BUILTIN_TOOLS
    tools = data.get("tools", [])
    for t in tools:
        if t not in BUILTIN_TOOLS:
            fail(f"unknown tool {t!r}; the built-in tools are: {', '.join(BUILTIN_TOOLS)}", "tools")
    preset = Preset(name, data.get("system", ""), data.get("description", ""), data.get("model"), dict(sampling),
                    {k: str(v) for k, v in variables.items()}, list(messages), source, list(tools),
                    data.get("knowledge"))
    used = set(_PLACEHOLDER.findall(preset.system + "".join(m["content"] for m in messages)))
    if used - set(variables):
        missing = sorted(used - set(variables))[0]
        fail(f"{{{{{missing}}}}} is used but [variables] gives it no default", "system")
    return preset


def load_preset_file(path: str | Path) -> Preset:
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise MMChatError(f"cannot read preset {path} ({e})") from None
    return parse_preset(text, path.stem, str(path))


def builtin_presets() -> dict[str, Preset]:
    folder = resources.files("mmchat") / "data" / "presets"
    out = {}
    for item in sorted(folder.iterdir(), key=lambda p: p.name):
        if item.name.endswith(".toml"):
            name = item.name[: -len(".toml")]
            out[name] = parse_preset(item.read_text(encoding="utf-8"), name, f"built-in preset {name}")
    return out


def available(user_dir: Path | None = None) -> dict[str, Preset]:
    """All presets by name: the built-ins, then the user's files (which win on a shared name). A broken user file
    does not hide the others; it fails when asked for by name."""
    presets = builtin_presets()
    folder = user_dir or user_presets_dir()
    if folder.is_dir():
        for path in sorted(folder.glob("*.toml")):
            try:
                presets[path.stem] = load_preset_file(path)
            except MMChatError:
                presets.pop(path.stem, None)
    return presets


def get(name: str, /, *, user_dir: Path | None = None, **variables: str) -> Preset:
    """A preset by name (or a path to a .toml file), with some of its {{variables}} set."""
    if name.endswith(".toml") or os.sep in name:
        return load_preset_file(Path(name).expanduser()).with_vars(**variables)
    if not _NAME.match(name):
        raise MMChatError(f"'{name}' is not a preset name")
    path = (user_dir or user_presets_dir()) / f"{name}.toml"
    if path.exists():
        return load_preset_file(path).with_vars(**variables)
    presets = builtin_presets()
    if name not in presets:
        names = ", ".join(sorted(available(user_dir)))
        raise MMChatError(f"no preset '{name}'; known: {names} (add your own as {path})")
    return presets[name].with_vars(**variables)


def parse_assignments(items: list[str] | str) -> dict[str, str]:
    """['target=French', 'source=English'] (or 'target=French source=English') -> dict."""
    if isinstance(items, str):
        items = items.split()
    out = {}
    for item in items:
        key, eq, value = item.partition("=")
        if not eq or not key.strip():
            raise MMChatError(f"'{item}' is not NAME=VALUE (e.g. target=French)")
        out[key.strip()] = value.strip()
    return out
