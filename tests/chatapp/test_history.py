"""The conversations store: round trips, ordering, regenerate, export, schema versions, corrupt
files, and a real kill -9 in the middle of a streaming reply."""

import sqlite3
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest

from chatapp.store import history as history_module
from chatapp.store.history import DEFAULT_TITLE, History, HistoryError, NotFoundError, make_title


@pytest.fixture
def db_path(tmp_path):
    return tmp_path / "history.sqlite3"


@pytest.fixture
def store(db_path):
    h = History(db_path)
    yield h
    h.close()


def test_default_path_honours_data_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("CHATAPP_DATA_DIR", str(tmp_path / "data"))
    with History() as h:
        assert h.path == tmp_path / "data" / "history.sqlite3"
        assert h.path.exists()
        assert h.recovered_from is None


def test_chat_round_trip(store, db_path):
    params = {"temperature": 0.7, "top_p": 0.9, "top_k": 40, "max_new_tokens": 256, "seed": 3}
    chat = store.new_chat("HuggingFaceTB/SmolLM2-135M-Instruct", title="Plans", system_prompt="Be brief.",
                          params=params, decoding="medusa")
    assert chat.id > 0 and chat.title == "Plans" and chat.params == params and chat.decoding == "medusa"
    assert chat.created_at == chat.updated_at
    store.close()
    with History(db_path) as again:
        assert again.chat(chat.id) == chat
        assert again.chats() == [chat]


def test_new_chat_defaults_and_embedded_model(store):
    chat = store.new_chat(None)
    assert (chat.title, chat.model, chat.system_prompt, chat.params, chat.decoding) == (DEFAULT_TITLE, None, "", {}, "plain")


def test_update_chat_changes_only_given_fields(store):
    chat = store.new_chat("m", system_prompt="old")
    updated = store.update_chat(chat.id, title="Renamed", params={"temperature": 1.0})
    assert updated.title == "Renamed" and updated.params == {"temperature": 1.0}
    assert updated.system_prompt == "old" and updated.model == "m" and updated.decoding == "plain"
    assert updated.updated_at >= chat.updated_at
    assert store.chat(chat.id) == updated
    store.update_chat(chat.id, model="other", system_prompt="", decoding="dmc")
    again = store.chat(chat.id)
    assert (again.model, again.system_prompt, again.decoding, again.title) == ("other", "", "dmc", "Renamed")


def test_bad_arguments_are_refused(store):
    chat = store.new_chat("m")
    with pytest.raises(ValueError, match="temprature"):
        store.new_chat("m", params={"temprature": 1})
    with pytest.raises(ValueError, match="decoding"):
        store.update_chat(chat.id, decoding="fast")
    with pytest.raises(ValueError, match="role"):
        store.add_message(chat.id, "tool", "x")
    with pytest.raises(NotFoundError):
        store.chat(12345)
    with pytest.raises(NotFoundError):
        store.add_message(12345, "user", "x")
    with pytest.raises(NotFoundError):
        store.update_message(12345, content="x")
    with pytest.raises(NotFoundError):
        store.delete_chat(12345)
    assert isinstance(NotFoundError("x"), LookupError) and isinstance(NotFoundError("x"), HistoryError)
    assert store.messages(chat.id) == []


def test_messages_round_trip_in_order(store, db_path):
    chat = store.new_chat("m")
    a = store.add_message(chat.id, "system", "sys")
    b = store.add_message(chat.id, "user", "hello")
    c = store.add_message(chat.id, "assistant", "hi there", stats={"tokens_per_s": 41.5, "ttft_s": 0.12})
    assert [m.position for m in (a, b, c)] == [0, 1, 2]
    assert c.complete is True and c.stats == {"tokens_per_s": 41.5, "ttft_s": 0.12} and b.stats is None
    store.close()
    with History(db_path) as again:
        assert again.messages(chat.id) == [a, b, c]
        assert again.message(b.id) == b


def test_chats_most_recently_updated_first(store):
    first = store.new_chat("m", title="first")
    second = store.new_chat("m", title="second")
    third = store.new_chat("m", title="third")
    assert [c.title for c in store.chats()] == ["third", "second", "first"]
    time.sleep(0.01)
    store.add_message(first.id, "user", "bump")
    assert [c.id for c in store.chats()] == [first.id, third.id, second.id]
    time.sleep(0.01)
    store.update_chat(second.id, title="renamed")
    assert [c.id for c in store.chats()] == [second.id, first.id, third.id]


def test_title_from_first_user_message(store):
    chat = store.new_chat("m")
    store.add_message(chat.id, "system", "You are terse.")
    assert store.chat(chat.id).title == DEFAULT_TITLE
    store.add_message(chat.id, "user", "How do I  reverse\na linked list in place without extra memory?")
    title = store.chat(chat.id).title
    assert title.startswith("How do I reverse a linked list") and title.endswith("…")
    assert len(title) <= 40 and "\n" not in title
    store.add_message(chat.id, "user", "second question")
    assert store.chat(chat.id).title == title

    named = store.new_chat("m", title="Mine")
    store.add_message(named.id, "user", "anything")
    assert store.chat(named.id).title == "Mine"

    short = store.new_chat("m")
    store.add_message(short.id, "user", "  hi  ")
    assert store.chat(short.id).title == "hi"


def test_make_title():
    assert make_title("short") == "short"
    assert make_title("x" * 100) == "x" * 39 + "…"
    assert len(make_title("word " * 30)) <= 40


def test_streaming_updates(store):
    chat = store.new_chat("m")
    store.add_message(chat.id, "user", "tell me a story")
    reply = store.add_message(chat.id, "assistant", "", complete=False)
    assert reply.complete is False
    store.update_message(reply.id, content="Once upon", complete=False)
    assert store.message(reply.id).content == "Once upon" and not store.message(reply.id).complete
    stats = {"tokens_per_s": 30.0, "ttft_s": 0.2, "new_tokens": 12, "accepted_per_step": 2.4}
    store.update_message(reply.id, content="Once upon a time.", complete=True, stats=stats)
    done = store.message(reply.id)
    assert (done.content, done.complete, done.stats) == ("Once upon a time.", True, stats)
    store.update_message(reply.id)  # nothing to change
    assert store.message(reply.id) == done


def test_delete_chat_cascades(store, db_path):
    keep = store.new_chat("m")
    gone = store.new_chat("m")
    for chat in (keep, gone):
        store.add_message(chat.id, "user", "q")
        store.add_message(chat.id, "assistant", "a")
    store.delete_chat(gone.id)
    assert [c.id for c in store.chats()] == [keep.id]
    with pytest.raises(NotFoundError):
        store.messages(gone.id)
    assert len(store.messages(keep.id)) == 2
    raw = sqlite3.connect(db_path)
    assert raw.execute("SELECT count(*) FROM messages WHERE chat_id = ?", (gone.id,)).fetchone()[0] == 0
    raw.close()


def test_delete_messages_from_for_regenerate(store):
    chat = store.new_chat("m")
    other = store.new_chat("m")
    other_msg = store.add_message(other.id, "user", "elsewhere")
    u1 = store.add_message(chat.id, "user", "q1")
    store.add_message(chat.id, "assistant", "a1")
    store.add_message(chat.id, "user", "q2")
    a2 = store.add_message(chat.id, "assistant", "a2")
    store.add_message(chat.id, "user", "q3")
    store.add_message(chat.id, "assistant", "a3")
    assert store.delete_messages_from(chat.id, a2.id) == 3
    assert [m.content for m in store.messages(chat.id)] == ["q1", "a1", "q2"]
    regenerated = store.add_message(chat.id, "assistant", "a2 again")
    assert regenerated.position == 3
    assert [m.content for m in store.messages(chat.id)] == ["q1", "a1", "q2", "a2 again"]
    with pytest.raises(NotFoundError):
        store.delete_messages_from(chat.id, other_msg.id)  # not this chat's
    assert store.messages(other.id) == [other_msg]
    store.delete_messages_from(chat.id, u1.id)
    assert store.messages(chat.id) == []


def test_export_markdown(store):
    chat = store.new_chat("llama-3.2-1b", title="Greetings", system_prompt="Be kind.")
    store.add_message(chat.id, "user", "Hello")
    store.add_message(chat.id, "assistant", "Hi! How can I help?\n")
    store.add_message(chat.id, "user", "Write a poem")
    store.add_message(chat.id, "assistant", "Roses are", complete=False)
    md = store.export_markdown(chat.id)
    lines = md.splitlines()
    assert lines[0] == "# Greetings"
    assert "llama-3.2-1b" in md
    assert md.index("## System prompt") < md.index("Be kind.") < md.index("## User")
    assert md.count("## User") == 2 and md.count("## Assistant") == 2
    assert "## Assistant (incomplete)\n\nRoses are" in md
    assert "## Assistant\n\nHi! How can I help?\n" in md
    assert md.index("Hello") < md.index("Hi! How") < md.index("Write a poem") < md.index("Roses are")

    bare = store.new_chat(None)
    md = store.export_markdown(bare.id)
    assert md.startswith(f"# {DEFAULT_TITLE}\n") and "System prompt" not in md and "embedded model" in md


def test_search(store):
    a = store.new_chat("m", title="Rust lifetimes")
    b = store.new_chat("m")
    store.add_message(b.id, "user", "what is 50% of 10_000?")
    store.new_chat("m", title="unrelated")
    assert [c.id for c in store.search("lifetimes")] == [a.id]
    assert [c.id for c in store.search("50%")] == [b.id]
    assert [c.id for c in store.search("10_0")] == [b.id]
    assert store.search("0_1") == [] and store.search("%%") == []
    assert [c.id for c in store.search("RUST")] == [a.id]


def test_threads_share_one_connection(store):
    chat = store.new_chat("m")
    errors = []

    def writer(n):
        try:
            for i in range(20):
                store.add_message(chat.id, "user", f"{n}-{i}")
        except Exception as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=writer, args=(n,)) for n in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    messages = store.messages(chat.id)
    assert [m.position for m in messages] == list(range(80))


def test_wal_and_file_mode(store, db_path):
    raw = sqlite3.connect(db_path)
    assert raw.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert raw.execute("PRAGMA user_version").fetchone()[0] == history_module.schema_version()
    raw.close()
    assert db_path.stat().st_mode & 0o077 == 0


def test_closed_store_refuses(db_path):
    h = History(db_path)
    h.close()
    h.close()
    with pytest.raises(HistoryError, match="closed"):
        h.chats()


# --- schema versions and damaged files ---------------------------------------------------------

def test_newer_schema_is_refused_untouched(db_path):
    raw = sqlite3.connect(db_path)
    raw.execute("CREATE TABLE future (x)")
    raw.execute("INSERT INTO future VALUES (1)")
    raw.execute("PRAGMA user_version = 99")
    raw.commit()
    raw.close()
    before = db_path.read_bytes()
    with pytest.raises(HistoryError) as info:
        History(db_path)
    message = str(info.value)
    assert "\n" not in message and str(db_path) in message and "99" in message
    assert str(history_module.schema_version()) in message
    assert db_path.read_bytes() == before
    assert sorted(p.name for p in db_path.parent.iterdir()) == [db_path.name]


def test_current_version_reopens_unchanged(db_path):
    with History(db_path) as h:
        chat = h.new_chat("m")
        h.add_message(chat.id, "user", "kept")
    raw = sqlite3.connect(db_path)
    schema = raw.execute("SELECT sql FROM sqlite_master ORDER BY name").fetchall()
    raw.close()
    with History(db_path) as h:
        assert h.recovered_from is None
        assert [m.content for m in h.messages(chat.id)] == ["kept"]
    raw = sqlite3.connect(db_path)
    assert raw.execute("SELECT sql FROM sqlite_master ORDER BY name").fetchall() == schema
    assert raw.execute("PRAGMA user_version").fetchone()[0] == 1
    raw.close()


def _v1_by_hand(path: Path) -> None:
    """A version-1 file as the first chatapp with a history wrote it."""
    raw = sqlite3.connect(path)
    for sql in history_module.MIGRATIONS[0]:
        raw.execute(sql)
    raw.execute("INSERT INTO chats VALUES (1, 'Old chat', 'm', '', '{\"temperature\": 0.5}', 'plain', 1.0, 2.0)")
    raw.execute("INSERT INTO messages VALUES (1, 1, 0, 'user', 'hello', 1, NULL, 1.0)")
    raw.execute("INSERT INTO messages VALUES (2, 1, 1, 'assistant', 'hi', 0, NULL, 2.0)")
    raw.execute("PRAGMA user_version = 1")
    raw.commit()
    raw.close()


def test_migration_from_an_older_version(db_path, monkeypatch):
    _v1_by_hand(db_path)
    # a later chatapp that adds a column: its step runs once, the data survives
    step = ["ALTER TABLE chats ADD COLUMN pinned INTEGER NOT NULL DEFAULT 0"]
    monkeypatch.setattr(history_module, "MIGRATIONS", [*history_module.MIGRATIONS, step])
    with History(db_path) as h:
        assert h.recovered_from is None
        assert h.chat(1).title == "Old chat" and h.chat(1).params == {"temperature": 0.5}
        assert [(m.content, m.complete) for m in h.messages(1)] == [("hello", True), ("hi", False)]
    raw = sqlite3.connect(db_path)
    assert raw.execute("PRAGMA user_version").fetchone()[0] == 2
    assert raw.execute("SELECT pinned FROM chats").fetchall() == [(0,)]
    raw.close()
    with History(db_path) as h:  # already at 2: nothing runs again
        assert h.chat(1).title == "Old chat"


def test_failed_migration_rolls_back(db_path, monkeypatch):
    _v1_by_hand(db_path)

    def bad_step(conn):
        conn.execute("ALTER TABLE chats ADD COLUMN pinned INTEGER")
        raise RuntimeError("boom")

    monkeypatch.setattr(history_module, "MIGRATIONS", [*history_module.MIGRATIONS, bad_step])
    with pytest.raises(HistoryError, match="from version 1 to 2 failed: boom"):
        History(db_path)
    raw = sqlite3.connect(db_path)
    assert raw.execute("PRAGMA user_version").fetchone()[0] == 1
    assert "pinned" not in [r[1] for r in raw.execute("PRAGMA table_info(chats)")]
    raw.close()
    monkeypatch.undo()
    with History(db_path) as h:
        assert h.recovered_from is None and h.chat(1).title == "Old chat"


def _only_aside(directory: Path) -> Path:
    aside = [p for p in directory.iterdir() if ".corrupt-" in p.name and not p.name.endswith(("-wal", "-shm"))]
    assert len(aside) == 1
    return aside[0]


def test_not_a_database_is_moved_aside(db_path):
    junk = b"this is not a database, it is a shopping list\n" * 200
    db_path.write_bytes(junk)
    with History(db_path) as h:
        aside = h.recovered_from
        assert aside is not None and aside.name.startswith("history.sqlite3.corrupt-")
        assert aside == _only_aside(db_path.parent)
        assert aside.read_bytes() == junk
        assert h.recovery_reason
        assert h.chats() == []
        h.new_chat("m")
    with History(db_path) as h:
        assert h.recovered_from is None and len(h.chats()) == 1


def test_corrupt_database_is_moved_aside(db_path):
    with History(db_path) as h:
        chat = h.new_chat("m")
        for i in range(300):
            h.add_message(chat.id, "user", f"message {i} " + "x" * 200)
    raw = sqlite3.connect(db_path)
    raw.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    raw.close()
    data = bytearray(db_path.read_bytes())
    page = 4096
    assert len(data) > 6 * page
    for offset in range(2 * page, 5 * page, 97):  # scribble over interior pages, keep the header
        data[offset:offset + 8] = b"\xde\xad\xbe\xef" * 2
    db_path.write_bytes(bytes(data))
    with History(db_path) as h:
        assert h.recovered_from is not None
        assert h.recovered_from.read_bytes() == bytes(data)
        assert h.chats() == []


def test_foreign_sqlite_file_is_moved_aside(db_path):
    raw = sqlite3.connect(db_path)
    raw.execute("CREATE TABLE chats (something_else TEXT)")
    raw.commit()
    raw.close()
    with History(db_path) as h:
        assert h.recovered_from is not None
        h.new_chat("m")
    raw = sqlite3.connect(h.recovered_from)
    assert raw.execute("SELECT name FROM sqlite_master").fetchall() == [("chats",)]
    raw.close()


def test_empty_file_is_a_fresh_store(db_path):
    db_path.write_bytes(b"")
    with History(db_path) as h:
        assert h.recovered_from is None
        h.new_chat("m")


# --- a real crash -----------------------------------------------------------------------------

@pytest.mark.slow
def test_kill_9_keeps_the_partial_reply(db_path):
    script = textwrap.dedent(f"""
        import os, signal
        from chatapp.store.history import History
        h = History({str(db_path)!r})
        chat = h.new_chat("m")
        h.add_message(chat.id, "user", "write a long story")
        reply = h.add_message(chat.id, "assistant", "", complete=False)
        h.update_message(reply.id, content="Once upon a time", complete=False)
        h.update_message(reply.id, content="Once upon a time there was", complete=False)
        os.kill(os.getpid(), signal.SIGKILL)
    """)
    root = Path(__file__).resolve().parents[2]
    proc = subprocess.run([sys.executable, "-c", script], cwd=root, capture_output=True, timeout=120)
    assert proc.returncode == -9, proc.stderr.decode()
    assert Path(str(db_path) + "-wal").exists()  # no clean close: the writes live in the WAL
    with History(db_path) as h:
        assert h.recovered_from is None
        [chat] = h.chats()
        assert chat.title == "write a long story"
        user, reply = h.messages(chat.id)
        assert (user.role, user.content, user.complete) == ("user", "write a long story", True)
        assert (reply.role, reply.content) == ("assistant", "Once upon a time there was")
        assert reply.complete == 0
        assert "(incomplete)" in h.export_markdown(chat.id)


@pytest.mark.parametrize("in_the_way", ["a file where the data folder goes", "a folder where the database goes"])
def test_something_in_the_way_is_a_one_line_error_and_is_left_alone(tmp_path, monkeypatch, in_the_way):
    if in_the_way.startswith("a file"):
        blocker = tmp_path / "data"
        blocker.write_text("mine")
        monkeypatch.setenv("CHATAPP_DATA_DIR", str(blocker))
        match = "cannot make the history folder"
    else:
        monkeypatch.setenv("CHATAPP_DATA_DIR", str(tmp_path / "data"))
        blocker = tmp_path / "data" / "history.sqlite3"
        blocker.mkdir(parents=True)
        (blocker / "keep.txt").write_text("mine")
        match = "a folder is where the history database goes"
    with pytest.raises(HistoryError, match=match) as info:
        History()
    assert "\n" not in str(info.value) and str(blocker) in str(info.value)
    assert (blocker.read_text() if blocker.is_file() else (blocker / "keep.txt").read_text()) == "mine"


async def test_the_chat_starts_without_history_and_says_why(tmp_path, monkeypatch):
    from chatapp.tui.app import ChatApp
    from engine.serving.client import EngineClient
    from fakes.engine import FakeWorker, send, wait_for

    (tmp_path / "data").write_text("mine")
    monkeypatch.setenv("CHATAPP_DATA_DIR", str(tmp_path / "data"))
    app = ChatApp(client=EngineClient(worker=FakeWorker(max_tokens=2, interval=0.01)))
    async with app.run_test(size=(140, 36)) as pilot:
        await wait_for(pilot, lambda: app.state == "ready", 5, "the model to load")
        assert app.history is None
        said = [n.message for n in app._notifications]
        assert any("cannot make the history folder" in m and "not saved" in m for m in said), said
        await send(pilot, "Hello")
        await wait_for(pilot, lambda: app.state == "ready" and app.conversation[-1]["role"] == "assistant", 5,
                       "the reply")
    assert (tmp_path / "data").read_text() == "mine"
