import torch

from offspec.runtime.pass_curve import load_or_measure_curve
from offspec.speculative.tree_size import BudgetPlanner
from offspec.runtime.model import open_model
from offspec.speculative.tree import DraftTree
from offspec.store.convert import convert_model


class _Grown:
    def __init__(self, tree, draft_s=0.01, rounds=4):
        self.tree, self.draft_s, self.rounds = tree, draft_s, rounds


def _confident_tree(n: int) -> DraftTree:
    """A chain the draft is sure of (each child 0.9), with weak siblings: acceptance grows with size."""
    tree = DraftTree(0, capacity=n + 1)
    parent, lp = 0, 0.0
    for i in range(n):
        if i % 2 == 0:
            lp += float(torch.log(torch.tensor(0.9)))
            idx = tree.add(torch.tensor([parent]), [i + 1], [lp])
            parent = int(idx[0])
        else:
            tree.add(torch.tensor([parent]), [i + 1], [lp + float(torch.log(torch.tensor(0.05)))])
    return tree


def test_disk_bound_curve_grows_the_budget():
    planner = BudgetPlanner({1: 2.0, 1025: 2.2})  # a streamed target: tree tokens are nearly free
    assert planner.next_budget() >= 256
    planner.observe(_Grown(_confident_tree(planner.next_budget())), planner.next_budget() + 1, 2.1, 20)
    assert planner.next_budget() >= 128


def test_compute_bound_curve_keeps_the_tree_small():
    planner = BudgetPlanner({1: 0.05, 17: 0.08, 257: 1.0, 1025: 4.0})
    planner.observe(_Grown(_confident_tree(64), draft_s=0.02), 65, 0.3, 3)
    assert planner.next_budget() <= 64


def test_measured_curve_is_cached_and_leaves_the_cache_alone(make_tiny_model, tmp_path, monkeypatch):
    monkeypatch.setenv("OFFSPEC_HOME", str(tmp_path / "home"))
    store = convert_model(make_tiny_model("llama"), tmp_path / "s", dtype="float32", progress=False)
    model = open_model(store, cache_tokens=64)
    model.forward(torch.tensor([[1, 2, 3]]))
    curve = load_or_measure_curve(model, sizes=(1, 8, 32))
    assert sorted(curve) == [1, 8, 32] and all(v > 0 for v in curve.values())
    assert model.cache.length == 3
    assert list((tmp_path / "home" / "curves").glob("*.json"))
    assert load_or_measure_curve(model, sizes=(1, 8, 32)) == curve  # from the cache file
    model.close()


def test_falls_back_to_plain_steps_when_drafting_costs_more_than_it_brings():
    from offspec.speculative.tree_size import PROBE_EVERY

    planner = BudgetPlanner({1: 1.0, 17: 2.0, 65: 4.0, 257: 9.0})
    planner.observe(_Grown(_confident_tree(16), draft_s=6.0, rounds=6), 17, 2.0, 1)
    assert planner.next_budget() == 0
    for _ in range(PROBE_EVERY):
        assert planner.next_budget() == 0
        planner.observe_plain(1.0)
    assert planner.next_budget() > 0  # a probe tree refreshes the estimates
    assert planner.next_budget() == 0


def test_engine_with_plain_fallback_still_equals_plain_greedy(make_tiny_model, tmp_path):
    from offspec.generate import Engine, GenerationConfig, generate

    store = convert_model(make_tiny_model("llama"), tmp_path / "t", dtype="float32", progress=False)
    draft = convert_model(make_tiny_model("llama", num_layers=2, seed=1), tmp_path / "d", dtype="float32",
                          progress=False)

    class Alternating:
        def __init__(self):
            self.n = 0

        def choose(self, budget=None):
            self.n += 1
            return "", 0 if self.n % 3 else 12

        def observe(self, *a):
            pass

        def observe_plain(self, *a):
            pass

    want = generate(Engine(open_model(store, cache_tokens=64), None, None), [4, 5, 6],
                    GenerationConfig(max_new_tokens=30, spec=False)).token_ids
    engine = Engine(open_model(store, cache_tokens=64), open_model(draft, cache_tokens=64), None, Alternating())
    assert generate(engine, [4, 5, 6], GenerationConfig(max_new_tokens=30)).token_ids == want
