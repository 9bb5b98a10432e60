"""Residency planning: which decoder layers stay on the device, in host RAM, or stream from disk (pure)."""

from __future__ import annotations

from dataclasses import dataclass, field

from offspec.errors import BudgetError

DEVICE, HOST, DISK = "device", "host", "disk"

# What a process holds beyond its memory plan, whatever the model: the Python interpreter, torch, transformers,
# bitsandbytes and offspec imported (0.40 GiB resident), a 150k-token tokenizer loaded and a draft's tokenizer
# compared with it (0.68 GiB at the peak; measured on Linux x86-64, torch 2.x, transformers 5.x), and the
# allocator's slack. On the CPU, peak RSS stays within the plan's device_bytes plus this (docs/architecture.md).
FIXED_OVERHEAD_BYTES = 768 << 20


def format_bytes(n: float) -> str:
    """Human-readable binary size, e.g. 1.50 GiB."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    return f"{n:.2f} TiB"


@dataclass(frozen=True)
class ResidencyPlan:
    """Per-layer tier plus the staging ring and the byte totals that follow from it."""

    tiers: tuple[str, ...]
    layer_bytes: tuple[int, ...]
    resident_bytes: int  # embeddings, final norm, lm_head
    kv_bytes: int
    reserved_bytes: int  # e.g. a resident draft model
    ring_slots: int
    slot_bytes: int
    device_kind: str = "cpu"
    notes: tuple[str, ...] = field(default_factory=tuple)
    upcast: float = 1.0  # memory bytes per stored byte of a resident layer (2.0: bf16 kept as float32)
    resident_upcast: float = 1.0  # the same for the resident parts (embeddings, norm, head)
    expert_slots: int = 0  # a mixture of experts: experts held per MoE layer in the expert cache (0: dense model)
    expert_slot_bytes: tuple[int, ...] = ()  # per decoder layer: memory of one cached expert (0 for a dense layer)
    workspace_bytes: int = 0  # compute buffers of the largest pass: logits, activations, dequantization scratch
    tree_tokens: int = 0  # the largest pass (tree nodes + root) the workspace is sized for; 0 = not sized

    def layers(self, tier: str) -> list[int]:
        return [i for i, t in enumerate(self.tiers) if t == tier]

    @property
    def streamed_bytes_per_pass(self) -> int:
        """Bytes read from disk by one forward pass."""
        return sum(b for b, t in zip(self.layer_bytes, self.tiers) if t == DISK)

    @property
    def copied_bytes_per_pass(self) -> int:
        """Bytes moved host->device per pass (disk layers, and host layers on CUDA)."""
        if self.device_kind == "cpu":
            return self.streamed_bytes_per_pass
        return sum(b for b, t in zip(self.layer_bytes, self.tiers) if t in (DISK, HOST))

    @property
    def ring_bytes(self) -> int:
        return self.ring_slots * self.slot_bytes

    @property
    def moe_layers(self) -> list[int]:
        return [i for i, b in enumerate(self.expert_slot_bytes) if b]

    @property
    def expert_cache_bytes(self) -> int:
        """Memory of the expert cache: `expert_slots` experts in every MoE layer (in the compute dtype)."""
        return self.expert_slots * sum(self.expert_slot_bytes)

    @property
    def device_bytes(self) -> int:
        """Bytes the plan holds in device memory (all RAM on the CPU)."""
        layers = sum(b for b, t in zip(self.layer_bytes, self.tiers) if t == DEVICE)
        if self.device_kind == "cpu":
            layers += sum(b for b, t in zip(self.layer_bytes, self.tiers) if t == HOST)
        ring = self.ring_bytes * (2 * self.upcast - 1)  # staging + float32 copies of its float tensors
        return (int(self.resident_bytes * self.resident_upcast + layers * self.upcast) + self.kv_bytes
                + self.reserved_bytes + int(ring) + self.expert_cache_bytes + self.workspace_bytes)

    @property
    def rss_bound_bytes(self) -> int:
        """CPU: the most resident memory a run of this plan takes, the plan plus the fixed overhead."""
        return self.device_bytes + FIXED_OVERHEAD_BYTES

    @property
    def host_bytes(self) -> int:
        """Pinned host RAM (CUDA only): host-resident layers plus the staging ring."""
        if self.device_kind == "cpu":
            return 0
        return sum(b for b, t in zip(self.layer_bytes, self.tiers) if t == HOST) + self.ring_bytes


def minimum_budget_bytes(layer_bytes: list[int], resident_bytes: int, kv_bytes: int, reserved_bytes: int,
                         ring_slots: int = 2, upcast: float = 1.0, resident_upcast: float | None = None,
                         expert_bytes: int = 0, workspace_bytes: int = 0) -> int:
    """The smallest device budget that runs: resident parts, KV cache, reserve, workspace, `ring_slots` streamed
    layers and the smallest expert cache (expert_bytes: one token's experts in every MoE layer)."""
    slot = max(layer_bytes, default=0) * (2 * upcast - 1)  # staging + float32 copies of its float tensors
    r_up = upcast if resident_upcast is None else resident_upcast
    return (int(resident_bytes * r_up) + kv_bytes + reserved_bytes + workspace_bytes + int(ring_slots * slot)
            + expert_bytes)


def plan_residency(layer_bytes: list[int], resident_bytes: int, device_budget_bytes: int,
                   host_budget_bytes: int = 0, kv_bytes: int = 0, reserved_bytes: int = 0,
                   device_kind: str = "cpu", ring_slots: int = 3, upcast: float = 1.0,
                   resident_upcast: float | None = None, expert_slot_bytes: list[int] | None = None,
                   num_experts: int = 0, min_expert_slots: int = 0, workspace_bytes: int = 0,
                   tree_tokens: int = 0) -> ResidencyPlan:
    """Fill the device budget with whole layers (the last layers first), then host RAM (CUDA), stream the rest.

    Resident layers sit at the end of the pass so that, while they compute, the reader already
    prefetches the next pass's first streamed layers into the ring. workspace_bytes: the compute buffers of a pass of
    tree_tokens tokens (runtime/sizing.workspace_bytes), held beside the weights. A mixture of experts
    (expert_slot_bytes: one cached expert's memory per layer, 0 for dense layers): `min_expert_slots` experts per MoE
    layer are held first, the layers' shared parts (attention, norms, router, shared experts) are placed as above,
    and what memory is left holds more experts, up to `num_experts` per layer.
    """
    per_slot = sum(expert_slot_bytes or ())
    if per_slot and num_experts:
        return _plan_with_experts(layer_bytes, resident_bytes, device_budget_bytes, host_budget_bytes, kv_bytes,
                                  reserved_bytes, device_kind, ring_slots, upcast, resident_upcast,
                                  list(expert_slot_bytes), num_experts, max(1, min(min_expert_slots, num_experts)),
                                  workspace_bytes, tree_tokens)
    n = len(layer_bytes)
    slot = max(layer_bytes, default=0)
    slot_cost = int(slot * (2 * upcast - 1))
    r_up = upcast if resident_upcast is None else resident_upcast
    fixed = int(resident_bytes * r_up) + kv_bytes + reserved_bytes + workspace_bytes
    minimum = minimum_budget_bytes(layer_bytes, resident_bytes, kv_bytes, reserved_bytes, 2, upcast, r_up,
                                   workspace_bytes=workspace_bytes)
    sized = {"workspace_bytes": workspace_bytes, "tree_tokens": tree_tokens}
    # Everything fits: no ring needed.
    if fixed + sum(layer_bytes) * upcast <= device_budget_bytes:
        return ResidencyPlan(tuple([DEVICE] * n), tuple(layer_bytes), resident_bytes, kv_bytes, reserved_bytes,
                             0, 0, device_kind, upcast=upcast, resident_upcast=r_up, **sized)
    if device_budget_bytes < minimum:
        raise BudgetError(
            f"device memory budget {format_bytes(device_budget_bytes)} is too small: it must hold the resident "
            f"parts ({format_bytes(resident_bytes * r_up)}), the KV cache ({format_bytes(kv_bytes)})"
            + (f", the draft ({format_bytes(reserved_bytes)})" if reserved_bytes else "")
            + (f", the workspace ({format_bytes(workspace_bytes)})" if workspace_bytes else "")
            + f" and two streamed layers ({format_bytes(2 * slot_cost)}); minimum {format_bytes(minimum)}"
        )
    tiers = [DISK] * n
    # Largest ring that still leaves the minimum; 2 slots at the least.
    slots = max(2, min(ring_slots, (device_budget_bytes - fixed) // slot_cost if slot else 2))
    free = device_budget_bytes - fixed - slots * slot_cost
    for i in reversed(range(n)):
        if layer_bytes[i] * upcast <= free:
            tiers[i] = DEVICE
            free -= int(layer_bytes[i] * upcast)
    notes: list[str] = []
    if device_kind != "cpu":
        host_free = host_budget_bytes - slots * slot
        for i in reversed(range(n)):
            if tiers[i] == DISK and layer_bytes[i] <= host_free:
                tiers[i] = HOST
                host_free -= layer_bytes[i]
        if host_free < 0:
            notes.append("host budget smaller than the pinned staging ring")
    if DISK not in tiers and HOST not in tiers:
        slots = 0
    elif DISK not in tiers and device_kind == "cpu":
        slots = 0
    return ResidencyPlan(tuple(tiers), tuple(layer_bytes), resident_bytes, kv_bytes, reserved_bytes,
                         slots, slot if slots else 0, device_kind, tuple(notes), upcast, r_up, **sized)




def _plan_with_experts(layer_bytes, resident_bytes, device_budget_bytes, host_budget_bytes, kv_bytes, reserved_bytes,
                       device_kind, ring_slots, upcast, resident_upcast, expert_slot_bytes: list[int],
                       num_experts: int, min_slots: int, workspace_bytes: int = 0,
                       tree_tokens: int = 0) -> ResidencyPlan:
    """plan_residency for a mixture of experts: the smallest expert cache reserved, then the dense plan, then the
    memory left over in expert slots."""
    from dataclasses import replace

    per_slot = sum(expert_slot_bytes)
    r_up = upcast if resident_upcast is None else resident_upcast
    fixed = int(resident_bytes * r_up) + kv_bytes + reserved_bytes + workspace_bytes
    sized = {"workspace_bytes": workspace_bytes, "tree_tokens": tree_tokens}
    if fixed + sum(layer_bytes) * upcast + num_experts * per_slot <= device_budget_bytes:
        plan = plan_residency(layer_bytes, resident_bytes, 1 << 62, 0, kv_bytes, reserved_bytes, device_kind,
                              ring_slots, upcast, r_up, **sized)
        return replace(plan, expert_slots=num_experts, expert_slot_bytes=tuple(expert_slot_bytes))
    try:
        plan = plan_residency(layer_bytes, resident_bytes, device_budget_bytes - min_slots * per_slot,
                              host_budget_bytes, kv_bytes, reserved_bytes, device_kind, ring_slots, upcast, r_up,
                              **sized)
    except BudgetError:
        minimum = minimum_budget_bytes(layer_bytes, resident_bytes, kv_bytes, reserved_bytes, 2, upcast, r_up,
                                       min_slots * per_slot, workspace_bytes)
        raise BudgetError(
            f"device memory budget {format_bytes(device_budget_bytes)} is too small: it must hold the resident "
            f"parts, the KV cache, the workspace, two streamed layers and {min_slots} experts per layer "
            f"({format_bytes(min_slots * per_slot)}); minimum {format_bytes(minimum)}") from None
    plan = replace(plan, expert_slots=min_slots, expert_slot_bytes=tuple(expert_slot_bytes))
    left = device_budget_bytes - plan.device_bytes
    extra = max(0, left) // per_slot
    return replace(plan, expert_slots=int(min(num_experts, min_slots + extra)))
