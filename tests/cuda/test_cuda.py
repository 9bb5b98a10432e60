"""CUDA oracles on tiny random float32 models (run with `pytest -m cuda` on a machine with CUDA; skipped without).

- the streamed forward equals transformers on the device, with layers on the device, in pinned host memory
  (copied each pass) and streamed from disk (disk -> pinned -> device), and after the ring wraps around;
- an interrupted pass leaves the ring usable (more interrupts than slots);
- speculative greedy equals plain greedy, token for token, with the target streamed;
- the timing clock brackets the device's own measure of the work (it waits for queued kernels);
- the implicit host syncs of one speculative step, counted with torch.cuda.set_sync_debug_mode, against
  the goal of one per growth round plus one for verification.
"""

from __future__ import annotations

import warnings

import pytest
import torch

from tests.helpers import interrupt_layer

pytestmark = [pytest.mark.cuda,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

PROMPTS = [[5, 17, 33, 90, 12], [7], list(range(40, 70))]


@pytest.fixture(scope="module")
def stores(make_tiny_model, tmp_path_factory):
    """(target HF folder, target store, draft store): 4- and 2-layer float32 Llamas sharing a tokenizer."""
    from offspec.store.convert import convert_model

    out = tmp_path_factory.mktemp("cuda-stores")
    src = make_tiny_model("llama", num_layers=4)
    target = convert_model(src, out / "t", dtype="float32", progress=False)
    draft = convert_model(make_tiny_model("llama", num_layers=2, seed=1), out / "d", dtype="float32", progress=False)
    return src, target, draft


def _plans(store) -> dict:
    from offspec.runtime.plan import DEVICE, DISK, HOST, ResidencyPlan
    from offspec.store.manifest import read_manifest

    man = read_manifest(store)
    b, r = tuple(man.layer_bytes), man.resident.size

    def plan(*tiers):
        return ResidencyPlan(tiers, b, r, 0, 0, 2, max(b), device_kind="cuda")

    return {"device": plan(DEVICE, DEVICE, DEVICE, DEVICE), "host": plan(HOST, HOST, HOST, HOST),
            "disk": plan(DISK, DISK, DISK, DISK), "mixed": plan(DEVICE, HOST, DISK, DISK)}


def _reference(src, ids):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32).to("cuda").eval()
    with torch.no_grad():
        return model(ids.to("cuda")).logits.float()


@pytest.mark.parametrize("tiers", ["device", "host", "disk", "mixed"])
def test_streamed_forward_equals_transformers_on_cuda(stores, tiers):
    from offspec.runtime.model import OffloadedModel

    src, store, _ = stores
    ids = torch.randint(0, 256, (1, 12), generator=torch.Generator().manual_seed(1))
    ref = _reference(src, ids)
    om = OffloadedModel(store, _plans(store)[tiers], device="cuda", cache_tokens=64)
    try:
        for _ in range(3):  # more passes than ring slots: the ring and the reader wrap around
            om.reset()
            got = om.forward(ids)
            assert got.device.type == "cuda"
            assert (got - ref).abs().max().item() < 1e-4, tiers
        om.reset()  # prefill then one token at a time through the same ring
        parts = [om.forward(ids[:, :7])] + [om.forward(ids[:, i : i + 1]) for i in range(7, 12)]
        assert (torch.cat(parts, 1) - ref).abs().max().item() < 1e-4, tiers
    finally:
        om.close()


@pytest.mark.parametrize("tiers", ["host", "disk"])
def test_an_interrupted_pass_leaves_the_ring_usable(stores, tiers, monkeypatch):
    from offspec.runtime.model import OffloadedModel

    src, store, _ = stores
    ids = torch.tensor([[1, 2, 3, 4]])
    ref = _reference(src, ids)
    om = OffloadedModel(store, _plans(store)[tiers], device="cuda", cache_tokens=64)
    try:
        interrupt_layer(monkeypatch, om.layers[2], 5)
        for _ in range(5):  # more interrupts than ring slots
            om.reset()
            with pytest.raises(KeyboardInterrupt):
                om.forward(ids)
        om.reset()
        assert (om.forward(ids) - ref).abs().max().item() < 1e-4
    finally:
        om.close()


def _engine(target_store, draft_store=None, host: bool = False):
    from offspec.generate import Engine
    from offspec.loader import load_tokenizer
    from offspec.runtime.model import OffloadedModel, open_model
    from offspec.runtime.plan import DEVICE, DISK, HOST, ResidencyPlan
    from offspec.store.manifest import read_manifest

    man = read_manifest(target_store)
    tiers = (DEVICE, HOST, HOST, DISK) if host else (DISK,) * man.num_layers
    plan = ResidencyPlan(tiers, tuple(man.layer_bytes), man.resident.size, 0, 0, 2, max(man.layer_bytes),
                         device_kind="cuda")
    target = OffloadedModel(target_store, plan, device="cuda", cache_tokens=128)
    draft = open_model(draft_store, device="cuda", cache_tokens=128) if draft_store else None
    return Engine(target, draft, load_tokenizer(target_store))


def _close(engine) -> None:
    for m in (engine.target, engine.draft):
        if m is not None:
            m.close()


@pytest.mark.parametrize("tree,budget", [("specexec", 8), ("specexec", 48), ("sequoia", 16)])
def test_speculative_greedy_equals_plain_greedy_on_cuda(stores, tree, budget):
    from offspec.generate import GenerationConfig, generate

    _, target, draft = stores
    plain, spec = _engine(target, host=True), _engine(target, draft, host=True)
    try:
        for prompt in PROMPTS:
            plain.reset()
            spec.reset()
            want = generate(plain, prompt, GenerationConfig(max_new_tokens=24, spec=False))
            got = generate(spec, prompt, GenerationConfig(max_new_tokens=24, budget=budget, tree=tree))
            assert got.token_ids == want.token_ids, (tree, budget, prompt)
            assert got.stats.passes <= want.stats.passes
    finally:
        _close(plain)
        _close(spec)


def test_the_clock_waits_for_queued_device_work():
    """The stopwatch brackets the device's own (event) measure of the same kernels: it cannot under-measure."""
    from offspec.runtime.timing import Stopwatch

    x = torch.randn(2048, 2048, device="cuda")
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    with Stopwatch(x.device) as sw:
        start.record()
        for _ in range(50):
            x = torch.tanh(x @ x)
        end.record()
    end.synchronize()
    assert sw.s >= start.elapsed_time(end) / 1e3


def _count_syncs(fn) -> int:
    """Implicit host syncs (item, tolist, .cpu(), nonzero, blocking copies ...) while fn runs."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            fn()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return sum("synchroniz" in str(w.message) for w in caught)


@pytest.mark.xfail(strict=True, reason="the sync-free speculative step (issue 8 part 3) is not built yet: growth and "
                                       "verification still sync the host many times per round; remove this mark "
                                       "when it lands")
def test_one_speculative_step_syncs_once_per_round_and_once_to_verify(stores):
    """Goal: at most one implicit host sync per growth round and one for the verification. The timing clock's
    explicit torch.cuda.synchronize at the draft/target boundaries is not counted by the debug mode."""
    from offspec.generate import GenerationConfig

    _, target, draft = stores
    engine = _engine(target, draft)
    try:
        rounds = []
        real_grow = engine._grow

        def grow(*a, **k):
            grown = real_grow(*a, **k)
            rounds.append(grown.rounds)
            return grown

        engine._grow = grow
        steps = engine.steps(PROMPTS[2], GenerationConfig(max_new_tokens=64, budget=32, branch=4))
        assert next(steps).prefill
        next(steps)  # one warm step (allocator, kernels), then the counted one
        n = _count_syncs(lambda: next(steps))
        assert rounds, "the step drafted no tree"
        assert n <= rounds[-1] + 1, f"{n} host syncs for {rounds[-1]} growth rounds"
    finally:
        _close(engine)


def test_graph_replay_equals_eager():
    pytest.skip("CUDA graph capture of the resident draft (issue 8 part 2) is not built: there is no replay to "
                "compare with eager yet")
