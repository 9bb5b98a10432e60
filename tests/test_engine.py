"""Engine oracles on tiny random models: speculative output equals plain output token for token, greedy and seeded;
limits, end-of-text and stop strings hold inside accepted paths; stats and log-probabilities."""

from dataclasses import replace

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


def _engine(target_store, draft_store=None, streamed=True, eos_ids=(), auto=False):
    from offspec.loader import load_tokenizer

    target = open_model(target_store, device_memory_over_min=0 if streamed else None, cache_tokens=64)
    assert not streamed or target.streamer is not None  # every layer streams
    draft = open_model(draft_store, cache_tokens=64) if draft_store else None
    planner = None
    if auto:  # the auto budget, fed with this machine's measured pass times (they vary from run to run)
        from offspec.runtime.pass_curve import measure_pass_curve
        from offspec.speculative.tree_size import BudgetPlanner

        planner = BudgetPlanner(measure_pass_curve(target, sizes=(1, 8, 24)))
    return Engine(target, draft, load_tokenizer(target_store), planner, eos_ids=eos_ids)


PROMPTS = [[5, 17, 33, 90, 12], [7], list(range(40, 70))]


@pytest.mark.parametrize("budget,branch", [(1, 1), (8, 2), (48, 4), (120, 8)])
def test_speculative_greedy_equals_plain_greedy(stores, budget, branch):
    target_store, draft_store = stores
    plain = _engine(target_store)
    spec = _engine(target_store, draft_store)
    for prompt in PROMPTS:
        plain.reset()
        spec.reset()
        want = generate(plain, prompt, GenerationConfig(max_new_tokens=24, spec=False))
        got = generate(spec, prompt, GenerationConfig(max_new_tokens=24, budget=budget, branch=branch))
        assert got.token_ids == want.token_ids
        assert got.stats.passes <= want.stats.passes


def test_target_as_its_own_draft_accepts_the_whole_chain(stores):
    target_store, _ = stores
    engine = _engine(target_store, target_store)
    res = list(engine.steps([3, 4, 5], GenerationConfig(max_new_tokens=40, budget=6, branch=1, max_depth=6)))
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


SAMPLED = {
    "t0.9-p0.95-k40": dict(temperature=0.9, top_p=0.95, top_k=40),
    "min-p-penalties": dict(temperature=1.1, min_p=0.02, repeat_penalty=1.4, presence_penalty=0.3,
                            frequency_penalty=0.2, repeat_last_n=8),
    "greedy-penalties": dict(temperature=0.0, repeat_penalty=1.5, frequency_penalty=0.5),
}
SPEC_SETUPS = [  # (drafter, budget, tree, branch)
    ("draft", 1, "specexec", 1), ("draft", 8, "specexec", 2), ("draft", 48, "specexec", 4),
    ("draft", "auto", "specexec", 4), ("draft", 24, "sequoia", 4), ("draft", "auto", "sequoia", 3),
    ("self", 6, "specexec", 2), ("self", 30, "sequoia", 3),
    ("ngram", 12, "specexec", 4), ("nf4-self", 8, "specexec", 2), ("nf4-self+ngram", 16, "sequoia", 3),
    ("auto", "auto", "specexec", 3), ("auto", 10, "sequoia", 3), ("w8a8-self", 8, "specexec", 2),
    ("int8-self", 12, "sequoia", 3),
]


def _seeded_engine(target_store, draft_store, nf4_store, drafter: str, auto: bool) -> Engine:
    """An engine for one SPEC_SETUPS row: a separate draft, the target itself, n-grams, or the target's NF4 copy."""
    from offspec.runtime.self_draft import open_self_draft
    from offspec.speculative.drafters import HybridDrafter, ModelDrafter, NgramDrafter

    if drafter in ("draft", "self"):
        return _engine(target_store, draft_store if drafter == "draft" else target_store, auto=auto)
    engine = _engine(target_store, auto=auto)
    if drafter == "ngram":
        engine.drafter = NgramDrafter(min_n=1)
    elif drafter == "auto":  # the planner picks, per tree, among a draft model, the NF4 copy and n-grams
        from offspec.speculative.drafters import AutoDrafter
        from offspec.speculative.tree_size import BudgetPlanner

        engine.drafter = AutoDrafter([ModelDrafter(open_model(draft_store, cache_tokens=64)),
                                      ModelDrafter(open_self_draft(engine.target, "nf4", nf4_store, cache_tokens=64), "self"),
                                      NgramDrafter(min_n=1)])
        if engine.planner is not None:
            engine.planner = BudgetPlanner(engine.planner.pass_s, cost=engine.drafter.cost)
    elif drafter in ("w8a8-self", "int8-self"):  # the copy quantized from the target's own store
        engine.drafter = ModelDrafter(open_self_draft(engine.target, drafter[: -len("-self")], cache_tokens=64),
                                      name="self")
    else:
        engine.drafter = ModelDrafter(open_self_draft(engine.target, "nf4", nf4_store, cache_tokens=64), name="self")
        if drafter.endswith("+ngram"):
            engine.drafter = HybridDrafter(engine.drafter, NgramDrafter(min_n=1))
    return engine


@pytest.mark.parametrize("case", list(SAMPLED))
def test_seeded_speculative_output_equals_seeded_plain_output(stores, nf4_store, case):
    """The seed fixes the text: any budget (auto too), tree shape or drafter gives plain decoding's tokens."""
    target_store, draft_store = stores
    plain = _engine(target_store)
    seed, prompt = 3 + len(case), PROMPTS[len(case) % 2]  # a different seed and prompt per case
    cfg = GenerationConfig(max_new_tokens=20, seed=seed, **SAMPLED[case])
    want = generate(plain, prompt, replace(cfg, spec=False)).token_ids
    assert len(want) == 20
    for drafter, budget, tree, branch in SPEC_SETUPS:
        spec = _seeded_engine(target_store, draft_store, nf4_store, drafter, auto=budget == "auto")
        got = generate(spec, prompt, replace(cfg, budget=None if budget == "auto" else budget, tree=tree,
                                             branch=branch, max_depth=6))
        assert got.token_ids == want, (drafter, budget, tree)
        if drafter == "self":  # the target as its own draft proposes the target's choices: long accepted paths
            assert got.stats.passes < 20 / 2
    plain.reset()
    other = generate(plain, prompt, replace(cfg, seed=seed + 1, spec=False))
    if cfg.temperature > 0:
        assert other.token_ids != want  # another seed, another text



def test_without_a_seed_the_random_seed_is_reported_and_replays(stores):
    target_store, draft_store = stores
    cfg = GenerationConfig(max_new_tokens=12, temperature=1.0)
    first = generate(_engine(target_store, draft_store), [1, 2, 3], replace(cfg, budget=8))
    assert first.stats.seed is not None
    again = generate(_engine(target_store), [1, 2, 3], replace(cfg, seed=first.stats.seed, spec=False))
    assert again.token_ids == first.token_ids
    assert generate(_engine(target_store), [1, 2, 3], GenerationConfig(max_new_tokens=2)).stats.seed is None


@pytest.mark.parametrize("limit", [1, 2, 5])
def test_max_new_tokens_is_a_hard_limit_inside_an_accepted_path(stores, limit):
    """The target as its own draft accepts whole chains; end-of-text past the limit must not lift the cut."""
    target_store, _ = stores
    free = generate(_engine(target_store), PROMPTS[0], GenerationConfig(max_new_tokens=12, spec=False)).token_ids
    eos = next(t for t in free[limit + 1:] if t not in free[: limit + 1])  # an end-of-text beyond the limit
    engine = _engine(target_store, target_store, eos_ids=[eos])
    cfg = GenerationConfig(max_new_tokens=limit, budget=8, branch=1, max_depth=8)
    res = generate(engine, PROMPTS[0], cfg)
    assert res.token_ids == free[:limit]
    assert res.stats.finish == "length"
    for tree in ("specexec", "sequoia"):
        events = [e for e in _engine(target_store, target_store).steps(PROMPTS[0], replace(cfg, tree=tree))
                  if not e.prefill]
        assert sum(len(e.tokens) for e in events) == limit


def test_end_of_text_inside_an_accepted_path_stops_there_and_counts_as_a_token(stores):
    target_store, _ = stores
    free = generate(_engine(target_store), PROMPTS[0], GenerationConfig(max_new_tokens=12, spec=False)).token_ids
    k = next(i for i in range(2, 12) if free[i] not in free[:i])
    cfg = GenerationConfig(max_new_tokens=12, budget=8, branch=1, max_depth=8)
    res = generate(_engine(target_store, target_store, eos_ids=[free[k]]), PROMPTS[0], cfg)
    assert res.token_ids == free[:k] and res.stats.finish == "stop"
    plain = generate(_engine(target_store, eos_ids=[free[k]]), PROMPTS[0], replace(cfg, spec=False))
    assert plain.token_ids == free[:k]
    assert plain.stats.passes == k + 1 and plain.stats.tokens_per_pass == 1.0  # end-of-text is its pass's token


def test_stop_strings_end_the_text_before_them_also_inside_an_accepted_path(stores):
    target_store, _ = stores
    tok = _engine(target_store).tokenizer
    free = generate(_engine(target_store), PROMPTS[0], GenerationConfig(max_new_tokens=16, spec=False))
    text = free.text
    stop = next(text[i : i + 2] for i in range(3, len(text) - 2) if text[i : i + 2].strip()
                and text.find(text[i : i + 2]) == i)
    cut = text.index(stop)
    cfg = GenerationConfig(max_new_tokens=16, stop=(stop, "never-seen-text"))
    plain = generate(_engine(target_store), PROMPTS[0], replace(cfg, spec=False))
    spec = generate(_engine(target_store, target_store), PROMPTS[0], replace(cfg, budget=12, branch=1))
    for res in (plain, spec):
        assert res.text == text[:cut] and res.stats.finish == "stop"
        assert stop in tok.decode(res.token_ids) and stop not in tok.decode(res.token_ids[:-1])
    assert spec.token_ids == plain.token_ids


def test_text_streamer_never_shows_part_of_a_stop_string(stores):
    from offspec.generate import TextStreamer

    tok = _engine(stores[0]).tokenizer
    ids = tok.encode("abcXYZdef", add_special_tokens=False)
    ts = TextStreamer(tok, ("XYZ",))
    shown = [ts.push([i]) for i in ids[:4]]  # "abcX": X may start the stop string
    assert "".join(shown) == "abc"
    assert ts.push(ids[4:5]) == ""  # "abcXY"
    assert ts.push(ids[5:6], final=True) == ""  # "abcXYZ": the stop string is complete and never shown
    ts = TextStreamer(tok, ("XYZ",))
    assert ts.push(tok.encode("abcXYq", add_special_tokens=False)) + ts.push([], final=True) == "abcXYq"


def test_logprobs_come_from_the_raw_distribution_and_match_plain_decoding(stores):
    target_store, draft_store = stores
    cfg = GenerationConfig(max_new_tokens=10, temperature=0.9, repeat_penalty=1.3, seed=5, logprobs=3)
    plain = generate(_engine(target_store), PROMPTS[0], replace(cfg, spec=False))
    spec = generate(_engine(target_store, draft_store), PROMPTS[0], replace(cfg, budget=16))
    assert spec.token_ids == plain.token_ids and len(plain.logprobs) == len(plain.token_ids) == 10
    ref = _engine(target_store, streamed=False)
    ctx = list(PROMPTS[0])
    for lp_plain, lp_spec, token in zip(plain.logprobs, spec.logprobs, plain.token_ids):
        raw = torch.log_softmax(ref.target.forward(torch.tensor([ctx]))[0, -1].float(), -1)
        ref.target.cache.reset()
        assert lp_plain.token == lp_spec.token == token
        assert lp_plain.logprob == pytest.approx(float(raw[token]), abs=1e-4)
        assert lp_spec.logprob == pytest.approx(lp_plain.logprob, abs=1e-4)
        assert [t for t, _ in lp_plain.top] == raw.topk(3).indices.tolist() == [t for t, _ in lp_spec.top]
        ctx.append(token)


def test_hitting_the_context_keeps_finish_length_and_says_so(make_tiny_model, tmp_path):
    from transformers import AutoConfig

    folder = make_tiny_model("llama", num_layers=2, seed=3)
    short = tmp_path / "short"
    import shutil

    shutil.copytree(folder, short)
    config = AutoConfig.from_pretrained(short)
    config.max_position_embeddings = 24
    config.save_pretrained(short)
    store = convert_model(short, tmp_path / "s", dtype="float32", progress=False)
    engine = _engine(store, streamed=False)  # two layers: the smallest streaming budget would hold them both
    res = generate(engine, list(range(5, 15)), GenerationConfig(max_new_tokens=100, spec=False))
    assert res.stats.finish == "length" and res.stats.context_full
    assert 0 < len(res.token_ids) < 100


def test_plain_stats_are_per_pass_and_merge_into_sums(stores):
    from offspec.generate import GenerationStats

    target_store, draft_store = stores
    a = generate(_engine(target_store), PROMPTS[0], GenerationConfig(max_new_tokens=6, spec=False)).stats
    b = generate(_engine(target_store, draft_store), PROMPTS[0], GenerationConfig(max_new_tokens=9, budget=8)).stats
    assert a.tokens_per_pass == 1.0 and a.budget == 0 and a.draft_s == 0
    total = GenerationStats.total([a, b])
    assert (total.tokens, total.passes) == (a.tokens + b.tokens, a.passes + b.passes)
    assert total.target_pass_s == pytest.approx((a.target_s + b.target_s) / (a.passes + b.passes))
    assert b.budget_total > 0 and total.budget == pytest.approx(b.budget_total / (a.passes + b.passes))
    assert GenerationStats.from_dict(total.to_dict()) == total
    assert total.peak_rss_bytes > 0


def test_tree_pass_computes_the_lm_head_for_internal_nodes_only(stores):
    """The lazy rows of a tree pass equal the full-logits pass on every node."""
    from offspec.speculative.specexec import grow_tree
    from offspec.speculative.verify import TreeLogits, forward_tree

    target_store, draft_store = stores
    full, lazy = _engine(target_store), _engine(target_store)
    draft = open_model(draft_store, cache_tokens=64)
    tree = grow_tree(draft, [5, 6, 7], budget=20, branch=3).tree
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
    yield "self", ModelDrafter(open_self_draft(target, "nf4", nf4_store, cache_tokens=64), name="self")
    yield "self+ngram", HybridDrafter(ModelDrafter(open_self_draft(target, "nf4", nf4_store, cache_tokens=64), name="self"),
                                      NgramDrafter(min_n=1))
    for fmt in ("w8a8", "int4"):
        yield f"self-{fmt}", ModelDrafter(open_self_draft(target, fmt, cache_tokens=64), name="self")


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
    own.drafter = ModelDrafter(open_self_draft(own.target, "nf4", nf4_store, cache_tokens=64), name="self")
    other = _engine(target_store, draft_store)
    cfg = GenerationConfig(max_new_tokens=24, budget=8, branch=1, max_depth=8)
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


@pytest.mark.parametrize("temperature,penalty", [(0.0, 1.0), (0.9, 1.0), (0.9, 1.3)])
def test_trees_grown_during_the_target_pass_are_used_when_their_leaf_is_accepted(stores, temperature, penalty):
    """The target as its own draft: the expected leaf is nearly always accepted, so most trees come from the
    previous pass, greedy and seeded (the early tree ranks by the next step's rule, noise and penalty window); the
    output is the same as without drafting ahead and as plain decoding."""
    target_store, _ = stores
    base = dict(max_new_tokens=30, budget=6, branch=2, max_depth=4, temperature=temperature, seed=5,
                repeat_penalty=penalty)
    on = generate(_engine(target_store, target_store), PROMPTS[0], GenerationConfig(**base))
    off = generate(_engine(target_store, target_store), PROMPTS[0], GenerationConfig(**base, ahead=False))
    assert on.token_ids == off.token_ids
    assert off.stats.ahead_started == 0
    assert on.stats.ahead_started >= on.stats.passes - 1
    plain = generate(_engine(target_store), PROMPTS[0], GenerationConfig(**base, spec=False))
    assert on.token_ids == plain.token_ids
    assert on.stats.ahead_used >= on.stats.passes // 2 and on.stats.ahead_saved_s > 0


def test_a_missed_early_tree_is_dropped_cleanly(stores):
    """A random draft rarely guesses the accepted leaf: the early trees are dropped and greedy output is unchanged."""
    target_store, draft_store = stores
    spec = generate(_engine(target_store, draft_store), PROMPTS[2], GenerationConfig(max_new_tokens=30, budget=10))
    plain = generate(_engine(target_store), PROMPTS[2], GenerationConfig(max_new_tokens=30, spec=False))
    assert spec.token_ids == plain.token_ids
    assert spec.stats.ahead_started > spec.stats.ahead_used


def test_end_of_text_ids_include_every_end_of_turn_token_the_vocabulary_has():
    from conftest import tiny_tokenizer

    from offspec.loader import stop_ids

    tok = tiny_tokenizer()
    tok.add_special_tokens({"additional_special_tokens": ["<|endoftext|>", "<|eot_id|>"]})
    vocab = tok.get_vocab()
    want = {tok.eos_token_id, vocab["<|im_end|>"], vocab["<|endoftext|>"], vocab["<|eot_id|>"]}
    assert set(stop_ids(tok)) == want
