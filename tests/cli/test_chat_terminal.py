"""chat on a terminal: line editing, history, bracketed paste, !multi and Esc-Enter, Ctrl-C at the prompt, and
/save asking before it overwrites, typed as key sequences into prompt_toolkit's pipe input and into a real
pseudo-terminal (pexpect)."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest

from offspec.chat_terminal import TerminalInput

LEFT, UP = "\x1b[D", "\x1b[A"
PASTE_START, PASTE_END = "\x1b[200~", "\x1b[201~"


@pytest.fixture
def terminal():
    """A TerminalInput reading keys from a pipe (prompt_toolkit's own test input), and the pipe."""
    from prompt_toolkit.input import create_pipe_input
    from prompt_toolkit.output import DummyOutput

    with create_pipe_input() as pipe:
        yield TerminalInput(None, input=pipe, output=DummyOutput()), pipe


def test_arrow_keys_edit_the_line_and_recall_history(terminal):
    reader, keys = terminal
    keys.send_text("Helo" + LEFT + "l\r")
    assert reader.read_message() == "Hello"
    keys.send_text(UP + " again\r")
    assert reader.read_message() == "Hello again"


def test_a_bracketed_paste_of_several_lines_is_one_message(terminal):
    reader, keys = terminal
    keys.send_text(PASTE_START + "first line\nsecond line\r\nthird line" + PASTE_END + "\r")
    assert reader.read_message() == "first line\nsecond line\nthird line"


def test_multi_line_mode_and_esc_enter(terminal):
    reader, keys = terminal
    keys.send_text("!multi\rone\r\rtwo\r!end\r")
    assert reader.read_message() == "one\n\ntwo"
    keys.send_text("a\x1b\rb\r")
    assert reader.read_message() == "a\nb"


def test_ctrl_d_ends_and_confirm_reads_yes_or_no(terminal):
    reader, keys = terminal
    keys.send_text("y\r")
    assert reader.confirm("overwrite?") is True
    keys.send_text("\r")
    assert reader.confirm("overwrite?") is False  # the default is no
    keys.send_text("\x04")
    assert reader.read_message() is None


def test_history_is_kept_in_a_file(tmp_path):
    from prompt_toolkit.input import create_pipe_input
    from prompt_toolkit.output import DummyOutput

    history = tmp_path / "home" / "chat_history"
    with create_pipe_input() as pipe:
        reader = TerminalInput(history, input=pipe, output=DummyOutput())
        pipe.send_text("remember me\r")
        assert reader.read_message() == "remember me"
    with create_pipe_input() as pipe:
        reader = TerminalInput(history, input=pipe, output=DummyOutput())  # a later chat
        pipe.send_text(UP + "\r")
        assert reader.read_message() == "remember me"


def test_chat_in_a_pseudo_terminal(tiny, session_home, tmp_path):
    """The real `offspec chat` on a pty: every way of typing a message lands as one user turn."""
    pexpect = pytest.importorskip("pexpect")
    home = tmp_path / "home"
    home.mkdir()
    (session_home / "stores").mkdir(exist_ok=True)
    (home / "stores").symlink_to(session_home / "stores")
    env = {**os.environ, "OFFSPEC_HOME": str(home), "TERM": "xterm", "PROMPT_TOOLKIT_NO_CPR": "1",
           "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    save = tmp_path / "pty.json"
    child = pexpect.spawn(sys.executable, ["-m", "offspec", "chat", "-m", str(tiny.target), "--no-spec", "-n", "3",
                                           "--dtype", "float32"], env=env, encoding="utf-8", timeout=60,
                          dimensions=(40, 200))
    try:
        def turn(keys: str) -> None:
            child.send(keys)
            child.expect("tok/s")  # the answer's stats line
            child.expect(">>>")

        child.expect(">>>")
        turn("Helo" + LEFT + "l\r")  # line editing
        turn(UP + " again\r")  # history
        turn(PASTE_START + "first line\nsecond line\nthird line" + PASTE_END + "\r")  # bracketed paste
        child.send("!multi\r")
        child.expect_exact("...")
        turn("one\rtwo\r!end\r")  # multi-line mode
        turn("a\x1b\rb\r")  # Esc Enter adds a line
        child.send("\x03")  # Ctrl-C at the prompt does not leave
        child.expect("Ctrl-D or /exit")
        child.expect(">>>")
        child.send(f"/save {save}\r")
        child.expect("saved 10 messages")
        child.expect(">>>")
        child.send(f"/save {save}\r")
        child.expect_exact("overwrite it? [y/N]")
        child.send("y\r")
        child.expect("saved 10 messages")
        child.send("/exit\r")
        child.expect(pexpect.EOF)
    finally:
        child.close(force=True)
    assert child.exitstatus == 0, child.before
    messages = json.loads(save.read_text())["messages"]
    users = [m["content"] for m in messages if m["role"] == "user"]
    assert users == ["Hello", "Hello again", "first line\nsecond line\nthird line", "one\ntwo", "a\nb"]
    assert [m["role"] for m in messages] == ["user", "assistant"] * 5
