"""The target's pass time against tree size: measured once per store, plan and machine, cached in OFFSPEC_HOME."""

from __future__ import annotations

import hashlib
import json
import os
import platform
from pathlib import Path

import torch

from offspec.paths import home_path_for_writing, offspec_home
from offspec.runtime.timing import clock

# The one home of the measured tree sizes: the planner extrapolates past the last with its slope;
# `offspec bench` adds the larger budgets it runs.
CURVE_SIZES = (1, 16, 64, 256)


def curve_key(model) -> str:
    """Store, residency plan, page-cache policy, dtype and machine: what the pass-time curve depends on."""
    warm = bool(model.streamer and model.streamer.warm)
    parts = [str(Path(model.store_dir).resolve()), ",".join(model.plan.tiers), str(warm), str(model.dtype),
             str(getattr(model.plan, "expert_slots", 0)),
             platform.node(), platform.processor() or platform.machine(), str(os.cpu_count()),
             str(torch.get_num_threads()), str(model.device)]
    return hashlib.sha256("|".join(parts).encode()).hexdigest()[:16]


@torch.inference_mode()
def measure_pass_curve(model, sizes: tuple[int, ...] = CURVE_SIZES, prefix: int = 32,
                       seed: int = 0, experts_read: dict[int, int] | None = None) -> dict[int, float]:
    """Seconds of one forward of T tokens (after `prefix` cached tokens) for each T; leaves the cache as found.

    A mixture of experts: each T starts from an empty expert cache, so its time includes reading the union of the
    experts its T tokens route to (a tree's cost grows with that union, not only with T); `experts_read`, when
    given, receives how many expert blobs each T read."""
    experts = getattr(model, "experts", None)
    start = model.cache.length
    g = torch.Generator().manual_seed(seed)
    vocab = model.vocab_size
    limit = model.max_context - start - prefix - 1
    out: dict[int, float] = {}
    try:
        model.forward(torch.randint(0, vocab, (1, prefix), generator=g), last_only=True)
        base = model.cache.length
        for t in sizes:
            if t > limit:
                break
            ids = torch.randint(0, vocab, (1, t), generator=g)
            if experts is not None:
                experts.clear()
            t0 = clock(model.device)  # CUDA: synchronised, so the figure is the work and not its launch
            model.forward(ids)
            out[t] = clock(model.device) - t0
            if experts is not None and experts_read is not None:
                experts_read[t] = model.stats.experts.reads
            model.cache.crop(base)
    finally:
        model.cache.crop(start)
    return out


def load_or_measure_curve(model, sizes: tuple[int, ...] = CURVE_SIZES) -> dict[int, float]:
    """The cached curve for this model/plan/machine, measured once if absent."""
    path = offspec_home() / "curves" / f"{curve_key(model)}.json"
    if path.is_file():
        try:
            return {int(k): float(v) for k, v in json.loads(path.read_text())["pass_s"].items()}
        except (ValueError, KeyError, TypeError):
            pass
    curve = measure_pass_curve(model, sizes)
    if home_path_for_writing("curves", path.name, what="pass-time curves") is None:
        return curve  # a read-only OFFSPEC_HOME: measured again next time
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps({"store": str(model.store_dir), "tiers": list(model.plan.tiers), "pass_s": curve}))
    os.replace(tmp, path)
    return curve
