"""convert_model: exact round trips, sharding, tying, NF4, resume/restart, and one-line errors."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import offspec.store.convert as convert
from offspec.errors import ConfigError, ModelError, StoreError
from offspec.store.convert import convert_model, layer_file
from offspec.store.integrity import verify_store
from offspec.store.manifest import ALIGN, read_manifest
from offspec.store.nf4 import dequantize_nf4

from ._blobs import read_blob, source_state_dict, store_state_dict


def _convert(src: Path, out: Path, **kw) -> Path:
    return convert_model(src, out, progress=False, **kw)


@pytest.mark.parametrize("model_type", ["llama", "mistral", "qwen2", "qwen3"])
def test_round_trip_float32_is_exact(make_tiny_model, tmp_path, model_type):
    src = make_tiny_model(model_type)
    store = _convert(src, tmp_path / "store", bits=16, dtype="float32")
    m = verify_store(store)
    assert (m.model_type, m.num_layers, m.bits, m.dtype) == (model_type, 4, 16, "float32")
    assert m.source == str(src.resolve()) and not m.tie_word_embeddings
    original = source_state_dict(src)
    stored = store_state_dict(store)
    assert stored.keys() == original.keys()
    for name, t in original.items():
        assert torch.equal(stored[name], t), name
    assert set(m.resident.tensors) == {"model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"}
    assert "self_attn.q_proj.weight" in m.layers[0].tensors
    for i, blob in enumerate(m.layers):
        assert blob.file == layer_file(i) and blob.size % ALIGN == 0
        assert (store / blob.file).stat().st_size == blob.size
        assert all(e.offset % ALIGN == 0 for e in blob.tensors.values())


def test_store_is_a_complete_model_folder(tiny_llama_dir, tmp_path):
    store = _convert(tiny_llama_dir, tmp_path / "store")
    for name in ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json", "manifest.json"):
        assert (store / name).is_file(), name
    assert not (tmp_path / "store.partial").exists()
    assert not (store / convert.JOURNAL).exists()
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(store)
    assert tok.decode(tok.encode("hi there")) == "hi there" and tok.chat_template


def test_bfloat16_cast(tiny_llama_dir, tmp_path):
    store = _convert(tiny_llama_dir, tmp_path / "store", dtype="bfloat16")
    stored = store_state_dict(store)
    for name, t in source_state_dict(tiny_llama_dir).items():
        assert stored[name].dtype == torch.bfloat16
        assert torch.equal(stored[name], t.to(torch.bfloat16)), name


def test_sharded_source_equals_single_file(make_tiny_model, tmp_path):
    single = make_tiny_model("llama")
    sharded = make_tiny_model("llama", shard_size="40KB")
    assert (sharded / "model.safetensors.index.json").is_file()
    assert len(list(sharded.glob("*.safetensors"))) > 3
    a = read_manifest(_convert(single, tmp_path / "a"))
    b = read_manifest(_convert(sharded, tmp_path / "b"))
    assert [x.sha256 for x in a.layers] == [x.sha256 for x in b.layers]
    assert a.resident.sha256 == b.resident.sha256


def test_tied_embeddings(make_tiny_model, tmp_path):
    src = make_tiny_model("qwen3", tie=True)
    assert "lm_head.weight" not in source_state_dict(src)
    store = _convert(src, tmp_path / "store", dtype="float32")
    m = read_manifest(store)
    assert m.tie_word_embeddings
    assert set(m.resident.tensors) == {"model.embed_tokens.weight", "model.norm.weight"}


def test_missing_lm_head_means_tied(tiny_llama_dir, tmp_path):
    src = tmp_path / "src"
    shutil.copytree(tiny_llama_dir, src)
    tensors = load_file(src / "model.safetensors")
    del tensors["lm_head.weight"]
    save_file(tensors, src / "model.safetensors")
    store = _convert(src, tmp_path / "store")
    m = read_manifest(store)
    assert m.tie_word_embeddings and "lm_head.weight" not in m.resident.tensors
    assert json.loads((store / "config.json").read_text())["tie_word_embeddings"] is True


def test_nf4_layers(tiny_llama_dir, tmp_path):
    store = _convert(tiny_llama_dir, tmp_path / "store", bits=4, dtype="bfloat16")
    m = verify_store(store)
    assert m.bits == 4
    original = source_state_dict(tiny_llama_dir)
    import bitsandbytes.functional as bnbf

    for i, blob in enumerate(m.layers):
        views = read_blob(store, blob)
        for name, e in blob.tensors.items():
            full = original.get(f"model.layers.{i}.{name}")
            if name.endswith(".absmax"):
                continue
            if full is not None and full.ndim == 2:  # every linear weight is packed
                assert e.quant is not None and e.dtype == "uint8"
                assert e.quant.shape == tuple(full.shape) and e.quant.dtype == "bfloat16"
                assert views[name + ".absmax"].dtype == torch.float32
                packed, state = bnbf.quantize_4bit(full.to(torch.bfloat16), blocksize=64, quant_type="nf4")
                assert torch.equal(views[name], packed)
                expect = bnbf.dequantize_4bit(packed, state)
                got = dequantize_nf4(views[name], views[name + ".absmax"], e.quant)
                assert got.shape == full.shape and torch.equal(got, expect), name
            else:  # norms stay in the float dtype
                assert e.quant is None and torch.equal(views[name], full.to(torch.bfloat16))
    assert all(e.quant is None for e in m.resident.tensors.values())


class _Interrupt(Exception):
    pass


def _count_writes(monkeypatch, fail_after: int | None = None) -> list[str]:
    """Wrap write_blob: record each blob written; raise _Interrupt once fail_after layers are written."""
    written: list[str] = []
    real = convert.write_blob

    def wrapper(store_dir, rel, tensors):
        if fail_after is not None and len(written) >= fail_after:
            raise _Interrupt(rel)
        entry = real(store_dir, rel, tensors)
        written.append(rel)
        return entry

    monkeypatch.setattr(convert, "write_blob", wrapper)
    return written


def test_resume_after_interrupt(tiny_llama_dir, tmp_path, monkeypatch):
    out = tmp_path / "store"
    with monkeypatch.context() as mp:
        _count_writes(mp, fail_after=2)
        with pytest.raises(_Interrupt):
            _convert(tiny_llama_dir, out)
    assert not out.exists()
    journal = json.loads((tmp_path / "store.partial" / convert.JOURNAL).read_text())
    assert sorted(journal["layers"]) == ["0", "1"]
    written = _count_writes(monkeypatch)
    _convert(tiny_llama_dir, out)
    assert written == [layer_file(2), layer_file(3), "resident.bin"]
    resumed = verify_store(out)
    fresh = read_manifest(_convert(tiny_llama_dir, tmp_path / "fresh"))
    assert [b.sha256 for b in resumed.layers] == [b.sha256 for b in fresh.layers]


def test_resume_rewrites_a_damaged_layer(tiny_llama_dir, tmp_path, monkeypatch):
    out = tmp_path / "store"
    with monkeypatch.context() as mp:
        _count_writes(mp, fail_after=3)
        with pytest.raises(_Interrupt):
            _convert(tiny_llama_dir, out)
    damaged = tmp_path / "store.partial" / layer_file(1)
    damaged.write_bytes(damaged.read_bytes()[:100])
    written = _count_writes(monkeypatch)
    _convert(tiny_llama_dir, out)
    assert written == [layer_file(1), layer_file(3), "resident.bin"]
    verify_store(out)


def test_restart_when_options_differ(tiny_llama_dir, tmp_path, monkeypatch):
    out = tmp_path / "store"
    with monkeypatch.context() as mp:
        _count_writes(mp, fail_after=2)
        with pytest.raises(_Interrupt):
            _convert(tiny_llama_dir, out, dtype="float32")
    written = _count_writes(monkeypatch)
    _convert(tiny_llama_dir, out, dtype="bfloat16")
    assert written == [layer_file(i) for i in range(4)] + ["resident.bin"]
    assert verify_store(out).dtype == "bfloat16"


def test_finished_store_is_reused_and_others_refused(tiny_llama_dir, tmp_path, monkeypatch):
    out = _convert(tiny_llama_dir, tmp_path / "store")
    written = _count_writes(monkeypatch)
    assert _convert(tiny_llama_dir, out) == out and written == []
    with pytest.raises(StoreError, match="already holds a store"):
        _convert(tiny_llama_dir, out, bits=4)
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    with pytest.raises(StoreError, match="not an offspec store"):
        _convert(tiny_llama_dir, other)
    empty = tmp_path / "empty"
    empty.mkdir()
    assert read_manifest(_convert(tiny_llama_dir, empty)).num_layers == 4


def test_changed_source_is_not_mixed_with_old_store(tiny_llama_dir, tmp_path):
    src = tmp_path / "src"
    shutil.copytree(tiny_llama_dir, src)
    out = _convert(src, tmp_path / "store")
    (src / "model.safetensors").touch()
    with pytest.raises(StoreError, match="before it changed"):
        _convert(src, out)


def test_truncated_safetensors_names_the_file(tiny_llama_dir, tmp_path):
    src = tmp_path / "src"
    shutil.copytree(tiny_llama_dir, src)
    f = src / "model.safetensors"
    f.write_bytes(f.read_bytes()[:-1000])
    with pytest.raises(ModelError, match=r"model\.safetensors: unreadable safetensors file"):
        _convert(src, tmp_path / "store")


def test_missing_shard_and_missing_tensor(make_tiny_model, tmp_path):
    src = tmp_path / "src"
    shutil.copytree(make_tiny_model("llama", shard_size="40KB"), src)
    index = json.loads((src / "model.safetensors.index.json").read_text())
    shard = index["weight_map"]["model.layers.2.mlp.up_proj.weight"]
    tensors = load_file(src / shard)
    del tensors["model.layers.2.mlp.up_proj.weight"]
    save_file(tensors, src / shard)
    with pytest.raises(ModelError, match=r"tensor model\.layers\.2\.mlp\.up_proj\.weight .*is missing"):
        _convert(src, tmp_path / "store")
    (src / shard).unlink()
    with pytest.raises(ModelError, match=f"shard {shard}.*is missing"):
        _convert(src, tmp_path / "store")


def test_missing_layer_tensor_without_index(tiny_llama_dir, tmp_path):
    src = tmp_path / "src"
    shutil.copytree(tiny_llama_dir, src)
    tensors = load_file(src / "model.safetensors")
    del tensors["model.layers.3.self_attn.k_proj.weight"]
    save_file(tensors, src / "model.safetensors")
    with pytest.raises(ModelError, match=r"model\.layers\.3\.self_attn\.k_proj\.weight is missing"):
        _convert(src, tmp_path / "store")


def test_source_errors(tiny_llama_dir, tmp_path):
    with pytest.raises(ModelError, match="model path not found: .*nowhere"):
        _convert(tmp_path / "nowhere", tmp_path / "store")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelError, match="no config.json, not a Hugging Face model folder"):
        _convert(tmp_path / "empty", tmp_path / "store")
    src = tmp_path / "src"
    src.mkdir()
    shutil.copy(tiny_llama_dir / "config.json", src)
    with pytest.raises(ModelError, match="no \\*.safetensors files"):
        _convert(src, tmp_path / "store")
    (tmp_path / "weights.bin").write_bytes(b"x")
    with pytest.raises(ModelError, match="not a model folder, .gguf file or offspec store"):
        _convert(tmp_path / "weights.bin", tmp_path / "store")
    with pytest.raises(ConfigError, match="bad --bits 8"):
        _convert(tiny_llama_dir, tmp_path / "store", bits=8)
    with pytest.raises(ConfigError, match="--dtype"):
        _convert(tiny_llama_dir, tmp_path / "store", dtype="int8")
    assert not (tmp_path / "store").exists()


def test_corrupt_gguf(tmp_path):
    bad = tmp_path / "broken.gguf"
    bad.write_bytes(b"GGUF" + b"\0" * 64)
    with pytest.raises(ModelError, match="broken.gguf: cannot load GGUF file"):
        _convert(bad, tmp_path / "store")


def test_a_multimodal_checkpoint_converts_its_text_decoder_only(tmp_path):
    """Gemma 3 keeps its text model under model.language_model: the store holds it under the text causal LM's
    names, and the vision tower and projector are left out."""
    from offspec.models.tiny import default_config, tiny_config
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(tiny_config(default_config("gemma3")))
    assert type(model).__name__ == "Gemma3ForConditionalGeneration"
    model.save_pretrained(tmp_path / "src")
    m = read_manifest(_convert(tmp_path / "src", tmp_path / "store", dtype="float32"))
    assert m.model_type == "gemma3" and m.num_layers == model.config.text_config.num_hidden_layers
    assert "model.embed_tokens.weight" in m.resident.tensors and "model.norm.weight" in m.resident.tensors
    assert not [n for n in m.resident.tensors if "vision" in n or "projector" in n or "language_model" in n]
    text = model.model.language_model.layers[0].state_dict()
    assert set(m.layers[0].tensors) == set(text)


def test_a_checkpoint_saved_without_its_base_models_prefix_runs(tmp_path):
    """A GPT-2 base model saves `h.0...`, `wte.weight`: the store binds them under the causal LM's prefix and ties
    the head to the embeddings, as transformers' own loading does."""
    from transformers import GPT2Config, GPT2LMHeadModel, GPT2Model

    from offspec.runtime.model import OffloadedModel
    from offspec.runtime.plan import plan_residency

    torch.manual_seed(0)
    GPT2Model(GPT2Config(vocab_size=256, n_positions=64, n_embd=64, n_layer=2, n_head=4)).save_pretrained(tmp_path / "src")
    assert any(k.startswith("h.0.") for k in load_file(tmp_path / "src" / "model.safetensors"))
    store = _convert(tmp_path / "src", tmp_path / "store", dtype="float32")
    ref = GPT2LMHeadModel.from_pretrained(tmp_path / "src").eval()
    m = read_manifest(store)
    model = OffloadedModel(store, plan_residency(m.layer_bytes, m.resident.size, 1 << 30), cache_tokens=16)
    ids = torch.tensor([[5, 9, 13, 2]])
    try:
        with torch.no_grad():
            assert (model.forward(ids) - ref(ids).logits).abs().max().item() < 1e-4
    finally:
        model.close()


def test_tensors_the_model_does_not_load_are_left_out(tmp_path):
    """Gemma 3n checkpoints carry key/value projections for the layers that reuse another layer's keys; transformers
    ignores them when loading, and so does the store."""
    from transformers import AutoModelForCausalLM

    from offspec.models.tiny import default_config, tiny_config

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(tiny_config(default_config("gemma3n_text")))
    shared = [i for i, layer in enumerate(model.model.layers) if layer.self_attn.is_kv_shared_layer]
    assert shared
    model.save_pretrained(tmp_path / "src")
    tensors = load_file(tmp_path / "src" / "model.safetensors")
    extra = f"model.layers.{shared[0]}.self_attn.k_proj.weight"
    tensors[extra] = torch.zeros(32, 64)
    save_file(tensors, tmp_path / "src" / "model.safetensors", metadata={"format": "pt"})
    m = read_manifest(_convert(tmp_path / "src", tmp_path / "store", dtype="float32"))
    assert "self_attn.k_proj.weight" not in m.layers[shared[0]].tensors
    assert "self_attn.k_proj.weight" in m.layers[0].tensors
