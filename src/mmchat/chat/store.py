"""Saved conversations: one SQLite file (WAL) under the data dir, written one message per transaction, so a
crash or kill -9 in the middle of an answer loses nothing that was already said."""
from __future__ import annotations

import json
import os
import sqlite3
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import MMChatError
from ..registry import user_dir

SCHEMA_VERSION = 1
SCHEMA = """
CREATE TABLE IF NOT EXISTS conversations (
    id       TEXT PRIMARY KEY,
    title    TEXT NOT NULL DEFAULT '',
    model    TEXT NOT NULL DEFAULT '',
    preset   TEXT,
    system   TEXT,
    settings TEXT NOT NULL DEFAULT '{}',  -- JSON: sampling overrides, preset variables
    created  REAL NOT NULL,
    updated  REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS messages (
    conversation_id TEXT NOT NULL REFERENCES conversations(id) ON DELETE CASCADE,
    position        INTEGER NOT NULL,      -- 0, 1, 2 ... within the conversation (system prompt not counted)
    role            TEXT NOT NULL,
    content         TEXT NOT NULL,
    meta            TEXT NOT NULL DEFAULT '{}',  -- JSON: tokens, speed, finish reason
    created         REAL NOT NULL,
    PRIMARY KEY (conversation_id, position)
);
"""


def data_dir() -> Path:
    """Where conversations live: $MMCHAT_HOME, else $XDG_DATA_HOME/mmchat, else ~/.local/share/mmchat."""
    return user_dir("XDG_DATA_HOME", ".local/share")


@dataclass
class StoredMessage:
    role: str
    content: str
    meta: dict = field(default_factory=dict)
    created: float = 0.0


@dataclass
class Conversation:
    id: str
    title: str = ""
    model: str = ""
    preset: str | None = None
    system: str | None = None
    settings: dict = field(default_factory=dict)
    created: float = 0.0
    updated: float = 0.0
    messages: list[StoredMessage] = field(default_factory=list)

    def to_dict(self) -> dict:
        """The conversation as JSON-ready data; `messages` in OpenAI's shape, the system prompt first."""
        messages = ([{"role": "system", "content": self.system}] if self.system else []) + \
            [{"role": m.role, "content": m.content, **({"meta": m.meta} if m.meta else {})} for m in self.messages]
        return {"id": self.id, "title": self.title, "model": self.model, "preset": self.preset,
                "settings": self.settings, "created": _iso(self.created), "updated": _iso(self.updated),
                "messages": messages}

    def to_markdown(self) -> str:
        lines = [f"# {self.title or 'Conversation ' + self.id}", "",
                 f"*{self.id} · {self.model or 'unknown model'}" + (f" · preset {self.preset}" if self.preset else "")
                 + f" · {_iso(self.created)}*", ""]
        if self.system:
            lines += ["**System:** " + self.system, ""]
        for m in self.messages:
            who = {"user": "You", "assistant": "Assistant"}.get(m.role, m.role.capitalize())
            note = " *(stopped)*" if m.meta.get("finish_reason") == "stopped" else ""
            lines += [f"## {who}{note}", "", m.content, ""]
        return "\n".join(lines)


def new_id() -> str:
    return uuid.uuid4().hex[:8]


def _iso(t: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(t)) if t else ""


def _title(text: str) -> str:
    first = " ".join(text.split())
    return first if len(first) <= 60 else first[:57].rstrip() + "..."


class Store:
    """Conversations in SQLite. Every write is its own transaction (WAL, synchronous=FULL): once a method
    returns, what it wrote survives a crash of this process. With `redact` (True, or a privacy.Redactor;
    None: the MMCHAT_REDACT environment variable), personal data in titles, system prompts and messages is
    replaced by tags before anything is written."""

    def __init__(self, path: str | Path | None = None, redact=None):
        self.path = Path(path) if path is not None else data_dir() / "conversations.db"
        if redact is None:
            redact = os.environ.get("MMCHAT_REDACT", "").lower() in ("1", "true", "yes", "on")
        if redact is True:
            from ..privacy import Redactor
            redact = Redactor()
        self.redactor = redact or None
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            # autocommit mode: transactions are opened explicitly, one per write
            self.db = sqlite3.connect(self.path, isolation_level=None, timeout=10, check_same_thread=False)
            self.db.execute("PRAGMA journal_mode=WAL")
            self.db.execute("PRAGMA synchronous=FULL")
            self.db.execute("PRAGMA foreign_keys=ON")
            self.db.execute("PRAGMA secure_delete=ON")  # deleted text is overwritten, not left in free pages
            version = self.db.execute("PRAGMA user_version").fetchone()[0]
            if version > SCHEMA_VERSION:
                raise MMChatError(f"{self.path} was written by a newer mmchat (schema {version}); upgrade mmchat")
            self.db.executescript(SCHEMA)
            self.db.execute(f"PRAGMA user_version={SCHEMA_VERSION}")
        except sqlite3.DatabaseError as e:
            raise MMChatError(f"{self.path} is not a usable conversation store ({e}); move it away and retry") from None
        except OSError as e:
            raise MMChatError(f"cannot open the conversation store {self.path} ({e.strerror})") from None

    def close(self):
        self.db.close()

    def _clean(self, text):
        return self.redactor.redact(text) if self.redactor is not None and isinstance(text, str) else text

    def _write(self, *statements: tuple[str, tuple]):
        """Run statements as one transaction: all of them land, or none."""
        try:
            self.db.execute("BEGIN IMMEDIATE")
            try:
                for sql, args in statements:
                    self.db.execute(sql, args)
            except BaseException:
                self.db.execute("ROLLBACK")
                raise
            self.db.execute("COMMIT")
        except sqlite3.OperationalError as e:
            raise MMChatError(f"could not write to {self.path} ({e})") from None

    # -- conversations ------------------------------------------------------------------------------------------
    def create(self, model: str = "", system: str | None = None, preset: str | None = None,
               settings: dict | None = None, title: str = "", conversation_id: str | None = None) -> Conversation:
        now = time.time()
        title, system = self._clean(title), self._clean(system)
        conv = Conversation(conversation_id or new_id(), title, model, preset, system, settings or {}, now, now)
        self._write(("INSERT INTO conversations (id, title, model, preset, system, settings, created, updated) "
                     "VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                     (conv.id, title, model, preset, system, json.dumps(conv.settings), now, now)))
        return conv

    def update(self, conversation_id: str, **fields):
        """Change title, model, preset, system or settings."""
        allowed = {"title", "model", "preset", "system", "settings"}
        if set(fields) - allowed:
            raise ValueError(f"unknown conversation fields {set(fields) - allowed}")
        if "settings" in fields:
            fields["settings"] = json.dumps(fields["settings"])
        for name in ("title", "system"):
            if name in fields:
                fields[name] = self._clean(fields[name])
        sets = ", ".join(f"{k} = ?" for k in fields)
        self._write((f"UPDATE conversations SET {sets}, updated = ? WHERE id = ?",
                     (*fields.values(), time.time(), conversation_id)))

    def resolve(self, conversation_id: str) -> str:
        """A full id, or a unique prefix of one -> the full id."""
        key = conversation_id.strip()
        rows = self.db.execute("SELECT id FROM conversations WHERE substr(id, 1, ?) = ? ORDER BY id",
                               (len(key), key)).fetchall() if key else []
        exact = [r[0] for r in rows if r[0] == key]
        if exact:
            return exact[0]
        if len(rows) == 1:
            return rows[0][0]
        if not rows:
            raise MMChatError(f"no saved conversation '{conversation_id}'; /list (or `mmchat chat --list`) "
                              "shows the saved ones")
        raise MMChatError(f"'{conversation_id}' matches {len(rows)} conversations; give more of the id")

    def get(self, conversation_id: str) -> Conversation:
        cid = self.resolve(conversation_id)
        row = self.db.execute("SELECT id, title, model, preset, system, settings, created, updated "
                              "FROM conversations WHERE id = ?", (cid,)).fetchone()
        conv = Conversation(*row[:5], json.loads(row[5]), row[6], row[7])
        conv.messages = [StoredMessage(r[0], r[1], json.loads(r[2]), r[3]) for r in self.db.execute(
            "SELECT role, content, meta, created FROM messages WHERE conversation_id = ? ORDER BY position", (cid,))]
        return conv

    def list(self, limit: int = 50) -> list[dict]:
        """The most recently updated conversations: id, title, model, messages, updated."""
        rows = self.db.execute(
            "SELECT c.id, c.title, c.model, c.preset, c.updated, COUNT(m.position) FROM conversations c "
            "LEFT JOIN messages m ON m.conversation_id = c.id GROUP BY c.id ORDER BY c.updated DESC LIMIT ?",
            (limit,)).fetchall()
        return [dict(id=r[0], title=r[1], model=r[2], preset=r[3], updated=_iso(r[4]), messages=r[5]) for r in rows]

    def delete(self, conversation_id: str):
        cid = self.resolve(conversation_id)
        self._write(("DELETE FROM messages WHERE conversation_id = ?", (cid,)),
                    ("DELETE FROM conversations WHERE id = ?", (cid,)))

    def forget(self, conversation_id: str | None = None) -> int:
        """Delete one conversation (or all, with None) so that its text is gone from the files: secure_delete
        zeroes the freed pages, the WAL is checkpointed and truncated, and VACUUM rebuilds the file.
        Returns how many conversations were deleted."""
        if conversation_id is None:
            count = self.db.execute("SELECT COUNT(*) FROM conversations").fetchone()[0]
            self._write(("DELETE FROM messages", ()), ("DELETE FROM conversations", ()))
        else:
            self.delete(conversation_id)
            count = 1
        self.db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        self.db.execute("VACUUM")
        self.db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        return count

    # -- messages ---------------------------------------------------------------------------------------------
    def append(self, conversation_id: str, role: str, content: str, meta: dict | None = None) -> int:
        """Add one message at the end; the first user message also titles an untitled conversation."""
        now = time.time()
        content = self._clean(content)
        # the position is computed inside the transaction, so two writers cannot take the same one
        statements = [("INSERT INTO messages (conversation_id, position, role, content, meta, created) "
                       "VALUES (?, (SELECT COALESCE(MAX(position) + 1, 0) FROM messages WHERE conversation_id = ?), "
                       "?, ?, ?, ?)",
                       (conversation_id, conversation_id, role, content, json.dumps(meta or {}), now)),
                      ("UPDATE conversations SET updated = ? WHERE id = ?", (now, conversation_id))]
        if role == "user":
            statements.append(("UPDATE conversations SET title = ? WHERE id = ? AND title = ''",
                               (_title(content), conversation_id)))
        self._write(*statements)
        return self.db.execute("SELECT MAX(position) FROM messages WHERE conversation_id = ?",
                               (conversation_id,)).fetchone()[0]

    def truncate(self, conversation_id: str, keep: int):
        """Keep the first `keep` messages (for /undo and /regenerate)."""
        self._write(("DELETE FROM messages WHERE conversation_id = ? AND position >= ?", (conversation_id, keep)),
                    ("UPDATE conversations SET updated = ? WHERE id = ?", (time.time(), conversation_id)))

    def replace(self, conversation_id: str, messages: list[StoredMessage]):
        """Write a whole history at once (saving a conversation that was not stored so far)."""
        statements = [("DELETE FROM messages WHERE conversation_id = ?", (conversation_id,))]
        messages = [StoredMessage(m.role, self._clean(m.content), m.meta, m.created) for m in messages]
        for i, m in enumerate(messages):
            statements.append(("INSERT INTO messages (conversation_id, position, role, content, meta, created) "
                               "VALUES (?, ?, ?, ?, ?, ?)",
                               (conversation_id, i, m.role, m.content, json.dumps(m.meta), m.created or time.time())))
        first_user = next((m.content for m in messages if m.role == "user"), "")
        statements.append(("UPDATE conversations SET updated = ?, title = CASE WHEN title = '' THEN ? ELSE title END "
                           "WHERE id = ?", (time.time(), _title(first_user), conversation_id)))
        self._write(*statements)

    def integrity_ok(self) -> bool:
        return self.db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"


def export(conv: Conversation, path: str | Path) -> Path:
    """Write a conversation to PATH as Markdown (.md) or JSON (.json), atomically (write, fsync, rename)."""
    path = Path(path).expanduser()
    if path.suffix.lower() in (".md", ".markdown"):
        text = conv.to_markdown()
    elif path.suffix.lower() == ".json":
        text = json.dumps(conv.to_dict(), ensure_ascii=False, indent=2) + "\n"
    else:
        raise MMChatError(f"export to .md or .json, not '{path.suffix or path.name}'")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        raise MMChatError(f"cannot write {path} ({e.strerror})") from None
    return path
