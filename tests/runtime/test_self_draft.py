"""The target's low-bit self-draft: logits equal transformers with the same quantization; resident parts are shared;
the copy is sized from the manifest."""

import math

import pytest
import torch

from offspec.runtime.model import OffloadedModel
from offspec.runtime.plan import DEVICE, DISK, ResidencyPlan
from offspec.runtime.self_draft import open_self_draft
from offspec.runtime.sizing import DEFAULT_TREE_TOKENS, self_draft_bytes, workspace_bytes
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
    draft = open_self_draft(target, "nf4", nf4_store, cache_tokens=64)
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
    compute = target.dtype
    # less its compute workspace: the workspace of a pass, and a dequantization buffer per NF4 weight shape
    shapes = {tuple(e.shape) for blob in man16.layers for n, e in blob.tensors.items()
              if len(e.shape) == 2 and n.endswith(".weight")}
    scratch = sum(math.prod(shape) for shape in shapes) * compute.itemsize
    weights = (self_draft_bytes(target.store_dir, man16, 0) - scratch
               - workspace_bytes(man16, target.config, compute, DEFAULT_TREE_TOKENS, 0))
    # the packed data, scales and small tensors of the real NF4 store (blobs are padded, so they are larger)
    used = sum(e.nbytes for blob in man4.layers for e in blob.tensors.values())
    assert used <= weights <= sum(man4.layer_bytes)
    assert self_draft_bytes(target.store_dir, man16, 10) > weights  # plus its own KV cache


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


@pytest.fixture(scope="module")
def target16(tiny_llama_dir, tmp_path_factory):
    store = convert_model(tiny_llama_dir, tmp_path_factory.mktemp("self-q") / "t16", bits=16, dtype="float32",
                          progress=False)
    man = read_manifest(store)
    plan = ResidencyPlan(TIERS, tuple(man.layer_bytes), man.resident.size, 0, 0, 2, max(man.layer_bytes))
    target = OffloadedModel(store, plan, cache_tokens=64)
    yield target
    target.close()


@pytest.mark.parametrize("fmt", ["w8a8", "int8", "int4"])
def test_quantized_self_draft_equals_transformers_with_the_same_quantization(target16, tiny_llama_dir, fmt):
    """The copy quantizes the layers the target streams (one at a time, from the target's own store) and its own
    lm_head; transformers' model with those same linears quantized gives the same logits."""
    from transformers import AutoModelForCausalLM

    from offspec.models.qlinear import QuantLinear, quantize_linear, quantize_linears

    draft = open_self_draft(target16, fmt, cache_tokens=64)
    ref = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32).eval()
    for i, tier in enumerate(TIERS):
        if tier == DISK:
            quantize_linears(ref.model.layers[i], fmt)
    ref.lm_head = quantize_linear(ref.lm_head, fmt)
    ids = torch.randint(0, 256, (1, 14), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        want = ref(ids).logits
    got = draft.forward(ids)
    assert (got - want).abs().max().item() < 1e-4
    for i, tier in enumerate(TIERS):
        q_d, q_t = draft.layers[i].self_attn.q_proj, target16.layers[i].self_attn.q_proj
        if tier == DEVICE:
            assert q_d is q_t  # the target's own resident layer
        else:
            assert isinstance(q_d, QuantLinear) and q_d.fmt == fmt
            norm = draft.layers[i].input_layernorm.weight  # its own small copy: the layer's blob was let go
            assert norm.untyped_storage().nbytes() == norm.nbytes
    assert isinstance(draft.lm_head, QuantLinear) and draft.vocab_size == target16.vocab_size
    assert draft.decoder.embed_tokens.weight.data_ptr() == target16.decoder.embed_tokens.weight.data_ptr()
    assert draft.cache is not target16.cache


@pytest.mark.parametrize("fmt", ["w8a8", "int8", "int4"])
def test_quantized_self_draft_is_sized_from_the_manifest(target16, fmt):
    """What the plan reserves is what a copy of every layer holds: quantized weights (biases in float32), the
    small tensors, its own quantized head; and the compute workspace of its passes."""
    from offspec.models.qlinear import QuantLinear

    man = target16.manifest
    plan = ResidencyPlan((DISK,) * man.num_layers, tuple(man.layer_bytes), man.resident.size, 0, 0, 2,
                         max(man.layer_bytes))
    streamed = OffloadedModel(target16.store_dir, plan, cache_tokens=64)
    try:
        draft = open_self_draft(streamed, fmt, cache_tokens=64)
        held = draft.lm_head.nbytes
        for layer in draft.layers:
            for mod in layer.modules():
                held += mod.nbytes if isinstance(mod, QuantLinear) else sum(
                    t.nbytes for t in mod._parameters.values() if t is not None)
        work = workspace_bytes(man, streamed.config, streamed.dtype, DEFAULT_TREE_TOKENS, 0)  # its passes' buffers
        assert held + work == self_draft_bytes(target16.store_dir, man, 0, fmt=fmt)
    finally:
        streamed.close()


def test_forward_weight_bytes_counts_what_a_forward_reads(target16):
    """The quantized copy's layers and head in their kernels' layouts, the target's shared resident layers once,
    no embedding table; the streaming target counts only what stays in memory."""
    from offspec.models.qlinear import QuantLinear

    draft = open_self_draft(target16, "w8a8", cache_tokens=64)
    quant = sum(m.nbytes for m in draft.decoder.modules() if isinstance(m, QuantLinear)) + draft.lm_head.nbytes
    shared = sum(p.nbytes for i, t in enumerate(TIERS) if t == DEVICE for p in target16.layers[i].parameters())
    small = sum(p.nbytes for i, t in enumerate(TIERS) if t == DISK for p in draft.layers[i].parameters())
    rotary = sum({b.data_ptr(): b.nbytes for b in draft.decoder.rotary_emb.buffers()}.values())
    norm = draft.decoder.norm.weight.nbytes
    assert draft.forward_weight_bytes() == quant + shared + small + norm + rotary
    head = target16.lm_head.weight.nbytes
    assert target16.forward_weight_bytes() == shared + head + norm + rotary
