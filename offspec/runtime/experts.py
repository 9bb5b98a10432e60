"""Routed experts streamed by expert: a per-layer cache of expert slots bound into transformers' experts modules.

A mixture-of-experts layer's experts module holds fused parameters [num_experts, ...] and is called by its MoE
block as `experts(hidden_states, top_k_index, top_k_weights)` after the router ran. offspec wraps that module's
forward: it sees the routed experts, makes sure each one is in the layer's cache (reading its blob
`layers/layer_NNN/expert_EEE.bin` when it is not), binds the module's parameters to the cache's slab of slots and
renumbers `top_k_index` to slot numbers (and the module's `num_experts` to the slot count), so transformers' own
expert math runs unchanged over the routed experts only. Slots are reused least recently used first (or least
frequently used); a pass that routes to more experts than a layer has slots (a tree, a prefill) runs the experts
module once per group of experts that fits, the others weighted 0 in each call, and sums the groups' outputs.
"""

from __future__ import annotations

import inspect
import os
from collections import Counter, OrderedDict
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from offspec.errors import StoreError
from offspec.runtime.streamer import alloc_staging, read_into
from offspec.store.manifest import DTYPES, BlobEntry, tensor_views
from offspec.transformers_contract import ExpertsModule

POLICIES = ("lru", "lfu")


@dataclass
class ExpertStats:
    """Counts of one pass (or of a run, summed): reads are blobs read from disk when routed, prefetched ones apart."""

    routed: int = 0  # (layer, expert) pairs a pass routed tokens to
    hits: int = 0  # of those, already in the cache (or prefetched) when routed
    reads: int = 0  # blobs read from disk because they were routed and not in the cache
    bytes_read: int = 0  # bytes of those reads
    prefetched: int = 0  # blobs read ahead of their layer by the predictor
    prefetch_bytes: int = 0
    prefetch_used: int = 0  # prefetched blobs that the layer then routed to
    read_log: list[tuple[int, int]] = field(default_factory=list)  # (layer, expert) of each on-demand read (a pass)

    @property
    def hit_rate(self) -> float:
        return self.hits / self.routed if self.routed else 0.0

    @property
    def prefetch_accuracy(self) -> float:
        """Share of prefetched blobs that were routed to (the predictor's precision)."""
        return self.prefetch_used / self.prefetched if self.prefetched else 0.0

    def add(self, other: ExpertStats) -> None:
        for name in ("routed", "hits", "reads", "bytes_read", "prefetched", "prefetch_bytes", "prefetch_used"):
            setattr(self, name, getattr(self, name) + getattr(other, name))  # read_log stays per pass

    def as_dict(self) -> dict:
        return {"experts_routed": self.routed, "experts_read": self.reads, "expert_hits": self.hits,
                "expert_hit_rate": round(self.hit_rate, 4), "expert_bytes_read": self.bytes_read,
                "experts_prefetched": self.prefetched, "prefetch_used": self.prefetch_used,
                "prefetch_accuracy": round(self.prefetch_accuracy, 4)}


def expert_blob_bytes(blob: BlobEntry, compute: torch.dtype) -> int:
    """Memory of one expert in a cache slot: each tensor in the compute dtype (NF4 unpacked)."""
    total = 0
    for name, e in blob.tensors.items():
        if name.endswith(".absmax"):
            continue
        shape = e.quant.shape if e.quant is not None else e.shape
        n = 1
        for d in shape:
            n *= d
        total += n * (compute.itemsize if (e.quant is not None or DTYPES[e.dtype].is_floating_point)
                      else DTYPES[e.dtype].itemsize)
    return total


class LayerExperts:
    """One MoE layer's cache: `slots` experts per fused parameter, filled by use."""

    def __init__(self, layer: int, module: ExpertsModule, blobs: tuple[BlobEntry, ...], store_dir: Path,
                 slots: int, compute: torch.dtype, device: torch.device, policy: str = "lru") -> None:
        if len(blobs) != module.num_experts:
            raise StoreError(f"{store_dir}: layer {layer} has {len(blobs)} expert blobs, its model "
                             f"{module.num_experts} experts")
        self.layer, self.module, self.blobs, self.store_dir = layer, module, blobs, store_dir
        self.slots = max(1, min(slots, module.num_experts))
        self.compute, self.device, self.policy = compute, device, policy
        self.slab = {leaf: torch.zeros((self.slots, *shape), dtype=compute, device=device)
                     for leaf, shape in module.shapes}
        self.params = {leaf: nn.Parameter(t, requires_grad=False) for leaf, t in self.slab.items()}
        self.where: OrderedDict[int, int] = OrderedDict()  # expert -> slot, least recently used first
        self.uses: Counter[int] = Counter()  # routed passes per expert (lfu)
        self.free = list(range(self.slots))
        self.wrapped: nn.Module | None = None  # the experts module whose forward runs over this cache
        prefix = module.path + "."
        self._leaf = {name: name[len(prefix):] for b in blobs for name in b.tensors
                      if not name.endswith(".absmax")}

    @property
    def slot_bytes(self) -> int:
        return sum(t[0].numel() * t.element_size() for t in self.slab.values())

    def _victim(self, keep: set[int]) -> int:
        """The expert whose slot is reused: least recently used (lru) or least used (lfu), never one in `keep`."""
        candidates = [e for e in self.where if e not in keep]
        if self.policy == "lfu":
            return min(candidates, key=lambda e: (self.uses[e], list(self.where).index(e)))
        return candidates[0]

    def fill(self, slab: dict[str, torch.Tensor], slot: int, buf: torch.Tensor, e: int) -> None:
        """Write expert e's tensors (read into buf) into `slot` of `slab`: cast, or NF4 unpacked."""
        blob = self.blobs[e]
        views = tensor_views(blob.tensors, buf)
        for name, entry in blob.tensors.items():
            if name.endswith(".absmax"):
                continue
            leaf = self._leaf[name]
            if entry.quant is not None:
                from offspec.store.nf4 import dequantize_nf4

                value = dequantize_nf4(views[name], views[name + ".absmax"], entry.quant)
            else:
                value = views[name]
            slab[leaf][slot].copy_(value.view(slab[leaf].shape[1:]))


class ExpertCache:
    """Every MoE layer's expert slots, the blob reads that fill them, the experts forwards bound to them, the counts.

    prefetch(layer, experts) reads blobs ahead in a reader thread; a routed expert whose blob was prefetched is
    taken from there (counted as a hit and as a used prefetch, not as a read)."""

    def __init__(self, store_dir: Path, experts: dict[int, ExpertsModule], blobs: dict[int, tuple[BlobEntry, ...]],
                 slots: int | dict[int, int], compute: torch.dtype, device: torch.device, warm: bool = False,
                 policy: str = "lru") -> None:
        if policy not in POLICIES:
            raise ValueError(f"expert cache policy must be one of {POLICIES}, not {policy!r}")
        self.store_dir, self.warm = store_dir, warm
        self.layers = {i: LayerExperts(i, m, blobs[i], store_dir,
                                       slots[i] if isinstance(slots, dict) else slots, compute, device, policy)
                       for i, m in experts.items()}
        self.stats = ExpertStats()  # of the current pass
        self.total = ExpertStats()  # since the cache was built
        size = max((b.size for blobs_i in blobs.values() for b in blobs_i), default=0)
        self._staging = alloc_staging(size) if size else None
        self._pool: ThreadPoolExecutor | None = None
        self._pending: dict[tuple[int, int], Future] = {}  # prefetched (layer, expert) -> its blob bytes
        self.last_routed: dict[int, list[int]] = {}  # layer -> experts routed at its last call

    # ------------------------------------------------------------------ reads
    def _read(self, layer: int, e: int, buf: torch.Tensor | None = None) -> torch.Tensor:
        """Read expert e of `layer`'s blob into buf (a new buffer when None); StoreError if missing or short."""
        blob = self.layers[layer].blobs[e]
        path = self.store_dir / blob.file
        if buf is None:
            buf = alloc_staging(blob.size)
        try:
            fd = os.open(path, os.O_RDONLY)
        except OSError:
            raise StoreError(f"{path}: expert {e} of layer {layer} is missing from the store; convert the model "
                             "again") from None
        try:
            n = read_into(fd, buf, blob.size)
            if not self.warm:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)
        if n != blob.size:
            raise StoreError(f"{path}: short read ({n} of {blob.size} bytes); expert {e} of layer {layer} is "
                             "truncated")
        return buf

    def prefetch(self, layer: int, experts: list[int]) -> None:
        """Start reading these experts of `layer` (those neither cached nor already on their way)."""
        lay = self.layers.get(layer)
        if lay is None:
            return
        if self._pool is None:
            self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="offspec-experts")
        for e in experts:
            key = (layer, e)
            if e in lay.where or key in self._pending:
                continue
            self._pending[key] = self._pool.submit(self._read, layer, e)
            self.stats.prefetched += 1
            self.stats.prefetch_bytes += lay.blobs[e].size

    def _take_prefetched(self, layer: int, e: int) -> torch.Tensor | None:
        fut = self._pending.pop((layer, e), None)
        if fut is None:
            return None
        self.stats.prefetch_used += 1
        return fut.result()

    def drop_prefetches(self, layer: int | None = None) -> None:
        """Forget prefetched blobs (of one layer, or all) that their layer did not route to."""
        for key in [k for k in self._pending if layer is None or k[0] == layer]:
            fut = self._pending.pop(key)
            if fut.cancel():  # never started: not a read
                self.stats.prefetched -= 1
                self.stats.prefetch_bytes -= self.layers[key[0]].blobs[key[1]].size

    def _load(self, lay: LayerExperts, slab: dict[str, torch.Tensor], slot: int, e: int) -> None:
        buf = self._take_prefetched(lay.layer, e)
        if buf is None:
            buf = self._read(lay.layer, e, self._staging)
            self.stats.reads += 1
            self.stats.bytes_read += lay.blobs[e].size
            self.stats.read_log.append((lay.layer, e))
        else:
            self.stats.hits += 1
        lay.fill(slab, slot, buf, e)

    # ------------------------------------------------------------------ routing
    def ensure(self, layer: int, routed: list[int]) -> tuple[dict[str, nn.Parameter], int, torch.Tensor]:
        """Make `routed` (at most the layer's slot count of its distinct experts) cached: (the slab's parameters, the
        slot count, a lookup tensor expert -> slot)."""
        lay = self.layers[layer]
        keep = set(routed)
        for e in routed:
            if e in lay.where:
                lay.where.move_to_end(e)
                self.stats.hits += 1
                continue
            slot = lay.free.pop() if lay.free else lay.where.pop(lay._victim(keep))
            try:  # the slot is only recorded once filled: a failed read leaves no half-written expert behind
                self._load(lay, lay.slab, slot, e)
            except BaseException:
                lay.free.append(slot)
                raise
            lay.where[e] = slot
        lut = torch.zeros(lay.module.num_experts + 1, dtype=torch.long)
        for e in routed:
            lut[e] = lay.where[e]
        lut[-1] = lay.slots  # an implementation's "no expert" index stays one past the last slot
        return lay.params, lay.slots, lut.to(lay.device)

    def groups(self, layer: int, routed: list[int]) -> list[list[int]]:
        """The routed experts in calls of at most the layer's slot count, the cached ones first (a tree or a prefill
        may route to more experts than a layer caches)."""
        lay = self.layers[layer]
        ordered = [e for e in routed if e in lay.where] + [e for e in routed if e not in lay.where]
        return [ordered[i:i + lay.slots] for i in range(0, len(ordered), lay.slots)] or [[]]

    def wrap(self, layer: int, module: nn.Module,
             on_routed: Callable[[int, list[int], torch.Tensor], None] | None = None) -> None:
        """Run `layer`'s experts module (transformers' own forward) over the cache: its parameters bound to the slab
        and the routing renumbered to slots, once per group of routed experts that fits the slots (the groups'
        outputs summed: each token's other experts get weight 0 in a group's call)."""
        lay = self.layers[layer]
        lay.wrapped = module
        forward = module.forward  # transformers' forward (its experts implementation), bound to the module
        names = [n for n in inspect.signature(forward).parameters][:3]

        def routed_forward(*args, **kwargs):
            args = list(args)
            for name in names[len(args):3]:  # called by keyword: the experts forward's own parameter names
                args.append(kwargs.pop(name))
            hidden, index, weights = args[0], args[1], args[2]
            routed = torch.unique(index[index < lay.module.num_experts]).tolist()
            lay.uses.update(routed)
            self.stats.routed += len(routed)
            self.last_routed[layer] = list(routed)
            if on_routed is not None:
                on_routed(layer, routed, hidden)
            groups = self.groups(layer, routed)
            out = None
            for group in groups:
                params, n, lut = self.ensure(layer, group)
                for leaf, p in params.items():
                    module._parameters[leaf] = p
                module.num_experts = n
                clamped = index.clamp(max=lay.module.num_experts)
                if len(groups) == 1:
                    idx, w = lut[clamped], weights
                else:
                    inside = torch.isin(clamped, torch.tensor(group, dtype=clamped.dtype, device=clamped.device))
                    idx = torch.where(inside, lut[clamped], 0)
                    w = torch.where(inside, weights, torch.zeros_like(weights))
                y = forward(hidden, idx, w, *args[3:], **kwargs)
                out = y if out is None else out + y
            self.drop_prefetches(layer)
            return out

        module.forward = routed_forward

    # ------------------------------------------------------------------ bookkeeping
    def clear(self) -> None:
        """Forget every cached expert (the next passes read what they route to)."""
        self.drop_prefetches()
        for lay in self.layers.values():
            lay.where.clear()
            lay.uses.clear()
            lay.free = list(range(lay.slots))

    def begin_pass(self) -> None:
        self.stats = ExpertStats()

    def end_pass(self) -> ExpertStats:
        """The pass's counts (a copy: what runs after the pass does not change them)."""
        self.total.add(self.stats)
        done = ExpertStats(**{**self.stats.__dict__, "read_log": list(self.stats.read_log)})
        self.stats = ExpertStats()
        return done

    @property
    def resident_bytes(self) -> int:
        return sum(lay.slots * lay.slot_bytes for lay in self.layers.values())

    def resident_experts(self) -> dict[int, int]:
        """Experts now held per MoE layer."""
        return {i: len(lay.where) for i, lay in self.layers.items()}

    def close(self) -> None:
        """Stop prefetching and give the slabs back: the wrapped forwards and the modules refer to each other, so
        without this the slabs would wait for the garbage collector (opening model after model grew the process)."""
        if self._pool is not None:
            self.drop_prefetches()
            self._pool.shutdown(wait=True)
            self._pool = None
        for lay in self.layers.values():
            if lay.wrapped is not None:
                lay.wrapped.__dict__.pop("forward", None)  # transformers' own forward again
                for leaf in lay.params:
                    lay.wrapped._parameters.pop(leaf, None)
                lay.wrapped = None
            lay.slab, lay.params = {}, {}
            lay.where.clear()
