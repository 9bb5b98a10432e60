"""Batched decoding oracles on tiny random models: every sequence of a shared pass gets the text `generate` gives
for it alone (greedy and seeded, plain and speculative), each streamed layer is read once per pass, cancelled
sequences leave the next pass, and one request's failure ends only that request."""

from __future__ import annotations

import pytest
import torch

from offspec.batch import BatchEngine
from offspec.generate import Engine, GenerationConfig, generate
from offspec.store.convert import convert_model


@pytest.fixture(scope="module")
def stores(make_tiny_model, tmp_path_factory):
    out = tmp_path_factory.mktemp("batch-stores")
    target = convert_model(make_tiny_model("llama", num_layers=4), out / "t", dtype="float32", progress=False)
    draft = convert_model(make_tiny_model("llama", num_layers=2, seed=1), out / "d", dtype="float32", progress=False)
    return target, draft


def make_engine(target_store, drafter: str = "none", cache_tokens: int = 128) -> Engine:
    """Every target layer streamed; drafter: none, draft (the 2-layer model) or ngram."""
    from offspec.loader import load_tokenizer
    from offspec.runtime.model import open_model
    from offspec.speculative.drafters import ModelDrafter, NgramDrafter

    target_store, draft_store = target_store
    target = open_model(target_store, device_memory_over_min=0, cache_tokens=cache_tokens)  # every layer streams
    assert target.streamer is not None
    d = None
    if drafter == "draft":
        d = ModelDrafter(open_model(draft_store, cache_tokens=cache_tokens))
    elif drafter == "ngram":
        d = NgramDrafter(min_n=1)
    return Engine(target, tokenizer=load_tokenizer(target_store), context_tokens=cache_tokens, drafter=d)


def prompts(n: int, seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    lengths = [5, 1, 23, 9, 40, 3, 14, 31][:n]
    return [torch.randint(6, 100, (k,), generator=g).tolist() for k in lengths]


def run_batch(batch: BatchEngine, work: list[tuple[list[int], GenerationConfig]], join_every: int = 0):
    """Start the requests (all at once, or one more every `join_every` passes) and step until all end."""
    seqs, queue = [], list(work)
    while queue or any(not s.finished for s in seqs):
        while queue and batch.free_slots and (not join_every or not seqs or batch.passes % join_every == 0
                                              or not batch.active):
            p, cfg = queue.pop(0)
            seqs.append(batch.start(p, cfg))
            if join_every:
                break
        for seq, ev in batch.step():
            assert not isinstance(ev, Exception), ev
    return seqs


def alone(engine: Engine, work):
    out = []
    for p, cfg in work:
        engine.reset()
        out.append(generate(engine, p, cfg))
    return out


SETUPS = [("none", {}), ("draft", {"budget": 12, "branch": 2}), ("ngram", {"budget": 8})]


@pytest.mark.parametrize("drafter,spec", SETUPS, ids=[s[0] for s in SETUPS])
@pytest.mark.parametrize("n", [2, 8])
def test_each_sequence_of_a_shared_pass_equals_generate_alone(stores, drafter, spec, n):
    engine = make_engine(stores, drafter)
    ref = make_engine(stores, drafter)
    try:
        greedy = [(p, GenerationConfig(max_new_tokens=12, spec=drafter != "none", **spec)) for p in prompts(n)]
        seeded = [(p, GenerationConfig(max_new_tokens=12, spec=drafter != "none", temperature=0.9, top_p=0.95,
                                       seed=100 + i, **spec)) for i, p in enumerate(prompts(n, seed=1))]
        for work in (greedy, seeded):
            want = alone(ref, work)
            batch = BatchEngine(engine, slots=n)
            acquired = []
            real = engine.target.streamer.acquire
            engine.target.streamer.acquire = lambda layer: (acquired.append(layer), real(layer))[1]
            got = run_batch(batch, work)
            engine.target.streamer.acquire = real
            for g, w in zip(got, want):
                assert g.token_ids == w.token_ids
                assert g.stats.finish == w.stats.finish
            streamed = engine.target.plan.layers("disk")
            assert len(acquired) == batch.passes * len(streamed)  # one read of each layer per pass, for everyone
            alone_passes = sum(w.stats.passes + 1 for w in want)  # decode passes + the prefill of each
            assert batch.passes < alone_passes
            batch.close()
    finally:
        engine.close()
        ref.close()


def test_sequences_joining_and_leaving_midway_equal_generate_alone(stores):
    engine, ref = make_engine(stores, "draft"), make_engine(stores, "draft")
    try:
        work = [(p, GenerationConfig(max_new_tokens=6 + 3 * i, budget=8, temperature=0.7 * (i % 2), seed=i))
                for i, p in enumerate(prompts(6, seed=2))]
        want = alone(ref, work)
        got = run_batch(BatchEngine(engine, slots=3), work, join_every=2)  # 3 slots for 6 requests
        assert [g.token_ids for g in got] == [w.token_ids for w in want]
    finally:
        engine.close()
        ref.close()


def test_a_prompt_extending_a_finished_one_reuses_its_cache_row(stores):
    engine, ref = make_engine(stores, "ngram"), make_engine(stores, "ngram")
    try:
        batch = BatchEngine(engine, slots=2)
        cfg = GenerationConfig(max_new_tokens=8, budget=8)
        first = run_batch(batch, [(prompts(1)[0], cfg)])[0]
        convo = first.prompt_ids + first.token_ids + [7, 8, 9]
        second = run_batch(batch, [(convo, cfg)])[0]
        assert second.stats.prefill_tokens < 5  # only what the row does not hold yet
        assert second.token_ids == alone(ref, [(convo, cfg)])[0].token_ids
    finally:
        engine.close()
        ref.close()


def test_a_cancelled_sequence_rides_no_further_pass(stores):
    engine = make_engine(stores)
    try:
        batch = BatchEngine(engine, slots=3)
        cfg = GenerationConfig(max_new_tokens=30, spec=False)
        a, b, c = (batch.start(p, cfg) for p in prompts(3))
        rows = []
        real = engine.target.forward_batch
        engine.target.forward_batch = lambda *args: (rows.append(list(args[4])), real(*args))[1]
        batch.step()
        batch.step()
        batch.cancel(b)
        while not (a.finished and c.finished):
            batch.step()
        assert rows[0] == [0, 1, 2] and rows[1] == [0, 1, 2]
        assert all(b.slot not in r for r in rows[2:]) and len(rows) > 3
        assert batch.free_slots == 3 and not b.finished
    finally:
        engine.close()


def test_a_failing_request_ends_alone_and_a_failing_pass_ends_only_its_riders(stores):
    engine, ref = make_engine(stores, "draft"), make_engine(stores, "draft")
    try:
        batch = BatchEngine(engine, slots=3)
        cfg = GenerationConfig(max_new_tokens=10, budget=8)
        work = prompts(3, seed=3)
        want = alone(ref, [(p, cfg) for p in work])
        seqs = [batch.start(p, cfg) for p in work]
        bad = batch.slots[seqs[1].slot].drafter

        def broken(*a, **k):
            raise RuntimeError("draft exploded")

        bad.grow = broken
        errors = {}
        while not all(s.finished for s in seqs):
            for seq, ev in batch.step():
                if isinstance(ev, Exception):
                    errors[seq.slot] = ev
        assert list(errors) == [seqs[1].slot] and "exploded" in str(errors[seqs[1].slot])
        assert [seqs[0].token_ids, seqs[2].token_ids] == [want[0].token_ids, want[2].token_ids]
        del bad.grow  # the slot works again
        real = engine.target.forward_batch
        calls = {"n": 0}

        def flaky(*args):
            calls["n"] += 1
            if calls["n"] == 1:
                raise RuntimeError("disk on fire")
            return real(*args)

        engine.target.forward_batch = flaky
        doomed = batch.start(work[0], cfg)
        out = batch.step()
        assert [type(ev) for _, ev in out] == [RuntimeError] and doomed.finished and batch.free_slots == 3
        again = run_batch(batch, [(p, cfg) for p in work])
        assert [s.token_ids for s in again] == [w.token_ids for w in want]
    finally:
        engine.close()
        ref.close()


def test_context_full_ends_a_sequence_as_generate_does(stores):
    engine, ref = make_engine(stores, cache_tokens=24), make_engine(stores, cache_tokens=24)
    try:
        cfg = GenerationConfig(max_new_tokens=100, spec=False)
        work = [(p, cfg) for p in prompts(4)[:3]]
        want = alone(ref, work)
        got = run_batch(BatchEngine(engine, slots=3), work)
        assert [g.token_ids for g in got] == [w.token_ids for w in want]
        assert [g.stats.context_full for g in got] == [w.stats.context_full for w in want] == [True] * 3
    finally:
        engine.close()
        ref.close()
