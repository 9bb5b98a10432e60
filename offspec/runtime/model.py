"""The offloaded model: resident parts + per-layer tiers, one forward over explicit positions and a float mask."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import torch

from offspec.errors import ModelError, StoreError
from offspec.models.nf4 import assign_layer_tensors, swap_nf4_linears
from offspec.models.registry import build_skeleton, check_supported
from offspec.runtime.kv_cache import StaticKVCache
from offspec.runtime.masks import causal_mask
from offspec.runtime.device import pick_compute_dtype, resolve_device
from offspec.runtime.plan import DEVICE, DISK, HOST, ResidencyPlan
from offspec.runtime.sizing import plan_for_store, upcast_plan
from offspec.runtime.streamer import LayerStreamer, load_blob
from offspec.store.manifest import Manifest, read_manifest, tensor_views
from offspec.transformers_contract import call_layer


@dataclass
class PassStats:
    """Figures of the most recent forward pass."""

    tokens: int = 0
    pass_s: float = 0.0
    streamed_bytes: int = 0
    wait_s: float = 0.0


class OffloadedModel:
    """A decoder-only model whose layers are device-resident, host-resident or streamed from disk."""

    def __init__(self, store_dir: str | Path, plan: ResidencyPlan, device: torch.device | str = "cpu",
                 warm: bool = False, cache_tokens: int = 2048, manifest: Manifest | None = None) -> None:
        from transformers import AutoConfig

        self.store_dir = Path(store_dir)
        self.manifest = manifest or read_manifest(self.store_dir)
        self.device = torch.device(device)
        self.plan = plan
        check_supported(self.manifest.model_type)
        try:
            self.config = AutoConfig.from_pretrained(self.store_dir)
        except Exception as exc:  # noqa: BLE001 - any config failure is a model error for the user
            raise ModelError(f"{self.store_dir}: cannot read config.json ({exc})") from None
        self.store_dtype = self.manifest.torch_dtype
        self.dtype = pick_compute_dtype(self.store_dtype, self.device)  # activations, KV cache, matmuls
        sk = build_skeleton(self.config, self.dtype, self.device)
        self.embed, self.layers, self.norm, self.lm_head, self.rotary = sk.embed, sk.layers, sk.norm, sk.lm_head, sk.rotary
        self.num_layers = len(self.layers)
        if self.num_layers != self.manifest.num_layers:
            raise StoreError(f"{self.store_dir}: config has {self.num_layers} layers, manifest {self.manifest.num_layers}")
        for i, entry in enumerate(self.manifest.layers):
            quant = {n: e.quant for n, e in entry.tensors.items() if e.quant is not None}
            if quant:
                swap_nf4_linears(self.layers[i], quant)
        self._load_resident()
        for i, tier in enumerate(plan.tiers):
            if tier in (DEVICE, HOST) and not (tier == HOST and self.device.type == "cuda"):
                buf = load_blob(self.store_dir, self.manifest.layers[i], self.device)
                views = self._upcast(tensor_views(self.manifest.layers[i].tensors, buf))
                assign_layer_tensors(self.layers[i], views)
        self._host_bufs: dict[int, torch.Tensor] = {}  # CUDA: pinned host copies of host-tier layers
        if self.device.type == "cuda":
            for i in plan.layers(HOST):
                self._host_bufs[i] = load_blob(self.store_dir, self.manifest.layers[i], torch.device("cpu"), pin=True)
        self.streamer: LayerStreamer | None = None
        streamed = plan.layers(DISK)
        if streamed:
            files = {i: self.store_dir / self.manifest.layers[i].file for i in streamed}
            sizes = {i: self.manifest.layers[i].size for i in streamed}
            slots = max(plan.ring_slots, 1)
            self._slot_compute = self._alloc_upcast_buffers(streamed, slots)
            self.streamer = LayerStreamer(files, sizes, streamed, slots, warm=warm, pin=self.device.type == "cuda",
                                          prepare=self._prepare_streamed)
        self._copier = None
        if self.device.type == "cuda" and (streamed or plan.layers(HOST)):
            from offspec.runtime.cuda import DeviceRing

            self._copier = DeviceRing(max(plan.ring_slots, 2), max(plan.layer_bytes), self.device)
        head_dim = getattr(self.config, "head_dim", None) or self.config.hidden_size // self.config.num_attention_heads
        self.cache = StaticKVCache(self.num_layers, self.config.num_key_value_heads, head_dim, cache_tokens,
                                   self.dtype, self.device)
        self.stats = PassStats()
        self._last_hidden: torch.Tensor | None = None  # normed final hidden states of the last forward
        self.total_streamed_bytes = 0
        self.passes = 0

    # ------------------------------------------------------------------ loading
    def _upcast(self, views: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Float tensors not in the compute dtype become compute-dtype copies (resident parts, once)."""
        return {n: (v.to(self.dtype) if v.dtype.is_floating_point and v.dtype != self.dtype
                    and not n.endswith(".absmax") else v) for n, v in views.items()}

    def _alloc_upcast_buffers(self, streamed: list[int], slots: int) -> list[torch.Tensor] | None:
        """One flat compute-dtype buffer per ring slot when streamed layers need converting (CPU only)."""
        if self.device.type != "cpu" or self.dtype == self.store_dtype:
            return None
        self._upcast_offsets = {i: upcast_plan(self.manifest.layers[i].tensors, self.dtype) for i in streamed}
        n = max(size for _, size in self._upcast_offsets.values())
        if n == 0:
            return None
        return [torch.zeros(n, dtype=self.dtype) for _ in range(slots)]

    def _prepare_streamed(self, layer: int, buf: torch.Tensor, slot: int) -> dict[str, torch.Tensor]:
        """In the reader thread: views into the slot, float ones converted into the slot's compute buffer."""
        entries = self.manifest.layers[layer].tensors
        views = tensor_views(entries, buf)
        if self._slot_compute is None:
            return views
        offsets, _ = self._upcast_offsets[layer]  # computed once per layer, not per pass
        flat = self._slot_compute[slot]
        for name, off in offsets.items():
            v = views[name]
            dst = flat[off : off + v.numel()].view(v.shape)
            dst.copy_(v)
            views[name] = dst
        return views

    def _load_resident(self) -> None:
        entry = self.manifest.resident
        # views keep their blob's storage alive; upcast copies let the stored bytes go
        views = self._upcast(tensor_views(entry.tensors, load_blob(self.store_dir, entry, self.device)))
        parts = {"model.embed_tokens.": self.embed, "model.norm.": self.norm, "lm_head.": self.lm_head}
        for name, t in views.items():
            for prefix, mod in parts.items():
                if name.startswith(prefix):
                    assign_layer_tensors(mod, {name[len(prefix):]: t})
                    break
        if "lm_head.weight" not in views:
            if "model.embed_tokens.weight" not in views:
                raise StoreError(f"{self.store_dir}: resident blob has no embeddings")
            assign_layer_tensors(self.lm_head, {"weight": views["model.embed_tokens.weight"]})

    @property
    def vocab_size(self) -> int:
        return int(self.embed.weight.shape[0])

    @property
    def max_context(self) -> int:
        return int(getattr(self.config, "max_position_embeddings", 1 << 20))

    # ------------------------------------------------------------------ forward
    supports_logit_rows = True

    @torch.inference_mode()
    def forward(self, input_ids: torch.Tensor, position_ids: torch.Tensor | None = None,
                attn_mask: torch.Tensor | None = None, last_only: bool = False,
                logit_rows: torch.Tensor | None = None) -> torch.Tensor:
        """Logits [1, T, V] (float32) for input_ids [1, T]; appends the T positions to the KV cache.

        last_only: logits of the last position only; logit_rows: of those positions only (others can be
        had later from `logits_at` until the next forward)."""
        t0 = time.perf_counter()
        cache = self.cache
        t = input_ids.shape[1]
        cache.ensure(t)
        start = cache.length
        input_ids = input_ids.to(self.device)
        if position_ids is None:
            position_ids = torch.arange(start, start + t, device=self.device)[None]
        position_ids = position_ids.to(self.device)
        if attn_mask is None:
            attn_mask = causal_mask(start, t, self.dtype, self.device)
        attn_mask = attn_mask.to(self.device, self.dtype)
        h = self.embed(input_ids)  # [1, T, hidden]
        pos_emb = self.rotary(h, position_ids)
        streamed = 0
        wait0 = self.streamer.stats.wait_s if self.streamer else 0.0
        for i, layer in enumerate(self.layers):
            tier = self.plan.tiers[i]
            slot = None
            if tier == DISK or (tier == HOST and self.device.type == "cuda"):
                slot, views = self._fetch(i)
                assign_layer_tensors(layer, views)
                streamed += self.manifest.layers[i].size if tier == DISK else 0
            try:
                h = call_layer(layer, h, mask=attn_mask, position_ids=position_ids, position_embeddings=pos_emb,
                               cache=cache)
            finally:  # an interrupted pass must still hand its slot back, or the ring runs dry
                if slot is not None:
                    self._done(i, slot)
        cache.advance(t)
        if last_only:
            h = h[:, -1:]
        h = self.norm(h)
        self._last_hidden = h
        if logit_rows is not None:
            h = h[:, logit_rows]
        logits = self.lm_head(h).float()
        self.stats = PassStats(t, time.perf_counter() - t0, streamed,
                               (self.streamer.stats.wait_s - wait0) if self.streamer else 0.0)
        self.total_streamed_bytes += streamed
        self.passes += 1
        return logits

    __call__ = forward

    @torch.inference_mode()
    def logits_at(self, rows: torch.Tensor) -> torch.Tensor:
        """Logits [R, V] (float32) of rows of the most recent forward."""
        return self.lm_head(self._last_hidden[0, rows]).float()

    def _fetch(self, i: int) -> tuple[object, dict[str, torch.Tensor]]:
        """Wait for layer i's weights; (slot to hand back, tensors to bind)."""
        entries = self.manifest.layers[i].tensors
        if self.device.type != "cuda":
            slot, _ = self.streamer.acquire(i)
            return slot, self.streamer.prepared[slot]
        if self.plan.tiers[i] == HOST:
            slot, dev = self._copier.upload(self._host_bufs[i], None, None)
        else:
            host_slot, buf = self.streamer.acquire(i)
            slot, dev = self._copier.upload(buf, self.streamer, host_slot)
        return slot, tensor_views(entries, dev)

    def _done(self, i: int, slot: object) -> None:
        if self.device.type != "cuda":
            self.streamer.release(slot)
        else:
            self._copier.done(slot)

    def reset(self) -> None:
        self.cache.reset()

    def close(self) -> None:
        if self.streamer is not None:
            self.streamer.close()
            self.streamer = None

    def weight_bytes(self) -> int:
        return self.manifest.resident.size + sum(self.manifest.layer_bytes)


def open_model(store_dir: str | Path, device: str = "cpu", device_memory_bytes: int | None = None,
               host_memory_bytes: int | None = None, reserved_bytes: int = 0, cache_tokens: int = 2048,
               warm: bool = False, verify: bool = True, ring_slots: int = 3,
               device_memory_over_min: int | None = None) -> OffloadedModel:
    """Open a store with a residency plan fitted to the budgets (defaults from the machine)."""
    from offspec.runtime.memory import default_budgets

    store_dir = Path(store_dir)
    if verify:
        from offspec.store.integrity import ensure_verified

        manifest = ensure_verified(store_dir)
    else:
        manifest = read_manifest(store_dir)
    check_supported(manifest.model_type)
    dev = resolve_device(device)
    dev_default, host_default = default_budgets(dev)
    plan, _ = plan_for_store(
        store_dir, manifest, dev.type,
        device_memory_bytes if device_memory_bytes is not None else dev_default,
        host_memory_bytes if host_memory_bytes is not None else host_default,
        reserved_bytes, cache_tokens, ring_slots, device_memory_over_min,
    )
    return OffloadedModel(store_dir, plan, dev, warm=warm, cache_tokens=cache_tokens, manifest=manifest)


