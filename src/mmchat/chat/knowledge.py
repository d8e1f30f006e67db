"""A knowledge base for grounded answers: Markdown, text and PDF files, chunked by headings and paragraphs,
indexed in SQLite FTS5 and ranked by BM25. `answer()` retrieves before the model answers, puts the passages in
the prompt, asks for citations, and declines when nothing relevant is found.

    kb = KnowledgeBase("~/.local/share/mmchat/kb.db")
    kb.add("docs/")                        # .md, .markdown, .txt, .pdf, recursively; re-adding replaces
    kb.search("how long does a refund take")
    answer(llm, kb, "How long does a refund take?")
"""
from __future__ import annotations

import hashlib
import json
import re
import sqlite3
import threading
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

from ..errors import MMChatError

SUFFIXES = {".md", ".markdown", ".txt", ".pdf"}
MAX_CHUNK = 900  # characters; paragraphs of one section are packed up to this

# Words that carry no topic: dropped from queries so that "what is the ..." does not match everything.
STOPWORDS = set("""a an and are as at be been but by can could do does did for from had has have how i if in
into is it its me my of on or our please so that the their them then there these this to was we were what when
where which who why will with would you your yours about after before any also am just may might much many
more most no not only other some such than too very want wants tell know long""".split())

SCHEMA = """
CREATE TABLE IF NOT EXISTS documents (
    id INTEGER PRIMARY KEY,
    source TEXT NOT NULL UNIQUE,      -- the file's resolved path
    title TEXT NOT NULL,
    sha256 TEXT NOT NULL,
    chunks INTEGER NOT NULL
);
CREATE VIRTUAL TABLE IF NOT EXISTS chunks USING fts5(
    text, heading, title, source UNINDEXED, doc_id UNINDEXED, tokenize = 'porter unicode61'
);
"""


@dataclass
class Passage:
    text: str
    source: str       # the file
    heading: str      # "Returns and refunds > Refunds", or "page 2" in a PDF
    score: float      # BM25, higher is more relevant
    matched: list[str] = field(default_factory=list)  # the query's words found in it

    def cite(self) -> str:
        return f"{Path(self.source).name}, {self.heading}" if self.heading else Path(self.source).name


@dataclass
class Chunk:
    text: str
    heading: str


# -- reading and chunking -------------------------------------------------------------------------------------
def read_document(path: Path) -> tuple[str, list[Chunk]]:
    """A file -> (its title, its chunks)."""
    suffix = path.suffix.lower()
    if suffix == ".pdf":
        return _read_pdf(path)
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise MMChatError(f"{path} is not UTF-8 text; convert it or leave it out") from None
    if suffix in (".md", ".markdown"):
        return chunk_markdown(text, path.stem)
    paragraphs = _paragraphs(text)
    title = paragraphs[0] if paragraphs and len(paragraphs[0]) < 80 else path.stem
    return title, _pack(paragraphs[1:] if title != path.stem else paragraphs, title)


def _paragraphs(text: str) -> list[str]:
    return [" ".join(p.split()) for p in re.split(r"\n\s*\n", text) if p.strip()]


def _pack(paragraphs: list[str], heading: str) -> list[Chunk]:
    """Consecutive paragraphs of one section joined up to MAX_CHUNK characters (a longer paragraph alone)."""
    chunks, current = [], ""
    for p in paragraphs:
        if current and len(current) + len(p) + 1 > MAX_CHUNK:
            chunks.append(Chunk(current, heading))
            current = ""
        current = f"{current}\n{p}" if current else p
    if current:
        chunks.append(Chunk(current, heading))
    return chunks


def chunk_markdown(text: str, default_title: str = "") -> tuple[str, list[Chunk]]:
    """Sections by headings (their path, e.g. "Shipping > Costs", is the chunk's heading), then paragraphs."""
    title, path, body, chunks = default_title, [], [], []

    def flush():
        if body:
            chunks.extend(_pack(_paragraphs("\n".join(body)), " > ".join(path)))
            body.clear()
    in_code = False
    for line in text.splitlines():
        if line.strip().startswith("```"):
            in_code = not in_code
        m = None if in_code else re.match(r"^(#{1,6})\s+(.+?)\s*#*\s*$", line)
        if m:
            flush()
            level, heading = len(m[1]), m[2]
            if level == 1 and title == default_title:
                title = heading
            path = path[: level - 1] + [""] * max(0, level - 1 - len(path)) + [heading]
            path = [p for p in path if p]
        else:
            body.append(line)
    flush()
    return title, chunks


def _read_pdf(path: Path) -> tuple[str, list[Chunk]]:
    from pypdf import PdfReader
    from pypdf.errors import PdfReadError
    try:
        reader = PdfReader(str(path))
        pages = [page.extract_text() or "" for page in reader.pages]
    except (PdfReadError, OSError, ValueError) as e:
        raise MMChatError(f"{path} could not be read as a PDF ({e})") from None
    title = (reader.metadata.title if reader.metadata and reader.metadata.title else "") or path.stem
    chunks = []
    for n, text in enumerate(pages, 1):
        # PDF text comes as lines; blank lines (or none at all) separate paragraphs
        chunks.extend(_pack(_paragraphs(text) or ([" ".join(text.split())] if text.strip() else []), f"page {n}"))
    return title, chunks


# -- the index ------------------------------------------------------------------------------------------------
def query_terms(query: str) -> list[str]:
    words = re.findall(r"\w+", query.lower())
    seen = []
    for w in words:
        if w not in STOPWORDS and (len(w) > 1 or w.isdigit()) and w not in seen:
            seen.append(w)
    return seen


def stem(word: str) -> str:
    """A light suffix stripper, enough to see that "lamps" or "refunded" answers "lamp" or "refund" (FTS5's
    porter stemmer ranks; this only counts which question words a passage contains)."""
    for suffix, keep in (("ies", "y"), ("ing", ""), ("ed", ""), ("es", ""), ("s", "")):
        if word.endswith(suffix) and len(word) - len(suffix) >= 3:
            return word[: -len(suffix)] + keep
    return word


class KnowledgeBase:
    def __init__(self, path: str | Path = ":memory:"):
        self.path = str(Path(path).expanduser()) if str(path) != ":memory:" else ":memory:"
        if self.path != ":memory:":
            Path(self.path).parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self.db = sqlite3.connect(self.path, check_same_thread=False)
        self.db.execute("PRAGMA journal_mode=WAL")
        try:
            self.db.executescript(SCHEMA)
        except sqlite3.OperationalError as e:
            raise MMChatError(f"this SQLite has no FTS5 ({e}); install a Python built with it") from None

    @classmethod
    def sample(cls) -> "KnowledgeBase":
        """An in-memory knowledge base of the sample shop (Lumen & Loom) that ships with mmchat."""
        kb = cls()
        kb.add(sample_dir())
        return kb

    def close(self):
        self.db.close()

    def add(self, path: str | Path) -> list[tuple[str, int]]:
        """Index a file or every supported file under a folder. Returns (source, chunks) per file indexed;
        a file already indexed with the same content is skipped, a changed one replaced."""
        root = Path(path).expanduser()
        if not root.exists():
            raise MMChatError(f"{root} does not exist")
        if root.is_dir():
            files = sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in SUFFIXES)
            if not files:
                raise MMChatError(f"{root} has no {', '.join(sorted(SUFFIXES))} files")
        elif root.suffix.lower() in SUFFIXES:
            files = [root]
        else:
            raise MMChatError(f"{root.name}: mmchat indexes {', '.join(sorted(SUFFIXES))} files")
        done = []
        for f in files:
            done.append((str(f.resolve()), self._add_file(f)))
        return done

    def _add_file(self, path: Path) -> int:
        source = str(path.resolve())
        sha = hashlib.sha256(path.read_bytes()).hexdigest()
        row = self.db.execute("SELECT id, sha256, chunks FROM documents WHERE source = ?", (source,)).fetchone()
        if row and row[1] == sha:
            return row[2]
        title, chunks = read_document(path)
        with self._lock, self.db:  # one transaction: a document is indexed whole or not at all
            if row:
                self.db.execute("DELETE FROM chunks WHERE doc_id = ?", (row[0],))
                self.db.execute("DELETE FROM documents WHERE id = ?", (row[0],))
            cur = self.db.execute("INSERT INTO documents (source, title, sha256, chunks) VALUES (?, ?, ?, ?)",
                                  (source, title, sha, len(chunks)))
            self.db.executemany("INSERT INTO chunks (text, heading, title, source, doc_id) VALUES (?, ?, ?, ?, ?)",
                                [(c.text, c.heading, title, source, cur.lastrowid) for c in chunks])
        return len(chunks)

    def remove(self, source: str | Path) -> bool:
        source = str(Path(source).expanduser().resolve())
        with self._lock, self.db:
            row = self.db.execute("SELECT id FROM documents WHERE source = ?", (source,)).fetchone()
            if row:
                self.db.execute("DELETE FROM chunks WHERE doc_id = ?", (row[0],))
                self.db.execute("DELETE FROM documents WHERE id = ?", (row[0],))
        return row is not None

    def documents(self) -> list[dict]:
        return [{"source": s, "title": t, "chunks": n}
                for s, t, n in self.db.execute("SELECT source, title, chunks FROM documents ORDER BY source")]

    def search(self, query: str, k: int = 5) -> list[Passage]:
        """The k best passages for a question in plain words, best first (empty when no word matches)."""
        terms = query_terms(query)
        if not terms:
            return []
        # every word quoted (no FTS5 syntax from the user gets through), any of them may match; BM25 ranks
        # headings 2x and titles 1x as strongly as body text
        match = " OR ".join('"' + t.replace('"', '""') + '"' for t in terms)
        rows = self.db.execute(
            "SELECT text, source, heading, -bm25(chunks, 1.0, 2.0, 1.0) AS score FROM chunks WHERE chunks MATCH ? "
            "ORDER BY score DESC LIMIT ?", (match, 3 * int(k))).fetchall()
        out = []
        for text, source, heading, score in rows:
            words = {stem(w) for w in re.findall(r"\w+", f"{heading} {text}".lower())}
            out.append(Passage(text, source, heading, float(score), [t for t in terms if stem(t) in words]))
        # a passage with more of the question's words first; BM25 among equals
        out.sort(key=lambda p: (len(p.matched), p.score), reverse=True)
        return out[:k]

    def retrieve(self, query: str, k: int = 3, min_score: float = 0.0, min_coverage: float = 0.5) -> list[Passage]:
        """The passages relevant enough to answer from: at least `min_coverage` of the question's words found
        in the passage (one shared common word is not relevance; raw BM25 values depend on the corpus size, so
        they make a poor threshold alone) and BM25 at least `min_score`."""
        terms = query_terms(query)
        return [p for p in self.search(query, k)
                if p.score >= min_score and terms and len(p.matched) / len(terms) >= min_coverage]


def default_path() -> Path:
    """$MMCHAT_HOME/kb.db, else $XDG_DATA_HOME/mmchat/kb.db (~/.local/share/mmchat/kb.db)."""
    import os
    if os.environ.get("MMCHAT_HOME"):
        return Path(os.environ["MMCHAT_HOME"]).expanduser() / "kb.db"
    return Path(os.environ.get("XDG_DATA_HOME") or Path.home() / ".local" / "share") / "mmchat" / "kb.db"


def sample_dir() -> Path:
    return Path(str(resources.files("mmchat") / "data" / "kb"))


# -- answering ------------------------------------------------------------------------------------------------
DONT_KNOW = ("I'm sorry, I don't know that: it is not in our documents. I can hand you over to a human "
             "colleague if you like.")


@dataclass
class Answer:
    text: str
    passages: list[Passage]           # what the model was given, numbered [1], [2], ... in the prompt
    cited: list[int]                  # the passage numbers the answer cites
    declined: bool                    # nothing relevant was found, so the model was not asked

    @property
    def sources(self) -> list[str]:
        return [self.passages[i - 1].cite() for i in self.cited]


def grounded_messages(question: str, passages: list[Passage], system: str = "",
                      history: list[dict] = ()) -> list[dict]:
    """The prompt: the passages numbered, the rule to answer only from them and cite them, the question."""
    context = "\n\n".join(f"[{i}] ({p.cite()})\n{p.text}" for i, p in enumerate(passages, 1))
    rules = ("Answer the customer's question using only the passages below. Be brief. End with the number of "
             "the passage you used in brackets, like [1]. If the passages do not answer the question, say that "
             "you do not know.")
    system = f"{system}\n\n{rules}" if system else rules
    return [{"role": "system", "content": f"{system}\n\nPassages:\n{context}"}, *history,
            {"role": "user", "content": question}]


def sentences(text: str) -> list[str]:
    return [s.strip() for s in re.split(r"(?<=[.!?])\s+", text) if s.strip()]


def extractive_grammar(passages: list[Passage], per_passage: int = 12) -> str:
    """A Lark grammar whose sentences are the passages' own sentences, each followed by its passage's number:
    the model only chooses which sentence answers, so the answer is the documents' wording, correctly cited."""
    rules, names = [], []
    for i, p in enumerate(passages, 1):
        options = list(dict.fromkeys(sentences(p.text)))[:per_passage]
        if options:
            rules.append(f"p{i}: ({' | '.join(json.dumps(s) for s in options)}) \" [{i}]\"")
            names.append(f"p{i}")
    return "\n".join([f"start: {' | '.join(names)}", *rules])


def answer(llm, kb: KnowledgeBase, question: str, k: int = 3, system: str = "", history: list[dict] = (),
           min_score: float = 0.0, extractive: bool = False, **sampling) -> Answer:
    """Retrieve, then answer from the passages with citations; decline without asking the model when nothing
    relevant is found. A citation the model leaves out is added for the best passage (the answer came from
    what it was shown). extractive=True constrains the answer to one of the passages' own sentences with its
    citation (a small model otherwise often ignores what it was shown)."""
    passages = kb.retrieve(question, k, min_score)
    if not passages:
        return Answer(DONT_KNOW, [], [], True)
    if extractive:
        sampling = {**sampling, "constraint": llm.constraint(grammar=extractive_grammar(passages))}
    text = llm.chat(grounded_messages(question, passages, system, list(history)),
                    **{"temperature": 0.2, "max_tokens": 160, **sampling}).strip()
    cited = sorted({int(n) for n in re.findall(r"\[(\d+)\]", text) if 1 <= int(n) <= len(passages)})
    if not cited:
        cited = [1]
        text = f"{text} [1]"
    return Answer(text, passages, cited, False)
