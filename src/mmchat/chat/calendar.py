"""A calendar and reminders in SQLite (WAL mode) for the personal assistant: add, list by day or range, move,
delete. Days may be written as ISO dates (2026-12-03) or as words a user says: today, tomorrow, yesterday, a
weekday (the next one, today included). Times are HH:MM, 24-hour.

    cal = Calendar("~/.local/share/mmchat/calendar.db")
    cal.add_event("Dentist", "tomorrow", "09:30")
    cal.events_on("tomorrow")      # "what do I have tomorrow?"
"""
from __future__ import annotations

import re
import sqlite3
import threading
from datetime import date, datetime, timedelta
from pathlib import Path

from ..errors import MMChatError

WEEKDAYS = ["monday", "tuesday", "wednesday", "thursday", "friday", "saturday", "sunday"]
# what a tool argument for a day may be; also the pattern in the tools' JSON schemas
DAY_PATTERN = r"^([0-9]{4}-[0-9]{2}-[0-9]{2}|today|tomorrow|yesterday|" + "|".join(WEEKDAYS) + ")$"
TIME_PATTERN = r"^([01][0-9]|2[0-3]):[0-5][0-9]$"

SCHEMA = """
CREATE TABLE IF NOT EXISTS events (
    id INTEGER PRIMARY KEY,
    title TEXT NOT NULL,
    day TEXT NOT NULL,            -- YYYY-MM-DD
    time TEXT,                    -- HH:MM, NULL for all-day
    minutes INTEGER NOT NULL DEFAULT 60,
    location TEXT NOT NULL DEFAULT '',
    created TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS events_day ON events(day, time);
CREATE TABLE IF NOT EXISTS reminders (
    id INTEGER PRIMARY KEY,
    text TEXT NOT NULL,
    due TEXT NOT NULL,            -- YYYY-MM-DD HH:MM
    done INTEGER NOT NULL DEFAULT 0,
    created TEXT NOT NULL
);
"""


def parse_day(value: str, today: date | None = None) -> date:
    """An ISO date or today/tomorrow/yesterday/a weekday name -> a date; MMChatError otherwise."""
    today = today or date.today()
    word = str(value).strip().lower()
    if word == "today":
        return today
    if word == "tomorrow":
        return today + timedelta(days=1)
    if word == "yesterday":
        return today - timedelta(days=1)
    if word in WEEKDAYS:
        return today + timedelta(days=(WEEKDAYS.index(word) - today.weekday()) % 7)
    try:
        return date.fromisoformat(word)
    except ValueError:
        raise MMChatError(f"'{value}' is not a day; write YYYY-MM-DD, today, tomorrow or a weekday") from None


def parse_time(value: str | None) -> str | None:
    if value in (None, ""):
        return None
    value = str(value).strip()
    m = re.fullmatch(r"(\d{1,2}):(\d{2})", value)
    if not m or int(m[1]) > 23 or int(m[2]) > 59:
        raise MMChatError(f"'{value}' is not a time; write HH:MM (24-hour), e.g. 09:30")
    return f"{int(m[1]):02d}:{m[2]}"


class Calendar:
    """Events and reminders in one SQLite file. Every method returns plain dicts (JSON-ready for tools)."""

    def __init__(self, path: str | Path = ":memory:", today: date | None = None):
        self.path = str(Path(path).expanduser()) if str(path) != ":memory:" else ":memory:"
        if self.path != ":memory:":
            Path(self.path).parent.mkdir(parents=True, exist_ok=True)
        self._today = today  # fixed "today" for tests and replays; None: the real date
        self._lock = threading.Lock()
        self.db = sqlite3.connect(self.path, check_same_thread=False)
        self.db.row_factory = sqlite3.Row
        self.db.execute("PRAGMA journal_mode=WAL")  # a crash never loses a committed event
        self.db.executescript(SCHEMA)

    @property
    def today(self) -> date:
        return self._today or date.today()

    def close(self):
        self.db.close()

    def _day(self, value) -> str:
        return parse_day(value, self.today).isoformat()

    # -- events -----------------------------------------------------------------------------------------------
    def add_event(self, title: str, day: str, time: str | None = None, minutes: int = 60,
                  location: str = "") -> dict:
        title = str(title).strip()
        if not title:
            raise MMChatError("an event needs a title")
        if not 1 <= int(minutes) <= 24 * 60:
            raise MMChatError(f"an event lasts 1 to 1440 minutes (got {minutes})")
        with self._lock, self.db:
            cur = self.db.execute(
                "INSERT INTO events (title, day, time, minutes, location, created) VALUES (?, ?, ?, ?, ?, ?)",
                (title, self._day(day), parse_time(time), int(minutes), location or "",
                 datetime.now().isoformat(timespec="seconds")))
        return self.get_event(cur.lastrowid)

    def get_event(self, event_id: int) -> dict:
        row = self.db.execute("SELECT * FROM events WHERE id = ?", (int(event_id),)).fetchone()
        if row is None:
            raise MMChatError(f"there is no event {event_id}; list the events to see their ids")
        return _event(row)

    def events_between(self, start, end) -> list[dict]:
        """Events from day `start` to day `end`, both included, in time order (all-day ones first)."""
        a, b = self._day(start), self._day(end)
        if a > b:
            raise MMChatError(f"the range starts ({a}) after it ends ({b})")
        rows = self.db.execute("SELECT * FROM events WHERE day BETWEEN ? AND ? "
                               "ORDER BY day, time IS NOT NULL, time, id", (a, b)).fetchall()
        return [_event(r) for r in rows]

    def events_on(self, day) -> list[dict]:
        return self.events_between(day, day)

    def move_event(self, event_id: int, day: str | None = None, time: str | None = None) -> dict:
        old = self.get_event(event_id)
        with self._lock, self.db:
            self.db.execute("UPDATE events SET day = ?, time = ? WHERE id = ?",
                            (self._day(day) if day else old["day"], parse_time(time) if time else old["time"],
                             int(event_id)))
        return self.get_event(event_id)

    def delete_event(self, event_id: int) -> dict:
        old = self.get_event(event_id)
        with self._lock, self.db:
            self.db.execute("DELETE FROM events WHERE id = ?", (int(event_id),))
        return old

    # -- reminders --------------------------------------------------------------------------------------------
    def add_reminder(self, text: str, day: str, time: str | None = None) -> dict:
        text = str(text).strip()
        if not text:
            raise MMChatError("a reminder needs a text")
        due = f"{self._day(day)} {parse_time(time) or '09:00'}"
        with self._lock, self.db:
            cur = self.db.execute("INSERT INTO reminders (text, due, created) VALUES (?, ?, ?)",
                                  (text, due, datetime.now().isoformat(timespec="seconds")))
        return {"id": cur.lastrowid, "text": text, "due": due, "done": False}

    def reminders(self, include_done: bool = False) -> list[dict]:
        rows = self.db.execute("SELECT * FROM reminders" + ("" if include_done else " WHERE done = 0") +
                               " ORDER BY due, id").fetchall()
        return [{"id": r["id"], "text": r["text"], "due": r["due"], "done": bool(r["done"])} for r in rows]

    def due_reminders(self, now: datetime | None = None) -> list[dict]:
        now = (now or datetime.now()).strftime("%Y-%m-%d %H:%M")
        return [r for r in self.reminders() if r["due"] <= now]

    def complete_reminder(self, reminder_id: int) -> dict:
        with self._lock, self.db:
            cur = self.db.execute("UPDATE reminders SET done = 1 WHERE id = ?", (int(reminder_id),))
        if cur.rowcount == 0:
            raise MMChatError(f"there is no reminder {reminder_id}")
        return {"id": int(reminder_id), "done": True}


def _event(row) -> dict:
    return {"id": row["id"], "title": row["title"], "day": row["day"], "time": row["time"],
            "minutes": row["minutes"], "location": row["location"]}
