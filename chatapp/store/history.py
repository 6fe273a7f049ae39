"""The conversations store: chats and their messages in a SQLite file.

One file, ``data_dir()/history.sqlite3``, in WAL mode. Every write is its own transaction and is
committed before the call returns, so killing the app (even with ``kill -9``) loses nothing that a
call had written; a reply that was streaming at the time stays in the file with ``complete`` false.
(``synchronous=NORMAL``: safe against a process crash; a power cut may lose the last commits but
never corrupts the file.)

The schema carries its version in ``PRAGMA user_version``; ``MIGRATIONS[i]`` takes a database from
version ``i`` to ``i + 1``, each step in one transaction. A file written by a newer chatapp is
refused with :class:`HistoryError` and left as it is. A file that is not a SQLite database, is
corrupt, or is some other program's database is moved aside to ``history.sqlite3.corrupt-<time>``
and a fresh store is started; :attr:`History.recovered_from` names the moved file so the UI can
tell the user. Nothing is ever deleted.

The calls are synchronous and short (a few ms); one connection serves every thread, guarded by a
lock.
"""

from __future__ import annotations

import json
import errno
import os
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

from engine.events import DECODINGS
from engine.paths import data_dir

FILENAME = "history.sqlite3"
DEFAULT_TITLE = "New chat"
TITLE_LENGTH = 40
ROLES = ("system", "user", "assistant")
PARAM_KEYS = ("temperature", "top_p", "top_k", "max_new_tokens", "seed")

# SQLite's primary result codes for "this is not a (sound) database file".
_SQLITE_CORRUPT = 11
_SQLITE_NOTADB = 26


class HistoryError(Exception):
    """The history file cannot be used (written by a newer chatapp, a failed migration, ...)."""


class NotFoundError(HistoryError, LookupError):
    """No chat or message with that id."""


@dataclass
class Chat:
    id: int
    title: str
    model: str | None  # model id or path; None = the embedded default model
    system_prompt: str
    params: dict  # sampling settings: a subset of PARAM_KEYS
    decoding: str  # plain | medusa | dmc
    created_at: float  # seconds since the epoch
    updated_at: float


@dataclass
class Message:
    id: int
    chat_id: int
    position: int  # 0, 1, 2... within the chat
    role: str  # system | user | assistant
    content: str
    complete: bool  # False while a reply streams in, or when the app died during one
    stats: dict | None = field(default=None)  # tokens/s, time to first token, acceptance...
    created_at: float = 0.0


# --- schema ------------------------------------------------------------------------------------

Step = Sequence[str] | Callable[[sqlite3.Connection], None]

_V1 = (
    """CREATE TABLE chats (
        id INTEGER PRIMARY KEY,
        title TEXT NOT NULL,
        model TEXT,
        system_prompt TEXT NOT NULL DEFAULT '',
        params TEXT NOT NULL DEFAULT '{}',
        decoding TEXT NOT NULL DEFAULT 'plain',
        created_at REAL NOT NULL,
        updated_at REAL NOT NULL
    )""",
    """CREATE TABLE messages (
        id INTEGER PRIMARY KEY,
        chat_id INTEGER NOT NULL REFERENCES chats(id) ON DELETE CASCADE,
        position INTEGER NOT NULL,
        role TEXT NOT NULL CHECK (role IN ('system', 'user', 'assistant')),
        content TEXT NOT NULL,
        complete INTEGER NOT NULL DEFAULT 1,
        stats TEXT,
        created_at REAL NOT NULL,
        UNIQUE (chat_id, position)
    )""",
    "CREATE INDEX chats_by_update ON chats (updated_at DESC, id DESC)",
)

# MIGRATIONS[i] takes a database from user_version i to i + 1: SQL statements, or a function of
# the connection. Append only; never edit a step that has shipped.
MIGRATIONS: list[Step] = [_V1]


def schema_version() -> int:
    """The version this chatapp writes."""
    return len(MIGRATIONS)


def default_path() -> Path:
    return data_dir() / FILENAME


def write_new_file(folder: Path, stem: str, suffix: str, text: str) -> Path:
    """``text`` in a new file ``folder/stem.suffix`` (``stem-2``, ``stem-3``... when taken), private
    to the user (0600): created exclusively, so nothing that is already there, a planted symlink
    included, is followed or written over. Returns its path."""
    folder.mkdir(parents=True, exist_ok=True)
    for n in range(1, 10000):
        path = folder / (f"{stem}{suffix}" if n == 1 else f"{stem}-{n}{suffix}")
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0), 0o600)
        except FileExistsError:
            continue
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        return path
    raise FileExistsError(errno.EEXIST, "every name is taken", str(folder / f"{stem}{suffix}"))


# --- the store ---------------------------------------------------------------------------------

class History:
    """The conversations store. ``path`` defaults to ``data_dir()/history.sqlite3``."""

    def __init__(self, path: str | os.PathLike | None = None):
        self.path = Path(path) if path is not None else default_path()
        self.recovered_from: Path | None = None  # where an unusable file was moved, if one was
        self.recovery_reason: str | None = None  # why, in words
        self._lock = threading.RLock()
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as e:  # a file where the folder goes, no permission...
            raise HistoryError(f"{self.path.parent}: cannot make the history folder here "
                               f"({e.strerror or e})") from None
        if self.path.is_dir():
            raise HistoryError(f"{self.path}: a folder is where the history database goes")
        try:
            self._conn = self._open()
        except _Unusable as e:
            self.recovered_from = self._move_aside()
            self.recovery_reason = str(e)
            self._conn = self._open()

    # opening

    def _open(self) -> sqlite3.Connection:
        try:
            if not self.path.exists():
                # private to the user; SQLite gives the -wal and -shm files the same mode
                os.close(os.open(self.path, os.O_CREAT | os.O_WRONLY, 0o600))
            conn = sqlite3.connect(self.path, timeout=5.0, isolation_level=None, check_same_thread=False)
        except (OSError, sqlite3.Error) as e:
            raise HistoryError(f"{self.path}: cannot open it ({getattr(e, 'strerror', None) or e})") from None
        try:
            self._prepare(conn)
        except BaseException:
            conn.close()
            raise
        return conn

    def _prepare(self, conn: sqlite3.Connection) -> None:
        try:
            version = conn.execute("PRAGMA user_version").fetchone()[0]
            if version > schema_version():  # before anything that could write to the file
                raise HistoryError(f"{self.path}: written by a newer chatapp (schema version {version}; "
                                   f"this one reads up to {schema_version()}); update chatapp to open it")
            check = conn.execute("PRAGMA quick_check").fetchall()
            if check != [("ok",)]:
                raise _Unusable(f"corrupt ({check[0][0]})")
            if version == 0 and conn.execute("SELECT count(*) FROM sqlite_master").fetchone()[0]:
                raise _Unusable("a SQLite database that chatapp did not write")
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA synchronous=NORMAL")
            conn.execute("PRAGMA foreign_keys=ON")
            self._migrate(conn, version)
        except sqlite3.DatabaseError as e:
            if (getattr(e, "sqlite_errorcode", 0) & 0xFF) in (_SQLITE_CORRUPT, _SQLITE_NOTADB):
                raise _Unusable(str(e)) from e
            raise HistoryError(f"{self.path}: {e}") from e

    def _migrate(self, conn: sqlite3.Connection, version: int) -> None:
        for target in range(version + 1, schema_version() + 1):
            step = MIGRATIONS[target - 1]
            conn.execute("BEGIN IMMEDIATE")
            try:
                if callable(step):
                    step(conn)
                else:
                    for sql in step:
                        conn.execute(sql)
                conn.execute(f"PRAGMA user_version = {target}")
                conn.execute("COMMIT")
            except BaseException as e:
                conn.execute("ROLLBACK")
                if isinstance(e, Exception) and not isinstance(e, HistoryError):
                    raise HistoryError(f"{self.path}: upgrading the schema from version {target - 1} "
                                       f"to {target} failed: {e}") from e
                raise

    def _move_aside(self) -> Path:
        stamp = time.strftime("%Y%m%d-%H%M%S")
        aside = self.path.with_name(f"{self.path.name}.corrupt-{stamp}")
        n = 1
        while aside.exists():
            n += 1
            aside = self.path.with_name(f"{self.path.name}.corrupt-{stamp}-{n}")
        os.replace(self.path, aside)
        # the journal files belong to the old file; a fresh database must not pick them up
        for suffix in ("-wal", "-shm", "-journal"):
            side = self.path.with_name(self.path.name + suffix)
            if side.exists():
                os.replace(side, aside.with_name(aside.name + suffix))
        return aside

    def close(self) -> None:
        with self._lock:
            if self._conn is not None:
                self._conn.close()
                self._conn = None

    def __enter__(self) -> History:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # plumbing

    @contextmanager
    def _write(self) -> Iterator[sqlite3.Connection]:
        """One transaction, committed when the block ends."""
        with self._lock:
            conn = self._connection()
            conn.execute("BEGIN IMMEDIATE")
            try:
                yield conn
            except BaseException:
                conn.execute("ROLLBACK")
                raise
            conn.execute("COMMIT")

    @contextmanager
    def _read(self) -> Iterator[sqlite3.Connection]:
        with self._lock:
            yield self._connection()

    def _connection(self) -> sqlite3.Connection:
        if self._conn is None:
            raise HistoryError(f"{self.path}: the history is closed")
        return self._conn

    # chats

    def new_chat(self, model: str | None, title: str = DEFAULT_TITLE, system_prompt: str = "",
                 params: Mapping | None = None, decoding: str = "plain") -> Chat:
        params_json = _params_json(params)
        _check_decoding(decoding)
        now = time.time()
        with self._write() as conn:
            cur = conn.execute(
                "INSERT INTO chats (title, model, system_prompt, params, decoding, created_at, updated_at) "
                "VALUES (?, ?, ?, ?, ?, ?, ?)", (title, model, system_prompt, params_json, decoding, now, now))
            return self._chat(conn, cur.lastrowid)

    def chats(self) -> list[Chat]:
        """Every chat, the most recently updated first."""
        with self._read() as conn:
            rows = conn.execute(f"SELECT {_CHAT_COLUMNS} FROM chats ORDER BY updated_at DESC, id DESC").fetchall()
        return [_chat_from_row(r) for r in rows]

    def chat(self, chat_id: int) -> Chat:
        with self._read() as conn:
            return self._chat(conn, chat_id)

    def update_chat(self, chat_id: int, *, title: str | None = None, model: str | None = None,
                    system_prompt: str | None = None, params: Mapping | None = None,
                    decoding: str | None = None) -> Chat:
        """Change the given fields (None = leave as is); returns the chat as it now is."""
        changes: dict[str, object] = {}
        if title is not None:
            changes["title"] = title
        if model is not None:
            changes["model"] = model
        if system_prompt is not None:
            changes["system_prompt"] = system_prompt
        if params is not None:
            changes["params"] = _params_json(params)
        if decoding is not None:
            _check_decoding(decoding)
            changes["decoding"] = decoding
        with self._write() as conn:
            self._chat(conn, chat_id)  # raises NotFoundError
            changes["updated_at"] = time.time()
            assignments = ", ".join(f"{name} = ?" for name in changes)
            conn.execute(f"UPDATE chats SET {assignments} WHERE id = ?", (*changes.values(), chat_id))
            return self._chat(conn, chat_id)

    def delete_chat(self, chat_id: int) -> None:
        """The chat and its messages."""
        with self._write() as conn:
            if conn.execute("DELETE FROM chats WHERE id = ?", (chat_id,)).rowcount == 0:
                raise NotFoundError(f"no chat {chat_id}")

    def search(self, text: str) -> list[Chat]:
        """Chats whose title or any message contains ``text`` (case-insensitive for ASCII),
        the most recently updated first."""
        pattern = "%" + text.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_") + "%"
        with self._read() as conn:
            rows = conn.execute(
                f"SELECT {_CHAT_COLUMNS} FROM chats WHERE title LIKE :p ESCAPE '\\' OR system_prompt LIKE :p "
                "ESCAPE '\\' OR id IN (SELECT chat_id FROM messages WHERE content LIKE :p ESCAPE '\\') "
                "ORDER BY updated_at DESC, id DESC", {"p": pattern}).fetchall()
        return [_chat_from_row(r) for r in rows]

    # messages

    def messages(self, chat_id: int) -> list[Message]:
        """The chat's messages in order."""
        with self._read() as conn:
            self._chat(conn, chat_id)
            rows = conn.execute(f"SELECT {_MESSAGE_COLUMNS} FROM messages WHERE chat_id = ? ORDER BY position",
                                (chat_id,)).fetchall()
        return [_message_from_row(r) for r in rows]

    def message(self, message_id: int) -> Message:
        with self._read() as conn:
            return self._message(conn, message_id)

    def add_message(self, chat_id: int, role: str, content: str, complete: bool = True,
                    stats: Mapping | None = None) -> Message:
        """Append a message. The first user message names a chat that still has the default title."""
        if role not in ROLES:
            raise ValueError(f"role must be one of {', '.join(ROLES)}, got {role!r}")
        stats_json = _stats_json(stats)
        now = time.time()
        with self._write() as conn:
            chat = self._chat(conn, chat_id)
            position = conn.execute("SELECT coalesce(max(position) + 1, 0) FROM messages WHERE chat_id = ?",
                                    (chat_id,)).fetchone()[0]
            cur = conn.execute(
                "INSERT INTO messages (chat_id, position, role, content, complete, stats, created_at) "
                "VALUES (?, ?, ?, ?, ?, ?, ?)", (chat_id, position, role, content, int(bool(complete)), stats_json, now))
            title = chat.title
            if role == "user" and chat.title == DEFAULT_TITLE:
                title = make_title(content) or DEFAULT_TITLE
            conn.execute("UPDATE chats SET title = ?, updated_at = ? WHERE id = ?", (title, now, chat_id))
            return self._message(conn, cur.lastrowid)

    def update_message(self, message_id: int, content: str | None = None, complete: bool | None = None,
                       stats: Mapping | None = None) -> None:
        """Change the given fields (None = leave as is). While a reply streams, the UI calls this with
        the text so far and ``complete=False``, then once with ``complete=True`` and the stats."""
        changes: dict[str, object] = {}
        if content is not None:
            changes["content"] = content
        if complete is not None:
            changes["complete"] = int(bool(complete))
        if stats is not None:
            changes["stats"] = _stats_json(stats)
        with self._write() as conn:
            message = self._message(conn, message_id)
            if changes:
                assignments = ", ".join(f"{name} = ?" for name in changes)
                conn.execute(f"UPDATE messages SET {assignments} WHERE id = ?", (*changes.values(), message_id))
                conn.execute("UPDATE chats SET updated_at = ? WHERE id = ?", (time.time(), message.chat_id))

    def delete_messages_from(self, chat_id: int, message_id: int) -> int:
        """Delete that message and every later one in the chat (to regenerate a reply); returns
        how many were deleted."""
        with self._write() as conn:
            message = self._message(conn, message_id)
            if message.chat_id != chat_id:
                raise NotFoundError(f"message {message_id} is not in chat {chat_id}")
            n = conn.execute("DELETE FROM messages WHERE chat_id = ? AND position >= ?",
                             (chat_id, message.position)).rowcount
            conn.execute("UPDATE chats SET updated_at = ? WHERE id = ?", (time.time(), chat_id))
            return n

    # export

    def export_markdown(self, chat_id: int) -> str:
        """The chat as Markdown: the title as the heading, the model and system prompt, then each
        message under its role; a reply that never finished is marked "(incomplete)"."""
        with self._lock:
            chat = self.chat(chat_id)
            messages = self.messages(chat_id)
        created = datetime.fromtimestamp(chat.created_at).strftime("%Y-%m-%d %H:%M")
        lines = [f"# {_one_line(chat.title)}", "", f"*{_one_line(chat.model or 'embedded model')} · {created}*", ""]
        if chat.system_prompt:
            lines += ["## System prompt", "", chat.system_prompt.rstrip("\n"), ""]
        for m in messages:
            heading = f"## {m.role.capitalize()}"
            if not m.complete:
                heading += " (incomplete)"
            lines += [heading, "", m.content.rstrip("\n"), ""]
        return "\n".join(lines)

    # rows

    def _chat(self, conn: sqlite3.Connection, chat_id: int) -> Chat:
        row = conn.execute(f"SELECT {_CHAT_COLUMNS} FROM chats WHERE id = ?", (chat_id,)).fetchone()
        if row is None:
            raise NotFoundError(f"no chat {chat_id}")
        return _chat_from_row(row)

    def _message(self, conn: sqlite3.Connection, message_id: int) -> Message:
        row = conn.execute(f"SELECT {_MESSAGE_COLUMNS} FROM messages WHERE id = ?", (message_id,)).fetchone()
        if row is None:
            raise NotFoundError(f"no message {message_id}")
        return _message_from_row(row)


class _Unusable(Exception):
    """The file is not a usable history database: move it aside."""


_CHAT_COLUMNS = "id, title, model, system_prompt, params, decoding, created_at, updated_at"
_MESSAGE_COLUMNS = "id, chat_id, position, role, content, complete, stats, created_at"


def _chat_from_row(row) -> Chat:
    id_, title, model, system_prompt, params, decoding, created_at, updated_at = row
    return Chat(id_, title, model, system_prompt, _loads(params) or {}, decoding, created_at, updated_at)


def _message_from_row(row) -> Message:
    id_, chat_id, position, role, content, complete, stats, created_at = row
    return Message(id_, chat_id, position, role, content, bool(complete),
                   _loads(stats) if stats is not None else None, created_at)


def _loads(text: str | None):
    try:
        return json.loads(text) if text else None
    except ValueError:  # a hand-edited row: show the chat rather than fail
        return None


def _params_json(params: Mapping | None) -> str:
    params = dict(params or {})
    unknown = sorted(set(params) - set(PARAM_KEYS))
    if unknown:
        raise ValueError(f"unknown sampling parameter(s) {', '.join(unknown)}; known: {', '.join(PARAM_KEYS)}")
    return json.dumps(params)


def _stats_json(stats: Mapping | None) -> str | None:
    return None if stats is None else json.dumps(dict(stats))


def _check_decoding(decoding: str) -> None:
    if decoding not in DECODINGS:
        raise ValueError(f"decoding must be one of {', '.join(DECODINGS)}, got {decoding!r}")


def _one_line(text: str) -> str:
    return " ".join(text.split())


def make_title(text: str, limit: int = TITLE_LENGTH) -> str:
    """A chat title from its first user message: one line, at most ``limit`` characters, cut at a
    word boundary where there is one, with an ellipsis when cut."""
    text = _one_line(text)
    if len(text) <= limit:
        return text
    cut = text[: limit - 1]
    space = cut.rfind(" ")
    if space >= limit // 2:
        cut = cut[:space]
    return cut.rstrip(" ,.;:-") + "…"
