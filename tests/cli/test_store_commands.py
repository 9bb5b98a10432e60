"""models / rm / prune / plan / convert: what offspec keeps is visible and removable, names work everywhere,
plan is a dry run, flags that do nothing say so."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from offspec.store.resolve import resolve_model


@pytest.fixture
def home(tmp_path, monkeypatch) -> Path:
    h = tmp_path / "home"
    monkeypatch.setenv("OFFSPEC_HOME", str(h))
    return h


def _names(stdout: str) -> list[str]:
    return [line.split()[3] for line in stdout.splitlines() if not line.startswith("total")]


def test_models_lists_everything_with_pasteable_names(runner, cli_app, tiny, home):
    store = resolve_model(str(tiny.draft), progress=False)
    (home / "demo").mkdir()
    (home / "demo" / "some-model.gguf").write_bytes(b"x" * 5000)
    (home / "demo" / "some-model.gguf.ok").write_text("{}")
    (home / "peer" / "copy-bfloat16-0123").mkdir(parents=True)
    (home / "peer" / "copy-bfloat16-0123" / "model.safetensors").write_bytes(b"y" * 7000)
    for folder in ("curves", "logs", "shapes"):
        (home / folder).mkdir()
        (home / folder / "a.json").write_text("{}")
    res = runner.invoke(cli_app, ["models"], env={"COLUMNS": "60"})
    assert res.exit_code == 0, res.output
    names = _names(res.stdout)
    assert names == [store.name, "demo/some-model.gguf", "peer/copy-bfloat16-0123", "curves", "shapes", "logs"]
    assert res.stdout.splitlines()[-1].startswith("total ")
    import json

    rows = json.loads(runner.invoke(cli_app, ["models", "--json"]).stdout)
    assert {r["kind"] for r in rows} == {"store", "demo", "peer", "curve", "shape", "log"}
    assert sum(r["size_bytes"] for r in rows if r["kind"] == "demo") == 5000 + 2  # the marker goes with its file
    # the store's name works wherever a model is accepted
    plan = runner.invoke(cli_app, ["plan", store.name, "--device", "cpu", "--device-memory", "1GiB"])
    assert plan.exit_code == 0 and store.name in plan.stdout
    ver = runner.invoke(cli_app, ["verify", store.name])
    assert ver.exit_code == 0 and ver.stdout.startswith("ok:")
    gen = runner.invoke(cli_app, ["generate", "-m", store.name, "--no-spec", "-n", "2", "hi"])
    assert gen.exit_code == 0, gen.output


def test_rm_removes_exactly_what_it_lists(runner, cli_app, tiny, home):
    a = resolve_model(str(tiny.draft), progress=False)
    b = resolve_model(str(tiny.target), progress=False)
    no = runner.invoke(cli_app, ["rm", a.name], input="n\n")
    assert no.exit_code != 0 and a.exists()
    res = runner.invoke(cli_app, ["rm", a.name], input="y\n")
    assert res.exit_code == 0, res.output
    assert a.name in res.stdout and "removed 1 item" in res.stderr
    assert not a.exists() and b.exists()
    missing = runner.invoke(cli_app, ["rm", "nope", "--yes"])
    assert missing.exit_code == 1 and "nothing named nope" in missing.stderr and b.exists()


_HOLD = """
import sys, time
from offspec.store.resolve import resolve_model
resolve_model(sys.argv[1], progress=False)
print("ready", flush=True)
time.sleep(60)
"""


def test_rm_and_prune_leave_a_store_in_use(runner, cli_app, tiny, home):
    store = resolve_model(str(tiny.draft), progress=False)
    env = {**os.environ, "OFFSPEC_HOME": str(home), "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    reader = subprocess.Popen([sys.executable, "-c", _HOLD, str(store)], stdout=subprocess.PIPE, text=True, env=env)
    try:
        assert reader.stdout.readline().strip() == "ready"
        res = runner.invoke(cli_app, ["rm", store.name, "--yes"])
        assert res.exit_code == 1 and "in use by another process" in res.stderr
        assert (store / "manifest.json").is_file()
    finally:
        reader.kill()
        reader.wait()
    assert runner.invoke(cli_app, ["rm", store.name, "--yes"]).exit_code == 0 and not store.exists()


def test_prune_removes_stale_things_only(runner, cli_app, tiny, home, tmp_path, monkeypatch):
    import offspec.store.convert as convert_mod
    from offspec.store.locks import exclusive, lock_path

    keep = resolve_model(str(tiny.target), progress=False)
    older = resolve_model(str(tiny.draft), dtype="float32", progress=False)
    newer = resolve_model(str(tiny.draft), dtype="bfloat16", progress=False)
    real = convert_mod.write_blob

    def stop(store_dir, rel, tensors):
        if rel.endswith("001.bin"):
            raise KeyboardInterrupt
        return real(store_dir, rel, tensors)

    with monkeypatch.context() as mp:
        mp.setattr(convert_mod, "write_blob", stop)
        with pytest.raises(KeyboardInterrupt):
            resolve_model(str(tiny.short), progress=False)
    partial = next((home / "stores").glob("*.partial"))
    stale_lock = lock_path(home / "stores" / "gone")
    stale_lock.write_text("")
    busy = home / "stores" / "busy"
    with exclusive(busy):  # a conversion in progress elsewhere: its lock is held
        res = runner.invoke(cli_app, ["prune", "--yes"])
        assert lock_path(busy).exists()
    assert res.exit_code == 1 and "locks" in res.stderr  # the held lock is left and said so
    assert not partial.exists() and not stale_lock.exists() and not older.exists()
    assert keep.exists() and newer.exists()
    assert "a copy in float32" in res.stdout
    again = runner.invoke(cli_app, ["prune"])
    assert again.exit_code == 0 and "nothing to prune" in again.stderr


def test_plan_is_a_dry_run(runner, cli_app, tiny, home):
    res = runner.invoke(cli_app, ["plan", str(tiny.target), "--device", "cpu", "--device-memory", "1GiB",
                                  "--draft", str(tiny.draft), "--bits", "4"])
    assert res.exit_code == 0, res.output
    assert "not converted yet" in res.stdout and "NF4" in res.stdout and "draft model" in res.stdout
    assert not home.exists() or not any(home.rglob("*.bin"))


def test_plan_for_cuda_with_a_draft_needs_no_cuda(runner, cli_app, tiny, home):
    import torch

    if torch.cuda.is_available():
        pytest.skip("CUDA is here")
    res = runner.invoke(cli_app, ["plan", str(tiny.target), "--draft", str(tiny.draft), "--device", "cuda",
                                  "--device-memory", "1GiB", "--host-memory", "2GiB"])
    assert res.exit_code == 0, res.output
    assert "on cuda" in res.stdout and "draft model" in res.stdout


def test_flags_that_do_nothing_say_so(runner, cli_app, tiny):
    store = resolve_model(str(tiny.target), progress=False)
    res = runner.invoke(cli_app, ["generate", "-m", str(store), "--bits", "4", "--dtype", "float32", "--no-spec",
                                  "--budget", "8", "--host-memory", "1GiB", "--device", "cpu", "-n", "2", "hi"])
    assert res.exit_code == 0, res.output
    warnings = [line for line in res.stderr.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 3
    assert "--bits/--dtype do nothing with a store" in warnings[0]
    assert "--host-memory does nothing on the CPU" in warnings[1]
    assert "--budget do nothing without speculation (--no-spec)" in warnings[2]
    quiet = runner.invoke(cli_app, ["generate", "-m", str(store), "--no-spec", "-n", "2", "hi"])
    assert "warning" not in quiet.stderr


def test_interrupted_convert_says_how_to_resume(runner, cli_app, tiny, tmp_path, monkeypatch):
    import offspec.store.convert as convert_mod

    real = convert_mod.write_blob

    def stop(store_dir, rel, tensors):
        if rel.endswith("002.bin"):
            raise KeyboardInterrupt
        return real(store_dir, rel, tensors)

    monkeypatch.setattr(convert_mod, "write_blob", stop)
    res = runner.invoke(cli_app, ["convert", str(tiny.target), str(tmp_path / "out")])
    assert res.exit_code == 130
    assert res.stderr.splitlines() == [f"interrupted: 2 of 4 layers of out converted (in {tmp_path / 'out.partial'}); "
                                       "run the same command again to resume"]
    monkeypatch.setattr(convert_mod, "write_blob", real)
    ok = runner.invoke(cli_app, ["convert", str(tiny.target), str(tmp_path / "out")])
    assert ok.exit_code == 0 and ok.stdout.strip() == str(tmp_path / "out") and "converted:" in ok.stderr


def test_automatic_conversion_says_where_and_how_big(tiny, home, capsys):
    store = resolve_model(str(tiny.draft), progress=False)
    err = capsys.readouterr().err
    assert f"converted draft into {store} (" in err and "KB)" in err
    resolve_model(str(tiny.draft), dtype="float32", progress=False)
    assert "make another full copy of" in capsys.readouterr().err


def test_draft_without_model_does_not_convert_the_demo_draft(tiny, monkeypatch):
    import offspec.store.demo as demo
    from offspec.loader import load_engine

    target = resolve_model(str(tiny.target), progress=False)
    monkeypatch.setattr(demo, "demo_target", lambda *a, **k: target)
    monkeypatch.setattr(demo, "demo_draft", lambda *a, **k: pytest.fail("the demo draft was converted"))
    loaded = load_engine(None, str(tiny.draft), spec=True, progress=False, budget_auto=False, cache_tokens=64)
    assert loaded.draft_store is not None and loaded.draft_store.name.startswith("draft-")
    for m in (loaded.engine.target, loaded.engine.draft):
        m.close()


@pytest.mark.parametrize("command", ["convert", "plan"])
def test_an_unsupported_family_is_refused_before_anything_is_written(runner, cli_app, tiny, home, tmp_path, command):
    args = [command, str(tiny.other_arch)] + ([str(tmp_path / "out")] if command == "convert" else [])
    res = runner.invoke(cli_app, args)
    assert res.exit_code != 0 and res.stdout == ""
    assert res.stderr.count("\n") == 1 and "unsupported architecture 'bert'" in res.stderr
    assert not (tmp_path / "out").exists() and not (tmp_path / "out.partial").exists()
