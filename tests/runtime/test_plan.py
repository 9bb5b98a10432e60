import pytest

from offspec.errors import BudgetError
from offspec.runtime.plan import DEVICE, DISK, HOST, minimum_budget_bytes, plan_residency

MB = 1 << 20
LAYERS = [100 * MB] * 10


def test_everything_fits_keeps_all_layers_resident_without_a_ring():
    plan = plan_residency(LAYERS, 50 * MB, 10_000 * MB)
    assert plan.tiers == (DEVICE,) * 10
    assert plan.ring_slots == 0 and plan.streamed_bytes_per_pass == 0


def test_tight_budget_streams_the_first_layers_and_keeps_the_last():
    budget = 50 * MB + 3 * 100 * MB + 4 * 100 * MB  # resident + ring of 3 + 4 layers
    plan = plan_residency(LAYERS, 50 * MB, budget)
    assert plan.ring_slots == 3
    assert plan.layers(DEVICE) == [6, 7, 8, 9]
    assert plan.layers(DISK) == list(range(6))
    assert plan.streamed_bytes_per_pass == 600 * MB
    assert plan.device_bytes <= budget


def test_minimum_budget_streams_everything_with_two_slots():
    minimum = minimum_budget_bytes(LAYERS, 50 * MB, 10 * MB, 0)
    plan = plan_residency(LAYERS, 50 * MB, minimum, kv_bytes=10 * MB)
    assert plan.tiers == (DISK,) * 10 and plan.ring_slots == 2


def test_too_small_budget_says_the_minimum():
    with pytest.raises(BudgetError, match=r"minimum 350\.00 MiB"):
        plan_residency(LAYERS, 50 * MB, 200 * MB, kv_bytes=100 * MB)


def test_reserved_draft_counts_against_the_device_budget():
    free = plan_residency(LAYERS, 0, 900 * MB)
    with_draft = plan_residency(LAYERS, 0, 900 * MB, reserved_bytes=300 * MB)
    assert len(with_draft.layers(DEVICE)) == len(free.layers(DEVICE)) - 3


def test_cuda_plan_uses_the_host_tier_before_disk():
    plan = plan_residency(LAYERS, 0, 500 * MB, host_budget_bytes=700 * MB, device_kind="cuda")
    assert plan.layers(DEVICE) == [8, 9]
    assert plan.layers(HOST) == [4, 5, 6, 7]
    assert plan.layers(DISK) == [0, 1, 2, 3]
    assert plan.copied_bytes_per_pass == 800 * MB
    assert plan.host_bytes == 700 * MB


def test_a_small_model_that_fits_whole_needs_no_ring_minimum():
    two_layers = [100 * MB, 100 * MB]
    plan = plan_residency(two_layers, 10 * MB, 2 * 100 * MB * 2 + 20 * MB + 1, upcast=2.0)
    assert plan.tiers == (DEVICE, DEVICE) and plan.ring_slots == 0


def test_parse_device_memory_forms():
    from offspec.config import parse_device_memory

    assert parse_device_memory("2GiB") == (2 << 30, None)
    assert parse_device_memory("min") == (None, 0)
    assert parse_device_memory("min+512MiB") == (None, 512 << 20)
    assert parse_device_memory(None) == (None, None)


def test_workspace_counts_in_the_plan_and_its_minimum():
    minimum = minimum_budget_bytes(LAYERS, 50 * MB, 10 * MB, 0, workspace_bytes=40 * MB)
    assert minimum == minimum_budget_bytes(LAYERS, 50 * MB, 10 * MB, 0) + 40 * MB
    plan = plan_residency(LAYERS, 50 * MB, minimum, kv_bytes=10 * MB, workspace_bytes=40 * MB, tree_tokens=65)
    assert plan.tiers == (DISK,) * 10 and plan.device_bytes <= minimum
    assert plan.workspace_bytes == 40 * MB and plan.tree_tokens == 65
    with pytest.raises(BudgetError, match="workspace"):
        plan_residency(LAYERS, 50 * MB, minimum - 1, kv_bytes=10 * MB, workspace_bytes=40 * MB)
    # the workspace takes the place of layers
    roomy = plan_residency(LAYERS, 0, 900 * MB)
    with_work = plan_residency(LAYERS, 0, 900 * MB, workspace_bytes=200 * MB)
    assert len(with_work.layers(DEVICE)) == len(roomy.layers(DEVICE)) - 2
    from offspec.runtime.plan import FIXED_OVERHEAD_BYTES

    assert with_work.rss_bound_bytes == with_work.device_bytes + FIXED_OVERHEAD_BYTES


def test_workspace_grows_with_the_tree_and_holds_the_nf4_buffers(make_tiny_model, tmp_path):
    """Sized from a store: float32 logits per tree row, one dequantization buffer per NF4 weight shape."""
    import torch

    from offspec.models.registry import load_config
    from offspec.runtime.sizing import PREFILL_TOKENS, plan_for_store, workspace_bytes
    from offspec.store.convert import convert_model
    from offspec.store.manifest import read_manifest

    src = make_tiny_model("llama", num_layers=2)
    s16 = convert_model(src, tmp_path / "s16", dtype="float32", progress=False)
    s4 = convert_model(src, tmp_path / "s4", bits=4, dtype="float32", progress=False)
    m16, m4, cfg = read_manifest(s16), read_manifest(s4), load_config(s16)
    big, small = (workspace_bytes(m16, cfg, torch.float32, t, 64) for t in (PREFILL_TOKENS + 1, PREFILL_TOKENS))
    assert big - small >= cfg.vocab_size * 4  # one more row of float32 logits (and more)
    shapes = {tuple(e.quant.shape) for blob in m4.layers for e in blob.tensors.values() if e.quant is not None}
    nf4_buffers = sum(a * b for a, b in shapes) * 4
    assert nf4_buffers > 0
    assert workspace_bytes(m4, cfg, torch.float32, 17, 64) == workspace_bytes(m16, cfg, torch.float32, 17, 64) + nf4_buffers
    plan, minimum = plan_for_store(s4, m4, "cpu", 0, over_min=0, cache_tokens=64, tree_tokens=17)
    assert plan.tree_tokens == 17 and plan.workspace_bytes == workspace_bytes(m4, cfg, torch.float32, 17, 64)
    assert plan.device_bytes <= minimum
