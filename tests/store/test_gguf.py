"""GGUF conversion, tensor by tensor: equal to transformers' own load of the same file, for a llama-layout and a
Gemma 3 model in F16, Q8_0 and a K-quant mix; default precision by file type; split files; metadata sizing."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from offspec.store.convert import convert
from offspec.store.gguf import default_bits, read_gguf_header
from offspec.store.manifest import read_manifest
from offspec.store.metadata import estimate_manifest, read_source_metadata, store_bytes

from ._blobs import store_state_dict
from ._gguf import tiny_hf_model, transformers_state_dict, write_gguf


@pytest.fixture(scope="module")
def gguf_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("gguf")


def _gguf(gguf_dir, arch: str, file_type: str):
    path = gguf_dir / f"tiny-{arch}-{file_type}.gguf"
    if not path.exists():
        write_gguf(tiny_hf_model(arch), path, file_type)
    return path


@pytest.mark.parametrize("arch", ["llama", "gemma3"])
@pytest.mark.parametrize("file_type", ["F16", "Q8_0", "Q4_K_M"])
def test_streamed_conversion_equals_transformers_load(gguf_dir, tmp_path, arch, file_type):
    path = _gguf(gguf_dir, arch, file_type)
    result = convert(path, tmp_path / "store", bits=16, dtype="float32", progress=False)
    want = transformers_state_dict(path, torch.float32)
    got = store_state_dict(result.path)
    assert set(got) == set(want)
    for name, t in want.items():
        assert got[name].dtype == torch.float32 and torch.equal(got[name], t), name
    cfg = json.loads((result.path / "config.json").read_text())
    assert cfg["model_type"] == ("gemma3_text" if arch == "gemma3" else "llama")
    assert read_manifest(result.path).tie_word_embeddings is False


def test_family_fixes_restore_the_original_weights(gguf_dir, tmp_path):
    """F16 files: llama's Q/K un-permute and Gemma's norm minus 1 give back the HF model the file was made from."""
    for arch in ("llama", "gemma3"):
        hf = tiny_hf_model(arch).state_dict()
        got = store_state_dict(convert(_gguf(gguf_dir, arch, "F16"), tmp_path / arch, bits=16, dtype="float32",
                                       progress=False).path)
        for name, t in hf.items():
            tol = 1e-6 if t.ndim == 1 else 1e-3  # 2-D weights went through float16
            assert torch.allclose(got[name], t, atol=tol, rtol=tol), (arch, name)


def test_bfloat16_store_casts_transformers_values(gguf_dir, tmp_path):
    path = _gguf(gguf_dir, "llama", "Q8_0")
    want = transformers_state_dict(path, torch.bfloat16)
    got = store_state_dict(convert(path, tmp_path / "s", bits=16, dtype="bfloat16", progress=False).path)
    assert all(torch.equal(got[k], v) for k, v in want.items())


def test_default_precision_follows_the_file_type(gguf_dir, tmp_path):
    lines: list[str] = []
    q4 = convert(_gguf(gguf_dir, "llama", "Q4_K_M"), tmp_path / "a", progress=False, on_choice=lines.append)
    assert q4.bits == 4 and read_manifest(q4.path).bits == 4
    assert len(lines) == 1 and "NF4" in lines[0] and "Q4_K_M" in lines[0] and "below 8 bits" in lines[0]
    q8 = convert(_gguf(gguf_dir, "llama", "Q8_0"), tmp_path / "b", progress=False, on_choice=lines.append)
    assert q8.bits == 16 and "Q8_0" in lines[1] and "bfloat16 weights" in lines[1]
    f16 = read_gguf_header(_gguf(gguf_dir, "llama", "F16"))
    assert default_bits(f16)[0] == 16
    asked = convert(_gguf(gguf_dir, "llama", "Q4_K_M"), tmp_path / "c", bits=16, progress=False,
                    on_choice=lines.append)
    assert asked.bits == 16 and len(lines) == 2  # nothing to explain when --bits is given


@pytest.mark.parametrize("bits", [16, 4])
def test_metadata_estimate_equals_the_written_store(gguf_dir, make_tiny_model, tmp_path, bits):
    for src in (_gguf(gguf_dir, "llama", "Q4_K_M"), make_tiny_model("qwen3", tie=True)):
        meta = read_source_metadata(src)
        expected = estimate_manifest(meta, bits, "bfloat16")
        written = read_manifest(convert(src, tmp_path / f"{src.name}-{bits}", bits=bits, progress=False).path)
        assert expected.layer_bytes == written.layer_bytes
        assert expected.resident.size == written.resident.size
        assert store_bytes(expected) == store_bytes(written)
        assert expected.tie_word_embeddings == written.tie_word_embeddings


def _split(path, out_dir, parts: int):
    """Split a GGUF the way llama.cpp's gguf-split does: metadata in part 1, tensors spread over the parts."""
    import gguf

    reader = gguf.GGUFReader(str(path))
    names = [t.name for t in reader.tensors]
    per = -(-len(names) // parts)
    files = []
    for p in range(parts):
        w = gguf.GGUFWriter(str(out_dir / f"tiny-{p + 1:05d}-of-{parts:05d}.gguf"), "llama")
        if p == 0:
            for key, field in reader.fields.items():
                if key.startswith("GGUF.") or key == "general.architecture":
                    continue
                value = field.contents()
                vtype = field.types[0]
                if vtype == gguf.GGUFValueType.ARRAY:
                    w.add_key_value(key, value, vtype, sub_type=field.types[-1])
                else:
                    w.add_key_value(key, value, vtype)
        w.add_uint16("split.no", p)
        w.add_uint16("split.count", parts)
        for t in reader.tensors[p * per : (p + 1) * per]:
            w.add_tensor(t.name, t.data, raw_shape=t.data.shape, raw_dtype=t.tensor_type)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
        files.append(out_dir / f"tiny-{p + 1:05d}-of-{parts:05d}.gguf")
    return files


def test_split_gguf_converts_from_its_first_part(gguf_dir, tmp_path):
    whole = _gguf(gguf_dir, "llama", "Q8_0")
    parts = _split(whole, tmp_path, 3)
    a = store_state_dict(convert(whole, tmp_path / "whole", bits=16, dtype="float32", progress=False).path)
    b = store_state_dict(convert(parts[0], tmp_path / "split", bits=16, dtype="float32", progress=False).path)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    parts[2].unlink()
    from offspec.errors import ModelError

    with pytest.raises(ModelError, match="part tiny-00003-of-00003.gguf of this split GGUF is missing"):
        convert(parts[0], tmp_path / "again", progress=False)


def test_truncated_gguf_is_one_line(gguf_dir, tmp_path):
    from offspec.errors import ModelError

    src = tmp_path / "cut.gguf"
    data = _gguf(gguf_dir, "llama", "F16").read_bytes()
    src.write_bytes(data[: len(data) // 2])
    with pytest.raises(ModelError, match="cut.gguf: cannot load GGUF file .*beyond the end of the file"):
        convert(src, tmp_path / "s", progress=False)
    assert not (tmp_path / "s.partial").exists()


def test_gguf_copy_has_a_working_tokenizer(gguf_dir, tmp_path):
    from transformers import AutoTokenizer

    store = convert(_gguf(gguf_dir, "llama", "F16"), tmp_path / "s", progress=False).path
    tok = AutoTokenizer.from_pretrained(store)
    assert tok.decode(tok.encode("hi there", add_special_tokens=False)) == "hi there"
    shutil.rmtree(store)


@pytest.mark.parametrize("arch", ["llama", "gemma3"])
def test_large_matrices_in_row_chunks_equal_transformers_load(gguf_dir, tmp_path, monkeypatch, arch):
    """Every matrix over the chunk size: untouched ones go a few rows at a time, fixed ones (llama's Q/K) whole."""
    import offspec.store.gguf as gguf_mod

    monkeypatch.setattr(gguf_mod, "CHUNK_BYTES", 4096)
    path = _gguf(gguf_dir, arch, "Q4_K_M")
    want = transformers_state_dict(path, torch.bfloat16)
    got = store_state_dict(convert(path, tmp_path / "s", bits=16, dtype="bfloat16", progress=False).path)
    assert all(torch.equal(got[k], v) for k, v in want.items())


@pytest.mark.slow
def test_demo_draft_gguf_equals_transformers_load(tmp_path):
    """The real 0.5B demo GGUF (Q4_K/Q5_0/Q6_K/Q8_0 mix), converted tensor by tensor, equals transformers' load."""
    from offspec.errors import ModelError
    from offspec.store.demo import demo_draft_gguf

    try:
        path = demo_draft_gguf()
    except ModelError as exc:
        pytest.skip(str(exc))
    store = convert(path, tmp_path / "draft", bits=16, dtype="bfloat16", progress=False).path
    want = transformers_state_dict(path, torch.bfloat16)
    got = store_state_dict(store)
    assert set(got) == set(want) - ({"lm_head.weight"} if read_manifest(store).tie_word_embeddings else set())
    for name in got:
        assert torch.equal(got[name], want[name]), name
