"""The offload throughput benchmark, measuring side: raw reads, plain and speculative streamed decoding, a peer.

One run measures, on the same model, plan and prompts: the raw read speed of what one pass streams
(preadv into one reused buffer, sampled several times through the run, interleaved with the passes,
because a virtual disk is bimodal from read to read), the target's pass time against tree size, plain
streamed decoding, speculative decoding at each tree budget, and optionally transformers + accelerate
offload as the baseline. Prefill and generation throughput are reported apart (as llama-bench does).
`run_bench` returns every figure; `bench_command` checks the output paths, runs, and hands the result
to `offspec.bench_report` to print, write JSON and draw the plot.
"""

from __future__ import annotations

import datetime as _dt
import gc
import json
import os
import platform
import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from offspec.errors import ConfigError, ModelError

DEFAULT_BUDGETS = "auto,16,64,256,1024"
PEER_MAX_NEW_TOKENS = 8  # the peer reads every offloaded weight per token: keep it short
_BUILTIN = Path(__file__).parent / "data" / "bench_prompts.json"
_CODE_HINTS = ("```", "def ", "class ", "import ", "return ", "function ", "#include", "=>", "();", "{\n", "self.")


# ---------------------------------------------------------------------- prompts
@dataclass(frozen=True)
class BenchPrompt:
    kind: str  # "code" or "prose" for the built-in set; whatever a prompts file says otherwise
    prompt: str


def guess_kind(text: str) -> str:
    """'code' if the text looks like it asks about code, else 'prose'."""
    low = text.lower()
    return "code" if any(h in low for h in _CODE_HINTS) or "python" in low else "prose"


def builtin_prompts() -> list[BenchPrompt]:
    """The built-in set: 4 code prompts, 4 prose/chat prompts."""
    return load_prompts(_BUILTIN)


def load_prompts(path: str | Path | None) -> list[BenchPrompt]:
    """Prompts from a JSON list (strings or {"kind", "prompt"} objects) or a text file (one per line)."""
    if path is None:
        return builtin_prompts()
    p = Path(path).expanduser()
    if not p.is_file():
        raise ConfigError(f"--prompts {path}: no such file")
    text = p.read_text(encoding="utf-8")
    try:
        data = json.loads(text)
    except json.JSONDecodeError:
        data = None
    if data is None:
        if p.suffix.lower() == ".json":
            raise ConfigError(f"--prompts {path}: not valid JSON")
        out = [BenchPrompt(guess_kind(line), line) for line in (s.strip() for s in text.splitlines()) if line]
    else:
        if not isinstance(data, list):
            raise ConfigError(f"--prompts {path}: expected a JSON list of strings or {{\"kind\", \"prompt\"}} objects")
        out = []
        for i, item in enumerate(data):
            if isinstance(item, str):
                out.append(BenchPrompt(guess_kind(item), item))
            elif isinstance(item, dict) and isinstance(item.get("prompt"), str):
                kind = str(item.get("kind") or guess_kind(item["prompt"])).strip().lower()
                out.append(BenchPrompt(kind, item["prompt"]))
            else:
                raise ConfigError(f"--prompts {path}: item {i} is neither a string nor an object with a \"prompt\"")
        out = [b for b in out if b.prompt.strip()]
    if not out:
        raise ConfigError(f"--prompts {path}: no prompts in it")
    return out


def prompt_ids(tokenizer, prompt: str) -> list[int]:
    """Token ids of one user turn, exactly as `offspec generate` and `chat` build them (chat template if any)."""
    from offspec.chat import encode_prompt

    return encode_prompt(tokenizer, [{"role": "user", "content": prompt}])


def parse_budgets(text: str) -> list[int | None]:
    """'auto,16,64' -> [None, 16, 64] (duplicates dropped, order kept)."""
    from offspec.config import parse_budget

    out: list[int | None] = []
    for part in str(text).split(","):
        if part.strip():
            b = parse_budget(part.strip())
            if b not in out:
                out.append(b)
    if not out:
        raise ConfigError("--budgets is empty: give e.g. auto,16,64,256")
    return out


# ---------------------------------------------------------------------- raw read bandwidth
def store_blobs(store: Path, manifest, tiers: tuple[str, ...] | None = None) -> list[tuple[Path, int]]:
    """(path, size) of every blob of the store; with tiers, only the layers the plan streams from disk."""
    from offspec.runtime.plan import DISK

    store = Path(store)
    layers = [(store / e.file, e.size) for e in manifest.layers]
    if tiers is not None:
        return [blob for blob, tier in zip(layers, tiers) if tier == DISK]
    return layers + [(store / manifest.resident.file, manifest.resident.size)]


def evict(paths) -> None:
    """Drop every given file from the page cache."""
    from offspec.runtime.streamer import drop_page_cache

    for p in paths:
        drop_page_cache(p)


def _read_all(blobs: list[tuple[Path, int]], buf) -> int:
    from offspec.runtime.streamer import read_into

    done = 0
    for path, size in blobs:
        fd = os.open(path, os.O_RDONLY)
        try:
            done += read_into(fd, buf, size)
        finally:
            os.close(fd)
    return done


def measure_read_gbps(blobs: list[tuple[Path, int]], repeats: int = 3, evict_paths=None, buffer=None,
                      cold: bool = True) -> dict:
    """Evict, then preadv each blob into one reused buffer, `repeats` times; GB/s per run, median and best.

    With cold=False nothing is evicted and one untimed read fills the page cache first (the warm figure).
    """
    from offspec.runtime.streamer import alloc_staging

    total = sum(size for _, size in blobs)
    rec = {"files": len(blobs), "bytes": total, "cold": cold, "runs_s": [], "gbps_runs": [], "gbps_median": None,
           "gbps_best": None}
    if not blobs:
        return rec
    need = max(size for _, size in blobs)
    buf = buffer if buffer is not None and buffer.numel() >= need else alloc_staging(need)
    evict_paths = list(evict_paths) if evict_paths is not None else [p for p, _ in blobs]
    if not cold:
        _read_all(blobs, buf)
    for _ in range(max(1, repeats)):
        if cold:
            evict(evict_paths)
        t0 = time.perf_counter()
        done = _read_all(blobs, buf)
        dt = time.perf_counter() - t0
        if done != total:
            raise ModelError(f"short read while measuring bandwidth ({done} of {total} bytes): the store is truncated")
        rec["runs_s"].append(dt)
        rec["gbps_runs"].append(total / dt / 1e9)
    if cold:
        evict(evict_paths)
    rec["gbps_median"] = statistics.median(rec["gbps_runs"])
    rec["gbps_best"] = max(rec["gbps_runs"])
    return rec


class ReadCeiling:
    """The raw read speed of the blobs one pass streams, sampled several times through the run.

    One read at the start is not a ceiling: a virtual disk is bimodal from read to read and the host may
    cache what the guest evicts, so a pass can then "beat" it. `sample` is called between the run's
    sections (interleaved with the passes); `summary` gives every run with when it was taken, the median,
    min, best and spread (best / min). Cold (evicted before each read) unless the run is warm.

    It reads into a buffer of its own: the streamer's staging slots hold layers prefetched for the next
    pass, and overwriting one between passes would corrupt that pass.
    """

    def __init__(self, blobs: list[tuple[Path, int]], evict_paths, cold: bool = True) -> None:
        from offspec.runtime.streamer import alloc_staging

        self.blobs, self.evict_paths, self.cold = blobs, list(evict_paths), cold
        self.buffer = alloc_staging(max(n for _, n in blobs)) if blobs else None
        self.runs: list[dict] = []

    def sample(self, when: str, repeats: int = 1) -> None:
        if not self.blobs:
            return
        rec = measure_read_gbps(self.blobs, repeats, self.evict_paths, self.buffer, cold=self.cold)
        self.runs += [{"when": when, "s": s, "gbps": g} for s, g in zip(rec["runs_s"], rec["gbps_runs"])]

    def summary(self) -> dict:
        g = [r["gbps"] for r in self.runs]
        return {"files": len(self.blobs), "bytes": sum(n for _, n in self.blobs), "cold": self.cold,
                "runs": self.runs, "gbps_runs": g, "gbps_median": statistics.median(g) if g else None,
                "gbps_min": min(g) if g else None, "gbps_best": max(g) if g else None,
                "spread": max(g) / min(g) if g and min(g) > 0 else None}


# ---------------------------------------------------------------------- pass-time curve
def curve_sizes_for(budgets: list[int | None]) -> tuple[int, ...]:
    """The planner's measured tree sizes (runtime.pass_curve.CURVE_SIZES) plus the larger budgets this run uses."""
    from offspec.runtime.pass_curve import CURVE_SIZES

    return tuple(sorted(set(CURVE_SIZES) | {b for b in budgets if b}))


def pass_time_curve(model, sizes: tuple[int, ...] | None = None, repeats: int = 3, prefix: int = 32) -> list[dict]:
    """Seconds of one target forward of T tokens after a short prefill, per T: median and best over repeats."""
    from offspec.runtime.pass_curve import CURVE_SIZES, measure_pass_curve

    sizes = sizes or CURVE_SIZES

    runs: dict[int, list[float]] = {}
    for r in range(max(1, repeats)):
        for t, s in measure_pass_curve(model, sizes, prefix=prefix, seed=r).items():
            runs.setdefault(t, []).append(s)
    streamed = model.plan.streamed_bytes_per_pass
    out = []
    for t in sizes:
        if t not in runs:
            continue
        med = statistics.median(runs[t])
        out.append({"tokens": t, "pass_s_median": med, "pass_s_best": min(runs[t]), "runs_s": runs[t],
                    "tokens_per_s": t / med, "streamed_gbps": streamed / med / 1e9 if streamed else 0.0})
    return out


DRAFT_LEVEL_ROWS = (1, 16, 64)  # rows of a draft forward: one tree level of a narrow, a middling and a wide tree


def ram_read_gbps(nbytes: int = 256 << 20, repeats: int = 5) -> float:
    """GB/s of reading memory already in use (a float sum over a touched buffer, best of `repeats`), with the
    torch threads the draft uses: what a draft forward's weights can be read at, at best."""
    import torch

    buf = torch.ones(max(1, nbytes // 4), dtype=torch.float32)
    buf.sum()
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        buf.sum()
        best = min(best, time.perf_counter() - t0)
    return buf.nbytes / best / 1e9


def draft_forward_figures(name: str, model, repeats: int = 3) -> dict:
    """A draft model's forward seconds for one tree level of T rows (after a 128-token prefix), against the time
    to read the weights a forward reads once from RAM (the limit)."""
    nbytes = model.forward_weight_bytes()
    gbps = ram_read_gbps()
    read_s = nbytes / gbps / 1e9
    levels = [{"rows": c["tokens"], "forward_s": c["pass_s_median"], "forward_s_best": c["pass_s_best"],
               "x_read": c["pass_s_median"] / read_s}
              for c in pass_time_curve(model, DRAFT_LEVEL_ROWS, repeats, prefix=128)]
    return {"drafter": name, "weight_bytes": nbytes, "ram_read_gbps": gbps, "read_s": read_s, "levels": levels}


def _draft_models(drafter) -> list[tuple[str, object]]:
    """(name, model) of the draft models behind a drafter (an auto drafter's members each)."""
    if drafter is None:
        return []
    members = getattr(drafter, "members", None)
    if members is not None:
        return [pair for m in members.values() for pair in _draft_models(m)]
    model = getattr(drafter, "draft_model", None)
    return [(drafter.name.removesuffix("+ngram"), model)] if model is not None else []


# ---------------------------------------------------------------------- decoding sections
def _aggregate(records: list[dict]) -> dict:
    """Figures of one configuration from its per-prompt records: generation (prefill excluded) and prefill apart."""
    from offspec.generate import GenerationStats

    total = GenerationStats.total(GenerationStats.from_dict(r) for r in records)
    passes = total.passes
    return {
        "prompts": len(records),
        "prefill_tokens": total.prefill_tokens,
        "prefill_s": total.prefill_s,
        "prefill_tok_per_s": total.prefill_tokens / total.prefill_s if total.prefill_s > 0 else None,
        "tokens": total.tokens,
        "passes": passes,
        "decode_s": total.decode_s,
        "tok_per_s": total.tok_per_s,
        "tokens_per_pass": total.tokens_per_pass,
        "pass_s": total.target_pass_s,
        "draft_s_per_pass": total.draft_s / passes if passes else 0.0,
        "streamed_bytes_per_pass": total.streamed_bytes / passes if passes else 0.0,
        "streamed_gbps": total.streamed_gbps,
        "mean_tree_size": total.mean_tree_size,
        "mean_budget": total.budget,
        "streamed_bytes_per_token": total.streamed_bytes_per_token,
        # a mixture of experts: experts read per pass, the expert cache's hit rate, the prefetches used (0 if dense)
        "experts_read_per_pass": total.experts_read / passes if passes else 0.0,
        "expert_hit_rate": total.expert_hit_rate,
        "prefetch_accuracy": total.prefetch_accuracy,
        "limit_tok_per_s": None,  # set by add_limits once the read ceiling is known (end of the run)
        "limit_fraction": None,
    }


def run_config(engine, prompts: list[BenchPrompt], prompt_ids: list[list[int]], cfg, evict_paths: list[Path],
               cold: bool, on_prompt: Callable[[int], None] | None = None) -> dict:
    """Generate every prompt under cfg (cache reset, store evicted when cold); figures overall and by kind."""
    from offspec.generate import generate

    records = []
    for k, (bp, ids) in enumerate(zip(prompts, prompt_ids)):
        if on_prompt is not None:
            on_prompt(k)
        engine.reset()
        if cold:
            evict(evict_paths)
        res = generate(engine, ids, cfg)
        records.append({"kind": bp.kind, "prompt": bp.prompt[:80], "prompt_tokens": len(ids),
                        **res.stats.to_dict(), "text": res.text})
    engine.reset()
    row = _aggregate(records)
    kinds = sorted({r["kind"] for r in records})
    row["by_kind"] = {kind: _aggregate([r for r in records if r["kind"] == kind]) for kind in kinds}
    row["records"] = records
    return row


# ---------------------------------------------------------------------- machine facts
def machine_info() -> dict:
    """CPU model, cores, RAM, library versions, date."""
    import psutil
    import torch
    import transformers

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    info = {
        "cpu": cpu,
        "cores_logical": os.cpu_count(),
        "cores_physical": psutil.cpu_count(logical=False),
        "torch_threads": torch.get_num_threads(),
        "ram_bytes": psutil.virtual_memory().total,
        "ram_available_bytes": psutil.virtual_memory().available,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    }
    try:
        import accelerate

        info["accelerate"] = accelerate.__version__
    except ImportError:
        info["accelerate"] = None
    return info


def _plan_info(plan, target_store: Path, draft_store: Path | None) -> dict:
    from offspec.runtime.plan import DEVICE, DISK, HOST

    return {
        "target_store": str(target_store),
        "draft_store": str(draft_store) if draft_store else None,
        "tiers": list(plan.tiers),
        "layers": {t: plan.layers(t) for t in (DEVICE, HOST, DISK)},
        "layer_bytes": list(plan.layer_bytes),
        "resident_bytes": plan.resident_bytes,
        "kv_bytes": plan.kv_bytes,
        "reserved_bytes": plan.reserved_bytes,
        "workspace_bytes": plan.workspace_bytes,
        "ring_slots": plan.ring_slots,
        "slot_bytes": plan.slot_bytes,
        "streamed_bytes_per_pass": plan.streamed_bytes_per_pass,
        "device_bytes": plan.device_bytes,
        "device_kind": plan.device_kind,
    }


def peer_budget_bytes(plan) -> int:
    """The memory offspec's plan gives the target's weights: its device budget use less KV cache, draft and
    compute workspace."""
    return int(plan.device_bytes - plan.kv_bytes - plan.reserved_bytes - plan.workspace_bytes)


# ---------------------------------------------------------------------- the run
class _Steps:
    """Where the run is: a rich progress bar on a terminal, else one timestamped status line per step."""

    def __init__(self, console, total: int, enabled: bool) -> None:
        self.console, self.enabled, self.live = console, enabled, enabled and console.is_terminal
        self.bar = None
        self.t0 = time.perf_counter()
        if self.live:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

            self.bar = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                                TimeElapsedColumn(), console=console)
            self.task = self.bar.add_task("starting", total=total)

    def __enter__(self) -> _Steps:
        if self.bar is not None:
            self.bar.start()
        return self

    def __exit__(self, *exc) -> None:
        if self.bar is not None:
            self.bar.stop()

    def __call__(self, desc: str, advance: int = 0) -> None:
        if self.bar is not None:
            self.bar.update(self.task, description=desc, advance=advance)
        elif self.enabled:
            self.console.print(f"[{time.perf_counter() - self.t0:7.1f} s] {desc}", markup=False, highlight=False,
                               style="dim")


def _open(model, draft, want_spec: bool, rc, progress: bool, ngram: bool | None = None,
          reserve_for: tuple[str, ...] = (), max_budget: int | None = None):
    """load_engine with budget_auto; if the calibrating planner cannot be built, without it (noted). max_budget: the
    largest fixed budget the run asks for (the plan holds its workspace)."""
    from offspec.loader import load_engine

    try:
        return load_engine(model, draft, spec=want_spec, rc=rc, progress=progress,
                           budget_auto=True, ngram=ngram, reserve_for=reserve_for, max_budget=max_budget), None
    except (ImportError, AttributeError) as exc:
        note = f"auto budget planner unavailable ({type(exc).__name__}: {exc}); auto = the engine's default"
        return load_engine(model, draft, spec=want_spec, rc=rc, progress=progress,
                           budget_auto=False, ngram=ngram, reserve_for=reserve_for, max_budget=max_budget), note


def _switch_drafter(loaded, base: str, hybrid: bool, rc, auto: bool) -> None:
    """Give the engine the drafter `base` (+ n-grams if hybrid) on the same target plan; close the previous one."""
    from dataclasses import replace

    from offspec.loader import open_drafter

    engine = loaded.engine
    if engine.drafter is not None:
        engine.drafter.close()
    dp = replace(loaded.plans[base], ngram=hybrid)
    engine.drafter = open_drafter(dp, engine.target, loaded.target_store, loaded.tokenizer, rc,
                                  engine.target.cache.capacity)
    engine.draft = getattr(engine.drafter, "draft_model", None)
    if auto and engine.planner is not None:
        from offspec.speculative.tree_size import make_planner

        engine.planner = make_planner(engine.target, cost=engine.drafter.cost)


def run_bench(model: str | None = None, draft: str | None = None, bits: int = 16, dtype: str = "bfloat16",
              device: str = "cpu", device_memory: str | None = None, host_memory: str | None = None,
              warm: bool = False, budgets: str = DEFAULT_BUDGETS, prompts: str | Path | None = None,
              max_new_tokens: int = 64, repeats: int = 3, peer: str | None = None, no_spec: bool = False,
              temperature: float = 0.0, peer_max_new_tokens: int = PEER_MAX_NEW_TOKENS,
              curve_sizes: tuple[int, ...] | None = None, console=None, progress: bool = True,
              drafters: str | None = None) -> dict:
    """Run every section once on one engine and return all figures as a JSON-ready dict.

    drafters: 'ngram,self,MODEL,self+ngram' compares drafters side by side on one target plan (the plan leaves
    room for the largest of them), each at every budget of `budgets`."""
    from offspec.config import RuntimeConfig
    from offspec.generate import GenerationConfig
    from offspec.peers import PEER_NAMES, run_peer
    from offspec.store.manifest import read_manifest

    GenerationConfig(max_new_tokens=max_new_tokens, temperature=temperature)  # the one check of these flags
    if repeats < 1:
        raise ConfigError(f"bad --repeats {repeats}: must be at least 1")
    if peer is not None and peer not in PEER_NAMES:
        raise ConfigError(f"unknown --peer '{peer}' (use {', '.join(PEER_NAMES)})")
    budget_list = [] if no_spec else parse_budgets(budgets)
    drafter_list: list[tuple[str, str | None, bool]] = []
    if drafters is not None:
        from offspec.loader import parse_drafters

        if no_spec or draft is not None:
            raise ConfigError("--drafters picks the drafters itself: drop --draft and --no-spec")
        drafter_list = parse_drafters(drafters)
    bench_prompts = load_prompts(prompts)
    rc = RuntimeConfig.from_flags(device, device_memory, host_memory, warm, bits, dtype)
    if console is None:
        from rich.console import Console

        console = Console(stderr=True)
    options = {"model": model, "draft": draft, "bits": bits, "dtype": dtype, "device": device,
               "device_memory": device_memory, "host_memory": host_memory, "warm": warm, "budgets": budgets,
               "prompts": str(prompts) if prompts else None, "max_new_tokens": max_new_tokens, "repeats": repeats,
               "peer": peer, "no_spec": no_spec, "temperature": temperature,
               "peer_max_new_tokens": peer_max_new_tokens, "drafters": drafters}
    notes: list[str] = []
    if progress:
        console.print(f"opening {model or 'the demo models'} (store conversion, verification and the planner's "
                      "pass-time calibration run once per store)", markup=False, highlight=False, style="dim")
    from offspec.runtime.sizing import DEFAULT_TREE_TOKENS

    max_budget = max([b for b in budget_list if b is not None] + [DEFAULT_TREE_TOKENS - 1])
    if drafter_list:
        first = drafter_list[0]
        loaded, note = _open(model, first[1], True, rc, progress, ngram=first[2] or None,
                             reserve_for=tuple(dict.fromkeys(d[1] for d in drafter_list)), max_budget=max_budget)
    else:
        loaded, note = _open(model, draft, not no_spec, rc, progress, max_budget=max_budget)
    if note:
        notes.append(note)
    engine = loaded.engine
    target = engine.target
    if budget_list and engine.drafter is None:
        notes.append("no drafter: speculative sections skipped (pass --draft)")
        budget_list = []
    manifest = read_manifest(loaded.target_store)
    plan = target.plan
    streamed_blobs = store_blobs(loaded.target_store, manifest, plan.tiers)
    all_blobs = store_blobs(loaded.target_store, manifest)
    all_paths = [p for p, _ in all_blobs]
    ids_per_prompt = [prompt_ids(loaded.tokenizer, bp.prompt) for bp in bench_prompts]
    eos = engine.eos_ids
    seed = 0 if temperature > 0 else None
    configs: list[tuple[str, object, tuple | None]] = [
        ("plain", GenerationConfig(max_new_tokens=max_new_tokens, spec=False, temperature=temperature, seed=seed),
         None)]
    for d in drafter_list or [None]:
        for b in budget_list:
            configs.append(("auto" if b is None else str(b),
                            GenerationConfig(max_new_tokens=max_new_tokens, budget=b, temperature=temperature,
                                             seed=seed), d))
    if curve_sizes is None:
        curve_sizes = curve_sizes_for(budget_list)
    n_peer = len(bench_prompts) if peer else 0
    total_steps = 2 + len(configs) * len(bench_prompts) + n_peer
    result: dict = {"machine": machine_info(), "options": options,
                    "plan": _plan_info(plan, loaded.target_store, loaded.draft_store), "notes": notes}
    try:
        with _Steps(console, total_steps, progress) as step:
            step("raw read bandwidth")
            # 1. raw reads: what one pass streams (the ceiling, sampled again between every later section)
            #    and the whole store once; warm runs read the page cache, so their ceiling is the warm read
            ceiling = ReadCeiling(streamed_blobs, all_paths, cold=not warm)
            ceiling.sample("start", repeats)
            result["read"] = {"store": measure_read_gbps(all_blobs, 1, all_paths, ceiling.buffer)}
            step("pass-time curve", 1)
            # 2. the target's pass time against tree size
            engine.reset()
            if not warm:
                evict(all_paths)
            result["curve"] = pass_time_curve(target, curve_sizes, repeats)
            engine.reset()
            ceiling.sample("after the pass-time curve")
            step("decoding", 1)
            # 3. plain decoding, then speculative decoding at each budget, each followed by a raw read
            rows = []
            current = drafter_list[0] if drafter_list else None
            measured: set[str] = set()
            result["draft_forward"] = []
            for name, cfg, d in configs:
                if d is not None and d != current:
                    _switch_drafter(loaded, d[1], d[2], rc, any(b is None for b in budget_list))
                    current = d
                for dname, dmodel in _draft_models(engine.drafter if name != "plain" else None):
                    if dname not in measured:  # 3b. each draft model's forward per tree level, once
                        measured.add(dname)
                        step(f"{dname} draft forward per level")
                        result["draft_forward"].append(draft_forward_figures(dname, dmodel, repeats))
                label = "plain decoding" if name == "plain" else f"budget {name}"
                if name != "plain" and drafter_list:
                    label = f"{engine.drafter_name} {label}"
                row = run_config(engine, bench_prompts, ids_per_prompt, cfg, all_paths, cold=not warm,
                                 on_prompt=lambda k, label=label: step(f"{label}: prompt {k + 1}/{len(bench_prompts)}",
                                                                       1 if k else 0))
                step(f"{label}: done", 1)
                ceiling.sample(f"after {label}")
                row["config"] = name
                row["drafter"] = engine.drafter_name if name != "plain" else ""
                row["spec"] = name != "plain"
                row["budget"] = None if name in ("plain", "auto") else int(name)
                rows.append(row)
            result["configs"] = rows
            result["read"]["ceiling"] = ceiling.summary()
            # 4. the peer, with the engine closed so both do not hold memory at once
            budget_bytes = peer_budget_bytes(plan)
            run_device = str(target.device)  # "auto" resolved
            # the peer computes in the dtype the target computes in (float32 on CPUs without native bf16)
            compute_dtype = str(target.dtype).removeprefix("torch.")
            source_store = loaded.target_store
            loaded.close()
            loaded = engine = target = None
            gc.collect()
            result["peer"] = None
            if peer:
                step(f"peer {peer}: loading")
                result["peer"] = run_peer(
                    source_store, [bp.kind for bp in bench_prompts], ids_per_prompt, store_dtype=dtype, compute_dtype=compute_dtype,
                    device=run_device, host_budget_bytes=rc.host_memory_bytes, budget_bytes=budget_bytes,
                    max_new=min(max(peer_max_new_tokens, 2), max(max_new_tokens, 2)), cold=not warm, eos=eos,
                    on_prompt=lambda k: step(f"peer {peer}: prompt {k + 1}/{len(bench_prompts)}", 1 if k else 0),
                    notes=notes, progress=progress)
                step(f"peer {peer}: done", 1)
    finally:
        if loaded is not None:  # on errors; after the decode sections it is already closed
            loaded.close()
    add_limits(result)
    _add_speedups(result)
    return result


def add_limits(result: dict) -> None:
    """Each configuration's limit (tok/pass x the read ceiling / bytes streamed per pass) and the fraction of it
    reached; a figure above its ceiling is flagged on the row and explained in `notes` (a measurement problem)."""
    read = result.get("read") or {}
    ceiling = (read.get("ceiling") or {}).get("gbps_best")
    read["gbps_for_limit"] = ceiling
    read["limit_basis"] = ("best of the raw " + ("cold" if (read.get("ceiling") or {}).get("cold", True) else "warm")
                           + " reads of the streamed layers, interleaved with the passes") if ceiling else None
    notes = result.setdefault("notes", [])
    for r in result.get("configs") or []:
        for row in (r, *r["by_kind"].values()):
            per_pass, tpp = row["streamed_bytes_per_pass"], row["tokens_per_pass"]
            limit = tpp * ceiling * 1e9 / per_pass if (ceiling and per_pass) else None
            row["limit_tok_per_s"] = limit
            row["limit_fraction"] = row["tok_per_s"] / limit if limit else None
            row["gbps_over_ceiling"] = bool(ceiling and per_pass and row["streamed_gbps"] > ceiling)
        over = [f"{r['limit_fraction'] * 100:.0f}% of the limit"] if (r["limit_fraction"] or 0) > 1 else []
        if r["gbps_over_ceiling"]:
            over.append(f"passes streamed {r['streamed_gbps']:.2f} GB/s")
        if over:
            notes.append(f"{r['config']}: {' and '.join(over)}, above the raw read ceiling of {ceiling:.2f} GB/s: a "
                         "measurement problem (the raw reads ran slower than the passes did: a bimodal disk or a "
                         "host-side cache), not a real speed")
    c = read.get("ceiling") or {}
    if c.get("spread") and c["spread"] > 1.5:
        notes.append(f"the raw read speed varied {c['spread']:.1f}x during the run ({c['gbps_min']:.2f}-"
                     f"{c['gbps_best']:.2f} GB/s): fractions of the limit are uncertain by as much")


def _add_speedups(result: dict) -> None:
    rows = result.get("configs") or []
    plain = next((r for r in rows if r["config"] == "plain"), None)
    peer = result.get("peer")
    for r in rows:
        r["speedup_vs_plain"] = r["tok_per_s"] / plain["tok_per_s"] if plain and plain["tok_per_s"] > 0 else None
        r["speedup_vs_peer"] = r["tok_per_s"] / peer["tok_per_s"] if peer and peer["tok_per_s"] > 0 else None
        for kind, k in r["by_kind"].items():
            p = plain["by_kind"].get(kind) if plain else None
            k["speedup_vs_plain"] = k["tok_per_s"] / p["tok_per_s"] if p and p["tok_per_s"] > 0 else None
            q = peer["by_kind"].get(kind) if peer else None
            k["speedup_vs_peer"] = k["tok_per_s"] / q["tok_per_s"] if q and q["tok_per_s"] > 0 else None
    best = max((r for r in rows if r["spec"]), key=lambda r: r["tok_per_s"], default=None)
    result["best"] = {"config": best["config"], "tok_per_s": best["tok_per_s"],
                      "speedup_vs_plain": best["speedup_vs_plain"],
                      "speedup_vs_peer": best["speedup_vs_peer"]} if best else None


def bench_command(model: str | None = None, draft: str | None = None, bits: int = 16, dtype: str = "bfloat16",
                  device: str = "cpu", device_memory: str | None = None, host_memory: str | None = None,
                  warm: bool = False, budgets: str = DEFAULT_BUDGETS, prompts: str | None = None,
                  max_new_tokens: int = 64, repeats: int = 3, peer: str | None = None, json_path: str | None = None,
                  plot_path: str | None = None, no_spec: bool = False, temperature: float = 0.0,
                  drafters: str | None = None) -> dict:
    """`offspec bench`: check the output paths, run, print the summary and tables on stderr, write --json and --plot."""
    from rich.console import Console

    from offspec import bench_report as report

    report.check_output_paths(json_path, plot_path)  # fail before the long run, not after it
    console = Console(stderr=True)
    if not console.is_terminal:  # logs and pipes: room for the whole table
        console = Console(stderr=True, width=150)
    result = run_bench(model, draft, bits, dtype, device, device_memory, host_memory, warm, budgets, prompts,
                       max_new_tokens, repeats, peer, no_spec, temperature, console=console, drafters=drafters)
    for line in report.summary_lines(result):
        console.print(line, markup=False, highlight=False)
    console.print(report.results_table(result))
    legend = report.limit_legend(result)
    if legend:
        console.print(legend, markup=False, highlight=False, soft_wrap=True)  # one line, however narrow
    console.print(report.kinds_table(result))
    if json_path:
        report.write_json(result, json_path)
        console.print(f"wrote {json_path}", markup=False)
    if plot_path:
        report.write_plot(result, plot_path)
        console.print(f"wrote {plot_path}", markup=False)
    return result
