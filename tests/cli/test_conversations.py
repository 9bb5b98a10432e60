"""Conversations that can be continued: chat commands, the record /save writes, the SQLite log, `offspec logs`,
`chat --continue` and `chat --load` (one loader)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from offspec.chat import ChatSession
from offspec.conversations import Conversation, ConversationLog, Recorder, load_conversation
from offspec.errors import ConfigError
from offspec.generate import GenerationConfig

CHAT = ["chat", "--no-spec", "-n", "3", "--dtype", "float32"]


@pytest.fixture
def home(tmp_path, session_home, monkeypatch) -> Path:
    """A fresh OFFSPEC_HOME (its own log) that shares the converted tiny stores."""
    fresh = tmp_path / "home"
    fresh.mkdir()
    (session_home / "stores").mkdir(exist_ok=True)
    (fresh / "stores").symlink_to(session_home / "stores")
    monkeypatch.setenv("OFFSPEC_HOME", str(fresh))
    return fresh


@pytest.fixture(scope="module")
def loaded(tiny, session_home):
    from offspec.config import RuntimeConfig
    from offspec.loader import load_engine

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("OFFSPEC_HOME", str(session_home))
        out = load_engine(str(tiny.target), None, spec=False, rc=RuntimeConfig(device="cpu", dtype="float32"),
                          cache_tokens=256, progress=False, budget_auto=False)
    yield out
    out.close()


@pytest.fixture
def session(loaded):
    loaded.engine.reset()
    return ChatSession(loaded.engine, loaded.tokenizer, GenerationConfig(max_new_tokens=3, spec=False))


def test_system_clear_stats_and_help(session):
    session.ask("Hello")
    assert session.command("/stats").message.splitlines()[1].startswith("session (1 answer):")
    session.ask("Again")
    assert "session (2 answers):" in session.command("/stats").message
    old_id = session.conversation.id
    assert session.command("/system Be brief.").message == "system message set"
    assert session.messages[0] == {"role": "system", "content": "Be brief."} and len(session.messages) == 5
    assert session.command("/system Be kind.") and [m for m in session.messages if m["role"] == "system"] == [
        {"role": "system", "content": "Be kind."}]
    session.command("/clear")
    assert session.messages == [{"role": "system", "content": "Be kind."}] and not session.turns
    assert session.conversation.id != old_id  # a cleared conversation is a new record
    assert session.command("/stats").message == "no answers yet"
    session.command("/system")
    assert session.messages == [] and session.system is None
    assert session.command("/reset").message == "conversation cleared"
    text = session.command("/help").message
    for word in ("/system", "/clear", "/save", "/load", "/stats", "/exit", "!multi"):
        assert word in text


def test_save_asks_before_overwriting_and_load_restores(session, tmp_path):
    session.ask("Hello")
    path = tmp_path / "c.json"
    assert "saved 2 messages" in session.command(f"/save {path}").message
    first = path.read_text()
    session.ask("More")
    asked: list[str] = []
    no = session.command(f"/save {path}", confirm=lambda q: asked.append(q) or False)
    assert no.message.startswith("not saved") and path.read_text() == first and str(path) in asked[0]
    assert session.command(f"/save {path}").message.startswith("not saved")  # nobody to ask: keep the file
    assert "saved 4 messages" in session.command(f"/save {path}", confirm=lambda q: True).message
    saved = json.loads(path.read_text())
    assert saved["messages"] == session.messages and saved["id"] == session.conversation.id
    session.command("/clear")
    assert "loaded 4 messages" in session.command(f"/load {path}").message
    assert session.messages == saved["messages"] and session.conversation.id == saved["id"]
    with pytest.raises(ConfigError):
        session.command(f"/load {tmp_path / 'missing.json'}")
    (tmp_path / "bad.json").write_text('{"messages": [{"role": "robot", "content": 1}]}')
    with pytest.raises(ConfigError, match="message 0"):
        session.command(f"/load {tmp_path / 'bad.json'}")


def test_the_log_holds_the_record_save_writes(session, tmp_path):
    log = ConversationLog(tmp_path / "home")
    session.on_change = Recorder(log, warn=pytest.fail)
    session.ask("Hello")
    session.ask("Again")
    path = session.save(tmp_path / "c.json")
    logged = log.list()
    assert len(logged) == 1  # one conversation, updated after each answer
    assert logged[0].to_dict() == json.loads(path.read_text())
    assert load_conversation(path).to_dict() == load_conversation(log=log).to_dict()  # one loader, both sources


def test_an_unwritable_log_warns_once_and_goes_on(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("")
    warnings: list[str] = []
    record = Recorder(ConversationLog(blocker / "home"), warnings.append)
    conv = Conversation([{"role": "user", "content": "hi"}])
    record(conv)
    record(conv)
    assert len(warnings) == 1 and "--no-log" in warnings[0]


def test_generate_logs_and_offspec_logs_lists(runner, cli_app, tiny, home):
    res = runner.invoke(cli_app, ["generate", "Hello there", "-m", str(tiny.target), "--no-spec", "-n", "2",
                                  "--dtype", "float32"])
    assert res.exit_code == 0, res.output
    out = runner.invoke(cli_app, ["logs", "--json"])
    assert out.exit_code == 0, out.output
    records = json.loads(out.stdout)
    assert len(records) == 1 and records[0]["command"] == "generate" and records[0]["model"] == str(tiny.target)
    assert [m["role"] for m in records[0]["messages"]] == ["user", "assistant"]
    assert records[0]["messages"][1]["content"] + "\n" == res.stdout
    table = runner.invoke(cli_app, ["logs"], env={"COLUMNS": "200"})
    assert table.exit_code == 0 and records[0]["id"] in table.stdout and "Hello there" in table.stdout
    runner.invoke(cli_app, ["generate", "Hi", "-m", str(tiny.target), "--no-spec", "-n", "1", "--no-log"])
    assert runner.invoke(cli_app, ["logs", "--off"]).exit_code == 0
    runner.invoke(cli_app, ["generate", "Hi", "-m", str(tiny.target), "--no-spec", "-n", "1"])
    assert len(json.loads(runner.invoke(cli_app, ["logs", "--json"]).stdout)) == 1  # neither was logged
    assert runner.invoke(cli_app, ["logs", "--on"]).exit_code == 0
    runner.invoke(cli_app, ["generate", "Hi", "-m", str(tiny.target), "--no-spec", "-n", "1"])
    assert len(json.loads(runner.invoke(cli_app, ["logs", "--json", "-n", "0"]).stdout)) == 2


def test_generate_with_an_unwritable_log_warns_once(runner, cli_app, tiny, home):
    (home / "logs.db").mkdir()  # sqlite cannot open it (as in a read-only folder, where root could still write)
    res = runner.invoke(cli_app, ["generate", "Hello", "-m", str(tiny.target), "--no-spec", "-n", "2"])
    assert res.exit_code == 0, res.output
    lines = sorted(res.stderr.splitlines(), key=lambda line: not line.startswith("warning:"))
    assert len(lines) == 2 and lines[0].startswith("warning: not logging") and "tok/s" in lines[1]


def test_chat_continue_and_load_resume_a_conversation(runner, cli_app, tiny, home, tmp_path):
    model = ["-m", str(tiny.target)]
    first = runner.invoke(cli_app, [*CHAT, *model, "--system", "Be brief."], input="Hello\n")
    assert first.exit_code == 0, first.output
    save = tmp_path / "resumed.json"
    res = runner.invoke(cli_app, [*CHAT, *model, "--continue"], input=f"Go on\n/save {save}\n")
    assert res.exit_code == 0, res.output
    resumed = json.loads(save.read_text())
    assert [m["role"] for m in resumed["messages"]] == ["system", "user", "assistant", "user", "assistant"]
    assert resumed["messages"][1]["content"] == "Hello" and resumed["messages"][0]["content"] == "Be brief."
    logged = json.loads(runner.invoke(cli_app, ["logs", "--json"]).stdout)
    assert len(logged) == 1 and logged[0]["id"] == resumed["id"]  # continuing updates the same record
    assert logged[0]["messages"] == resumed["messages"]
    again = tmp_path / "again.json"
    res = runner.invoke(cli_app, [*CHAT, *model, "--load", str(save), "--no-log"], input=f"/save {again}\n")
    assert res.exit_code == 0, res.output
    assert json.loads(again.read_text())["messages"] == resumed["messages"]
    bad = runner.invoke(cli_app, [*CHAT, *model, "--load", str(tmp_path / "none.json")], input="")
    assert bad.exit_code == 2 and bad.stderr.count("\n") == 1 and "none.json" in bad.stderr
    both = runner.invoke(cli_app, [*CHAT, *model, "--load", str(save), "--continue"], input="")
    assert both.exit_code == 2 and "--continue" in both.stderr


def test_continue_with_nothing_logged_is_one_line(runner, cli_app, tiny, home):
    res = runner.invoke(cli_app, [*CHAT, "-m", str(tiny.target), "--continue"], input="")
    assert res.exit_code == 2 and res.stderr.count("\n") == 1 and "no logged conversation" in res.stderr


def test_piped_multi_line_mode_makes_one_message(runner, cli_app, tiny, home, tmp_path):
    save = tmp_path / "m.json"
    res = runner.invoke(cli_app, [*CHAT, "-m", str(tiny.target)],
                        input=f"!multi\nline one\n\nline two\n!end\n/save {save}\n")
    assert res.exit_code == 0, res.output
    messages = json.loads(save.read_text())["messages"]
    assert [m["role"] for m in messages] == ["user", "assistant"]
    assert messages[0]["content"] == "line one\n\nline two"
