"""``chatapp`` in a real terminal (tmux), as a person uses it, on the embedded model: ask a question and
see the answer and the stats, open compare mode, quit, start again and find the conversation; and a
``kill -9`` in the middle of a reply loses nothing that was on screen."""

from __future__ import annotations

import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

pytestmark = [pytest.mark.slow,  # each drives chatapp in a real terminal (tmux)
              pytest.mark.skipif(shutil.which("tmux") is None, reason="needs tmux (.ci/run installs it)")]

CHATAPP = str(Path(sys.executable).parent / "chatapp")
WIDTH, HEIGHT = 150, 42
SCREENS = Path(os.environ.get("CHATAPP_SCREENS_DIR", "")) if os.environ.get("CHATAPP_SCREENS_DIR") else None


class Terminal:
    """One tmux session on a server of its own, running ``chatapp`` with the given environment."""

    def __init__(self, env: dict[str, str], *args: str):
        self.socket = f"chatapp-test-{uuid.uuid4().hex[:8]}"
        self.env = {**os.environ, **env, "TERM": "xterm-256color", "COLORTERM": "truecolor"}
        command = " ".join(["exec", CHATAPP, "--device", "cpu", *args])  # exec: the pane's process is chatapp
        self._tmux("new-session", "-d", "-s", "t", "-x", str(WIDTH), "-y", str(HEIGHT), command)

    def _tmux(self, *args: str) -> str:
        r = subprocess.run(["tmux", "-L", self.socket, *args], env=self.env, capture_output=True, text=True,
                           timeout=30)
        return r.stdout

    def screen(self) -> str:
        return self._tmux("capture-pane", "-p", "-t", "t")

    def keys(self, *keys: str) -> None:
        self._tmux("send-keys", "-t", "t", *keys)

    def type(self, text: str) -> None:
        self._tmux("send-keys", "-t", "t", "-l", text)

    def pid(self) -> int:
        return int(self._tmux("display-message", "-p", "-t", "t", "#{pane_pid}").strip())

    def wait_for(self, condition, timeout: float, what: str) -> str:
        deadline = time.monotonic() + timeout
        while True:
            text = self.screen()
            if condition(text):
                return text
            if time.monotonic() > deadline:
                pytest.fail(f"timed out after {timeout} s waiting for {what}; the screen:\n{text}")
            time.sleep(0.5)

    def save(self, name: str, text: str) -> None:
        if SCREENS is not None:
            SCREENS.mkdir(parents=True, exist_ok=True)
            (SCREENS / f"{name}.txt").write_text(text)

    def close(self) -> None:
        self._tmux("kill-server")


@pytest.fixture
def user_env(tmp_path):
    return {"CHATAPP_DATA_DIR": str(tmp_path / "data"), "CHATAPP_CONFIG_DIR": str(tmp_path / "config")}


def test_a_new_user_chats_compares_and_finds_the_chat_again(user_env):
    term = Terminal(user_env)
    try:
        term.wait_for(lambda s: "ready" in s, 300, "the embedded model to load")
        term.type("What is the capital of France?")
        term.keys("Enter")
        screen = term.wait_for(lambda s: "ready" in s and "tok/s" in s and "Paris" in s, 120, "the answer")
        assert "tokens/step" in screen and "first token" in screen and "memory" in screen
        term.save("chat", screen)

        term.keys("C-t")  # compare mode, on the last question: plain against Medusa
        term.wait_for(lambda s: "plain" in s and "medusa" in s, 30, "the compare screen")
        term.keys("Enter")
        screen = term.wait_for(lambda s: "identical" in s or "differ" in s, 240, "both set-ups to finish")
        assert "faster" in screen or "slower" in screen
        term.save("compare", screen)
        term.keys("q")
        term.wait_for(lambda s: "ready" in s and "What is the capital" in s, 120, "the chat screen again")
        term.keys("C-q")
        deadline = time.monotonic() + 15
        while term.screen().strip() and "ready" in term.screen() and time.monotonic() < deadline:
            time.sleep(0.3)
    finally:
        term.close()

    term = Terminal(user_env)
    try:
        screen = term.wait_for(lambda s: "ready" in s, 300, "the model to load again")
        assert "What is the capital" in screen  # the list of chats (the title wraps in it)
    finally:
        term.close()


def test_kill_9_during_a_reply_keeps_the_reply(user_env):
    db = Path(user_env["CHATAPP_DATA_DIR"]) / "history.sqlite3"
    term = Terminal(user_env)
    try:
        term.wait_for(lambda s: "ready" in s, 300, "the embedded model to load")
        term.type("Write a long story about a lighthouse keeper.")
        term.keys("Enter")

        def partial_reply() -> str:
            with sqlite3.connect(db) as con:
                rows = con.execute("SELECT content, complete FROM messages WHERE role = 'assistant'").fetchall()
            return rows[0][0] if rows and len(rows[0][0]) > 40 and not rows[0][1] else ""

        deadline = time.monotonic() + 120
        while not partial_reply():
            assert time.monotonic() < deadline, "no partial reply written within 120 s"
            time.sleep(0.2)
        os.kill(term.pid(), signal.SIGKILL)
    finally:
        term.close()

    with sqlite3.connect(db) as con:
        [(content, complete)] = con.execute("SELECT content, complete FROM messages WHERE role = 'assistant'")
    assert complete == 0 and len(content) > 40

    term = Terminal(user_env)
    try:
        term.wait_for(lambda s: "ready" in s and "Write a long story" in s, 300, "the app to start again")
        term.keys("C-b")  # to the list of chats
        time.sleep(0.5)
        term.keys("Enter")  # open the first
        screen = term.wait_for(lambda s: "(incomplete)" in s, 30, "the saved partial reply")
        assert content[:30].split("\n")[0] in screen
    finally:
        term.close()
