"""Mixture-of-experts GGUFs (llama.cpp's merged `blk.N.ffn_{gate,up,down}_exps` tensors) read one expert at a time:
under the names a Hugging Face checkpoint of the family uses, equal to transformers' own load of the same file and
to the model it was written from, each expert read from its own bytes only; bad files fail with one line."""

from __future__ import annotations

import re

import pytest
import torch

from offspec.errors import ModelError
from offspec.store import gguf as gguf_store
from offspec.store.gguf import GgufSource, expert_slices, read_gguf_header

from ._gguf import tiny_hf_model, tiny_moe_model, transformers_state_dict, write_gguf

FAMILIES = ["qwen2_moe", "qwen3_moe"]


@pytest.fixture(scope="module")
def moe_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("gguf-moe")


def _gguf(moe_dir, model_type: str, file_type: str):
    path = moe_dir / f"tiny-{model_type}-{file_type}.gguf"
    if not path.exists():  # K-quant blocks tile rows of 256 values
        write_gguf(tiny_moe_model(model_type, hidden=256 if file_type == "Q4_K_M" else 64), path, file_type)
    return path


def _all_tensors(src: GgufSource, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """Every tensor of the source under its full checkpoint name."""
    out = {name: load() for name, load in src.resident_tensors().items()}
    for i in range(src.num_layers):
        out.update({f"model.layers.{i}.{rel}": load(dtype) for rel, load in src.layer_tensors(i).items()})
    return out


def _fused(name: str, want: dict[str, torch.Tensor]) -> torch.Tensor:
    """The slice of transformers' fused expert parameter that a per-expert checkpoint tensor is: expert e of
    `experts.down_proj` [E, H, I], or of the gate (first) or up (second) half of `experts.gate_up_proj` [E, 2I, H]."""
    m = re.fullmatch(r"(?P<prefix>.*\.experts)\.(?P<e>\d+)\.(?P<proj>gate|up|down)_proj\.weight", name)
    e = int(m["e"])
    if m["proj"] == "down":
        return want[f"{m['prefix']}.down_proj"][e]
    gate, up = want[f"{m['prefix']}.gate_up_proj"][e].chunk(2, dim=0)
    return gate if m["proj"] == "gate" else up


@pytest.mark.parametrize("model_type", FAMILIES)
@pytest.mark.parametrize("file_type", ["F32", "F16", "BF16", "Q8_0", "Q4_K_M"])
def test_each_expert_equals_transformers_load(moe_dir, model_type, file_type):
    path = _gguf(moe_dir, model_type, file_type)
    want = transformers_state_dict(path, torch.float32)
    with GgufSource(path) as src:
        got = _all_tensors(src)
    experts = [n for n in got if ".mlp.experts." in n]
    assert len(experts) == 2 * 4 * 3  # layers x experts x (gate, up, down)
    for name, t in got.items():
        oracle = _fused(name, want) if name in experts else want[name]
        assert t.dtype == torch.float32 and torch.equal(t, oracle), name
    assert set(got) - set(experts) == set(want) - {n for n in want if ".mlp.experts." in n}


@pytest.mark.parametrize("model_type", FAMILIES)
def test_names_and_values_are_the_hf_checkpoint(moe_dir, tmp_path, model_type):
    """F32: the source holds exactly the tensors (names and values) of the family's safetensors checkpoint."""
    from safetensors.torch import load_file

    model = tiny_moe_model(model_type)
    model.save_pretrained(tmp_path)
    checkpoint = load_file(tmp_path / "model.safetensors")
    with GgufSource(_gguf(moe_dir, model_type, "F32")) as src:
        got = _all_tensors(src)
        assert src.config.num_experts == 4
    assert set(got) == set(checkpoint)
    assert all(torch.equal(got[k], checkpoint[k]) for k in checkpoint)
    assert "model.layers.1.mlp.experts.3.gate_proj.weight" in got


def test_an_expert_reads_only_its_own_bytes(moe_dir, monkeypatch):
    """Each expert's loader dequantizes its slice of the merged tensor and nothing else, in row chunks when large."""
    path = _gguf(moe_dir, "qwen2_moe", "Q8_0")
    merged = {t.name: t for t in read_gguf_header(path).tensors}["blk.1.ffn_up_exps.weight"]
    n_expert, rows, cols = merged.shape
    size = merged.nbytes // n_expert
    reads: list[tuple[int, int]] = []
    real = gguf_store.dequantize

    def recording(info, maps):
        reads.append((info.offset, info.nbytes))
        return real(info, maps)

    monkeypatch.setattr(gguf_store, "dequantize", recording)
    whole = {}
    with GgufSource(path) as src:
        layer = src.layer_tensors(1)
        for e in range(n_expert):
            assert src.tensor_bytes(f"model.layers.1.mlp.experts.{e}.up_proj.weight") == size
            reads.clear()
            whole[e] = layer[f"mlp.experts.{e}.up_proj.weight"]()
            assert reads == [(merged.offset + e * size, size)] and whole[e].shape == (rows, cols)
        monkeypatch.setattr(gguf_store, "CHUNK_BYTES", rows * cols * 4 // 5)  # about five chunks per expert
        reads.clear()
        chunked = layer["mlp.experts.2.up_proj.weight"](torch.float32)
    start, end = merged.offset + 2 * size, merged.offset + 3 * size
    assert len(reads) > 1 and all(n < size for _, n in reads)
    assert reads[0][0] == start and sum(n for _, n in reads) == size
    assert all(start <= off and off + n <= end for off, n in reads)
    assert torch.equal(chunked, whole[2])


def test_expert_sizes_come_from_the_file(tmp_path):
    """Experts of another size than the family's default: the config takes llama.cpp's expert sizes from the file
    (transformers' GGUF config map leaves them out), and the tensors are still the checkpoint's."""
    from safetensors.torch import load_file

    model = tiny_moe_model("qwen2_moe", moe_intermediate_size=64, shared_expert_intermediate_size=96)
    path = write_gguf(model, tmp_path / "sized.gguf", "F32")
    model.save_pretrained(tmp_path / "hf")
    checkpoint = load_file(tmp_path / "hf" / "model.safetensors")
    with GgufSource(path) as src:
        assert (src.config.moe_intermediate_size, src.config.shared_expert_intermediate_size) == (64, 96)
        got = _all_tensors(src)
    assert set(got) == set(checkpoint) and all(torch.equal(got[k], checkpoint[k]) for k in checkpoint)


def _rewrite(path, out, drop: str | None = None, add: dict | None = None):
    """A copy of a GGUF without the tensor `drop` and with the tensors `add` ({name: float32 array})."""
    import gguf

    reader = gguf.GGUFReader(str(path))
    arch = reader.fields["general.architecture"].contents()
    w = gguf.GGUFWriter(str(out), arch)
    for key, field in reader.fields.items():
        if key.startswith("GGUF.") or key == "general.architecture":
            continue
        if field.types[0] == gguf.GGUFValueType.ARRAY:
            w.add_key_value(key, field.contents(), field.types[0], sub_type=field.types[-1])
        else:
            w.add_key_value(key, field.contents(), field.types[0])
    for t in reader.tensors:
        if t.name != drop:
            w.add_tensor(t.name, t.data, raw_shape=t.data.shape, raw_dtype=t.tensor_type)
    for name, a in (add or {}).items():
        w.add_tensor(name, a)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return out


def test_missing_expert_tensor_is_one_line(moe_dir, tmp_path):
    path = _rewrite(_gguf(moe_dir, "qwen3_moe", "F16"), tmp_path / "gap.gguf", drop="blk.1.ffn_up_exps.weight")
    with pytest.raises(ModelError, match=r"gap.gguf: tensor blk.1.ffn_up_exps.weight is missing") as info:
        GgufSource(path)
    assert "\n" not in str(info.value)


def test_truncated_expert_tensor_is_one_line(moe_dir, tmp_path):
    whole = _gguf(moe_dir, "qwen3_moe", "F16")
    last = max((t for t in read_gguf_header(whole).tensors if t.name.endswith("_exps.weight")), key=lambda t: t.offset)
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(whole.read_bytes()[: last.offset + last.nbytes // 2])
    with pytest.raises(ModelError, match=rf"cut.gguf: cannot load GGUF file \(tensor {re.escape(last.name)} lies "
                                         r"beyond the end of the file \(truncated\?\)\)$"):
        GgufSource(cut)


def test_merged_experts_transformers_does_not_read_are_one_line(tmp_path):
    """A Mixtral GGUF is a 'llama' GGUF with merged experts: transformers reads it as a dense llama without them,
    so it is refused with one line rather than converted without its experts."""
    import numpy as np

    dense = write_gguf(tiny_hf_model("llama"), tmp_path / "dense.gguf", "F16")
    rng = np.random.default_rng(0)
    experts = {f"blk.{i}.ffn_{w}_exps.weight": rng.standard_normal((4, 32, 256), dtype=np.float32)
               for i in range(2) for w in ("gate", "up")}
    path = _rewrite(dense, tmp_path / "mixtral.gguf", add=experts)
    with pytest.raises(ModelError, match=r"mixtral.gguf: transformers \S+ does not load the merged expert tensor "
                                         r"blk.0.ffn_gate_exps.weight of GGUF architecture 'llama'"):
        GgufSource(path)


def test_header_sizes_each_expert(moe_dir):
    """From the header alone: every expert's slice of every merged tensor, summing to the file's expert bytes, each
    the size of the tensor the source reads for that expert."""
    path = _gguf(moe_dir, "qwen2_moe", "Q8_0")
    header = read_gguf_header(path)
    slices = expert_slices(header)
    merged = [t for t in header.tensors if t.name.endswith("_exps.weight")]
    assert sorted(slices) == [0, 1] and all(sorted(slices[i]) == [0, 1, 2, 3] for i in slices)
    assert sum(s.nbytes for layer in slices.values() for ex in layer.values() for s in ex.values()) == sum(
        t.nbytes for t in merged)
    proj = {"ffn_gate_exps.weight": "gate", "ffn_up_exps.weight": "up", "ffn_down_exps.weight": "down"}
    with GgufSource(path) as src:
        for i, layer in slices.items():
            loaders = src.layer_tensors(i)
            for e, ex in layer.items():
                for name, s in ex.items():
                    rel = f"mlp.experts.{e}.{proj[name]}_proj.weight"
                    assert src.tensor_bytes(f"model.layers.{i}.{rel}") == s.nbytes
                    assert tuple(loaders[rel]().shape) == s.shape


@pytest.mark.parametrize("bits", [16, 4])
def test_metadata_estimate_equals_the_written_store(moe_dir, tmp_path, bits):
    """Sized from the header, expert by expert (NF4 packs each expert's matrix): the store the converter writes."""
    from offspec.store.convert import convert
    from offspec.store.manifest import read_manifest
    from offspec.store.metadata import estimate_manifest, read_source_metadata, store_bytes

    path = _gguf(moe_dir, "qwen3_moe", "Q8_0")
    meta = read_source_metadata(path)
    assert meta.tensor_count == len(_all_tensors_names(path))
    expected = estimate_manifest(meta, bits, "bfloat16")
    written = read_manifest(convert(path, tmp_path / "s", bits=bits, progress=False).path)
    assert expected.layer_bytes == written.layer_bytes and store_bytes(expected) == store_bytes(written)


def _all_tensors_names(path) -> set[str]:
    with GgufSource(path) as src:
        layers = {f"{i}.{rel}" for i in range(src.num_layers) for rel in src.layer_tensors(i)}
        return set(src.resident_tensors()) | layers


def test_gpt_oss_gguf_is_one_line(tmp_path):
    """transformers' GGUF map of gpt-oss leaves out its gate/up experts and their biases: refused, not converted."""
    import gguf
    import numpy as np
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    hidden, inter, n_exp = 64, 64, 4
    w = gguf.GGUFWriter(str(tmp_path / "oss.gguf"), "gpt-oss")
    w.add_file_type(0)
    w.add_context_length(256)
    w.add_embedding_length(hidden)
    w.add_block_count(1)
    w.add_feed_forward_length(inter)
    w.add_head_count(4)
    w.add_head_count_kv(2)
    w.add_key_length(16)
    w.add_value_length(16)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_rope_freq_base(10000.0)
    w.add_expert_count(n_exp)
    w.add_expert_used_count(2)
    tokens = ["<pad>", "<s>", "</s>", "<unk>"] + list(bytes_to_unicode().values())
    w.add_tokenizer_model("gpt2")
    w.add_token_list(tokens)
    w.add_token_types([3, 3, 3, 2] + [1] * (len(tokens) - 4))
    w.add_token_merges([])
    rng = np.random.default_rng(0)
    shapes = {"token_embd.weight": (len(tokens), hidden), "output_norm.weight": (hidden,),
              "output.weight": (len(tokens), hidden), "blk.0.attn_norm.weight": (hidden,),
              "blk.0.attn_q.weight": (64, hidden), "blk.0.attn_k.weight": (32, hidden),
              "blk.0.attn_v.weight": (32, hidden), "blk.0.attn_output.weight": (hidden, 64), "blk.0.attn_sinks": (4,),
              "blk.0.post_attention_norm.weight": (hidden,), "blk.0.ffn_gate_inp.weight": (n_exp, hidden),
              "blk.0.ffn_gate_exps.weight": (n_exp, inter, hidden), "blk.0.ffn_gate_exps.bias": (n_exp, inter),
              "blk.0.ffn_up_exps.weight": (n_exp, inter, hidden), "blk.0.ffn_up_exps.bias": (n_exp, inter),
              "blk.0.ffn_down_exps.weight": (n_exp, hidden, inter), "blk.0.ffn_down_exps.bias": (n_exp, hidden)}
    for name, shape in shapes.items():
        w.add_tensor(name, rng.standard_normal(shape, dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(ModelError, match=r"oss.gguf: transformers \S+ does not load the merged expert tensor "
                                         r"blk.0.ffn_gate_exps.weight of GGUF architecture 'gpt-oss'"):
        GgufSource(tmp_path / "oss.gguf")
