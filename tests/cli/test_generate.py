"""`offspec generate`: stdout holds only the answer, stats go to stderr, --json parses, spec greedy == plain greedy."""

from __future__ import annotations

import json

import pytest

import offspec.generate


def run(runner, app, *args, input: str | None = None):
    return runner.invoke(app, ["generate", *[str(a) for a in args]], input=input)


def test_stdout_is_only_the_text_and_stats_go_to_stderr(runner, cli_app, tiny):
    res = run(runner, cli_app, "Hello", "--model", tiny.target, "--no-spec", "-n", 6, "--dtype", "float32")
    assert res.exit_code == 0, res.output
    js = run(runner, cli_app, "Hello", "--model", tiny.target, "--no-spec", "-n", 6, "--dtype", "float32", "--json")
    assert js.exit_code == 0, js.output
    text = json.loads(js.stdout)["text"]
    assert text
    assert res.stdout == text + "\n"  # the answer and one closing newline, nothing else
    lines = res.stderr.splitlines()
    assert len(lines) == 1, res.stderr  # no loading chatter off a terminal: just the stats line
    for word in ("tokens", "tok/s", "tokens/pass", "passes", "s/pass", "draft", "GB/s"):
        assert word in lines[0]


def test_json_is_one_object_and_speculative_greedy_equals_plain_greedy(runner, cli_app, tiny):
    common = ["Speculative decoding", "--model", tiny.target, "-n", 10, "--dtype", "float32", "--temperature", 0,
              "--json"]
    plain = run(runner, cli_app, *common, "--no-spec")
    spec = run(runner, cli_app, *common, "--draft", tiny.draft, "--budget", 8)
    assert plain.exit_code == 0 and spec.exit_code == 0, plain.output + spec.output
    p, s = json.loads(plain.stdout), json.loads(spec.stdout)  # json.loads fails on anything besides one object
    for key in ("text", "prompt_ids", "token_ids", "stats", "model", "draft"):
        assert key in s
    assert s["token_ids"] == p["token_ids"] and len(p["token_ids"]) > 0
    assert s["prompt_ids"] == p["prompt_ids"]
    assert p["draft"] is None and s["draft"] == str(tiny.draft)
    for key in ("tokens", "passes", "tokens_per_pass", "tok_per_s", "target_pass_s", "draft_s", "streamed_bytes",
                "budget"):
        assert key in s["stats"]
    assert s["stats"]["tokens"] == len(s["token_ids"])
    assert s["stats"]["budget"] > 0 and p["stats"]["budget"] == 0


def test_prompt_from_stdin_and_dash(runner, cli_app, tiny):
    args = ["--model", tiny.target, "--no-spec", "-n", 3, "--json", "--dtype", "float32"]
    piped = run(runner, cli_app, *args, input="Hello")
    dash = run(runner, cli_app, "-", *args, input="Hello")
    given = run(runner, cli_app, "Hello", *args)
    assert piped.exit_code == dash.exit_code == given.exit_code == 0, piped.output + dash.output
    ids = {tuple(json.loads(r.stdout)["prompt_ids"]) for r in (piped, dash, given)}
    assert len(ids) == 1


def test_no_prompt_on_a_terminal_is_one_error_line(runner, cli_app, tiny, monkeypatch):
    import offspec.console

    monkeypatch.setattr(offspec.console, "stdin_is_tty", lambda: True)
    res = run(runner, cli_app, "--model", tiny.target)
    assert res.exit_code != 0
    assert res.stdout == ""
    assert res.stderr.count("\n") == 1 and "no prompt" in res.stderr


def test_raw_skips_the_chat_template(runner, cli_app, tiny):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny.target)
    args = ["Hello", "--model", tiny.target, "--no-spec", "-n", 2, "--json", "--dtype", "float32"]
    raw = json.loads(run(runner, cli_app, *args, "--raw").stdout)
    chat = json.loads(run(runner, cli_app, *args, "--system", "Be brief.").stdout)
    assert raw["prompt_ids"] == tok.encode("Hello")
    text = tok.decode(chat["prompt_ids"])
    assert "<|im_start|>system\nBe brief.<|im_end|>" in text and text.endswith("<|im_start|>assistant\n")


def test_ctrl_c_prints_the_stats_so_far_and_exits_130(runner, cli_app, tiny, monkeypatch):
    real = offspec.generate.stream_text

    def interrupted(engine, prompt_ids, cfg, stats=None):
        for i, ev in enumerate(real(engine, prompt_ids, cfg, stats)):
            yield ev
            if i == 2:
                raise KeyboardInterrupt

    monkeypatch.setattr(offspec.generate, "stream_text", interrupted)
    res = run(runner, cli_app, "Hello", "--model", tiny.target, "--no-spec", "-n", 20, "--dtype", "float32")
    assert res.exit_code == 130
    assert res.stdout.endswith("\n") and len(res.stdout) > 1  # the partial answer was streamed
    assert res.stderr.startswith("interrupted: 3 tokens")
    assert "Traceback" not in res.output


@pytest.mark.parametrize("temperature", [0.8])
def test_sampling_with_a_seed_is_reproducible(runner, cli_app, tiny, temperature):
    args = ["Hello", "--model", tiny.target, "--draft", tiny.draft, "--budget", 4, "-n", 6, "--json",
            "--temperature", temperature, "--seed", 7, "--top-k", 20, "--dtype", "float32"]
    a, b = run(runner, cli_app, *args), run(runner, cli_app, *args)
    assert a.exit_code == 0, a.output
    assert json.loads(a.stdout)["token_ids"] == json.loads(b.stdout)["token_ids"]


def test_no_spec_decodes_plainly(runner, cli_app, tiny):
    res = run(runner, cli_app, "Hello", "--model", tiny.target, "-n", 3, "--json", "--dtype", "float32", "--no-spec")
    assert res.exit_code == 0, res.output
    out = json.loads(res.stdout)
    assert out["draft"] is None and out["stats"]["budget"] == 0 and out["stats"]["tokens_per_pass"] == 1


@pytest.mark.parametrize("extra,drafter", [([], "ngram"), (["--draft", "ngram"], "ngram"),
                                           (["--draft", "self"], "self"), (["--draft", "self", "--ngram"], "self+ngram"),
                                           (["--draft", "{draft}", "--ngram"], "model+ngram")])
def test_every_drafter_from_the_command_line_equals_plain_greedy(runner, cli_app, tiny, extra, drafter):
    """Without --draft a --model drafts with n-grams; every drafter's greedy output is the plain one."""
    common = ["Say hello hello hello hello", "--model", tiny.target, "-n", 16, "--json", "--dtype", "float32",
              "--raw"]
    plain = json.loads(run(runner, cli_app, *common, "--no-spec").stdout)
    extra = [str(tiny.draft) if e == "{draft}" else e for e in extra]
    res = run(runner, cli_app, *common, "--budget", 8, *extra)
    assert res.exit_code == 0, res.output
    out = json.loads(res.stdout)
    assert out["drafter"] == drafter and out["token_ids"] == plain["token_ids"]
    assert f"draft {drafter}" in res.stderr
