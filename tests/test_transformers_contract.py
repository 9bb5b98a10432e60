"""The contract with transformers' internals, per supported family: a real decoder layer and the model forward
run over offspec's cache give what they give over transformers' own DynamicCache.

A failure names the installed transformers version and the part of the contract that broke."""

from __future__ import annotations

import pytest
import torch

from offspec.models.registry import check_supported, kv_layout, layer_windows
from offspec.runtime.kv_cache import StaticKVCache
from offspec.runtime.masks import causal_mask, pad_mask, window_mask
from offspec.transformers_contract import (cache_arg_name, call_layer, layer_position_embeddings, run_decoder,
                                           transformers_version)
from tests.conftest import TINY_FAMILIES, _tiny_config

PREFIX, NEW = 9, 3  # the prefix is longer than every tiny sliding window


def broke(family: str, part: str, detail: str) -> str:
    return f"transformers {transformers_version()}, {family}: the contract part '{part}' broke: {detail}"


def tiny_model(family: str):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(_tiny_config(family, 3, False)).eval()


def reference_decode(model, ids: torch.Tensor):
    """transformers' own incremental decode over a DynamicCache: (inputs, outputs) of every layer for the new tokens."""
    from transformers import DynamicCache

    captured: dict[int, list] = {}
    hooks = [layer.register_forward_hook(lambda m, args, kwargs, out, i=i: captured.__setitem__(
        i, [args[0] if args else kwargs["hidden_states"], out[0] if isinstance(out, tuple) else out]),
        with_kwargs=True) for i, layer in enumerate(model.model.layers)]
    try:
        cache = DynamicCache(config=model.config)
        with torch.no_grad():
            model.model(ids[:, :PREFIX], use_cache=True, **{cache_arg_name(type(model.model)): cache})
            prefix_io = {i: list(v) for i, v in captured.items()}
            out = model.model(ids[:, PREFIX:], use_cache=True, **{cache_arg_name(type(model.model)): cache})
    finally:
        for h in hooks:
            h.remove()
    return prefix_io, captured, out.last_hidden_state


def offspec_masks(config, cache: StaticKVCache, pos: torch.Tensor, layer_idx: int) -> torch.Tensor:
    start, t = cache.length, pos.shape[-1]
    mask = pad_mask(causal_mask(start, t, torch.float32), cache.span)
    window = layer_windows(config)[layer_idx]
    return window_mask(mask, pos[0], cache.positions[: cache.span], window) if window else mask


@pytest.mark.parametrize("family", list(TINY_FAMILIES))
def test_every_tiny_family_is_accepted_by_its_structure(family):
    check_supported(_tiny_config(family, 3, False))


@pytest.mark.parametrize("family", list(TINY_FAMILIES))
def test_decoder_layers_over_offspec_cache_equal_dynamic_cache(family):
    model = tiny_model(family)
    config = model.config
    ids = torch.randint(3, 250, (1, PREFIX + NEW), generator=torch.Generator().manual_seed(1))
    prefix_io, new_io, _ = reference_decode(model, ids)
    cache = StaticKVCache.for_layout(kv_layout(config), 16, torch.float32)
    decoder = model.model
    with torch.no_grad():
        for part, io, pos in (("prefix", prefix_io, torch.arange(PREFIX)[None]),
                              ("decode", new_io, torch.arange(PREFIX, PREFIX + NEW)[None])):
            cache.begin(pos)
            for i, layer in enumerate(decoder.layers):
                h_in, want = io[i]
                pe = layer_position_embeddings(decoder, h_in, pos, i)
                try:
                    got = call_layer(layer, h_in, mask=offspec_masks(config, cache, pos, i), position_ids=pos,
                                     position_embeddings=pe, cache=cache)
                except TypeError as exc:
                    pytest.fail(broke(family, "decoder layer call / cache.update signature", str(exc)))
                if not cache.keys[i][0, :, cache.length : cache.length + pos.shape[-1]].abs().sum() > 0:
                    pytest.fail(broke(family, "cache.update", f"layer {i} did not write its keys into the cache"))
                diff = (got - want).abs().max().item()
                assert diff < 1e-4, broke(family, f"decoder layer output over the cache ({part})",
                                          f"layer {i} differs by {diff:.2e}")
            cache.advance(pos.shape[-1])


@pytest.mark.parametrize("family", list(TINY_FAMILIES))
def test_model_forward_with_prepared_masks_equals_dynamic_cache(family):
    model = tiny_model(family)
    config = model.config
    ids = torch.randint(3, 250, (1, PREFIX + NEW), generator=torch.Generator().manual_seed(2))
    _, _, want = reference_decode(model, ids)
    cache = StaticKVCache.for_layout(kv_layout(config), 16, torch.float32)
    windows = [w for w in layer_windows(config) if w]
    with torch.no_grad():
        for chunk, pos in ((ids[:, :PREFIX], torch.arange(PREFIX)[None]),
                           (ids[:, PREFIX:], torch.arange(PREFIX, PREFIX + NEW)[None])):
            cache.begin(pos)
            full = pad_mask(causal_mask(cache.length, pos.shape[-1], torch.float32), cache.span)
            windowed = window_mask(full, pos[0], cache.positions[: cache.span], windows[0]) if windows else full
            masks = ({"full_attention": full, "sliding_attention": windowed} if check_supported(config)
                     .masks_by_layer_type else windowed)
            try:
                got = run_decoder(model.model, chunk, masks, pos, cache)
            except (TypeError, KeyError) as exc:
                pytest.fail(broke(family, "model forward arguments (mask, position_ids, cache)", repr(exc)))
            cache.advance(pos.shape[-1])
    diff = (got - want).abs().max().item()
    assert diff < 1e-4, broke(family, "model forward with a prepared 4D mask over the cache", f"differs by {diff:.2e}")


# ------------------------------------------------------------------ what offspec reads from transformers' classes
def tiny_default(model_type: str):
    from transformers import AutoModelForCausalLM

    from offspec.models.tiny import default_config, tiny_config

    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(tiny_config(default_config(model_type))).float().eval()


@pytest.mark.parametrize("model_type", ["gemma2", "granite", "cohere", "gemma4_text", "opt", "gpt2", "falcon"])
def test_the_head_runner_gives_the_causal_lms_own_logits(model_type):
    """Soft-capping (Gemma 2), a logit divisor (Granite), a logit scale (Cohere), a head that slices by the input's
    length (Gemma 4) or calls a part of its base model (OPT): the causal LM's own forward, from the hidden states."""
    from offspec.transformers_contract import HeadRunner

    model = tiny_default(model_type)
    ids = torch.randint(3, 200, (1, 7), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        want = model(ids).logits
        hidden = model.base_model(ids).last_hidden_state
        head = HeadRunner(model)
        got = head(hidden)
        rows = head(hidden[0, [2, 5]])  # rows of a tree: [R, hidden] -> [R, V]
        one = head(hidden[0, 4])  # one position: [hidden] -> [V]
        batch = head(torch.stack([hidden[0, :3], hidden[0, 3:6]]))  # a batch: [B, T, hidden] -> [B, T, V]
    assert (got - want).abs().max().item() < 1e-5
    assert (rows - want[0, [2, 5]]).abs().max().item() < 1e-5
    assert (one - want[0, 4]).abs().max().item() < 1e-5
    assert (batch - torch.stack([want[0, :3], want[0, 3:6]])).abs().max().item() < 1e-5


@pytest.mark.parametrize("model_type", ["llama", "gemma4_text", "minicpm3", "gemma3n_text", "falcon", "gpt2"])
def test_kv_shapes_from_a_meta_forward_are_what_the_model_writes_to_its_cache(model_type):
    """Per-layer head sizes (Gemma 4), multi-latent attention (MiniCPM3), KV sharing (Gemma 3n: shared layers write
    nothing), multi-query attention (Falcon): the meta-device forward records what a real forward writes."""
    from transformers import AutoModelForCausalLM

    from offspec.transformers_contract import kv_shapes

    model = tiny_default(model_type)
    with torch.device("meta"):
        meta = AutoModelForCausalLM.from_config(model.config)
    shapes = kv_shapes(meta)

    real = CacheProtocolForTest()
    mask = causal_mask(0, 3, torch.float32)
    if check_supported(model.config).masks_by_layer_type:
        mask = {kind: mask for kind in set(model.config.layer_types)}
    with torch.no_grad():
        run_decoder(model.base_model, torch.tensor([[5, 6, 7]]), mask, torch.arange(3)[None], real)
    assert shapes == real.shapes and shapes


class CacheProtocolForTest:
    """A cache that keeps nothing and records what each layer writes (heads, dim) for keys and values."""

    is_compileable = False

    def __init__(self) -> None:
        self.shapes = {}

    def update(self, k, v, layer_idx, *args, **kwargs):
        self.shapes[layer_idx] = ((k.shape[1], k.shape[3]), (v.shape[1], v.shape[3]))
        return k, v

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return 0


def test_checkpoint_names_follow_transformers_own_renames(tmp_path):
    """EXAONE saves its original layout (transformer.h...), a GPT-2 base model saves names without its prefix:
    transformers' conversion mapping gives each tensor its model's name."""
    from transformers import AutoConfig

    from offspec.transformers_contract import CheckpointNames

    names = CheckpointNames(AutoConfig.for_model("exaone"))
    assert names.name("transformer.h.3.attn.attention.q_proj.weight") == "model.layers.3.self_attn.q_proj.weight"
    assert names.name("transformer.wte.weight") == "model.embed_tokens.weight"
    assert names.name("model.layers.3.mlp.up_proj.weight") == "model.layers.3.mlp.up_proj.weight"
    gpt2 = CheckpointNames(AutoConfig.for_model("gpt2", n_layer=2))
    assert gpt2.name("h.1.attn.c_attn.weight") == "transformer.h.1.attn.c_attn.weight"
    assert "transformer.h.1.attn.c_attn.weight" in gpt2.parameters


@pytest.mark.parametrize("model_type,stack", [("llama", "model.layers"), ("gpt2", "transformer.h"),
                                              ("gpt_neox", "gpt_neox.layers"), ("opt", "model.decoder.layers")])
def test_the_decoder_layer_stack_is_found_in_the_class(model_type, stack):
    from offspec.transformers_contract import decoder_layer_stack

    model = tiny_default(model_type)
    name, layers = decoder_layer_stack(model, model.config.num_hidden_layers)
    assert name == stack and layers is model.get_submodule(stack)


def test_tied_heads_are_bound_as_transformers_ties_them():
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    from offspec.transformers_contract import tie_unbound_weights

    with init_empty_weights():
        model = AutoModelForCausalLM.from_config(AutoConfig.for_model("gpt2", n_layer=1, tie_word_embeddings=True))
    wte = torch.nn.Parameter(torch.randn(model.config.vocab_size, model.config.n_embd), requires_grad=False)
    model.transformer.wte._parameters["weight"] = wte
    assert tie_unbound_weights(model) == ["lm_head.weight"]
    assert model.lm_head.weight is wte
