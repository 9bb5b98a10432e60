"""The target's NF4 self-draft: logits equal a dequantized-NF4 transformers reference; resident parts are shared."""

import pytest
import torch

from offspec.runtime.model import OffloadedModel
from offspec.runtime.plan import DEVICE, DISK, ResidencyPlan
from offspec.runtime.self_draft import open_self_draft
from offspec.runtime.sizing import nf4_copy_bytes
from offspec.store.convert import convert_model
from offspec.store.manifest import QuantInfo, read_manifest
from offspec.store.nf4 import dequantize_nf4, quantize_nf4

TIERS = (DISK, DEVICE, DISK, DEVICE)  # the target streams layers 0 and 2, keeps 1 and 3


@pytest.fixture(scope="module")
def pair(tiny_llama_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("self-draft")
    target_store = convert_model(tiny_llama_dir, out / "t16", bits=16, dtype="float32", progress=False)
    nf4_store = convert_model(tiny_llama_dir, out / "t4", bits=4, dtype="float32", progress=False)
    man = read_manifest(target_store)
    plan = ResidencyPlan(TIERS, tuple(man.layer_bytes), man.resident.size, 0, 0, 2, max(man.layer_bytes))
    target = OffloadedModel(target_store, plan, cache_tokens=64)
    draft = open_self_draft(target, nf4_store, cache_tokens=64)
    yield target, draft, nf4_store
    target.close()


def nf4_reference(tiny_llama_dir):
    """transformers' model with the decoder linear weights of the target's streamed layers replaced by their
    NF4 round trip (quantize, dequantize) — what the self-draft must compute."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32).eval()
    for i, tier in enumerate(TIERS):
        if tier != DISK:
            continue
        for mod in model.model.layers[i].modules():
            if isinstance(mod, torch.nn.Linear):
                w = mod.weight.data
                packed, absmax = quantize_nf4(w)
                mod.weight.data = dequantize_nf4(packed, absmax, QuantInfo("nf4", 64, tuple(w.shape), "float32"))
    return model


def test_self_draft_logits_equal_the_dequantized_nf4_reference(pair, tiny_llama_dir):
    _, draft, _ = pair
    ids = torch.randint(0, 256, (1, 14), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        ref = nf4_reference(tiny_llama_dir)(ids).logits
    draft.reset()
    got = draft.forward(ids)
    assert (got - ref).abs().max().item() < 1e-4
    assert (got - ref).abs().max().item() < (ref.abs().max().item())  # sanity: the same scale


def test_self_draft_shares_the_targets_resident_parts(pair):
    target, draft, _ = pair
    assert draft.decoder.embed_tokens.weight.data_ptr() == target.decoder.embed_tokens.weight.data_ptr()
    assert draft.causal_lm.lm_head.weight.data_ptr() == target.causal_lm.lm_head.weight.data_ptr()
    assert draft.decoder.norm.weight.data_ptr() == target.decoder.norm.weight.data_ptr()
    for i, tier in enumerate(TIERS):
        q_d, q_t = draft.layers[i].self_attn.q_proj, target.layers[i].self_attn.q_proj
        if tier == DEVICE:
            assert q_d.weight.data_ptr() == q_t.weight.data_ptr()
        else:
            assert q_d.weight.dtype == torch.uint8  # its own packed NF4 weight
    assert draft.cache is not target.cache


def test_nf4_copy_is_sized_from_the_manifest(pair):
    target, _, nf4_store = pair
    man16, man4 = read_manifest(target.store_dir), read_manifest(nf4_store)
    weights = nf4_copy_bytes(target.store_dir, man16, 0)
    # the packed data, scales and small tensors of the real NF4 store (blobs are padded, so they are larger)
    used = sum(e.nbytes for blob in man4.layers for e in blob.tensors.values())
    assert used <= weights <= sum(man4.layer_bytes)
    assert nf4_copy_bytes(target.store_dir, man16, 10) > weights  # plus its own KV cache


def test_fused_cpu_kernel_matches_dequantize_then_linear():
    """The once-repacked weight gives what per-call dequantization gives (bf16 activations; AVX512-BF16 CPUs)."""
    import bitsandbytes.functional as bnbf

    from offspec.models.nf4 import NF4Linear

    if not bnbf.has_avx512bf16():
        pytest.skip("no AVX512-BF16 here: the fused kernel is not used")
    g = torch.Generator().manual_seed(0)
    w = torch.randn(96, 128, generator=g).to(torch.bfloat16)
    packed, absmax = quantize_nf4(w)
    info = QuantInfo("nf4", 64, (96, 128), "bfloat16")
    from offspec.store.nf4 import nf4_quant_state

    lin = NF4Linear(128, 96, info)
    lin.bind(packed, nf4_quant_state(absmax, info))
    lin.bias = torch.randn(96, generator=g).to(torch.bfloat16)
    x = torch.randn(5, 128, generator=g).to(torch.bfloat16)
    want = lin(x).float()
    assert lin.pack_for_cpu() and lin.weight is None
    got = lin(x).float()
    assert (got - want).abs().max().item() <= 0.02 * want.abs().max().item()
