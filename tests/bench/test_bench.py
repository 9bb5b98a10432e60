"""offspec bench on tiny random models: every figure present and sane, the read ceiling sampled through the run,
figures above it flagged, output paths checked before the run, JSON, plot, prompt files, raw reads."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from offspec import bench, bench_report
from offspec.errors import ConfigError

CONFIG_KEYS = ("prefill_tokens", "prefill_s", "prefill_tok_per_s", "gbps_over_ceiling", "tokens", "passes", "decode_s", "tok_per_s", "tokens_per_pass", "pass_s", "draft_s_per_pass",
               "streamed_bytes_per_pass", "streamed_gbps", "limit_tok_per_s", "limit_fraction", "speedup_vs_plain",
               "speedup_vs_peer", "by_kind", "records", "config", "spec", "budget", "mean_budget")
POSITIVE = ("prefill_tokens", "prefill_s", "prefill_tok_per_s", "tokens", "passes", "decode_s", "tok_per_s", "tokens_per_pass", "pass_s", "streamed_bytes_per_pass",
            "streamed_gbps", "limit_tok_per_s", "limit_fraction", "speedup_vs_plain", "speedup_vs_peer")


def _positive(x) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x) and x > 0


@pytest.fixture(scope="module")
def result(bench_models, bench_home, streaming_budget, tmp_path_factory) -> dict:
    """One full run: every target layer streamed, plain + auto + budget 4, two prompts, the accelerate peer."""
    pytest.importorskip("accelerate", reason="the peer baseline needs accelerate")
    import torch

    prompts = tmp_path_factory.mktemp("prompts") / "p.json"
    prompts.write_text(json.dumps([{"kind": "code", "prompt": "def main ( ) : return"},
                                   {"kind": "prose", "prompt": "why is the sky blue ?"}]))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        target, draft = bench_models
        return bench.run_bench(str(target), str(draft), device_memory=streaming_budget, budgets="auto,4",
                               prompts=str(prompts), max_new_tokens=5, repeats=2, peer="accelerate",
                               peer_max_new_tokens=3, curve_sizes=(1, 8), progress=False)
    finally:
        torch.set_num_threads(threads)


# ---------------------------------------------------------------------- prompts and options
def test_builtin_prompts_have_code_and_prose():
    kinds = [p.kind for p in bench.builtin_prompts()]
    assert kinds.count("code") >= 4 and kinds.count("prose") >= 4


def test_prompts_file_json_strings_objects_and_text_lines(tmp_path: Path):
    mixed = tmp_path / "mixed.json"
    mixed.write_text(json.dumps(["def f(x): return x", {"kind": "Chat", "prompt": "hello there"},
                                 {"prompt": "tell me a story"}]))
    got = bench.load_prompts(mixed)
    assert [(p.kind, p.prompt) for p in got] == [("code", "def f(x): return x"), ("chat", "hello there"),
                                                  ("prose", "tell me a story")]
    lines = tmp_path / "prompts.txt"
    lines.write_text("import os and list files\n\n  write a poem about rain  \n")
    assert [(p.kind, p.prompt) for p in bench.load_prompts(lines)] == [
        ("code", "import os and list files"), ("prose", "write a poem about rain")]


@pytest.mark.parametrize("content", ['{"prompt": "x"}', "[1, 2]", "[]", "{not json"])
def test_bad_prompts_files_raise_config_error(tmp_path: Path, content: str):
    path = tmp_path / "bad.json"
    path.write_text(content)
    with pytest.raises(ConfigError):
        bench.load_prompts(path)


def test_missing_prompts_file_raises_config_error(tmp_path: Path):
    with pytest.raises(ConfigError, match="no such file"):
        bench.load_prompts(tmp_path / "nope.json")


def test_parse_budgets():
    assert bench.parse_budgets("auto, 16,64,16") == [None, 16, 64]
    with pytest.raises(ConfigError):
        bench.parse_budgets("auto,0")
    with pytest.raises(ConfigError):
        bench.parse_budgets(" , ")


def test_prompt_ids_use_the_chat_template(bench_tok):
    tok = bench_tok
    ids = bench.prompt_ids(tok, "why is the sky blue")
    text = tok.decode(ids)
    assert text.startswith("<|im_start|> user") and text.endswith("<|im_start|> assistant")


# ---------------------------------------------------------------------- raw cold reads
def test_read_bandwidth_evicts_then_reads_every_byte_into_one_buffer(tmp_path: Path, monkeypatch):
    import offspec.runtime.streamer as streamer

    sizes = [4096 * 3, 4096, 4096 * 5 + 100]
    blobs = []
    for i, n in enumerate(sizes):
        p = tmp_path / f"layer_{i}.bin"
        p.write_bytes(bytes([i + 1]) * n)
        blobs.append((p, n))
    other = tmp_path / "resident.bin"
    other.write_bytes(b"\0" * 4096)
    log: list[tuple] = []
    real_read, real_drop = streamer.read_into, streamer.drop_page_cache

    def read_into(fd, buf, size, offset=0):
        n = real_read(fd, buf, size, offset)
        log.append(("read", id(buf), n, int(buf[0]), int(buf[n - 1])))
        return n

    def drop(path):
        log.append(("evict", Path(path)))
        real_drop(path)

    monkeypatch.setattr(streamer, "read_into", read_into)
    monkeypatch.setattr(streamer, "drop_page_cache", drop)
    rec = bench.measure_read_gbps(blobs, repeats=2, evict_paths=[p for p, _ in blobs] + [other])
    assert rec["bytes"] == sum(sizes) and rec["files"] == 3
    assert len(rec["gbps_runs"]) == 2 and all(_positive(g) for g in rec["gbps_runs"])
    assert rec["gbps_best"] == max(rec["gbps_runs"]) and _positive(rec["gbps_median"])
    read_at = [i for i, e in enumerate(log) if e[0] == "read"]
    reads = [log[i] for i in read_at]
    assert [e[2] for e in reads] == sizes * 2  # exact byte counts, every blob, every repeat
    assert [(e[3], e[4]) for e in reads] == [(i + 1, i + 1) for i in range(3)] * 2
    assert len({e[1] for e in reads}) == 1  # one reused buffer
    # before each repeat every store file (not only the read ones) is evicted
    every = {p for p, _ in blobs} | {other}
    assert {e[1] for e in log[: read_at[0]]} == every
    assert {e[1] for e in log[read_at[2] + 1 : read_at[3]]} == every


def test_read_bandwidth_of_nothing_is_none():
    rec = bench.measure_read_gbps([], repeats=3)
    assert rec["bytes"] == 0 and rec["gbps_median"] is None


# ---------------------------------------------------------------------- the full run
def test_run_bench_reports_every_figure(result: dict):
    plan = result["plan"]
    assert plan["layers"]["disk"] == list(range(6)), "the budget should stream every target layer"
    per_pass = plan["streamed_bytes_per_pass"]
    assert per_pass == sum(plan["layer_bytes"])
    for key in ("cpu", "cores_logical", "ram_bytes", "torch", "transformers", "date"):
        assert result["machine"][key]
    assert result["options"]["budgets"] == "auto,4" and result["options"]["max_new_tokens"] == 5
    read = result["read"]
    assert read["ceiling"]["bytes"] == per_pass and read["ceiling"]["files"] == 6 and read["ceiling"]["cold"]
    assert read["store"]["bytes"] > per_pass and read["store"]["files"] == 7
    for part in ("ceiling", "store"):
        assert _positive(read[part]["gbps_median"]) and _positive(read[part]["gbps_best"])
    assert read["gbps_for_limit"] == read["ceiling"]["gbps_best"]
    assert [c["tokens"] for c in result["curve"]] == [1, 8]
    assert all(_positive(c["pass_s_median"]) and _positive(c["streamed_gbps"]) for c in result["curve"])

    rows = {r["config"]: r for r in result["configs"]}
    assert list(rows) == ["plain", "auto", "4"]
    for name, r in rows.items():
        for key in CONFIG_KEYS:
            assert key in r, (name, key)
        for key in POSITIVE:
            assert _positive(r[key]), (name, key, r[key])
        assert r["streamed_bytes_per_pass"] == per_pass  # every pass streams every disk layer
        assert r["limit_tok_per_s"] == pytest.approx(r["tokens_per_pass"] * read["gbps_for_limit"] * 1e9 / per_pass)
        assert set(r["by_kind"]) == {"code", "prose"}
        assert all(_positive(k["tok_per_s"]) for k in r["by_kind"].values())
        assert [rec["kind"] for rec in r["records"]] == ["code", "prose"]
        for rec in r["records"]:
            assert 1 <= rec["tokens"] <= 5 and rec["passes"] >= 1 and _positive(rec["prefill_s"])
            assert rec["prefill_tokens"] == rec["prompt_tokens"] - 1  # the last prompt token is the first root
        assert r["prefill_tokens"] == sum(rec["prefill_tokens"] for rec in r["records"])
        assert r["prefill_tok_per_s"] == pytest.approx(r["prefill_tokens"] / r["prefill_s"])
    assert rows["plain"]["tokens_per_pass"] == 1.0 and rows["plain"]["draft_s_per_pass"] == 0.0
    assert rows["plain"]["speedup_vs_plain"] == pytest.approx(1.0)
    assert 0 < rows["4"]["mean_budget"] <= 4.0  # the last token of an answer comes from a plain step
    assert rows["auto"]["mean_budget"] >= 1 and rows["auto"]["budget"] is None
    for name in ("auto", "4"):
        assert _positive(rows[name]["draft_s_per_pass"]) and rows[name]["mean_tree_size"] >= 1
    assert result["best"]["config"] in ("auto", "4")


def test_peer_runs_on_the_tiny_model(result: dict):
    peer = result["peer"]
    assert peer is not None, result["notes"]
    assert peer["name"] == "accelerate" and "disk" in peer["device_map"], peer["device_map"]
    assert peer["tokens"] == 2 * (3 - 1)  # decode tokens exclude the first (prefill) token of each prompt
    assert _positive(peer["tok_per_s"]) and peer["s_per_token"] == pytest.approx(1 / peer["tok_per_s"])
    assert set(peer["by_kind"]) == {"code", "prose"}
    plan = result["plan"]  # same memory for the target's weights as offspec's plan
    assert peer["budget_bytes"] == (plan["device_bytes"] - plan["kv_bytes"] - plan["reserved_bytes"]
                                    - plan["workspace_bytes"])
    assert peer["dtype"] in ("float32", "bfloat16")  # the target's compute dtype


def test_speculative_greedy_text_equals_plain_greedy(result: dict):
    rows = {r["config"]: r for r in result["configs"]}
    plain = [r["text"] for r in rows["plain"]["records"]]
    for name in ("auto", "4"):
        assert [r["text"] for r in rows[name]["records"]] == plain, name


def test_read_ceiling_is_sampled_between_the_sections(result: dict):
    c = result["read"]["ceiling"]
    # --repeats 2 at the start, then one read after the curve and after every configuration
    assert [r["when"] for r in c["runs"]] == ["start", "start", "after the pass-time curve", "after plain decoding",
                                              "after budget auto", "after budget 4"]
    g = c["gbps_runs"]
    assert g == [r["gbps"] for r in c["runs"]] and all(_positive(x) for x in g)
    assert c["gbps_min"] == min(g) and c["gbps_best"] == max(g) and c["spread"] == pytest.approx(max(g) / min(g))


def _with_ceiling(result: dict, gbps: float) -> dict:
    """A copy of the run's result whose read ceiling is `gbps` (limits recomputed as the run does)."""
    import copy

    r = copy.deepcopy(result)
    r["notes"] = []
    c = r["read"]["ceiling"]
    c["gbps_runs"] = [gbps, gbps]
    c["gbps_min"] = c["gbps_best"] = c["gbps_median"] = gbps
    c["spread"] = 1.0
    bench.add_limits(r)
    return r


def test_figures_above_the_ceiling_are_flagged_in_the_table_and_the_notes(result: dict):
    plain = next(r for r in result["configs"] if r["config"] == "plain")
    low = _with_ceiling(result, plain["streamed_gbps"] / 4)  # a raw read 4x slower than the passes streamed
    row = next(r for r in low["configs"] if r["config"] == "plain")
    assert row["limit_fraction"] > 1 and row["gbps_over_ceiling"]
    assert any(n.startswith("plain:") and "measurement problem" in n for n in low["notes"])
    table = _render(bench_report.results_table(low))
    line = next(ln for ln in table.splitlines() if ln.strip().startswith("plain"))
    assert f"% {bench_report.LIMIT_FLAG}" in line

    high = _with_ceiling(result, plain["streamed_gbps"] * 1000)  # a ceiling no pass comes near
    assert all(r["limit_fraction"] < 1 and not r["gbps_over_ceiling"] for r in high["configs"])
    assert not any("measurement problem" in n for n in high["notes"])
    assert bench_report.LIMIT_FLAG not in _render(bench_report.results_table(high))


def test_a_wide_ceiling_spread_is_noted(result: dict):
    import copy

    r = copy.deepcopy(result)
    r["notes"] = []
    c = r["read"]["ceiling"]
    c["gbps_runs"], c["gbps_min"], c["gbps_best"], c["spread"] = [0.5, 1.5], 0.5, 1.5, 3.0
    bench.add_limits(r)
    assert any("varied 3.0x" in n for n in r["notes"])
    assert any("spread 3.0x" in ln for ln in bench_report.summary_lines(r))


def _render(table) -> str:
    from rich.console import Console

    console = Console(width=200, record=True, file=open(__import__("os").devnull, "w"))
    console.print(table)
    return console.export_text()


def test_curve_sizes_extend_the_planner_sizes_with_the_run_budgets():
    from offspec.runtime.pass_curve import CURVE_SIZES

    sizes = bench.curve_sizes_for([None, 16, 4096])
    assert set(CURVE_SIZES) <= set(sizes) and 4096 in sizes and list(sizes) == sorted(set(sizes))
    assert bench.curve_sizes_for([]) == tuple(sorted(CURVE_SIZES))


def test_json_and_plot_files(result: dict, tmp_path: Path):
    path = tmp_path / "bench.json"
    bench_report.write_json(result, path)
    again = json.loads(path.read_text())
    assert again["configs"][0]["config"] == "plain" and again["peer"]["name"] == "accelerate"
    png = tmp_path / "bench.png"
    bench_report.write_plot(result, png)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_bench_command_prints_and_writes(result: dict, tmp_path: Path, monkeypatch, capsys):
    monkeypatch.setattr(bench, "run_bench", lambda *a, **k: result)
    out_json, out_png = tmp_path / "r.json", tmp_path / "r.png"
    bench.bench_command(model="m", json_path=str(out_json), plot_path=str(out_png))
    captured = capsys.readouterr()
    assert captured.out == ""  # the table and the summary go to stderr
    assert "plain" in captured.err and "budget 4" in captured.err and "peer accelerate" in captured.err
    assert "pp tok/s" in captured.err and "tg tok/s" in captured.err
    legend = [ln for ln in captured.err.splitlines() if ln.startswith("limit = ")]
    assert len(legend) == 1 and "measurement problem" in legend[0]
    assert json.loads(out_json.read_text())["read"]["ceiling"]["files"] == 6
    assert out_png.read_bytes()[:4] == b"\x89PNG"


def test_plot_without_matplotlib_is_a_clear_error(result: dict, tmp_path: Path, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "matplotlib", None)
    with pytest.raises(ConfigError, match="matplotlib"):
        bench_report.write_plot(result, tmp_path / "x.png")


def _no_run(*a, **k):
    raise AssertionError("the benchmark ran before its output paths were checked")


@pytest.mark.parametrize("flag,path,words", [
    ("json_path", "{tmp}/missing/r.json", ["--json", "does not exist"]),
    ("plot_path", "{tmp}/missing/r.png", ["--plot", "does not exist"]),
    ("json_path", "{tmp}", ["--json", "folder"]),
    ("plot_path", "{tmp}/r.notanimage", ["--plot", ".notanimage"]),
])
def test_bad_output_paths_fail_before_the_run(tmp_path: Path, monkeypatch, flag, path, words):
    monkeypatch.setattr(bench, "run_bench", _no_run)
    with pytest.raises(ConfigError) as err:
        bench.bench_command(model="m", **{flag: path.format(tmp=tmp_path)})
    for w in words:
        assert w in str(err.value)


def test_cli_bad_json_path_is_one_line_and_non_zero(tmp_path: Path, monkeypatch):
    from typer.testing import CliRunner

    from offspec.cli import app

    monkeypatch.setattr(bench, "run_bench", _no_run)
    res = CliRunner().invoke(app, ["bench", "--model", "m", "--json", str(tmp_path / "nope" / "r.json")])
    assert res.exit_code != 0 and res.stdout == "" and "Traceback" not in res.output
    lines = res.stderr.splitlines()
    assert len(lines) == 1 and "--json" in lines[0] and "does not exist" in lines[0], res.stderr


def test_bad_options_fail_before_loading():
    with pytest.raises(ConfigError):
        bench.run_bench("nowhere", max_new_tokens=0)
    with pytest.raises(ConfigError):
        bench.run_bench("nowhere", peer="vllm")
    with pytest.raises(ConfigError):
        bench.run_bench("nowhere", budgets="auto,99999")


def test_warm_read_does_not_evict(tmp_path: Path, monkeypatch):
    import offspec.runtime.streamer as streamer

    p = tmp_path / "blob.bin"
    p.write_bytes(b"\1" * 8192)
    evicted = []
    monkeypatch.setattr(streamer, "drop_page_cache", lambda path: evicted.append(path))
    rec = bench.measure_read_gbps([(p, 8192)], repeats=2, cold=False)
    assert evicted == [] and rec["cold"] is False and len(rec["gbps_runs"]) == 2


def test_warm_run_without_draft_drafts_with_ngrams(bench_models, bench_home, streaming_budget_no_draft,
                                                   tmp_path: Path):
    target, _ = bench_models
    prompts = tmp_path / "p.txt"
    prompts.write_text("def main ( ) : return\n")
    r = bench.run_bench(str(target), None, device_memory=streaming_budget_no_draft, warm=True, budgets="4",
                        prompts=str(prompts), max_new_tokens=3, repeats=1, curve_sizes=(1,), progress=False)
    assert [(c["config"], c["drafter"]) for c in r["configs"]] == [("plain", ""), ("4", "ngram")]
    assert r["plan"]["layers"]["disk"] == list(range(6))
    assert r["read"]["ceiling"]["cold"] is False  # a warm run's ceiling is the warm (page cache) read
    assert r["read"]["gbps_for_limit"] == r["read"]["ceiling"]["gbps_best"]
    assert r["peer"] is None
    assert r["configs"][1]["records"][0]["text"] == r["configs"][0]["records"][0]["text"]
    assert r["configs"][0]["by_kind"].keys() == {"code"}


def test_raw_reads_between_passes_leave_the_prefetched_layers_alone(bench_models, bench_home, streaming_budget_no_draft):
    """A ceiling sample between two passes must not touch the staging slots the reader has filled for the next."""
    import torch

    from offspec.runtime.model import open_model
    from offspec.store.manifest import read_manifest
    from offspec.store.resolve import resolve_model

    store = resolve_model(str(bench_models[0]), 16, "bfloat16", progress=False)
    model = open_model(store, device_memory_bytes=int(streaming_budget_no_draft), cache_tokens=4096)
    try:
        assert model.streamer is not None
        ids = torch.tensor([[5, 6, 7, 8]])
        want = model.forward(ids)
        blobs = bench.store_blobs(store, read_manifest(store), model.plan.tiers)
        ceiling = bench.ReadCeiling(blobs, [p for p, _ in bench.store_blobs(store, read_manifest(store))])
        assert all(ceiling.buffer.data_ptr() != b.data_ptr() for b in model.streamer.buffers)
        for _ in range(2):
            ceiling.sample("between passes")
            model.reset()
            assert torch.equal(model.forward(ids), want)
    finally:
        model.close()


def test_drafters_side_by_side_on_one_plan(bench_models, bench_home, streaming_budget, tmp_path: Path):
    from offspec.bench_report import _config_name

    target, draft = bench_models
    prompts = tmp_path / "p.txt"
    prompts.write_text("def main ( ) : return main ( ) : return\n")
    r = bench.run_bench(str(target), None, device_memory=streaming_budget, warm=True, budgets="4",
                        prompts=str(prompts), max_new_tokens=6, repeats=1, curve_sizes=(1,), progress=False,
                        drafters=f"ngram,{draft},{draft}+ngram")
    rows = r["configs"]
    assert [(c["config"], c["drafter"]) for c in rows] == [("plain", ""), ("4", "ngram"), ("4", "model"),
                                                          ("4", "model+ngram")]
    assert len({c["records"][0]["text"] for c in rows}) == 1  # greedy: every drafter writes the plain text
    assert r["plan"]["reserved_bytes"] > 0  # the plan left room for the draft model
    assert _config_name(rows[1]) == "ngram budget 4"
    figures = r["draft_forward"]  # the draft model's forward per tree level, against its weights' RAM read time
    assert [d["drafter"] for d in figures] == ["model"]
    assert [lv["rows"] for lv in figures[0]["levels"]] == [1, 16, 64]
    assert figures[0]["weight_bytes"] > 0 and all(lv["x_read"] > 0 for lv in figures[0]["levels"])
    from offspec.bench_report import summary_lines

    assert any(line.startswith("draft model forward per tree level") for line in summary_lines(r))
    auto = bench.run_bench(str(target), None, device_memory=streaming_budget, warm=True, budgets="4",
                           prompts=str(prompts), max_new_tokens=6, repeats=1, curve_sizes=(1,), progress=False,
                           drafters=f"ngram,{draft},auto")
    assert [c["drafter"] for c in auto["configs"]] == ["", "ngram", "model", "auto(ngram,model)"]
    assert len({c["records"][0]["text"] for c in auto["configs"]}) == 1
    with pytest.raises(ConfigError):
        bench.run_bench(str(target), str(draft), drafters="ngram")
    with pytest.raises(ConfigError):
        bench.run_bench(str(target), drafters="ngram,auto")
    with pytest.raises(ConfigError):
        bench.run_bench(str(target), drafters="ngram+ngram")
