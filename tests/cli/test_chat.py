"""The chat session: history across turns, KV reuse, Ctrl-C mid-answer, slash commands; `offspec chat` over a pipe."""

from __future__ import annotations

import json

import pytest

import offspec.chat
from offspec.chat import ChatSession, render_prompt
from offspec.errors import ConfigError
from offspec.generate import GenerationConfig


@pytest.fixture(scope="module")
def loaded(tiny, session_home):
    from offspec.config import RuntimeConfig
    from offspec.loader import load_engine

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("OFFSPEC_HOME", str(session_home))
        out = load_engine(str(tiny.target), str(tiny.draft), spec=True, rc=RuntimeConfig(device="cpu", dtype="float32"),
                          cache_tokens=256, progress=False, budget_auto=False)
    yield out
    out.engine.target.close()
    out.engine.draft.close()


@pytest.fixture
def session(loaded):
    loaded.engine.reset()
    return ChatSession(loaded.engine, loaded.tokenizer, GenerationConfig(max_new_tokens=6, budget=8))


def interrupt_after(n_pieces: int, monkeypatch):
    """Make the session's stream raise KeyboardInterrupt after n text pieces (as Ctrl-C would mid-answer)."""
    real = offspec.chat.stream_text

    def stream(engine, prompt_ids, cfg, stats=None):
        seen = 0
        for ev in real(engine, prompt_ids, cfg, stats):
            yield ev
            seen += bool(ev.text)
            if seen >= n_pieces:
                raise KeyboardInterrupt

    monkeypatch.setattr(offspec.chat, "stream_text", stream)


def test_history_carries_across_turns_and_reuses_the_cache(session, monkeypatch):
    first = session.ask("Hello, how are you?")
    assert first.text and not first.interrupted
    assert session.messages[-1] == {"role": "assistant", "content": first.text}
    prompts: list[list[int]] = []
    real = offspec.chat.stream_text

    def spy(engine, prompt_ids, cfg, stats=None):
        prompts.append(list(prompt_ids))
        yield from real(engine, prompt_ids, cfg, stats)

    monkeypatch.setattr(offspec.chat, "stream_text", spy)
    second = session.ask("Say it again.")
    assert first.text in session.tokenizer.decode(prompts[0])  # the second prompt holds the first answer
    assert prompts[0] == session.prompt_ids(session.messages[:-1])
    assert [m["role"] for m in session.messages] == ["user", "assistant", "user", "assistant"]
    # Only the new part of the conversation was prefilled: the KV cache kept the first turn.
    assert 0 < second.stats.prefill_tokens < len(prompts[0]) - 1


def test_interrupt_keeps_the_partial_answer_and_the_next_turn_works(session, monkeypatch):
    interrupt_after(1, monkeypatch)
    cut = session.ask("Tell me a long story.")
    assert cut.interrupted and cut.text
    assert session.messages[-1] == {"role": "assistant", "content": cut.text, "interrupted": True}
    monkeypatch.undo()
    nxt = session.ask("Go on.")
    assert not nxt.interrupted and nxt.stats.tokens > 0
    assert cut.text in session.prompt_text(session.messages[:-1])
    assert "interrupted" not in session.prompt_text()  # the mark stays out of the model's prompt


def test_interrupt_inside_the_target_pass_leaves_the_engine_usable(session, loaded, monkeypatch):
    target = loaded.engine.target
    real_forward = target.forward
    calls = {"n": 0}

    def forward(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:  # prefill, one pass, then Ctrl-C during the next pass
            raise KeyboardInterrupt
        return real_forward(*args, **kwargs)

    monkeypatch.setattr(target, "forward", forward)
    cut = session.ask("Hello, how are you?")
    assert cut.interrupted
    monkeypatch.undo()
    fresh = ChatSession(loaded.engine, loaded.tokenizer, session.cfg, messages=list(session.messages))
    after = session.ask("And now?")
    loaded.engine.reset()
    again = fresh.ask("And now?")
    assert after.text == again.text  # resuming on the interrupted caches equals a fresh run


def test_context_error_drops_the_user_message(session):
    from offspec.errors import ContextError

    with pytest.raises(ContextError):
        session.ask("x " * 400)
    assert session.messages == []


def test_slash_commands(session, tmp_path):
    session.system = "Be brief."
    session.reset()
    session.ask("Hello")
    stats = session.command("/stats")
    assert "last answer" in stats.message and not stats.leave
    path = tmp_path / "chat.json"
    saved = session.command(f"/save {path}")
    assert str(path) in saved.message
    data = json.loads(path.read_text())
    assert [m["role"] for m in data["messages"]] == ["system", "user", "assistant"]
    assert session.command("/reset").message and session.messages == [{"role": "system", "content": "Be brief."}]
    assert session.command("/exit").leave
    with pytest.raises(ConfigError):
        session.command("/frobnicate")
    with pytest.raises(ConfigError):
        session.command("/save")


def test_render_without_a_template(tiny):
    class NoTemplate:
        chat_template = None

    one = [{"role": "user", "content": "Hi"}]
    assert render_prompt(NoTemplate(), one) == "Hi"
    two = one + [{"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "Bye"}]
    assert render_prompt(NoTemplate(), two) == "User: Hi\nAssistant: Hello!\nUser: Bye\nAssistant:"


def test_chat_command_over_a_pipe(runner, cli_app, tiny, tmp_path):
    save = tmp_path / "saved.json"
    lines = ["Hello", "", "/stats", "What did I say?", f"/save {save}", "/exit", "never read"]
    res = runner.invoke(cli_app, ["chat", "--model", str(tiny.target), "--no-spec", "-n", "4", "--dtype", "float32",
                                  "--system", "Be brief."], input="\n".join(lines) + "\n")
    assert res.exit_code == 0, res.output
    assert ">>>" not in res.output  # no prompt decoration off a terminal
    messages = json.loads(save.read_text())["messages"]
    assert [m["role"] for m in messages] == ["system", "user", "assistant", "user", "assistant"]
    assert messages[2]["content"] + "\n" + messages[4]["content"] + "\n" == res.stdout
    assert "last answer" in res.stderr


def test_chat_ends_at_end_of_input(runner, cli_app, tiny):
    res = runner.invoke(cli_app, ["chat", "--model", str(tiny.target), "--no-spec", "-n", "2", "--dtype", "float32"],
                        input="Hello\n")
    assert res.exit_code == 0, res.output
    assert res.stdout.count("\n") == 1


def test_piped_chat_stops_at_an_unknown_command(runner, cli_app, tiny):
    res = runner.invoke(cli_app, ["chat", "--model", str(tiny.target), "--no-spec", "-n", "2", "--dtype", "float32"],
                        input="/frobnicate\nHello\n")
    assert res.exit_code == 2 and res.stdout == ""
    assert res.stderr.splitlines() == ["error: unknown command /frobnicate; try /help"]


def test_chat_command_survives_ctrl_c_mid_answer(runner, cli_app, tiny, tmp_path, monkeypatch):
    real = offspec.chat.stream_text
    calls = {"n": 0}

    def stream(engine, prompt_ids, cfg, stats=None):
        calls["n"] += 1
        for i, ev in enumerate(real(engine, prompt_ids, cfg, stats)):
            yield ev
            if calls["n"] == 1 and i == 1:
                raise KeyboardInterrupt

    monkeypatch.setattr(offspec.chat, "stream_text", stream)
    save = tmp_path / "c.json"
    res = runner.invoke(cli_app, ["chat", "--model", str(tiny.target), "--no-spec", "-n", "4", "--dtype", "float32"],
                        input=f"Hello\nGo on\n/save {save}\n")
    assert res.exit_code == 0, res.output
    assert "interrupted" in res.stderr
    messages = json.loads(save.read_text())["messages"]
    assert messages[1].get("interrupted") is True and "interrupted" not in messages[3]
    assert res.stdout == messages[1]["content"] + "\n" + messages[3]["content"] + "\n"
