"""Generation in layers: a step generator (prefill, then draft tree -> verify -> commit), text streaming, generate().

Plain decoding and speculative decoding yield the same `StepEvent`, so callers (CLI, chat, bench)
treat them alike. Both models keep a record of the token ids their KV caches hold, so a later call
whose prompt extends the previous sequence (a chat turn) only prefills the new tokens.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass, field, fields

import torch

from offspec.config import SamplingParams
from offspec.errors import ConfigError, ContextError, ModelError
from offspec.runtime.timing import clock
from offspec.speculative.drafters import Draft, Drafter, GrowOptions, ModelDrafter, prefill, sync_cache
from offspec.speculative.sampling import TreeSampler, top_logprobs
from offspec.speculative.stats import AcceptanceStats


@dataclass(frozen=True)
class GenerationConfig:
    """One generation's settings; invalid values raise ConfigError (naming the command-line flag)."""

    max_new_tokens: int = 256
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None  # None: a random seed when sampling, reported in the stats
    min_p: float = 0.0
    repeat_penalty: float = 1.0
    repeat_last_n: int = 64
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    stop: tuple[str, ...] = ()  # stop strings (the text ends before the first one)
    logprobs: int = 0  # top-N log-probabilities of each token from the target's raw distribution (0 = off)
    budget: int | None = None  # None = auto (hardware-aware)
    spec: bool = True
    tree: str = "specexec"  # specexec: best-first growth | sequoia: DP shape
    branch: int = 8  # children per expanded node
    max_depth: int = 32
    stop_ids: tuple[int, ...] = ()  # token ids that end the text, besides the engine's end-of-text ids
    ahead: bool = True  # while a streamed target pass runs, grow the next tree from the expected leaf

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise ConfigError(f"bad --max-new-tokens {self.max_new_tokens}: must be at least 1")
        if self.tree not in TREES:
            raise ConfigError(f"bad --tree '{self.tree}': use {' or '.join(TREES)}")
        if self.logprobs < 0:
            raise ConfigError(f"bad --logprobs {self.logprobs}: must be 0 (off) or more")
        if any(not s for s in self.stop):
            raise ConfigError("bad --stop '': a stop string must not be empty")
        self.sampling  # noqa: B018 - validates the sampling parameters

    @property
    def sampling(self) -> SamplingParams:
        return SamplingParams(self.temperature, self.top_p, self.top_k, self.min_p, self.repeat_penalty,
                              self.repeat_last_n, self.presence_penalty, self.frequency_penalty)


TREES = ("specexec", "sequoia")


@dataclass
class TokenLogprob:
    """A generated token's log-probability under the target's raw distribution, and the top-N alternatives."""

    token: int
    logprob: float
    top: list[tuple[int, float]]


@dataclass
class StepEvent:
    """What one target pass (or the prefill) produced."""

    tokens: list[int]
    tree_size: int = 0
    accepted: int = 0
    target_pass_s: float = 0.0
    draft_s: float = 0.0
    streamed_bytes: int = 0
    budget: int = 0
    prefill: bool = False
    finish: str | None = None  # "stop" | "length" | None
    committed: int = 0  # tokens this pass committed within the limit, end-of-text included
    logprobs: list[TokenLogprob] = field(default_factory=list)  # one per token (when asked)
    context_full: bool = False  # finish "length" because the context has no room left
    seed: int | None = None  # the prefill event: the sampling seed in use
    ahead_started: bool = False  # a tree for the next pass was grown during this pass
    ahead_used: bool = False  # this pass verified a tree grown during the previous pass (its draft_s was hidden)
    ahead_saved_s: float = 0.0
    drafter: str = ""  # the drafter that grew this pass's tree
    # a mixture of experts: (layer, expert) pairs routed to, read from disk, found cached, prefetched, prefetches used
    experts_routed: int = 0
    experts_read: int = 0
    expert_hits: int = 0
    experts_prefetched: int = 0
    prefetch_used: int = 0


EXPERT_COUNTS = {"experts_routed": "routed", "experts_read": "reads", "expert_hits": "hits",
                 "experts_prefetched": "prefetched", "prefetch_used": "prefetch_used"}


def expert_counts(model) -> dict[str, int]:
    """The expert counts of a model's last pass, as StepEvent fields ({} for a dense model)."""
    ex = getattr(getattr(model, "stats", None), "experts", None)
    return {k: getattr(ex, v) for k, v in EXPERT_COUNTS.items()} if ex is not None else {}


@dataclass
class TextEvent:
    text: str
    step: StepEvent


@dataclass
class GenerationStats:
    """Sums over one generation (or several, merged); the per-pass and per-second figures are properties."""

    tokens: int = 0  # tokens in the answer
    committed: int = 0  # tokens the passes committed, end-of-text included (plain decoding: one per pass)
    passes: int = 0  # target decode passes
    target_s: float = 0.0  # total seconds of the target's decode passes
    draft_s: float = 0.0  # total seconds spent drafting
    decode_s: float = 0.0
    prefill_s: float = 0.0
    prefill_tokens: int = 0
    streamed_bytes: int = 0  # bytes read from disk by decode passes
    tree_nodes: int = 0  # tree nodes over all passes (1 per plain pass)
    budget_total: int = 0  # drafted-node budgets over all passes (0 per plain pass)
    finish: str = ""  # "stop" | "length" | "interrupted"
    context_full: bool = False
    seed: int | None = None  # the sampling seed (None when greedy)
    planned_bytes: int = 0  # what the memory plan holds: weights, KV cache, ring, draft
    peak_rss_bytes: int = 0  # the process's peak resident memory
    peak_device_bytes: int = 0  # peak CUDA memory allocated (0 on the CPU)
    threads: int = 0  # torch CPU threads
    drafter: str = ""  # what proposed the trees ("" = plain decoding)
    ahead_started: int = 0  # trees grown during a target pass for the pass after it
    ahead_used: int = 0  # of those, kept by verification and verified next
    ahead_saved_s: float = 0.0  # drafting seconds the used ones hid behind target passes
    trees_by_drafter: dict[str, int] = field(default_factory=dict)  # trees verified, by the drafter that grew them
    experts_routed: int = 0  # a mixture of experts, over the decode passes: (layer, expert) pairs routed to,
    experts_read: int = 0  # read from disk when routed,
    expert_hits: int = 0  # found in the expert cache (or prefetched),
    experts_prefetched: int = 0  # read ahead by the prefetch predictor,
    prefetch_used: int = 0  # and of those, routed to

    @property
    def expert_hit_rate(self) -> float:
        return self.expert_hits / self.experts_routed if self.experts_routed else 0.0

    @property
    def prefetch_accuracy(self) -> float:
        return self.prefetch_used / self.experts_prefetched if self.experts_prefetched else 0.0

    @property
    def streamed_bytes_per_token(self) -> float:
        """Bytes read from disk per committed token of the decode passes."""
        return self.streamed_bytes / self.committed if self.committed else 0.0

    @property
    def tokens_per_pass(self) -> float:
        return self.committed / self.passes if self.passes else 0.0

    @property
    def tok_per_s(self) -> float:
        return self.tokens / self.decode_s if self.decode_s > 0 else 0.0

    @property
    def target_pass_s(self) -> float:
        """Mean seconds of one target decode pass."""
        return self.target_s / self.passes if self.passes else 0.0

    @property
    def streamed_gbps(self) -> float:
        return self.streamed_bytes / self.target_s / 1e9 if self.target_s > 0 else 0.0

    @property
    def budget(self) -> float:
        """Mean tree budget per pass (0 = plain decoding)."""
        return self.budget_total / self.passes if self.passes else 0.0

    @property
    def mean_tree_size(self) -> float:
        return self.tree_nodes / self.passes if self.passes else 0.0

    def add_step(self, ev: StepEvent) -> None:
        """Count one decode event."""
        if ev.tree_size:
            self.passes += 1
            self.target_s += ev.target_pass_s
            self.draft_s += ev.draft_s
            self.streamed_bytes += ev.streamed_bytes
            self.tree_nodes += ev.tree_size
            self.budget_total += ev.budget
            self.ahead_started += int(ev.ahead_started)
            self.ahead_used += int(ev.ahead_used)
            self.ahead_saved_s += ev.ahead_saved_s
            for name in EXPERT_COUNTS:
                setattr(self, name, getattr(self, name) + getattr(ev, name))
            if ev.drafter:
                self.trees_by_drafter[ev.drafter] = self.trees_by_drafter.get(ev.drafter, 0) + 1
        self.tokens += len(ev.tokens)
        self.committed += ev.committed
        if ev.finish:
            self.finish = ev.finish
        self.context_full = self.context_full or ev.context_full

    def merge(self, other: GenerationStats) -> None:
        """Add other's sums (a chat session's turns, a benchmark's prompts); peaks take the maximum."""
        for f in fields(self):
            mine, theirs = getattr(self, f.name), getattr(other, f.name)
            if f.name.startswith("peak_") or f.name in ("planned_bytes", "threads"):
                setattr(self, f.name, max(mine, theirs))
            elif isinstance(mine, (int, float)) and not isinstance(mine, bool) and f.name != "seed":
                setattr(self, f.name, mine + theirs)
        for name, n in other.trees_by_drafter.items():
            self.trees_by_drafter[name] = self.trees_by_drafter.get(name, 0) + n
        self.finish, self.seed = other.finish or self.finish, other.seed
        self.drafter = other.drafter or self.drafter
        self.context_full = self.context_full or other.context_full

    @classmethod
    def total(cls, parts: Iterable[GenerationStats]) -> GenerationStats:
        out = cls()
        for p in parts:
            out.merge(p)
        return out

    def to_dict(self) -> dict:
        """The sums and the means, JSON-ready."""
        out = asdict(self)
        for name in ("tokens_per_pass", "tok_per_s", "target_pass_s", "streamed_gbps", "budget", "mean_tree_size",
                     "streamed_bytes_per_token", "expert_hit_rate", "prefetch_accuracy"):
            out[name] = getattr(self, name)
        return out

    @classmethod
    def from_dict(cls, d: dict) -> GenerationStats:
        return cls(**{f.name: d[f.name] for f in fields(cls) if f.name in d})


@dataclass
class GenerationResult:
    text: str
    prompt_ids: list[int]
    token_ids: list[int]
    stats: GenerationStats = field(default_factory=GenerationStats)
    logprobs: list[TokenLogprob] = field(default_factory=list)


def random_seed() -> int:
    """A fresh 32-bit seed (reported, so the run can be replayed)."""
    return int.from_bytes(os.urandom(4), "little")


def _vm_hwm_bytes() -> int:
    """VmHWM from /proc/self/status (Linux), 0 where there is none."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError):
        pass
    return 0


def peak_memory() -> tuple[int, int]:
    """(peak RSS of this process, peak CUDA memory allocated) in bytes. Linux: VmHWM, this program's own peak (the
    ru_maxrss of a process started by fork and exec also holds the peak of the process that forked it)."""
    rss = _vm_hwm_bytes()
    if not rss:
        try:
            import resource

            rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
            rss = rss if sys.platform == "darwin" else rss * 1024  # bytes on macOS, KiB on Linux
        except ImportError:  # Windows
            import psutil

            rss = psutil.Process().memory_info().rss
    device = torch.cuda.max_memory_allocated() if torch.cuda.is_available() and torch.cuda.is_initialized() else 0
    return int(rss), int(device)


class StopStrings:
    """Finds the first stop string in the text of the generated tokens, token by token."""

    def __init__(self, tokenizer, stops: tuple[str, ...]) -> None:
        if stops and tokenizer is None:
            raise ConfigError("--stop needs the model's tokenizer")
        self.tokenizer, self.stops = tokenizer, stops
        self.ids: list[int] = []
        self.tail = 4 * max((len(s) for s in stops), default=0) + 8  # tokens whose text can hold a stop string

    def push(self, token: int) -> bool:
        """Add a token; True when the text now holds a stop string."""
        self.ids.append(token)
        text = self.tokenizer.decode(self.ids[-self.tail :], skip_special_tokens=True)
        return any(s in text for s in self.stops)


class Engine:
    """Drives a target OffloadedModel and a drafter (a resident draft model, an n-gram index, a hybrid, or none).

    eos_ids: the token ids that end a text (from the tokenizer and the generation config; see loader.stop_ids).
    """

    def __init__(self, target, draft=None, tokenizer=None, budget_planner=None,
                 context_tokens: int | None = None, eos_ids: Iterable[int] = (),
                 drafter: Drafter | None = None) -> None:
        self.target, self.tokenizer = target, tokenizer
        # positions a sequence may take: the KV cache size asked for (--ctx-size), within the model's context
        self.context_tokens = min(context_tokens or target.max_context, target.max_context)
        self.eos_ids: tuple[int, ...] = tuple(sorted(set(int(i) for i in eos_ids)))
        if drafter is None and draft is not None:
            drafter = ModelDrafter(draft)
        self.drafter = drafter
        self.draft = getattr(drafter, "draft_model", None)  # the draft model, if the drafter runs one
        self.target_ids: list[int] = []  # token ids held by the target's KV cache, in order
        self.stats = AcceptanceStats()
        self.planner = budget_planner
        self._p_cache: tuple[int, list[float]] | None = None

    def check_context(self, n_prompt: int) -> None:
        limit = self.context_tokens
        if n_prompt >= limit:
            if limit < self.target.max_context:
                raise ContextError(f"prompt is {n_prompt} tokens but the context is {limit} tokens "
                                   f"(raise --ctx-size; the model allows {self.target.max_context})")
            raise ContextError(f"prompt is {n_prompt} tokens but the model's context is {limit} tokens")

    # ------------------------------------------------------------------ steps
    def steps(self, prompt_ids: list[int], cfg: GenerationConfig) -> Iterator[StepEvent]:
        """Yield one StepEvent for the prefill, then one per target pass, until a stop or max_new_tokens.

        End-of-text, stop strings and max_new_tokens are enforced here, inside a pass's accepted path too: no tree
        ever makes the answer longer than max_new_tokens.
        """
        if not prompt_ids:
            raise ModelError("empty prompt")
        self.check_context(len(prompt_ids))
        params = cfg.sampling
        seed = None if params.greedy else (cfg.seed if cfg.seed is not None else random_seed())
        drafter = self.drafter if cfg.spec else None
        budget_cap = self.context_tokens - 1
        # Prefill: everything but the last prompt token (the first root) enters the caches.
        t0 = clock(*self._devices())
        pending = sync_cache(self.target, self.target_ids, prompt_ids)
        prefill(self.target, self.target_ids, pending[:-1])
        root = pending[-1]
        if drafter is not None:
            drafter.start(list(prompt_ids))
        yield StepEvent([], prefill=True, target_pass_s=clock(*self._devices()) - t0, tree_size=len(pending) - 1,
                        seed=seed)
        produced = 0
        stop_ids = set(self.eos_ids) | set(cfg.stop_ids)
        stops = StopStrings(self.tokenizer, cfg.stop) if cfg.stop else None
        while produced < cfg.max_new_tokens:
            room = budget_cap - len(self.target_ids) - 1
            if room <= 0:
                yield StepEvent([], finish="length", context_full=True)
                return
            left = cfg.max_new_tokens - produced
            budget = self._budget(cfg, min(room, 4096)) if drafter is not None and left > 1 else 0
            sampler = TreeSampler(params, seed, self.target_ids, len(self.target_ids))  # the root sits after them
            opts = self._grow_options(cfg, min(cfg.max_depth, left - 1), sampler)
            draft = self._grow(drafter, budget, opts) if budget > 0 else None
            if draft is not None and draft.tree.size > 1:
                event, root = self._spec_step(root, draft, budget, cfg, opts, sampler, drafter)
            else:  # plain decoding, speculation that does not pay right now (0), or a drafter with nothing to propose
                event, root = self._plain_step(root, cfg, params, seed)
                if drafter is not None:
                    drafter.commit([root])  # the drafter catches up at its next tree
                    event.draft_s = draft.draft_s if draft is not None else 0.0
                    if self.planner is not None and left > 1:
                        self.planner.observe_plain(event.target_pass_s)
                        if draft is not None:  # the drafter had nothing to propose
                            self.planner.observe_empty(draft.drafter)
            cut_event(event, left, stop_ids, stops)
            produced += len(event.tokens)
            yield event
            if event.finish:
                return

    def _devices(self) -> tuple:
        """The devices whose queued work the timers wait for (runtime.timing: CUDA is asynchronous)."""
        return (getattr(self.target, "device", None), getattr(self.draft, "device", None))

    def _plain_step(self, root: int, cfg: GenerationConfig, params: SamplingParams,
                    seed: int | None) -> tuple[StepEvent, int]:
        t0 = clock(*self._devices())
        sampler = TreeSampler(params, seed, self.target_ids, len(self.target_ids))
        logits = self.target.forward(torch.tensor([[root]]), last_only=True)[0, -1]
        self.target_ids.append(root)
        tok = sampler.choose(logits, [root])
        ev = StepEvent([tok], tree_size=1, target_pass_s=clock(*self._devices()) - t0,
                       streamed_bytes=self.target.stats.streamed_bytes, **expert_counts(self.target))
        if cfg.logprobs:
            ev.logprobs = [TokenLogprob(tok, *top_logprobs(logits, tok, cfg.logprobs))]
        return ev, tok

    def _grow_options(self, cfg: GenerationConfig, max_depth: int, sampler: TreeSampler) -> GrowOptions:
        """How this step's tree grows: the draft ranks children by the target's rule and noise when that differs
        from the draft's own logits (sampling, penalties)."""
        p = tuple(self._sequoia_p(cfg.branch)) if cfg.tree == "sequoia" else ()
        rank = sampler.rank_logits if sampler.ranks_draft else None
        return GrowOptions(cfg.tree, cfg.branch, max_depth, rank, p)

    def _grow(self, drafter: Drafter, budget: int, opts: GrowOptions) -> Draft:
        """The drafter's tree for this pass."""
        t0 = clock(*self._devices())  # draft and target timed apart: the clock waits for queued device work
        draft = drafter.grow(budget, opts)
        if not draft.ahead:
            draft.draft_s = clock(*self._devices()) - t0
        return draft

    def _sequoia_p(self, width: int) -> list[float]:
        """Acceptance by child rank for Sequoia's DP: a prior until measured, then refreshed every 16 passes
        and rounded coarsely so the cached shapes are reused (the DP costs seconds at large budgets)."""
        width = max(1, width)
        if self.stats.passes < 8:
            return [round(0.5 ** (k + 1), 2) for k in range(width)]
        if self._p_cache is None or self.stats.passes - self._p_cache[0] >= 16:
            self._p_cache = (self.stats.passes, [round(x, 2) for x in self.stats.acceptance_p(width)])
        return self._p_cache[1]

    def _budget(self, cfg: GenerationConfig, room: int) -> int:
        """Drafted nodes for the next step: fixed, or the planner's choice (0 = a plain step)."""
        if self.planner is None:
            return min(cfg.budget if cfg.budget is not None else 64, room)
        name, budget = self.planner.choose(cfg.budget)
        if hasattr(self.drafter, "select"):  # several drafters: the planner picked the one that drafts this tree
            self.drafter.select(name)
        return min(budget, room)

    def _spec_step(self, root: int, draft: Draft, budget: int, cfg: GenerationConfig, opts: GrowOptions,
                   sampler: TreeSampler, drafter: Drafter) -> tuple[StepEvent, int]:
        from offspec.speculative.verify import commit_target, forward_tree, verify_tree

        ahead = False
        if cfg.ahead and getattr(self.target, "streamer", None) is not None and hasattr(drafter, "draft_ahead"):
            rank_after = None
            if opts.rank_logits is not None:  # the early tree ranks by the rule and noise of the step after its path
                def rank_after(path: list[int]):
                    committed = self.target_ids + [root] + path[:-1]
                    return TreeSampler(cfg.sampling, sampler.seed, committed, len(committed)).rank_logits
            ahead = drafter.draft_ahead(draft, budget, opts, rank_after)  # runs while the target's CPU waits on the disk
        tree = draft.tree
        t0 = clock(*self._devices())
        start = self.target.cache.length
        logits = forward_tree(self.target, tree)  # one streamed pass over the whole tree, [N, V]
        pass_s = clock(*self._devices()) - t0
        res = verify_tree(tree, lambda node, path: sampler.choose(logits[node], path))
        commit_target(self.target, start, res)
        self.target_ids.extend([root] + res.tokens[:-1])
        drafter.commit(list(res.tokens), draft, res.accepted)
        n = tree.size
        self.stats.record(res, drafted=n - 1, draft_s=draft.draft_s, target_s=pass_s)
        if self.planner is not None:
            self.planner.observe(draft, n, pass_s, len(res.accepted))
        ev = StepEvent(list(res.tokens), tree_size=n, accepted=len(res.accepted), target_pass_s=pass_s,
                       draft_s=0.0 if draft.ahead else draft.draft_s, streamed_bytes=self.target.stats.streamed_bytes,
                       budget=budget, ahead_started=ahead, ahead_used=draft.ahead, drafter=draft.drafter,
                       **expert_counts(self.target))
        if draft.ahead:
            ev.ahead_saved_s = draft.draft_s
        if cfg.logprobs:
            rows = [0, *res.accepted]  # token i was chosen from node rows[i]'s logits
            ev.logprobs = [TokenLogprob(t, *top_logprobs(logits[r], t, cfg.logprobs))
                           for r, t in zip(rows, res.tokens)]
        return ev, res.next_token

    def reset(self) -> None:
        self.target.cache.reset()
        self.target_ids.clear()
        if self.drafter is not None:
            self.drafter.reset()

    def close(self) -> None:
        """Stop the reader threads of the target and of a draft model."""
        if self.drafter is not None:
            self.drafter.close()
        if hasattr(self.target, "close"):
            self.target.close()

    @property
    def drafter_name(self) -> str:
        return self.drafter.name if self.drafter is not None else ""


def cut_event(event: StepEvent, left: int, stop_ids: set[int], stops: StopStrings | None) -> None:
    """Cut event's tokens at end-of-text (dropped), at a completed stop string, or at `left` tokens; set finish
    and the committed count (end-of-text included)."""
    toks = event.tokens
    keep, eos = len(toks), False
    for j, tok in enumerate(toks):
        if tok in stop_ids:
            keep, eos, event.finish = j, True, "stop"
            break
        if stops is not None and stops.push(tok):
            keep, event.finish = j + 1, "stop"
            break
        if j + 1 == left:
            keep, event.finish = j + 1, "length"
            break
    event.tokens = toks[:keep]
    event.logprobs = event.logprobs[:keep]
    event.committed = keep + int(eos)


# ---------------------------------------------------------------------- text layer
class TextStreamer:
    """Incremental detokenization: emits only text that is final (no half UTF-8 characters, and no text that may
    still turn out to be the start of a stop string); the final text ends before the first stop string."""

    def __init__(self, tokenizer, stops: tuple[str, ...] = ()) -> None:
        self.tokenizer = tokenizer
        self.stops = stops
        self.ids: list[int] = []
        self.emitted = 0

    def push(self, ids: list[int], final: bool = False) -> str:
        self.ids.extend(ids)
        if self.tokenizer is None:
            return ""
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        end = len(text)
        if self.stops:
            found = [i for i in (text.find(s) for s in self.stops) if i >= 0]
            if found:
                end = min(found)
            elif not final:
                end -= _held_back(text, self.stops)
        if not final and text[:end].endswith("\ufffd"):
            return ""
        out = text[self.emitted : end]
        self.emitted = max(self.emitted, end)
        return out


def _held_back(text: str, stops: tuple[str, ...]) -> int:
    """Length of the longest end of text that is the start of a stop string."""
    for n in range(min(len(text), max(len(s) for s in stops) - 1), 0, -1):
        if any(s.startswith(text[-n:]) for s in stops):
            return n
    return 0


def stream_text(engine: Engine, prompt_ids: list[int], cfg: GenerationConfig,
                stats: GenerationStats | None = None) -> Iterator[TextEvent]:
    """Yield TextEvents as tokens are committed; fills `stats` as it goes (finish "interrupted" after Ctrl-C)."""
    stats = stats if stats is not None else GenerationStats()
    plan = getattr(engine.target, "plan", None)
    stats.planned_bytes = int(getattr(plan, "device_bytes", 0) or 0)
    stats.threads = torch.get_num_threads()
    ts = TextStreamer(engine.tokenizer, cfg.stop)
    stats.drafter = engine.drafter_name if cfg.spec else ""
    t_start = time.perf_counter()
    try:
        for ev in engine.steps(prompt_ids, cfg):
            if ev.prefill:
                stats.prefill_s, stats.prefill_tokens, stats.seed = ev.target_pass_s, ev.tree_size, ev.seed
                t_start = time.perf_counter()
                continue
            stats.add_step(ev)
            stats.decode_s = time.perf_counter() - t_start
            stats.peak_rss_bytes, stats.peak_device_bytes = peak_memory()
            text = ts.push(ev.tokens, final=ev.finish is not None)
            yield TextEvent(text, ev)
    except KeyboardInterrupt:
        stats.finish = "interrupted"
        raise


def generate(engine: Engine, prompt_ids: list[int], cfg: GenerationConfig) -> GenerationResult:
    """Run to completion; return the text, the token ids, the stats (and the log-probabilities when asked)."""
    stats = GenerationStats()
    ids: list[int] = []
    parts: list[str] = []
    logprobs: list[TokenLogprob] = []
    for ev in stream_text(engine, prompt_ids, cfg, stats):
        ids.extend(ev.step.tokens)
        logprobs.extend(ev.step.logprobs)
        parts.append(ev.text)
    return GenerationResult("".join(parts), list(prompt_ids), ids, stats, logprobs)
