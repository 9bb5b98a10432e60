"""Engine oracles on tiny random models: speculative greedy equals plain greedy, token for token."""

import pytest
import torch

from offspec.generate import Engine, GenerationConfig, generate
from offspec.runtime.model import open_model
from offspec.store.convert import convert_model


@pytest.fixture(scope="module")
def stores(make_tiny_model, tmp_path_factory):
    out = tmp_path_factory.mktemp("gen-stores")
    target = convert_model(make_tiny_model("llama", num_layers=4), out / "t", dtype="float32", progress=False)
    draft = convert_model(make_tiny_model("llama", num_layers=2, seed=1), out / "d", dtype="float32", progress=False)
    return target, draft


def _engine(target_store, draft_store=None, streamed=True):
    from offspec.loader import load_tokenizer
    from offspec.runtime.plan import minimum_budget_bytes
    from offspec.store.manifest import read_manifest

    man = read_manifest(target_store)
    budget = minimum_budget_bytes(man.layer_bytes, man.resident.size, 1 << 20, 0) if streamed else None
    target = open_model(target_store, device_memory_bytes=budget, cache_tokens=64)
    draft = open_model(draft_store, cache_tokens=64) if draft_store else None
    return Engine(target, draft, load_tokenizer(target_store))


PROMPTS = [[5, 17, 33, 90, 12], [7], list(range(40, 70))]


@pytest.mark.parametrize("budget,expand,branch", [(1, 1, 1), (8, 4, 2), (48, 16, 4), (120, 32, 8)])
def test_speculative_greedy_equals_plain_greedy(stores, budget, expand, branch):
    target_store, draft_store = stores
    plain = _engine(target_store)
    spec = _engine(target_store, draft_store)
    for prompt in PROMPTS:
        plain.reset()
        spec.reset()
        want = generate(plain, prompt, GenerationConfig(max_new_tokens=24, spec=False))
        got = generate(spec, prompt, GenerationConfig(max_new_tokens=24, budget=budget, expand=expand, branch=branch))
        assert got.token_ids == want.token_ids
        assert got.stats.passes <= want.stats.passes


def test_target_as_its_own_draft_accepts_the_whole_chain(stores):
    target_store, _ = stores
    engine = _engine(target_store, target_store)
    res = list(engine.steps([3, 4, 5], GenerationConfig(max_new_tokens=40, budget=6, expand=1, branch=1, max_depth=6)))
    passes = [e for e in res if not e.prefill]
    assert all(e.accepted == 6 for e in passes[:-1])
    assert all(len(e.tokens) == 7 for e in passes[:-1])


def test_sequoia_greedy_equals_plain_greedy(stores):
    target_store, draft_store = stores
    plain = generate(_engine(target_store), PROMPTS[0], GenerationConfig(max_new_tokens=20, spec=False))
    seq = generate(_engine(target_store, draft_store), PROMPTS[0],
                   GenerationConfig(max_new_tokens=20, budget=24, tree="sequoia", max_depth=6))
    assert seq.token_ids == plain.token_ids


def test_second_call_reuses_the_cached_prefix(stores):
    target_store, draft_store = stores
    engine = _engine(target_store, draft_store)
    first = generate(engine, [5, 6, 7], GenerationConfig(max_new_tokens=8, budget=16))
    convo = [5, 6, 7] + first.token_ids + [9, 10]
    second = generate(engine, convo, GenerationConfig(max_new_tokens=8, budget=16))
    assert second.stats.prefill_tokens == 2  # only the new tokens (minus the pending root) were prefilled
    fresh = _engine(target_store, draft_store)
    assert generate(fresh, convo, GenerationConfig(max_new_tokens=8, budget=16)).token_ids == second.token_ids


def test_seeded_sampling_is_reproducible(stores):
    target_store, draft_store = stores
    cfg = GenerationConfig(max_new_tokens=16, temperature=0.8, top_p=0.95, seed=7, budget=16)
    a = generate(_engine(target_store, draft_store), [1, 2, 3], cfg)
    b = generate(_engine(target_store, draft_store), [1, 2, 3], cfg)
    assert a.token_ids == b.token_ids and len(a.token_ids) == 16
    wr = generate(_engine(target_store, draft_store), [1, 2, 3],
                  GenerationConfig(max_new_tokens=16, temperature=0.8, seed=7, budget=16, tree="sequoia"))
    assert len(wr.token_ids) == 16


def test_tree_pass_computes_the_lm_head_for_internal_nodes_only(stores):
    """The lazy rows of a tree pass equal the full-logits pass on every node."""
    from offspec.speculative.specexec import grow_tree
    from offspec.speculative.verify import TreeLogits, forward_tree

    target_store, draft_store = stores
    full, lazy = _engine(target_store), _engine(target_store)
    draft = open_model(draft_store, cache_tokens=64)
    tree = grow_tree(draft, [5, 6, 7], budget=20, expand=4, branch=3).tree
    for e in (full, lazy):
        e.target.forward(torch.tensor([[5, 6]]))
    full.target.supports_logit_rows = False
    want = forward_tree(full.target, tree)
    got = forward_tree(lazy.target, tree)
    assert isinstance(got, TreeLogits) and len(got.rows) < tree.size
    for node in range(tree.size):
        assert torch.allclose(got[node], want[node], atol=1e-5)
