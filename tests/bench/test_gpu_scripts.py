"""The device-independent parts of the GPU benchmark (scripts/): random real-shape models that offspec converts,
the copy/read bound of a pass, and the speed-up predicted from CPU acceptance and GPU times."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

SCRIPTS = Path(__file__).resolve().parents[2] / "scripts"


def _script(name: str):
    spec = importlib.util.spec_from_file_location(f"offspec_scripts_{name}", SCRIPTS / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _row(config: str, tpp: float, pass_s: float, draft_s: float) -> dict:
    spec = config != "plain"
    return {"config": config, "spec": spec, "budget": int(config) if config.isdigit() else None,
            "tokens_per_pass": tpp, "pass_s": pass_s, "draft_s_per_pass": draft_s}


def test_pass_bound_is_the_slower_of_the_link_and_the_disk():
    s = _script("gpu_summary")
    plan = {"tiers": ["device", "host", "disk", "disk"], "layer_bytes": [10e9, 20e9, 30e9, 40e9]}
    link_only = s.pass_bound_s(plan, pinned_gbps=100.0, disk_gbps=None)
    assert link_only == pytest.approx((20e9 + 30e9 + 40e9) / 100e9)
    assert s.pass_bound_s(plan, 100.0, 1.0) == pytest.approx(70e9 / 1e9)  # the disk is the slower
    assert s.pass_bound_s(plan, 1.0, 1000.0) == pytest.approx(90e9 / 1e9)  # the link is the slower
    assert s.pass_bound_s({"tiers": ["device"], "layer_bytes": [1]}, 100.0, 1.0) is None


def test_prediction_combines_cpu_acceptance_with_gpu_times():
    s = _script("gpu_summary")
    accept = {"configs": [_row("plain", 1, 2.7, 0), _row("auto", 4.4, 3.2, 2.5), _row("16", 5.0, 3.5, 3.8),
                          _row("256", 9.0, 9.5, 11.0)]}
    gpu = {"configs": [_row("plain", 1, 0.2, 0), _row("16", 1.1, 0.21, 0.01), _row("64", 1.2, 0.22, 0.03),
                       _row("256", 1.3, 0.25, 0.05)]}
    pred = s.predict(accept, gpu)
    assert [p["budget"] for p in pred] == [16, 256]  # budgets measured in both runs; auto has no fixed size
    p16 = pred[0]
    assert p16["tok_per_s"] == pytest.approx(5.0 / (0.21 + 0.01))
    assert p16["speedup"] == pytest.approx(5.0 / (0.21 + 0.01) * 0.2)
    assert p16["speedup_free_draft"] == pytest.approx(5.0 * 0.2 / 0.21)
    assert s.predict(accept, {"configs": []}) == []


def test_report_prints_figures_next_to_ceilings(tmp_path: Path):
    s = _script("gpu_summary")
    (tmp_path / "rawbw.json").write_text(json.dumps({"gpu": "X", "h2d_pinned_GBps": 50.0, "h2d_pageable_GBps": 6.0,
                                                     "disk_cold_GBps": [1.0, 1.5, 1.4]}))
    run = {"plan": {"tiers": ["device", "host", "host"], "layer_bytes": [1e9, 5e9, 5e9],
                    "layers": {"device": [0], "host": [1, 2], "disk": []}},
           "read": {"gbps_for_limit": None}, "curve": [{"tokens": 1, "pass_s_median": 0.25}],
           "configs": [_row("plain", 1, 0.25, 0), _row("16", 1.1, 0.26, 0.1)]}
    (tmp_path / "host-16bit.json").write_text(json.dumps(run))
    accept = tmp_path / "accept.json"
    accept.write_text(json.dumps({"configs": [_row("plain", 1, 2.7, 0), _row("16", 5.0, 3.5, 3.8)]}))
    text = "\n".join(s.report(tmp_path, accept))
    assert "pinned host->device 50.0 GB/s" in text
    assert "host-16bit" in text and "bound 0.200 s" in text and "fraction of the limit 0.80" in text
    assert "predicted speculative / plain:" in text


def test_make_random_writes_a_folder_offspec_converts(tmp_path: Path, bench_tok, monkeypatch):
    """A random model of a (tiny) Qwen2 shape: transformers loads it and offspec converts it into a store."""
    mr = _script("make_random")
    monkeypatch.setitem(mr.SHAPES, "tiny", dict(hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                                                num_attention_heads=2, num_key_value_heads=1,
                                                tie_word_embeddings=True))
    tokdir = tmp_path / "tok"
    bench_tok.save_pretrained(tokdir)
    out = tmp_path / "tiny"
    total = mr.make_random(out, "tiny", tokdir, dtype="float32", device="cpu")
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["model_type"] == "qwen2" and cfg["num_hidden_layers"] == 2 and (out / "tokenizer.json").is_file()
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert index["metadata"]["total_size"] == total
    from offspec.store.convert import convert_model
    from offspec.store.manifest import read_manifest

    store = convert_model(str(out), tmp_path / "store", bits=16, dtype="float32", progress=False)
    assert read_manifest(store).num_layers == 2
    with pytest.raises(SystemExit, match="tokenizer"):
        mr.make_random(tmp_path / "x", "tiny", tmp_path, device="cpu")
