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

    from offspec.models.registry import load_config
    from offspec.runtime.sizing import kv_bytes_per_token

    man = read_manifest(target_store)
    kv = kv_bytes_per_token(load_config(target_store), torch.float32) * 64
    budget = minimum_budget_bytes(man.layer_bytes, man.resident.size, kv, 0) if streamed else None
    target = open_model(target_store, device_memory_bytes=budget, cache_tokens=64)
    assert not streamed or target.streamer is not None  # every layer streams
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


def _drafters(draft_store, target, nf4_store):
    from offspec.runtime.self_draft import open_self_draft
    from offspec.speculative.drafters import HybridDrafter, ModelDrafter, NgramDrafter

    yield "ngram", NgramDrafter(min_n=1)
    yield "hybrid", HybridDrafter(ModelDrafter(open_model(draft_store, cache_tokens=64)), NgramDrafter(min_n=1))
    yield "self", ModelDrafter(open_self_draft(target, nf4_store, cache_tokens=64), name="self")
    yield "self+ngram", HybridDrafter(ModelDrafter(open_self_draft(target, nf4_store, cache_tokens=64), name="self"),
                                      NgramDrafter(min_n=1))


@pytest.fixture(scope="module")
def nf4_store(make_tiny_model, tmp_path_factory):
    """The target's NF4 copy (its self-draft)."""
    return convert_model(make_tiny_model("llama", num_layers=4), tmp_path_factory.mktemp("nf4") / "t4", bits=4,
                         dtype="float32", progress=False)


def test_self_draft_accepts_more_than_a_separate_random_draft(stores, nf4_store):
    """The target's NF4 copy predicts the target far better than an unrelated draft (a random pair agrees rarely)."""
    from offspec.runtime.self_draft import open_self_draft
    from offspec.speculative.drafters import ModelDrafter

    target_store, draft_store = stores
    own = _engine(target_store)
    own.drafter = ModelDrafter(open_self_draft(own.target, nf4_store, cache_tokens=64), name="self")
    other = _engine(target_store, draft_store)
    cfg = GenerationConfig(max_new_tokens=24, budget=8, expand=1, branch=1, max_depth=8)
    mine, theirs = generate(own, PROMPTS[0], cfg), generate(other, PROMPTS[0], cfg)
    assert mine.token_ids == theirs.token_ids
    assert mine.stats.tokens_per_pass > 2 * theirs.stats.tokens_per_pass


REPETITIVE = [5, 17, 33, 90, 12, 5, 17, 33, 90, 12, 5, 17]  # the n-gram index has something to propose


@pytest.mark.parametrize("tree", ["specexec", "sequoia"])
def test_every_drafter_greedy_equals_plain_greedy(stores, nf4_store, tree):
    target_store, draft_store = stores
    plain = _engine(target_store)
    for name, drafter in _drafters(draft_store, plain.target, nf4_store):
        spec = Engine(plain.target, None, plain.tokenizer, drafter=drafter)
        for prompt in (REPETITIVE, PROMPTS[0]):
            plain.reset()  # the two engines share the target: each starts from an empty cache
            want = generate(plain, prompt, GenerationConfig(max_new_tokens=24, spec=False))
            spec.reset()
            got = generate(spec, prompt, GenerationConfig(max_new_tokens=24, budget=12, tree=tree, max_depth=6))
            assert got.token_ids == want.token_ids, name
            assert got.stats.passes <= want.stats.passes


def test_ngram_drafter_speculates_on_repeated_text(stores):
    """A random model falls into loops that the index then drafts: fewer passes than tokens."""
    from offspec.speculative.drafters import NgramDrafter

    target_store, _ = stores
    engine = Engine(_engine(target_store).target, None, None, drafter=NgramDrafter(min_n=1))
    res = generate(engine, REPETITIVE, GenerationConfig(max_new_tokens=40, budget=16))
    assert res.stats.passes < res.stats.tokens and engine.stats.passes > 0
    assert res.stats.drafter == "ngram"


@pytest.mark.parametrize("temperature", [0.0, 0.9])
def test_trees_grown_during_the_target_pass_are_used_when_their_leaf_is_accepted(stores, temperature):
    """The target as its own draft: the expected leaf is nearly always accepted, so most trees come from the
    previous pass; the output is the same as without drafting ahead (greedy: plain greedy; seeded sampling: the
    same tokens with and without it)."""
    target_store, _ = stores
    base = dict(max_new_tokens=30, budget=6, expand=2, branch=2, max_depth=4, temperature=temperature, seed=5)
    on = generate(_engine(target_store, target_store), PROMPTS[0], GenerationConfig(**base))
    off = generate(_engine(target_store, target_store), PROMPTS[0], GenerationConfig(**base, ahead=False))
    assert on.token_ids == off.token_ids
    assert off.stats.ahead_started == 0 and on.stats.ahead_started >= on.stats.passes - 1
    if temperature == 0.0:
        plain = generate(_engine(target_store), PROMPTS[0], GenerationConfig(max_new_tokens=30, spec=False))
        assert on.token_ids == plain.token_ids
        assert on.stats.ahead_used >= on.stats.passes // 2 and on.stats.ahead_saved_s > 0


def test_a_missed_early_tree_is_dropped_cleanly(stores):
    """A random draft rarely guesses the accepted leaf: the early trees are dropped and greedy output is unchanged."""
    target_store, draft_store = stores
    spec = generate(_engine(target_store, draft_store), PROMPTS[2], GenerationConfig(max_new_tokens=30, budget=10))
    plain = generate(_engine(target_store), PROMPTS[2], GenerationConfig(max_new_tokens=30, spec=False))
    assert spec.token_ids == plain.token_ids
    assert spec.stats.ahead_started > spec.stats.ahead_used
