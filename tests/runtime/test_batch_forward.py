"""Oracle: one batched pass over several sequences, each in its own cache row, gives every sequence the logits of
its own single-sequence forward, while each streamed layer is read once per pass."""

import pytest
import torch

from offspec.runtime.kv_cache import BatchKVCache
from offspec.runtime.masks import batch_mask, tree_mask
from offspec.runtime.model import OffloadedModel
from offspec.runtime.plan import minimum_budget_bytes, plan_residency
from offspec.store.convert import convert_model
from offspec.store.manifest import read_manifest

FAMILIES = ["llama", "mistral", "qwen2", "gemma2", "gemma3_text", "qwen3_moe"]  # windows, mixed, soft-capping, experts


@pytest.fixture(scope="module", params=FAMILIES)
def streamed_store(request, make_tiny_model, tmp_path_factory):
    src = make_tiny_model(request.param, num_layers=3)
    return convert_model(src, tmp_path_factory.mktemp("batch") / request.param, dtype="float32", progress=False)


def _open(store, cache_tokens=64):
    man = read_manifest(store)
    plan = plan_residency(man.layer_bytes, man.resident.size,
                          minimum_budget_bytes(man.layer_bytes, man.resident.size, 0, 0))
    return OffloadedModel(store, plan, cache_tokens=cache_tokens)


def _batch_cache(model, rows, capacity=64):
    from offspec.models.registry import kv_layout

    return BatchKVCache.for_layout(kv_layout(model.config), rows, capacity, model.dtype)


def _chain(n):
    return torch.ones(n, n, dtype=torch.bool).tril()


def _tree():
    """Five nodes: 0 (root), 1 and 2 under 0, 3 under 1, 4 under 3; (depths, ancestors)."""
    parents = [-1, 0, 0, 1, 3]
    anc = torch.zeros(5, 5, dtype=torch.bool)
    depth = []
    for i, p in enumerate(parents):
        anc[i, i] = True
        if p >= 0:
            anc[i] |= anc[p]
        depth.append(0 if p < 0 else depth[p] + 1)
    return torch.tensor(depth), anc


def _batched(model, cache, rows, tokens, depths, ancestors):
    """One forward_batch over rows (tokens[i]: the row's new tokens at positions length + depths[i])."""
    t = max(len(x) for x in tokens)
    ids = torch.zeros(len(rows), t, dtype=torch.long)
    pos = torch.zeros(len(rows), t, dtype=torch.long)
    for i, (r, x, d) in enumerate(zip(rows, tokens, depths)):
        ids[i, : len(x)] = torch.tensor(x)
        pos[i, : len(x)] = cache.lengths[r] + d
        pos[i, len(x):] = cache.lengths[r]
    end = max(cache.lengths[r] + len(x) for r, x in zip(rows, tokens))
    mask = batch_mask([cache.lengths[r] for r in rows], ancestors, t, end, model.dtype)
    h = model.forward_batch(ids, pos, mask, cache, rows, [len(x) for x in tokens])
    return [model.head(h[i, : len(x)]) for i, x in enumerate(tokens)]


def test_batched_prefill_and_tree_pass_equal_each_sequence_alone(streamed_store):
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(6, 256, (n,), generator=g).tolist() for n in (9, 3, 14)]
    tree_tokens = [torch.randint(6, 256, (5,), generator=g).tolist() for _ in prompts]
    depths, anc = _tree()
    model = _open(streamed_store)
    try:
        want = []
        for prompt, tree in zip(prompts, tree_tokens):  # each sequence alone, through the model's own cache
            model.reset()
            first = model.forward(torch.tensor([prompt]))[0]
            n = len(prompt)
            second = model.forward(torch.tensor([tree]), (n + depths)[None], tree_mask(n, anc, model.dtype))[0]
            want.append((first, second))
        cache = _batch_cache(model, rows=4)
        rows = [2, 0, 3]  # not 0..n-1: attention reads a gathered copy of the rows
        got1 = _batched(model, cache, rows, prompts, [torch.arange(len(p)) for p in prompts],
                        [_chain(len(p)) for p in prompts])
        got2 = _batched(model, cache, rows, tree_tokens, [depths] * 3, [anc] * 3)
        for (w1, w2), g1, g2 in zip(want, got1, got2):
            assert (g1 - w1).abs().max().item() < 1e-4
            assert (g2 - w2).abs().max().item() < 1e-4
        assert [cache.lengths[r] for r in rows] == [len(p) + 5 for p in prompts]
    finally:
        model.close()


def test_keep_per_row_then_decode_equals_the_kept_path_alone(streamed_store):
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(6, 256, (n,), generator=g).tolist() for n in (4, 7)]
    tree_tokens = [torch.randint(6, 256, (5,), generator=g).tolist() for _ in prompts]
    depths, anc = _tree()
    keep = [torch.tensor([0, 1, 3]), torch.tensor([0, 2])]  # a path in each tree
    model = _open(streamed_store)
    try:
        cache = _batch_cache(model, rows=2)
        _batched(model, cache, [0, 1], prompts, [torch.arange(len(p)) for p in prompts],
                 [_chain(len(p)) for p in prompts])
        _batched(model, cache, [0, 1], tree_tokens, [depths] * 2, [anc] * 2)
        for r, (prompt, k) in enumerate(zip(prompts, keep)):
            cache.keep(r, len(prompt), k)
        nxt = [[17], [18]]
        got = _batched(model, cache, [0, 1], nxt, [torch.zeros(1, dtype=torch.long)] * 2, [_chain(1)] * 2)
        for prompt, tree, k, n, g_ in zip(prompts, tree_tokens, keep, nxt, got):
            model.reset()
            ref = model.forward(torch.tensor([prompt + [tree[i] for i in k.tolist()] + n]))[0, -1:]
            assert (g_ - ref).abs().max().item() < 1e-4
    finally:
        model.close()


def test_each_streamed_layer_is_read_once_per_batched_pass(tiny_llama_dir, tmp_path):
    store = convert_model(tiny_llama_dir, tmp_path / "s", dtype="float32", progress=False)
    model = _open(store)
    try:
        acquired = []
        real = model.streamer.acquire
        model.streamer.acquire = lambda layer: (acquired.append(layer), real(layer))[1]
        cache = _batch_cache(model, rows=8)
        rows = list(range(8))
        prompts = [[5 + i, 6, 7] for i in rows]
        _batched(model, cache, rows, prompts, [torch.arange(3)] * 8, [_chain(3)] * 8)
        assert acquired == model.plan.layers("disk")  # once each, not once per sequence
        assert model.stats.streamed_bytes == model.plan.streamed_bytes_per_pass
    finally:
        model.close()
