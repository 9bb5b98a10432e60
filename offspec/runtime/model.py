"""The offloaded model: transformers' own forward, with streamed decoder layers bound by per-layer hooks."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from offspec.errors import StoreError
from offspec.models.binding import LayerBinding
from offspec.models.nf4 import NF4Linear, swap_nf4_linears
from offspec.models.registry import build_skeleton, kv_layout, load_config
from offspec.runtime.device import pick_compute_dtype, resolve_device
from offspec.runtime.experts import ExpertCache, ExpertStats
from offspec.runtime.kv_cache import BatchKVCache, StaticKVCache
from offspec.runtime.masks import causal_mask, pad_mask, window_mask
from offspec.runtime.plan import DEVICE, DISK, HOST, ResidencyPlan
from offspec.runtime.sizing import DEFAULT_TREE_TOKENS, HEAD_ROWS, plan_for_store, upcast_plan
from offspec.runtime.streamer import LayerStreamer, load_blob
from offspec.store.manifest import Manifest, read_manifest, tensor_views
from offspec.transformers_contract import experts_module, run_decoder, text_config


@dataclass
class PassStats:
    """Figures of the most recent forward pass (streamed_bytes counts expert blobs read as they were routed)."""

    tokens: int = 0
    pass_s: float = 0.0
    streamed_bytes: int = 0
    wait_s: float = 0.0
    experts: ExpertStats | None = None  # a mixture of experts: experts routed, read, hit and prefetched


class OffloadedModel:
    """A decoder-only model whose layers are device-resident, host-resident or streamed from disk.

    The forward is the family's own transformers forward (its causal LM's base model): a streamed layer's
    forward pre-hook waits for its blob and binds its weights (prepared once per ring slot), its forward hook
    hands the slot back; the head (the causal LM's own forward after its base model) runs over the rows needed.
    """

    def __init__(self, store_dir: str | Path, plan: ResidencyPlan, device: torch.device | str = "cpu",
                 warm: bool = False, cache_tokens: int = 2048, manifest: Manifest | None = None,
                 config=None, static_cache: bool = False, share: OffloadedModel | None = None,
                 prepare_layer: Callable[[int, torch.nn.Module], None] | None = None,
                 expert_slots: int | dict[int, int] | None = None, expert_policy: str = "lru",
                 expert_prefetch: str | None = None) -> None:
        """share: another model of the same architecture (the target, for its low-bit self-draft) whose embeddings,
        norm, lm_head and memory-resident layers (not those of a mixture of experts) this one uses as they are.
        prepare_layer(i, layer): called on each layer this model loads into memory, right after its weights are
        bound (the self-draft quantizes it there, one layer at a time, and lets the stored bytes go).
        expert_slots: a mixture of experts' cache, in experts per MoE layer (default: the plan's, else every
        expert); expert_policy: "lru" or "lfu"; expert_prefetch: None, "previous" (the experts the next MoE layer
        routed to last time) or "gate" (the next layer's router applied early to this layer's input)."""
        self.store_dir = Path(store_dir)
        self.manifest = manifest or read_manifest(self.store_dir)
        self.config = config if config is not None else load_config(self.store_dir)
        self.device = torch.device(device)
        self.plan = plan
        self.store_dtype = self.manifest.torch_dtype
        self.dtype = pick_compute_dtype(self.store_dtype, self.device)  # activations, KV cache, matmuls
        sk = build_skeleton(self.config, self.dtype, self.device)
        self.family, self.causal_lm, self.decoder, self.layers = sk.family, sk.causal_lm, sk.decoder, sk.layers
        self._skeleton, self.head = sk, sk.head
        if self.layers is None or len(self.layers) != self.manifest.num_layers:
            raise StoreError(f"{self.store_dir}: config has {len(self.layers or ())} decoder layers, manifest "
                             f"{self.manifest.num_layers}")
        self.num_layers = len(self.layers)
        for i, entry in enumerate(self.manifest.layers):
            quant = {n: e.quant for n, e in entry.tensors.items() if e.quant is not None}
            if quant:
                swap_nf4_linears(self.layers[i], quant)
        # a mixture of experts shares no decoder layer: its experts modules are bound per call from a cache of the
        # model's own, and a draft may run (ahead, in a thread) while the target runs the same layers
        shared = set(share.memory_resident_layers()) if share is not None and not self.manifest.is_moe else set()
        self.experts: ExpertCache | None = None
        self._init_experts(expert_slots, expert_policy, warm, expert_prefetch, shared)
        self._load_resident(share)
        for i in shared:
            self.layers[i] = share.layers[i]
        self._bindings: dict[tuple[int, int], LayerBinding] = {}  # (layer, ring slot) -> prepared weights
        self._host_bufs: dict[int, torch.Tensor] = {}  # CUDA: pinned host copies of host-tier layers
        ringed: list[int] = []  # layers bound through a ring slot each pass
        for i, tier in enumerate(plan.tiers):
            if i in shared:
                continue
            if tier == DISK or (tier == HOST and self.device.type == "cuda"):
                ringed.append(i)
                if tier == HOST:
                    self._host_bufs[i] = load_blob(self.store_dir, self.manifest.layers[i], torch.device("cpu"), pin=True)
            else:
                buf = load_blob(self.store_dir, self.manifest.layers[i], self.device)
                views = self._upcast(tensor_views(self.manifest.layers[i].tensors, buf))
                LayerBinding(self.layers[i], views, self.dtype).bind()
                if prepare_layer is not None:
                    prepare_layer(i, self.layers[i])
                del buf, views
        self._check_bound(ringed)
        self.streamer: LayerStreamer | None = None
        self._slot_compute: list[torch.Tensor] | None = None
        streamed = plan.layers(DISK)
        if streamed:
            files = {i: self.store_dir / self.manifest.layers[i].file for i in streamed}
            sizes = {i: self.manifest.layers[i].size for i in streamed}
            slots = max(plan.ring_slots, 1)
            self._slot_compute = self._alloc_upcast_buffers(streamed, slots)
            self._upcast_pairs: dict[tuple[int, int], list[tuple[torch.Tensor, torch.Tensor]]] = {}
            self.streamer = LayerStreamer(files, sizes, streamed, slots, warm=warm, pin=self.device.type == "cuda",
                                          prepare=self._upcast_slot if self._slot_compute is not None else None)
        self._copier = None
        if self.device.type == "cuda" and ringed:
            from offspec.runtime.cuda import DeviceRing

            self._copier = DeviceRing(max(plan.ring_slots, 2), max(plan.layer_bytes), self.device)
        self._held: list[tuple[int, int]] = []  # (layer, slot) bound and not yet handed back
        self._streamed = 0
        for i in ringed:
            self.layers[i].register_forward_pre_hook(self._make_pre_hook(i))
            self.layers[i].register_forward_hook(self._make_post_hook(i))
        self.cache = StaticKVCache.for_layout(kv_layout(self.config), cache_tokens, self.dtype, self.device,
                                              static=static_cache)
        self.stats = PassStats()
        self._last_hidden: torch.Tensor | None = None  # normed final hidden states of the last forward

    # ------------------------------------------------------------------ experts
    def _init_experts(self, slots: int | dict[int, int] | None, policy: str, warm: bool,
                      prefetch: str | None, shared: set[int]) -> None:
        """A mixture of experts: the expert cache, and each MoE layer's experts module run over it
        (not on `shared` layers: another model's, with their experts cached there)."""
        self._expert_stats: ExpertStats | None = None  # the most recent pass's expert counts
        if not self.manifest.is_moe:
            return
        modules = {}
        for i, layer in enumerate(self.layers):
            if i in shared:
                continue
            blobs = self.manifest.layer_experts(i)
            found = experts_module(layer)
            if bool(blobs) != (found is not None):
                raise StoreError(f"{self.store_dir}: decoder layer {i} "
                                 + ("has no experts module for its expert blobs" if blobs else
                                    "routes to experts the store has no blobs of") + "; convert the model again")
            if found is not None:
                modules[i] = found
        if not modules:
            return
        if slots is None:
            slots = self.plan.expert_slots or max(m.num_experts for m in modules.values())
        self.experts = ExpertCache(self.store_dir, modules, {i: self.manifest.layer_experts(i) for i in modules},
                                   slots, self.dtype, self.device, warm=warm, policy=policy)
        from offspec.runtime.expert_prefetch import ExpertPrefetcher

        self._prefetcher = ExpertPrefetcher(self, prefetch) if prefetch else None
        hook_routed = self._prefetcher.on_routed if self._prefetcher is not None else None
        for i, m in modules.items():
            self.experts.wrap(i, self.layers[i].get_submodule(m.path), hook_routed)

    def _expert_param_ids(self) -> set[int]:
        """ids of the experts modules' parameters (bound per call from the expert cache, never from layer blobs)."""
        if not self.manifest.is_moe:
            return set()
        return {id(p) for layer in self.layers if (found := experts_module(layer)) is not None
                for p in layer.get_submodule(found.path)._parameters.values()}

    # ------------------------------------------------------------------ loading
    def _upcast(self, views: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Float tensors not in the compute dtype become compute-dtype copies (resident parts, once)."""
        return {n: (v.to(self.dtype) if v.dtype.is_floating_point and v.dtype != self.dtype
                    and not n.endswith(".absmax") else v) for n, v in views.items()}

    def _alloc_upcast_buffers(self, streamed: list[int], slots: int) -> list[torch.Tensor] | None:
        """One flat compute-dtype buffer per ring slot when streamed layers need converting (CPU only)."""
        if self.device.type != "cpu" or self.dtype == self.store_dtype:
            return None
        plans = {i: upcast_plan(self.manifest.layers[i].tensors, self.dtype) for i in streamed}
        self._upcast_offsets = {i: offsets for i, (offsets, _) in plans.items()}
        n = max(size for _, size in plans.values())
        if n == 0:
            return None
        return [torch.zeros(n, dtype=self.dtype) for _ in range(slots)]

    def _slot_views(self, layer: int, slot: int, buf: torch.Tensor) -> dict[str, torch.Tensor]:
        """Views of a layer's tensors in a ring slot; float ones to convert point into the slot's compute buffer."""
        views = tensor_views(self.manifest.layers[layer].tensors, buf)
        if self._slot_compute is not None and self.device.type == "cpu":
            flat = self._slot_compute[slot]
            for name, off in self._upcast_offsets[layer].items():
                views[name] = flat[off : off + views[name].numel()].view(views[name].shape)
        return views

    def _upcast_slot(self, layer: int, buf: torch.Tensor, slot: int) -> None:
        """In the reader thread: convert the float tensors of a freshly read slot into its compute buffer."""
        key = (layer, slot)
        if key not in self._upcast_pairs:  # computed once per (layer, slot), not per pass
            raw = tensor_views(self.manifest.layers[layer].tensors, buf)
            dst = self._slot_views(layer, slot, buf)
            self._upcast_pairs[key] = [(dst[n], raw[n]) for n in self._upcast_offsets[layer]]
        for dst, src in self._upcast_pairs[key]:
            dst.copy_(src)

    def forward_weight_bytes(self) -> int:
        """Bytes of weights one forward reads from memory: every resident layer, norm and head (each tensor once,
        low-bit layers in their kernel's layout); not the embedding table (a forward reads a row per token), not
        streamed layers (their bytes come from disk, `plan.streamed_bytes_per_pass`)."""
        from offspec.models.qlinear import QuantLinear

        seen: set[int] = set()
        total = 0
        streamed = {id(self.layers[i]) for i in self.plan.layers(DISK)} if self.streamer is not None else set()
        skip = {id(m) for layer in self.layers if id(layer) in streamed for m in layer.modules()}
        skip.add(id(self.causal_lm.get_input_embeddings()))
        for mod in list(self.decoder.modules()) + list(self.lm_head.modules()):
            if id(mod) in skip:
                continue
            if isinstance(mod, QuantLinear):
                total += mod.nbytes
                continue
            tensors = [t for t in (*mod._parameters.values(), *mod._buffers.values()) if t is not None]
            if isinstance(mod, NF4Linear):  # packed codes and block scales, as bound or repacked for the fused kernel
                packed, state = mod._fused or (mod.weight, mod.state)
                tensors += [t for t in (packed, getattr(state, "absmax", None)) if isinstance(t, torch.Tensor)]
            for t in tensors:
                if not t.is_meta and t.data_ptr() not in seen:
                    seen.add(t.data_ptr())
                    total += t.nbytes
        return total

    def memory_resident_layers(self) -> list[int]:
        """Layers whose weights this model keeps in device memory (RAM on the CPU) for good."""
        return [i for i, t in enumerate(self.plan.tiers) if t == DEVICE or (t == HOST and self.device.type != "cuda")]

    def _outside_layers(self, model: nn.Module) -> list[tuple[str, nn.Parameter]]:
        """(name, parameter) of a causal LM's parameters outside its decoder layers: embeddings, norm, head."""
        in_layers = {id(p) for layer in self.layers for p in layer.parameters()}
        return [(n, p) for n, p in model.named_parameters(remove_duplicate=False) if id(p) not in in_layers]

    def _load_resident(self, share: OffloadedModel | None = None) -> None:
        if share is not None:  # the same Parameter objects: embeddings, norm, head (everything but the layers)
            mine = dict(self._outside_layers(self.causal_lm))
            for name, p in share._outside_layers(share.causal_lm):
                if name in mine:
                    mod_name, _, leaf = name.rpartition(".")
                    (self.causal_lm.get_submodule(mod_name) if mod_name else self.causal_lm)._parameters[leaf] = p
            return
        entry = self.manifest.resident
        # views keep their blob's storage alive; upcast copies let the stored bytes go
        views = self._upcast(tensor_views(entry.tensors, load_blob(self.store_dir, entry, self.device)))
        prefix = self.causal_lm.base_model_prefix + "."
        named = {n for n, _ in self.causal_lm.named_parameters(remove_duplicate=False)}
        named |= {n for n, _ in self.causal_lm.named_buffers(remove_duplicate=False)}
        # a checkpoint saved from the base model has no prefix ("h.0...", "wte.weight" for GPT-2)
        views = {(prefix + n if n not in named and prefix + n in named else n): t for n, t in views.items()}
        try:
            LayerBinding(self.causal_lm, views, self.dtype).bind()
        except AttributeError as exc:
            raise StoreError(f"{self.store_dir}: resident blob does not fit the {self.config.model_type} "
                             f"architecture ({exc})") from None
        self._skeleton.tie_weights()

    def _check_bound(self, ringed: list[int]) -> None:
        """Every parameter outside the ring-bound layers holds real data, and every parameter of a ring-bound layer
        has its tensor in the layer's blob (a store missing a tensor fails here, not in the middle of a pass)."""
        experts = self._expert_param_ids()
        ring = {id(p) for i in ringed for p in self.layers[i].parameters()}
        for name, p in self.causal_lm.named_parameters():
            if p.is_meta and id(p) not in ring and id(p) not in experts:
                raise StoreError(f"{self.store_dir}: the store has no tensor {name}")
        for i in ringed:
            stored = self.manifest.layers[i].tensors
            for name, p in self.layers[i].named_parameters():
                if name not in stored and id(p) not in experts:
                    raise StoreError(f"{self.store_dir}: the store has no tensor {name} of decoder layer {i}")

    @property
    def lm_head(self) -> nn.Module | None:
        """The causal LM's output layer (its output embeddings), whatever the class calls it."""
        return self.causal_lm.get_output_embeddings()

    @lm_head.setter
    def lm_head(self, module: nn.Module) -> None:
        """Another output layer (the self-draft's low-bit copy of the target's); the head runs through it."""
        self.causal_lm.set_output_embeddings(module)

    @property
    def vocab_size(self) -> int:
        out = self.lm_head
        if out is None:
            return int(text_config(self.config).vocab_size)
        return int(getattr(out, "out_features", None) or out.weight.shape[0])

    @property
    def max_context(self) -> int:
        return int(getattr(text_config(self.config), "max_position_embeddings", None) or 1 << 20)

    # ------------------------------------------------------------------ streamed layers
    def _make_pre_hook(self, i: int):
        def pre_hook(_module, _args):
            slot, buf = self._fetch(i)
            self._held.append((i, slot))
            binding = self._bindings.get((i, slot))
            if binding is None:  # built once per (layer, ring slot): the slot's buffer never moves
                binding = self._bindings[(i, slot)] = LayerBinding(self.layers[i], self._slot_views(i, slot, buf),
                                                                    self.dtype)
            binding.bind()
            if self.plan.tiers[i] == DISK:
                self._streamed += self.manifest.layers[i].size
        return pre_hook

    def _make_post_hook(self, i: int):
        def post_hook(_module, _args, _out):
            self._done(*self._held.pop())
        return post_hook

    def _fetch(self, i: int) -> tuple[int, torch.Tensor]:
        """Wait for layer i's blob; (slot to hand back, the slot's buffer)."""
        if self.device.type != "cuda":
            return self.streamer.acquire(i)
        if self.plan.tiers[i] == HOST:
            return self._copier.upload(self._host_bufs[i], None, None)
        host_slot, buf = self.streamer.acquire(i)
        return self._copier.upload(buf, self.streamer, host_slot)

    def _done(self, i: int, slot: int) -> None:
        if self.device.type != "cuda":
            self.streamer.release(slot)
        else:
            self._copier.done(slot)

    # ------------------------------------------------------------------ forward
    supports_logit_rows = True

    def _masks(self, mask: torch.Tensor, q_pos: torch.Tensor, k_pos: torch.Tensor):
        """The attention_mask argument: one mask (windowed when every layer has the window), or a dict by layer type.
        q_pos [T] and k_pos [span] (a batch: [B, T] and [B, span]) are the positions of queries and cache slots."""
        def windowed(window: int | None) -> torch.Tensor:
            if window is None or k_pos.shape[-1] <= window:  # else no key can be that far back
                return mask
            return window_mask(mask, q_pos, k_pos, window)

        fam = self.family
        if fam.masks_by_layer_type:
            return {t: windowed(w) for t, w in dict(zip(fam.layer_types, fam.windows)).items()}
        return windowed(fam.windows[0] if fam.windows else None)

    @torch.inference_mode()
    def forward(self, input_ids: torch.Tensor, position_ids: torch.Tensor | None = None,
                attn_mask: torch.Tensor | None = None, last_only: bool = False,
                logit_rows: torch.Tensor | None = None, cache: StaticKVCache | None = None) -> torch.Tensor:
        """Logits [1, T, V] (float32) for input_ids [1, T]; appends the T positions to the KV cache.

        attn_mask: additive [1, 1, T, cache.length + T] (0 visible); causal when None. Sliding-window layers
        also hide keys outside their window. last_only: logits of the last position only; logit_rows: of
        those positions only (others can be had later from `logits_at` until the next forward).
        cache: another cache than the model's own (see `fork`)."""
        t0 = time.perf_counter()
        cache = self.cache if cache is None else cache
        input_ids = input_ids.to(self.device)
        t = input_ids.shape[1]
        start = cache.length
        if position_ids is None:
            position_ids = torch.arange(start, start + t, device=self.device)[None]
        position_ids = position_ids.to(self.device)
        span = cache.begin(position_ids)
        if attn_mask is None:
            attn_mask = causal_mask(start, t, self.dtype, self.device)
        masks = self._masks(pad_mask(attn_mask.to(self.device, self.dtype), span), position_ids[0],
                            cache.positions[:span])
        h, wait_s = self._run(input_ids, masks, position_ids, cache)  # [1, T, hidden], normed
        cache.advance(t)
        if last_only:
            h = h[:, -1:]
        self._last_hidden = h
        if logit_rows is not None:
            h = h[:, logit_rows]
        logits = self._logits(h)
        self.stats = PassStats(t, time.perf_counter() - t0, self._streamed, wait_s, self._expert_stats)
        return logits

    __call__ = forward

    def _run(self, input_ids: torch.Tensor, masks, position_ids: torch.Tensor, cache) -> tuple[torch.Tensor, float]:
        """The family's forward over `cache`, streamed layers bound on the way: (final normed hidden states, seconds
        spent waiting for the disk); counts the streamed bytes of the pass."""
        self._streamed = 0
        wait0 = self.streamer.stats.wait_s if self.streamer else 0.0
        if self.experts is not None:
            self.experts.begin_pass()
        try:
            h = run_decoder(self.decoder, input_ids, masks, position_ids, cache)
        finally:  # an interrupted pass must still hand its slots back, or the ring runs dry
            while self._held:
                self._done(*self._held.pop())
            if self.experts is not None:
                self.experts.drop_prefetches()
                self._streamed += self.experts.stats.bytes_read + self.experts.stats.prefetch_bytes
                self._expert_stats = self.experts.end_pass()
        return h, (self.streamer.stats.wait_s - wait0) if self.streamer else 0.0

    @torch.inference_mode()
    def forward_batch(self, input_ids: torch.Tensor, position_ids: torch.Tensor, attn_mask: torch.Tensor,
                      cache: BatchKVCache, rows: list[int], counts: list[int]) -> torch.Tensor:
        """Final hidden states [B, T, hidden] of B sequences in one pass: each streamed layer is read once for all.

        Row i of input_ids and position_ids [B, T] holds counts[i] tokens of cache row rows[i], then padding;
        attn_mask: additive [B, 1, T, S] (runtime.masks.batch_mask), S <= the span. The rows' caches advance
        by counts (keep or crop them after); `head` turns the rows that are needed into logits."""
        t0 = time.perf_counter()
        input_ids, position_ids = input_ids.to(self.device), position_ids.to(self.device)
        span = cache.begin(rows, counts, position_ids)
        masks = self._masks(pad_mask(attn_mask.to(self.device, self.dtype), span), position_ids,
                            cache.key_positions())
        h, wait_s = self._run(input_ids, masks, position_ids, cache)
        cache.advance(rows, counts)
        self.stats = PassStats(sum(counts), time.perf_counter() - t0, self._streamed, wait_s, self._expert_stats)
        return h

    @torch.inference_mode()
    def head(self, h: torch.Tensor) -> torch.Tensor:
        """Float32 logits of final hidden states h [..., hidden]: the causal LM's own head (models/registry)."""
        return self._logits(h)

    def fork(self, cache_tokens: int) -> CacheView:
        """These weights over a KV cache of their own (one per sequence when several sequences share a model)."""
        cache = StaticKVCache.for_layout(kv_layout(self.config), cache_tokens, self.dtype, self.device,
                                         static=self.cache.static)
        return CacheView(self, cache)

    def _logits(self, h: torch.Tensor) -> torch.Tensor:
        """Float32 logits [..., V] of h [..., hidden]: the head runs HEAD_ROWS rows at a time, so a wide tree never
        holds its logits twice (compute dtype and float32) as the plan's workspace assumes (runtime/sizing)."""
        flat = h.reshape(-1, h.shape[-1])
        if flat.shape[0] <= HEAD_ROWS:
            return self.head(h).float()
        first = self.head(flat[:HEAD_ROWS])  # [HEAD_ROWS, V]
        out = torch.empty(flat.shape[0], first.shape[-1], dtype=torch.float32, device=first.device)
        out[:HEAD_ROWS] = first
        del first
        for s in range(HEAD_ROWS, flat.shape[0], HEAD_ROWS):
            out[s : s + HEAD_ROWS] = self.head(flat[s : s + HEAD_ROWS])
        return out.view(*h.shape[:-1], out.shape[-1])

    @torch.inference_mode()
    def logits_at(self, rows: torch.Tensor) -> torch.Tensor:
        """Logits [R, V] (float32) of rows of the most recent forward."""
        return self._logits(self._last_hidden[0, rows])

    def reset(self) -> None:
        self.cache.reset()

    def close(self) -> None:
        if self.experts is not None:
            self.experts.close()
        if self.streamer is not None:
            self.streamer.close()
            self.streamer = None
        if self._copier is not None:  # CUDA: stop the thread that hands pinned slots back
            self._copier.close()
            self._copier = None


class CacheView:
    """A model with a KV cache of its own: `forward` runs the model over this cache; every other attribute (dtype,
    device, logits_at after this view's forward, ...) is the model's. Closing it leaves the model open."""

    def __init__(self, model: OffloadedModel, cache: StaticKVCache) -> None:
        self.model, self.cache = model, cache

    def forward(self, *args, **kwargs) -> torch.Tensor:
        return self.model.forward(*args, cache=self.cache, **kwargs)

    __call__ = forward

    def __getattr__(self, name: str):
        return getattr(self.model, name)

    def reset(self) -> None:
        self.cache.reset()

    def close(self) -> None:
        pass


def open_model(store_dir: str | Path, device: str = "cpu", device_memory_bytes: int | None = None,
               host_memory_bytes: int | None = None, reserved_bytes: int = 0, cache_tokens: int = 2048,
               warm: bool = False, verify: bool = True, ring_slots: int = 3,
               device_memory_over_min: int | None = None, static_cache: bool = False,
               expert_prefetch: str | None = None, expert_policy: str = "lru",
               tree_tokens: int = DEFAULT_TREE_TOKENS) -> OffloadedModel:
    """Open a store with a residency plan fitted to the budgets (defaults from the machine); the plan holds the
    compute workspace of passes of up to tree_tokens tokens (runtime/sizing.workspace_bytes). A mixture of experts
    caches the plan's experts per layer (`expert_policy`), read ahead by `expert_prefetch` (None, previous, gate)."""
    from offspec.runtime.memory import default_budgets

    store_dir = Path(store_dir)
    if verify:
        from offspec.store.integrity import ensure_verified

        manifest = ensure_verified(store_dir)
    else:
        manifest = read_manifest(store_dir)
    config = load_config(store_dir)  # the one architecture check
    dev = resolve_device(device)
    dev_default, host_default = default_budgets(dev)
    plan, _ = plan_for_store(
        store_dir, manifest, dev.type,
        device_memory_bytes if device_memory_bytes is not None else dev_default,
        host_memory_bytes if host_memory_bytes is not None else host_default,
        reserved_bytes, cache_tokens, ring_slots, device_memory_over_min, config=config, tree_tokens=tree_tokens,
    )
    return OffloadedModel(store_dir, plan, dev, warm=warm, cache_tokens=cache_tokens, manifest=manifest,
                          config=config, static_cache=static_cache, expert_prefetch=expert_prefetch,
                          expert_policy=expert_policy)
