"""Generation in layers: a step generator (prefill, then draft tree -> verify -> commit), text streaming, generate().

Plain decoding and speculative decoding yield the same `StepEvent`, so callers (CLI, chat, bench)
treat them alike. Both models keep a record of the token ids their KV caches hold, so a later call
whose prompt extends the previous sequence (a chat turn) only prefills the new tokens.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from typing import Iterator

import torch

from offspec.errors import ContextError, ModelError
from offspec.runtime.timing import clock
from offspec.speculative.drafters import Draft, Drafter, GrowOptions, ModelDrafter, prefill, sync_cache
from offspec.speculative.sampling import SamplingParams, sample
from offspec.speculative.stats import AcceptanceStats


@dataclass(frozen=True)
class GenerationConfig:
    max_new_tokens: int = 256
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    budget: int | None = None  # None = auto (hardware-aware)
    spec: bool = True
    tree: str = "specexec"  # specexec: best-first growth, sample-and-match | sequoia: DP shape, w/o replacement
    expand: int = 32  # draft nodes expanded per growth round
    branch: int = 8  # children per expanded node
    max_depth: int = 32
    stop_ids: tuple[int, ...] = ()
    ahead: bool = True  # while a streamed target pass runs, grow the next tree from the expected leaf


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
    context_full: bool = False  # "length" because the context (--ctx-size) is full, not max_new_tokens
    ahead_started: bool = False  # a tree for the next pass was grown during this pass
    ahead_used: bool = False  # this pass verified a tree grown during the previous pass (its draft_s was hidden)
    ahead_saved_s: float = 0.0


@dataclass
class TextEvent:
    text: str
    step: StepEvent


@dataclass
class GenerationStats:
    tokens: int = 0
    passes: int = 0
    tokens_per_pass: float = 0.0
    tok_per_s: float = 0.0
    target_pass_s: float = 0.0  # mean seconds of one decode pass of the target
    draft_s: float = 0.0  # total seconds spent drafting
    decode_s: float = 0.0
    prefill_s: float = 0.0
    prefill_tokens: int = 0
    streamed_bytes: int = 0  # bytes read from disk by decode passes
    streamed_gbps: float = 0.0
    budget: float = 0.0  # mean tree budget per pass (0 = plain decoding)
    mean_tree_size: float = 0.0
    finish: str = ""
    context_full: bool = False  # generation stopped at the context limit
    threads: int = 0  # torch CPU threads
    drafter: str = ""  # what proposed the trees ("" = plain decoding)
    ahead_started: int = 0  # trees grown during a target pass for the pass after it
    ahead_used: int = 0  # of those, kept by verification and verified next
    ahead_saved_s: float = 0.0  # drafting seconds the used ones hid behind target passes

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class GenerationResult:
    text: str
    prompt_ids: list[int]
    token_ids: list[int]
    stats: GenerationStats = field(default_factory=GenerationStats)


class Engine:
    """Drives a target OffloadedModel and a drafter (a resident draft model, an n-gram index, a hybrid, or none)."""

    def __init__(self, target, draft=None, tokenizer=None, budget_planner=None,
                 context_tokens: int | None = None, drafter: Drafter | None = None) -> None:
        self.target, self.tokenizer = target, tokenizer
        # positions a sequence may take: the KV cache size asked for (--ctx-size), within the model's context
        self.context_tokens = min(context_tokens or target.max_context, target.max_context)
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
        """Yield one StepEvent for the prefill, then one per target pass, until stop or max_new_tokens."""
        if not prompt_ids:
            raise ModelError("empty prompt")
        self.check_context(len(prompt_ids))
        gen = torch.Generator().manual_seed(cfg.seed) if cfg.seed is not None else None
        if gen is None and cfg.temperature > 0:
            gen = torch.Generator().manual_seed(int(time.time_ns() % (1 << 62)))
        params = SamplingParams(cfg.temperature, cfg.top_p, cfg.top_k)
        drafter = self.drafter if cfg.spec else None
        budget_cap = self.context_tokens - 1
        # Prefill: everything but the last prompt token (the first root) enters the caches.
        t0 = clock(*self._devices())
        pending = sync_cache(self.target, self.target_ids, prompt_ids)
        prefill(self.target, self.target_ids, pending[:-1])
        root = pending[-1]
        if drafter is not None:
            drafter.start(list(prompt_ids))
        yield StepEvent([], prefill=True, target_pass_s=clock(*self._devices()) - t0, tree_size=len(pending) - 1)
        produced = 0
        stop = set(cfg.stop_ids)
        while produced < cfg.max_new_tokens:
            room = budget_cap - len(self.target_ids) - 1
            if room <= 0:
                yield StepEvent([], finish="length", context_full=True)
                return
            budget = self._budget(cfg, min(room, 4096)) if drafter is not None else 0
            draft = self._grow(drafter, budget, cfg, params, gen) if budget > 0 else None
            if draft is not None and draft.tree.size > 1:
                event, root = self._spec_step(root, draft, budget, cfg, params, gen, drafter)
            else:  # plain decoding, speculation that does not pay right now (0), or a drafter with nothing to propose
                event, root = self._plain_step(root, params, gen)
                if drafter is not None:
                    drafter.commit([root])
                    event.draft_s = draft.draft_s if draft is not None else 0.0
                    if self.planner is not None:
                        self.planner.observe_plain(event.target_pass_s)
            # Cut at a stop token or at max_new_tokens.
            toks = event.tokens
            for j, tok in enumerate(toks):
                if tok in stop:
                    event.tokens, event.finish = toks[:j], "stop"
                    break
            if produced + len(event.tokens) >= cfg.max_new_tokens and event.finish is None:
                event.tokens = event.tokens[: cfg.max_new_tokens - produced]
                event.finish = "length"
            produced += len(event.tokens)
            yield event
            if event.finish:
                return

    def _devices(self) -> tuple:
        """The devices whose queued work the timers wait for (runtime.timing: CUDA is asynchronous)."""
        return (getattr(self.target, "device", None), getattr(self.draft, "device", None))

    def _plain_step(self, root: int, params: SamplingParams, gen) -> tuple[StepEvent, int]:
        t0 = clock(*self._devices())
        logits = self.target.forward(torch.tensor([[root]]), last_only=True)[0, -1]
        self.target_ids.append(root)
        tok = int(sample(logits, params, gen)) if params.temperature > 0 else int(logits.argmax())
        ev = StepEvent([tok], tree_size=1, target_pass_s=clock(*self._devices()) - t0,
                       streamed_bytes=self.target.stats.streamed_bytes)
        return ev, tok

    def _grow(self, drafter: Drafter, budget: int, cfg: GenerationConfig, params: SamplingParams, gen) -> Draft:
        """The drafter's tree for this pass."""
        p = tuple(self._sequoia_p(cfg.branch)) if cfg.tree == "sequoia" else ()
        opts = GrowOptions(cfg.tree, cfg.expand, cfg.branch, cfg.max_depth, params, gen, p)
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

    def _verify(self, draft: Draft, logits: torch.Tensor, cfg: GenerationConfig, params: SamplingParams, gen):
        from offspec.speculative.verify import verify_greedy, verify_sample_match, verify_without_replacement

        if params.temperature <= 0:
            return verify_greedy(draft.tree, logits)
        if cfg.tree == "sequoia" and draft.sampled:
            return verify_without_replacement(draft.tree, logits, params, gen)
        return verify_sample_match(draft.tree, logits, params, gen)  # lossless for any tree drawn apart from the target

    def _budget(self, cfg: GenerationConfig, room: int) -> int:
        """Drafted nodes for the next step: fixed, or the planner's choice (0 = a plain step)."""
        budget = cfg.budget if cfg.budget is not None else (self.planner.next_budget() if self.planner else 64)
        return min(budget, room)

    def _spec_step(self, root: int, draft: Draft, budget: int, cfg: GenerationConfig,
                   params: SamplingParams, gen, drafter: Drafter) -> tuple[StepEvent, int]:
        from offspec.speculative.verify import commit_target, forward_tree

        ahead = False
        if cfg.ahead and getattr(self.target, "streamer", None) is not None and hasattr(drafter, "draft_ahead"):
            opts = GrowOptions(cfg.tree, cfg.expand, cfg.branch, cfg.max_depth, params, gen)
            ahead = drafter.draft_ahead(draft, budget, opts)  # runs while the target's CPU waits on the disk
        t0 = clock(*self._devices())
        start = self.target.cache.length
        logits = forward_tree(self.target, draft.tree)  # one streamed pass over the whole tree, [N, V]
        pass_s = clock(*self._devices()) - t0
        res = self._verify(draft, logits, cfg, params, gen)
        commit_target(self.target, start, res)
        self.target_ids.extend([root] + res.tokens[:-1])
        drafter.commit(list(res.tokens), draft, res.accepted)
        n = draft.tree.size
        self.stats.record(res, drafted=n - 1, draft_s=draft.draft_s, target_s=pass_s)
        if self.planner is not None:
            self.planner.observe(draft, n, pass_s, len(res.accepted))
        ev = StepEvent(list(res.tokens), tree_size=n, accepted=len(res.accepted), target_pass_s=pass_s,
                       draft_s=0.0 if draft.ahead else draft.draft_s, streamed_bytes=self.target.stats.streamed_bytes,
                       budget=budget, ahead_started=ahead, ahead_used=draft.ahead)
        if draft.ahead:
            ev.ahead_saved_s = draft.draft_s
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


# ---------------------------------------------------------------------- text layer
class TextStreamer:
    """Incremental detokenization: emits only text that is final (no half UTF-8 characters)."""

    def __init__(self, tokenizer) -> None:
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self.emitted = 0

    def push(self, ids: list[int], final: bool = False) -> str:
        self.ids.extend(ids)
        if self.tokenizer is None:
            return ""
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        if not final and text.endswith("\ufffd"):
            return ""
        out = text[self.emitted :]
        self.emitted = len(text)
        return out


def stream_text(engine: Engine, prompt_ids: list[int], cfg: GenerationConfig,
                stats: GenerationStats | None = None) -> Iterator[TextEvent]:
    """Yield TextEvents as tokens are committed; fills `stats` as it goes (also when interrupted)."""
    stats = stats if stats is not None else GenerationStats()
    stats.threads = torch.get_num_threads()
    ts = TextStreamer(engine.tokenizer)
    t_start = time.perf_counter()
    budgets: list[int] = []
    stats.drafter = engine.drafter_name if cfg.spec else ""
    for ev in engine.steps(prompt_ids, cfg):
        if ev.prefill:
            stats.prefill_s, stats.prefill_tokens = ev.target_pass_s, ev.tree_size
            t_start = time.perf_counter()
            continue
        if ev.tree_size:
            stats.passes += 1
            stats.target_pass_s += ev.target_pass_s
            stats.draft_s += ev.draft_s
            stats.streamed_bytes += ev.streamed_bytes
            stats.mean_tree_size += ev.tree_size
            stats.ahead_started += int(ev.ahead_started)
            stats.ahead_used += int(ev.ahead_used)
            stats.ahead_saved_s += ev.ahead_saved_s
            budgets.append(ev.budget)
        stats.tokens += len(ev.tokens)
        stats.decode_s = time.perf_counter() - t_start
        if ev.finish:
            stats.finish = ev.finish
            stats.context_full = ev.context_full
        _finish_stats(stats, budgets)
        text = ts.push(ev.tokens, final=ev.finish is not None)
        yield TextEvent(text, ev)


def _finish_stats(stats: GenerationStats, budgets: list[int]) -> None:
    p = max(stats.passes, 1)
    stats.tokens_per_pass = stats.tokens / p
    stats.tok_per_s = stats.tokens / stats.decode_s if stats.decode_s > 0 else 0.0
    stats.budget = sum(budgets) / len(budgets) if budgets else 0.0
    stats.streamed_gbps = stats.streamed_bytes / stats.target_pass_s / 1e9 if stats.target_pass_s > 0 else 0.0


def finalize_stats(stats: GenerationStats) -> GenerationStats:
    """Turn running sums into the reported means (target_pass_s and mean_tree_size per pass)."""
    p = max(stats.passes, 1)
    out = GenerationStats(**stats.to_dict())
    out.target_pass_s = stats.target_pass_s / p
    out.mean_tree_size = stats.mean_tree_size / p
    return out


def generate(engine: Engine, prompt_ids: list[int], cfg: GenerationConfig) -> GenerationResult:
    """Run to completion; return the text, the token ids and the stats."""
    stats = GenerationStats()
    ids: list[int] = []
    parts: list[str] = []
    for ev in stream_text(engine, prompt_ids, cfg, stats):
        ids.extend(ev.step.tokens)
        parts.append(ev.text)
    return GenerationResult("".join(parts), list(prompt_ids), ids, finalize_stats(stats))
