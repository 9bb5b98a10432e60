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
    for word in ("tokens", "tok/s", "1.00 tokens/pass", "passes", "s/pass", "peak RSS", "memory plan", "fixed overhead"):
        assert word in lines[0]
    assert "draft" not in lines[0] and "GB/s" not in lines[0]  # no draft, nothing streamed: not shown
    assert "seed" not in lines[0]  # greedy


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
    """Also: --json then reports finish "interrupted"."""
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
    js = run(runner, cli_app, "Hello", "--model", tiny.target, "--no-spec", "-n", 20, "--dtype", "float32", "--json")
    assert js.exit_code == 130
    out = json.loads(js.stdout)
    assert out["interrupted"] is True and out["stats"]["finish"] == "interrupted"


SAMPLING_FLAGS = ["--temp", 0.9, "--top-p", 0.95, "--top-k", 40, "--min-p", 0.02, "--repeat-penalty", 1.3,
                  "--repeat-last-n", 16, "--presence-penalty", 0.2, "--frequency-penalty", 0.1]


def test_a_seed_gives_the_same_text_with_or_without_speculation(runner, cli_app, tiny):
    common = ["Hello", "--model", tiny.target, "-n", 12, "--json", "--dtype", "float32", "--seed", 7, *SAMPLING_FLAGS]
    plain = json.loads(run(runner, cli_app, *common, "--no-spec").stdout)
    assert len(plain["token_ids"]) > 0 and plain["stats"]["seed"] == 7
    for extra in (["--budget", 4], ["--budget", "auto", "--tree", "sequoia"], ["--budget", 16, "--tree", "specexec"]):
        res = run(runner, cli_app, *common, "--draft", tiny.draft, *extra)
        assert res.exit_code == 0, res.output
        assert json.loads(res.stdout)["token_ids"] == plain["token_ids"], extra
    other = json.loads(run(runner, cli_app, *common[:-len(SAMPLING_FLAGS) - 2], "--seed", 8, *SAMPLING_FLAGS,
                           "--no-spec").stdout)
    assert other["token_ids"] != plain["token_ids"]


def test_without_a_seed_the_stats_show_the_one_used(runner, cli_app, tiny):
    common = ["Hello", "--model", tiny.target, "-n", 8, "--dtype", "float32", "--temperature", 1.0, "--no-spec"]
    res = run(runner, cli_app, *common)
    assert res.exit_code == 0, res.output
    seed = int(res.stderr.split("seed ")[1].split(",")[0])
    again = run(runner, cli_app, *common, "--seed", seed)
    assert again.stdout == res.stdout


def test_temperature_has_its_llama_cpp_and_long_spellings(runner, cli_app, tiny):
    common = ["Hello", "--model", tiny.target, "-n", 6, "--json", "--dtype", "float32", "--seed", 3, "--no-spec"]
    a = json.loads(run(runner, cli_app, *common, "--temp", 1.5).stdout)
    b = json.loads(run(runner, cli_app, *common, "--temperature", 1.5).stdout)
    assert a["token_ids"] == b["token_ids"] and a["stats"]["seed"] == 3


def test_max_new_tokens_is_a_hard_limit_with_a_store_as_its_own_draft(runner, cli_app, tiny):
    for n in (1, 2):
        res = run(runner, cli_app, "Hello", "--model", tiny.target, "--draft", tiny.target, "--budget", 32, "-n", n,
                  "--json", "--dtype", "float32")
        assert res.exit_code == 0, res.output
        out = json.loads(res.stdout)
        assert len(out["token_ids"]) == out["stats"]["tokens"] == n and out["stats"]["finish"] == "length"


def test_stop_strings_cut_the_text_and_are_never_printed(runner, cli_app, tiny):
    common = ["Hello", "--model", tiny.target, "-n", 24, "--dtype", "float32", "--no-spec"]
    full = json.loads(run(runner, cli_app, *common, "--json").stdout)["text"]
    stop = next(full[i : i + 3] for i in range(2, len(full) - 3) if full[i : i + 3].strip()
                and full.find(full[i : i + 3]) == i)
    want = full[: full.index(stop)]
    streamed = run(runner, cli_app, *common, "--stop", stop, "-r", "zzzz-never")
    assert streamed.exit_code == 0, streamed.output
    assert streamed.stdout == want + "\n" and stop not in streamed.stdout
    spec = json.loads(run(runner, cli_app, *common[:-1], "--draft", tiny.target, "--budget", 16, "-r", stop,
                          "--json").stdout)
    assert spec["text"] == want and spec["stats"]["finish"] == "stop"


def test_logprobs_in_json_from_the_raw_distribution(runner, cli_app, tiny):
    common = ["Hello", "--model", tiny.target, "-n", 5, "--json", "--dtype", "float32", "--logprobs", 3, "--seed", 1,
              "--temperature", 0.7, "--repeat-penalty", 1.2]
    plain = json.loads(run(runner, cli_app, *common, "--no-spec").stdout)
    spec = json.loads(run(runner, cli_app, *common, "--draft", tiny.draft, "--budget", 8).stdout)
    assert spec["token_ids"] == plain["token_ids"]
    assert [e["token"] for e in plain["logprobs"]] == plain["token_ids"]
    for p, s in zip(plain["logprobs"], spec["logprobs"]):
        assert len(p["top"]) == 3 and p["top"][0]["logprob"] >= p["top"][-1]["logprob"]
        assert p["logprob"] <= p["top"][0]["logprob"] + 1e-6 and isinstance(p["text"], str)
        assert abs(p["logprob"] - s["logprob"]) < 1e-4 and [t["token"] for t in p["top"]] == [t["token"] for t in s["top"]]
    assert "acceptance" in spec and spec["acceptance"]["passes"] > 0
    warned = run(runner, cli_app, "Hello", "--model", tiny.target, "-n", 2, "--dtype", "float32", "--logprobs", 2)
    assert "--logprobs shows only in --json" in warned.stderr


def test_no_spec_decodes_plainly(runner, cli_app, tiny):
    res = run(runner, cli_app, "Hello", "--model", tiny.target, "-n", 3, "--json", "--dtype", "float32", "--no-spec")
    assert res.exit_code == 0, res.output
    out = json.loads(res.stdout)
    assert out["draft"] is None and out["stats"]["budget"] == 0 and out["stats"]["tokens_per_pass"] == 1


@pytest.mark.parametrize("extra,drafter", [([], "ngram"), (["--draft", "ngram"], "ngram"),
                                           (["--draft", "self"], "self"), (["--draft", "self", "--ngram"], "self+ngram"),
                                           (["--draft", "{draft}", "--ngram"], "model+ngram"),
                                           (["--draft", "self,ngram"], "auto(self,ngram)"),
                                           (["--draft", "auto"], "auto(ngram,self)"),
                                           (["--draft", "{draft},self,ngram"], "auto(model,self,ngram)")])
def test_every_drafter_from_the_command_line_equals_plain_greedy(runner, cli_app, tiny, extra, drafter):
    """Without --draft a --model drafts with n-grams; every drafter's greedy output is the plain one."""
    common = ["Say hello hello hello hello", "--model", tiny.target, "-n", 16, "--json", "--dtype", "float32",
              "--raw"]
    plain = json.loads(run(runner, cli_app, *common, "--no-spec").stdout)
    extra = [e.replace("{draft}", str(tiny.draft)) for e in extra]
    res = run(runner, cli_app, *common, "--budget", 8, *extra)
    assert res.exit_code == 0, res.output
    out = json.loads(res.stdout)
    assert out["drafter"] == drafter and out["token_ids"] == plain["token_ids"]
    assert f"draft {drafter}" in res.stderr
