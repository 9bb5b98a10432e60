"""Flags as llama-cli / mlx_lm / llm users spell them: each one does what its name says (through typer's runner)."""

from __future__ import annotations

import json
import sys
import types

import pytest

COMMON = ["--no-spec", "--dtype", "float32"]


def gen(runner, app, *args, input: str | None = None):
    return runner.invoke(app, ["generate", *[str(a) for a in args]], input=input)


def as_json(res) -> dict:
    assert res.exit_code == 0, res.output
    return json.loads(res.stdout)


def one_error_line(res) -> str:
    assert res.exit_code == 2, res.output
    assert res.stdout == "" and "Traceback" not in res.output
    lines = res.stderr.splitlines()
    assert len(lines) == 1, res.stderr
    return lines[0]


def test_threads_sets_torch_threads_and_shows_in_the_stats(runner, cli_app, tiny):
    import torch

    before = torch.get_num_threads()
    try:
        res = gen(runner, cli_app, "Hello", "-m", tiny.target, *COMMON, "-n", 2, "-t", 1)
        assert res.exit_code == 0, res.output
        assert torch.get_num_threads() == 1
        assert "1 thread," in res.stderr.splitlines()[-1]
        out = as_json(gen(runner, cli_app, "Hello", "-m", tiny.target, *COMMON, "-n", 2, "--threads", 2, "--json"))
        assert out["stats"]["threads"] == 2
    finally:
        torch.set_num_threads(before)


def test_t_with_a_temperature_points_to_temp(runner, cli_app, tiny):
    line = one_error_line(gen(runner, cli_app, "Hello", "-m", tiny.target, "-t", "0.8"))
    assert "--temp 0.8" in line and "threads" in line
    assert "--threads" in one_error_line(gen(runner, cli_app, "Hello", "-m", tiny.target, "-t", "many"))
    assert "--threads" in one_error_line(gen(runner, cli_app, "Hello", "-m", tiny.target, "-t", "0"))


def test_temp_and_temperature_and_s_for_seed(runner, cli_app, tiny):
    base = ["Hello", "-m", tiny.target, *COMMON, "-n", 8, "--top-k", 50, "--json"]
    a = as_json(gen(runner, cli_app, *base, "--temp", 1.5, "-s", 3))
    b = as_json(gen(runner, cli_app, *base, "--temperature", 1.5, "--seed", 3))
    assert a["token_ids"] == b["token_ids"]
    others = {tuple(as_json(gen(runner, cli_app, *base, "--temp", 1.5, "-s", s))["token_ids"]) for s in (4, 5, 6)}
    assert len(others | {tuple(a["token_ids"])}) > 1  # -s really seeds: other seeds give other samples
    # -s is the seed (as in llama-cli), no longer the system message
    assert "-s" in one_error_line(gen(runner, cli_app, "Hello", "-m", tiny.target, "-s", "Be brief."))


def test_system_spellings_and_no_chat_template(runner, cli_app, tiny):
    base = ["Hello", "-m", tiny.target, *COMMON, "-n", 1, "--json"]
    ids = {tuple(as_json(gen(runner, cli_app, *base, flag, "Be brief."))["prompt_ids"])
           for flag in ("--system", "-sys", "--system-prompt")}
    assert len(ids) == 1
    raw = as_json(gen(runner, cli_app, *base, "--no-chat-template"))["prompt_ids"]
    assert raw == as_json(gen(runner, cli_app, *base, "--raw"))["prompt_ids"]
    assert raw != as_json(gen(runner, cli_app, *base))["prompt_ids"]


def test_max_tokens_is_max_new_tokens(runner, cli_app, tiny):
    for flag in ("--max-tokens", "--max-new-tokens", "-n"):
        out = as_json(gen(runner, cli_app, "Hello", "-m", tiny.target, *COMMON, flag, 3, "--json"))
        assert len(out["token_ids"]) == 3, flag


def test_prompt_from_p_and_from_a_file(runner, cli_app, tiny, tmp_path):
    base = ["-m", tiny.target, *COMMON, "-n", 1, "--json"]
    question = tmp_path / "q.txt"
    question.write_text("Hello, how are you?")
    ids = {tuple(as_json(r)["prompt_ids"]) for r in (
        gen(runner, cli_app, "Hello, how are you?", *base),
        gen(runner, cli_app, "-p", "Hello, how are you?", *base),
        gen(runner, cli_app, "--prompt", "Hello, how are you?", *base),
        gen(runner, cli_app, "-f", question, *base),
        gen(runner, cli_app, "-f", "-", *base, input="Hello, how are you?"),
    )}
    assert len(ids) == 1
    assert "--file" in one_error_line(gen(runner, cli_app, "-f", tmp_path / "missing.txt", *base))
    assert "once" in one_error_line(gen(runner, cli_app, "Hi", "-p", "Hello", *base))


def test_md_is_the_draft_model(runner, cli_app, tiny):
    base = ["Speculative decoding", "-m", tiny.target, "-n", 6, "--dtype", "float32", "--budget", 4, "--json"]
    md = as_json(gen(runner, cli_app, *base, "-md", tiny.draft))
    long = as_json(gen(runner, cli_app, *base, "--draft", tiny.draft))
    assert md["draft"] == long["draft"] == str(tiny.draft)
    assert md["token_ids"] == long["token_ids"] and md["stats"]["budget"] > 0


def test_ctx_size_stops_at_the_limit_with_one_line(runner, cli_app, tiny):
    base = ["Hello", "-m", tiny.target, *COMMON, "-n", 200]
    prompt_len = len(as_json(gen(runner, cli_app, *base, "--json"))["prompt_ids"])
    ctx = prompt_len + 6
    out = as_json(gen(runner, cli_app, *base, "-c", ctx, "--json"))
    assert out["stats"]["finish"] == "length" and out["stats"]["context_full"] is True
    assert prompt_len + len(out["token_ids"]) < ctx  # the answer stopped inside the KV cache
    res = gen(runner, cli_app, *base, "--ctx-size", ctx)
    assert res.exit_code == 0, res.output
    warnings = [line for line in res.stderr.splitlines() if "--ctx-size" in line]
    assert len(warnings) == 1 and str(ctx) in warnings[0]
    # -n ends first: no context line, finish is still "length"
    short = gen(runner, cli_app, "Hello", "-m", tiny.target, *COMMON, "-n", 2, "-c", ctx, "--json")
    assert "--ctx-size" not in short.stderr and as_json(short)["stats"]["context_full"] is False
    # a prompt longer than --ctx-size: one error line that names it
    res = gen(runner, cli_app, *base, "-c", prompt_len - 1)
    assert res.exit_code == 1 and "--ctx-size" in res.stderr and res.stderr.count("\n") == 1
    assert "--ctx-size" in one_error_line(gen(runner, cli_app, *base, "-c", 0))


def test_ctx_size_sizes_the_plan(runner, cli_app, tiny):
    small = runner.invoke(cli_app, ["plan", str(tiny.target), "--device-memory", "1GiB", "--device", "cpu", "-c", 64])
    default = runner.invoke(cli_app, ["plan", str(tiny.target), "--device-memory", "1GiB", "--device", "cpu"])
    assert small.exit_code == 0 and default.exit_code == 0, small.output + default.output
    assert "KV cache for 64 tokens" in " ".join(small.stdout.split())
    assert "KV cache for 512 tokens" in " ".join(default.stdout.split())  # 4096 capped at the model's 512

    def kv(out: str) -> str:
        return next(line for line in out.splitlines() if line.lstrip("│ ").startswith("KV cache"))

    assert kv(small.stdout) != kv(default.stdout)


def test_quiet_and_verbose(runner, cli_app, tiny):
    base = ["Speculative decoding", "-m", tiny.target, "-md", tiny.draft, "-n", 6, "--dtype", "float32",
            "--budget", 4]
    quiet = gen(runner, cli_app, *base, "--quiet")
    assert quiet.exit_code == 0 and quiet.stderr == "" and quiet.stdout.strip()
    verbose = gen(runner, cli_app, *base, "--verbose")
    assert verbose.exit_code == 0, verbose.output
    lines = verbose.stderr.splitlines()
    assert lines[0].startswith("prefill:")
    passes = [line for line in lines if line.startswith("pass ")]
    # the last token, once only one is left, comes from a plain pass (no tree)
    assert passes and all("tree" in line and "accepted" in line for line in passes[:-1])
    assert f"{len(passes)} passes" in lines[-1]  # one line per target pass, then the stats
    assert verbose.stdout == quiet.stdout
    assert "--quiet" in one_error_line(gen(runner, cli_app, *base, "--quiet", "-v"))


def test_bench_uses_llama_bench_letters(runner, cli_app, monkeypatch):
    import torch

    seen: dict = {}
    fake = types.ModuleType("offspec.bench")
    fake.bench_command = lambda **kw: seen.update(kw)
    monkeypatch.setitem(sys.modules, "offspec.bench", fake)
    import offspec

    monkeypatch.setattr(offspec, "bench", fake, raising=False)
    before = torch.get_num_threads()
    try:
        res = runner.invoke(cli_app, ["bench", "-m", "target", "-md", "draft", "-n", "8", "-r", "3", "-t", "1"])
        assert res.exit_code == 0, res.output
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)
    assert (seen["model"], seen["draft"], seen["max_new_tokens"], seen["repeats"]) == ("target", "draft", 8, 3)
    assert runner.invoke(cli_app, ["bench", "--repetitions", "2"]).exit_code == 0 and seen["repeats"] == 2
    # llama-bench's -d is the context depth: not the draft here
    assert runner.invoke(cli_app, ["bench", "-d", "draft"]).exit_code == 2


@pytest.mark.parametrize("command", ["generate", "chat"])
def test_help_lists_the_llama_cli_letters(runner, cli_app, command):
    res = runner.invoke(cli_app, [command, "--help"], env={"COLUMNS": "200"})
    assert res.exit_code == 0
    for flag in ("--threads", "-t", "--ctx-size", "-c", "--seed", "-s", "--temp", "--max-tokens", "-md", "--quiet",
                 "--verbose", "--no-chat-template"):
        assert flag in res.stdout, flag


def test_ctx_size_is_the_kv_cache_size_capped_at_the_model_context(tiny):
    from offspec.config import RuntimeConfig
    from offspec.loader import load_engine

    rc = RuntimeConfig(device="cpu", dtype="float32")
    for asked, expected in ((100, 100), (4096, 512)):  # the tiny model has 512 positions
        loaded = load_engine(str(tiny.target), str(tiny.draft), rc=rc, cache_tokens=asked, progress=False,
                             budget_auto=False)
        try:
            assert loaded.engine.context_tokens == expected
            assert loaded.engine.target.cache.capacity == loaded.engine.draft.cache.capacity == expected
        finally:
            loaded.close()


def test_chat_takes_the_same_flags(runner, cli_app, tiny, tmp_path):
    save = tmp_path / "c.json"
    base = ["chat", "-m", str(tiny.target), "-md", str(tiny.draft), "--budget", "4", "--dtype", "float32", "-n", "4",
            "-t", "1", "--temp", "0", "-s", "1", "-sys", "Be brief.", "--no-log"]
    res = runner.invoke(cli_app, [*base, "--verbose"], input=f"Hello\n/save {save}\n")
    assert res.exit_code == 0, res.output
    assert res.stderr.splitlines()[0].startswith("prefill:") and "pass 1: tree" in res.stderr
    messages = json.loads(save.read_text())["messages"]
    assert messages[0] == {"role": "system", "content": "Be brief."} and messages[2]["content"] + "\n" == res.stdout
    quiet = runner.invoke(cli_app, [*base, "--quiet"], input="Hello\n")
    assert quiet.exit_code == 0 and quiet.stdout == res.stdout and quiet.stderr == ""
    raw = runner.invoke(cli_app, [*base, "--no-chat-template"], input=f"Hello\n/save {save}\n")
    assert raw.exit_code == 0 and raw.stdout != res.stdout  # the same words, not templated: another prompt
    # a conversation that outgrows -c: the answer stops at the limit with one line, the next turn is refused
    full = runner.invoke(cli_app, [*base, "-c", "40", "-n", "100"], input="Hello\nAgain\n")
    assert full.exit_code == 1, full.output
    lines = full.stderr.splitlines()
    assert len(lines) == 2 and "--ctx-size" in lines[0] and "40" in lines[0] and "context" in lines[1]
    assert "--temp" in one_error_line(runner.invoke(cli_app, ["chat", "-m", str(tiny.target), "-t", "0.5"]))


def test_a_mixture_of_experts_reports_its_experts_and_prefetches_on_request(runner, cli_app, tmp_path,
                                                                            make_tiny_model):
    """A tiny MoE folder: the stats line and --json carry the expert counts; --expert-prefetch reads ahead, and a
    bad value is one line."""
    import shutil

    from tests.conftest import tiny_tokenizer

    src = tmp_path / "moe"
    shutil.copytree(make_tiny_model("qwen3_moe", num_layers=4, tokenizer=False), src)
    tiny_tokenizer().save_pretrained(src)
    args = ["Hello", "-m", src, *COMMON, "-n", 4, "--device-memory", "min+1KiB", "--raw", "--no-log"]
    res = gen(runner, cli_app, *args)
    assert res.exit_code == 0, res.output
    assert "read/pass" in res.stderr.splitlines()[-1] and "cache hits" in res.stderr.splitlines()[-1]
    stats = as_json(gen(runner, cli_app, *args, "--json", "--expert-prefetch", "gate"))["stats"]
    assert stats["experts_routed"] > 0 and stats["experts_prefetched"] > 0
    assert stats["experts_routed"] == stats["expert_hits"] + stats["experts_read"]
    assert "--expert-prefetch" in one_error_line(gen(runner, cli_app, *args, "--expert-prefetch", "soon"))
