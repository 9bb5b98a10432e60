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
