"""Several sequences decoded together: one streamed target pass carries every active sequence's tokens.

Each sequence runs in a slot: a row of the target's `BatchKVCache` and a drafter of its own (a fork of the
engine's). A pass gathers, for every active sequence, a chunk of its prompt to prefill, its draft tree, or its
root alone (plain decoding), runs them as one padded batch through the target (`OffloadedModel.forward_batch`:
each streamed layer is read once for all of them), then verifies and commits each sequence as `Engine.steps`
does for one. The target's choice is keyed by (seed, position, token), so each sequence's text equals what
`generate` gives for it alone, greedy or seeded, whatever else shares its passes.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from offspec.errors import ModelError
from offspec.generate import (
    Engine, GenerationConfig, GenerationStats, StepEvent, StopStrings, TextEvent, TextStreamer, TokenLogprob,
    cut_event, peak_memory, random_seed,
)
from offspec.models.registry import kv_layout
from offspec.runtime.kv_cache import BatchKVCache
from offspec.runtime.masks import batch_mask
from offspec.runtime.timing import clock
from offspec.speculative.drafters import Draft, Drafter, common_prefix
from offspec.speculative.sampling import TreeSampler, top_logprobs
from offspec.speculative.verify import TreeLogits, verify_tree

PREFILL_CHUNK = 512  # prompt tokens per pass when nothing else decodes (as `prefill` does alone)
PREFILL_BESIDE_DECODING = 64  # at least this many when other rows decode (they are padded to the widest row)
FORK_CACHE_TOKENS = 256  # first size of a forked draft cache (it grows as needed)


@dataclass
class Sequence:
    """One request decoding in a slot: what it asked for, where it stands, what it produced."""

    prompt_ids: list[int]
    cfg: GenerationConfig
    slot: int
    seed: int | None
    root: int  # the last committed token, not yet in the cache
    pending: list[int]  # prompt tokens still to prefill (the root excluded)
    stop_ids: set[int]
    stops: StopStrings | None
    text: TextStreamer
    stats: GenerationStats = field(default_factory=GenerationStats)
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprob] = field(default_factory=list)
    prefilled: bool = False
    finished: bool = False
    cancelled: bool = False
    started_s: float = field(default_factory=time.perf_counter)

    @property
    def prompt_tokens(self) -> int:
        return len(self.prompt_ids)


@dataclass
class _Slot:
    row: int
    drafter: Drafter | None
    held: list[int] = field(default_factory=list)  # token ids in the slot's cache row, in order
    seq: Sequence | None = None


@dataclass
class _Row:
    """What one sequence puts into a pass."""

    seq: Sequence
    tokens: torch.Tensor  # [T_i]
    depths: torch.Tensor  # [T_i]
    ancestors: torch.Tensor  # bool [T_i, T_i]
    kind: str  # "prefill" | "plain" | "tree"
    start: int = 0  # the row's cache length before the pass
    sampler: TreeSampler | None = None
    draft: Draft | None = None
    budget: int = 0


class BatchEngine:
    """Up to `slots` sequences over one Engine's target and drafter, stepped together (`step`: one target pass)."""

    def __init__(self, engine: Engine, slots: int) -> None:
        if slots < 1:
            raise ValueError("a batch needs at least one slot")
        self.engine, self.target = engine, engine.target
        self.context_tokens = engine.context_tokens
        t = self.target
        self.cache = BatchKVCache.for_layout(kv_layout(t.config), slots, self.context_tokens, t.dtype, t.device)
        d = engine.drafter
        self.slots = [_Slot(i, d if i == 0 or d is None else d.fork(min(self.context_tokens, FORK_CACHE_TOKENS)))
                      for i in range(slots)]
        self.passes = 0  # target passes run so far

    # ------------------------------------------------------------------ sequences
    @property
    def active(self) -> list[Sequence]:
        return [s.seq for s in self.slots if s.seq is not None]

    @property
    def free_slots(self) -> int:
        return sum(s.seq is None for s in self.slots)

    def start(self, prompt_ids: list[int], cfg: GenerationConfig) -> Sequence:
        """Put a request into a free slot (the one whose cache already holds the longest prefix of its prompt).
        ContextError when the prompt does not fit the context."""
        if not prompt_ids:
            raise ModelError("empty prompt")
        self.engine.check_context(len(prompt_ids))
        free = [s for s in self.slots if s.seq is None]
        if not free:
            raise RuntimeError("no free slot")  # the caller admits only when free_slots > 0
        slot = max(free, key=lambda s: common_prefix(s.held, prompt_ids))
        keep = min(common_prefix(slot.held, prompt_ids), len(prompt_ids) - 1)
        self.cache.crop(slot.row, keep)
        del slot.held[keep:]
        params = cfg.sampling
        seed = None if params.greedy else (cfg.seed if cfg.seed is not None else random_seed())
        stops = StopStrings(self.engine.tokenizer, cfg.stop) if cfg.stop else None
        seq = Sequence(list(prompt_ids), cfg, slot.row, seed, prompt_ids[-1], list(prompt_ids[keep:-1]),
                       set(self.engine.eos_ids) | set(cfg.stop_ids), stops, TextStreamer(self.engine.tokenizer, cfg.stop))
        seq.stats.seed, seq.stats.threads = seed, torch.get_num_threads()
        seq.stats.drafter = self.engine.drafter_name if cfg.spec and slot.drafter is not None else ""
        seq.stats.planned_bytes = int(getattr(getattr(self.target, "plan", None), "device_bytes", 0) or 0)
        seq.stats.prefill_tokens = len(seq.pending)
        try:
            if cfg.spec and slot.drafter is not None:
                slot.drafter.start(list(prompt_ids))
        except Exception:
            self._clear(slot)
            raise
        slot.seq = seq
        return seq

    def cancel(self, seq: Sequence) -> None:
        """Stop a sequence: its slot is freed before the next pass (a pass already running still carries it).
        The one call that may come from another thread than the one stepping."""
        seq.cancelled = True

    def drop_cancelled(self) -> None:
        """Free the slots of cancelled sequences (`step` does it first)."""
        for seq in self.active:
            if seq.cancelled:
                self._release(seq)

    def reset(self) -> None:
        """Forget every sequence and every slot's contents (after a pass failed in an unknown way)."""
        for slot in self.slots:
            self._clear(slot)

    def _drafter(self, seq: Sequence) -> Drafter | None:
        return self.slots[seq.slot].drafter if seq.cfg.spec else None

    def _release(self, seq: Sequence) -> None:
        """Free seq's slot; its cache row and drafter keep their contents for a later prompt with the same prefix."""
        slot = self.slots[seq.slot]
        if slot.seq is seq:
            slot.seq = None

    def _clear(self, slot: _Slot) -> None:
        """Forget a slot's contents (after a failure left its cache row or drafter in an unknown state)."""
        slot.seq = None
        slot.held.clear()
        self.cache.crop(slot.row, 0)
        if slot.drafter is not None:
            try:
                slot.drafter.reset()
            except Exception:  # noqa: BLE001 - a drafter that cannot even reset is started afresh next time
                pass

    # ------------------------------------------------------------------ one pass
    def step(self) -> list[tuple[Sequence, TextEvent | Exception]]:
        """One target pass over every active sequence: what each one produced (a TextEvent, whose step's `finish`
        ends it), or the exception that ended it. Cancelled sequences leave first and ride no pass."""
        out: list[tuple[Sequence, TextEvent | Exception]] = []
        self.drop_cancelled()
        active = self.active
        decoding = [s for s in active if not s.pending]
        drafting = [s for s in decoding if self._drafter(s) is not None]
        shared = self._shared_budget(drafting)
        rows: list[_Row] = []
        for seq in decoding:
            try:
                row = self._decode_row(seq, shared, len(drafting), out)
            except Exception as exc:  # noqa: BLE001 - one request's failure ends that request only
                self._fail(seq, exc, out)
                continue
            if row is not None:
                rows.append(row)
        width = max((len(r.tokens) for r in rows), default=0)
        chunk = PREFILL_CHUNK if width == 0 else max(PREFILL_BESIDE_DECODING, width)
        for seq in active:
            if seq.pending:
                part = torch.tensor(seq.pending[:chunk], dtype=torch.long)
                n = len(part)
                rows.append(_Row(seq, part, torch.arange(n), torch.ones(n, n, dtype=torch.bool).tril(), "prefill"))
        if not rows:
            return out
        rows.sort(key=lambda r: r.seq.slot)  # rows 0..n-1 in order: attention reads the cache without a copy
        pass_s, hidden = self._forward(rows, out)
        if hidden is None:
            return out
        tokens_in_pass = sum(len(r.tokens) for r in rows)
        plain_drafting = False
        for i, row in enumerate(rows):
            try:
                ev = self._finish_row(row, hidden[i], pass_s, tokens_in_pass)
            except Exception as exc:  # noqa: BLE001
                self._fail(row.seq, exc, out)
                continue
            if ev is not None:
                plain_drafting |= row.kind == "plain" and row.seq.cfg.spec and self._drafter(row.seq) is not None
                self._emit(row.seq, ev, out)
        planner = self.engine.planner
        if planner is not None and plain_drafting and not any(r.kind == "tree" for r in rows):
            planner.observe_plain(pass_s, tokens_in_pass)
        return out

    def _shared_budget(self, drafting: list[Sequence]) -> tuple[str, int | None] | None:
        """(drafter, drafted nodes per tree) when these sequences draft in the same pass, from the budget planner
        (budget None: every request has a fixed budget, the planner only picks the drafter; None: no planner)."""
        planner = self.engine.planner
        if planner is None or not drafting:
            return None
        if all(s.cfg.budget is not None for s in drafting):
            return planner.choose(max(1, drafting[0].cfg.budget // len(drafting)))[0], None
        return planner.choose_shared(len(drafting))

    def _decode_row(self, seq: Sequence, shared: tuple[str, int | None] | None, drafting: int,
                    out: list) -> _Row | None:
        """The sequence's draft tree (or its root alone) for this pass; None if it ended without one."""
        slot, cfg = self.slots[seq.slot], seq.cfg
        if not seq.prefilled:
            self._prefill_done(seq)
        left = cfg.max_new_tokens - seq.stats.tokens
        room = self.context_tokens - 1 - len(slot.held) - 1
        if room <= 0:  # the context is full: as Engine.steps, end without a pass
            self._emit(seq, StepEvent([], finish="length", context_full=True), out)
            return None
        drafter = self._drafter(seq)
        budget = 0
        if drafter is not None and left > 1:  # a pass's budget is split among the trees that share it
            if cfg.budget is not None:
                budget = max(1, cfg.budget // drafting)
            else:
                budget = shared[1] if shared is not None and shared[1] is not None else max(1, 64 // drafting)
            budget = min(budget, room, 4096)
            if shared is not None and hasattr(drafter, "select"):  # several drafters: the planner's pick
                drafter.select(shared[0])
        sampler = TreeSampler(cfg.sampling, seq.seed, slot.held, len(slot.held))  # the root sits after them
        start = self.cache.lengths[slot.row]
        draft = None
        if budget > 0:
            opts = self.engine._grow_options(cfg, min(cfg.max_depth, left - 1), sampler)
            draft = self.engine._grow(drafter, budget, opts)
        if draft is not None and draft.tree.size > 1:
            tree = draft.tree
            return _Row(seq, tree.tokens.cpu(), tree.depths.cpu(), tree.ancestors.cpu(), "tree", start, sampler,
                        draft, budget)
        root = torch.tensor([seq.root], dtype=torch.long)
        return _Row(seq, root, torch.zeros(1, dtype=torch.long), torch.ones(1, 1, dtype=torch.bool), "plain", start,
                    sampler, draft, budget)

    def _forward(self, rows: list[_Row], out: list) -> tuple[float, torch.Tensor | None]:
        """One target pass over the rows (padded to the widest); on a failure every sequence in it fails."""
        t = max(len(r.tokens) for r in rows)
        ids = torch.zeros(len(rows), t, dtype=torch.long)
        pos = torch.zeros(len(rows), t, dtype=torch.long)
        lengths = [self.cache.lengths[r.seq.slot] for r in rows]
        for i, (r, length) in enumerate(zip(rows, lengths)):
            ids[i, : len(r.tokens)] = r.tokens
            pos[i, : len(r.tokens)] = length + r.depths
            pos[i, len(r.tokens):] = length + int(r.depths.max())  # padding: a valid position, never read
        end = max(length + len(r.tokens) for r, length in zip(rows, lengths))  # no row sees a slot past its own
        mask = batch_mask(lengths, [r.ancestors for r in rows], t, end, self.target.dtype)
        devices = self.engine._devices()
        t0 = clock(*devices)
        try:
            hidden = self.target.forward_batch(ids, pos, mask, self.cache, [r.seq.slot for r in rows],
                                               [len(r.tokens) for r in rows])
        except Exception as exc:  # noqa: BLE001 - the pass failed for everyone in it; the server goes on
            for r in rows:
                self._fail(r.seq, exc, out)
            return 0.0, None
        self.passes += 1
        return clock(*devices) - t0, hidden

    def _finish_row(self, row: _Row, h: torch.Tensor, pass_s: float, tokens_in_pass: int) -> StepEvent | None:
        """Commit one sequence's part of the pass (h: its final hidden states [T, hidden], padding included)."""
        seq, slot, cfg = row.seq, self.slots[row.seq.slot], row.seq.cfg
        n = len(row.tokens)
        if row.kind == "prefill":
            done = seq.pending[:n]
            slot.held.extend(done)
            del seq.pending[:n]
            seq.stats.prefill_s += pass_s
            return None
        streamed = self.target.stats.streamed_bytes
        drafter = self._drafter(seq)
        if row.kind == "plain":
            logits = self.target.head(h[0])
            slot.held.append(seq.root)
            tok = row.sampler.choose(logits, [seq.root])
            ev = StepEvent([tok], tree_size=1, target_pass_s=pass_s, streamed_bytes=streamed)
            if cfg.logprobs:
                ev.logprobs = [TokenLogprob(tok, *top_logprobs(logits, tok, cfg.logprobs))]
            if drafter is not None:
                drafter.commit([tok])
                ev.draft_s = row.draft.draft_s if row.draft is not None else 0.0
            seq.root = tok
            return ev
        tree = row.draft.tree
        parents = tree.parents.cpu()
        internal = torch.unique(torch.cat([torch.zeros(1, dtype=torch.long), parents[parents >= 0]]))
        logits = TreeLogits(dict(zip(internal.tolist(), self.target.head(h[internal.to(h.device)]))),
                            lambda node: self.target.head(h[node]))
        res = verify_tree(tree, lambda node, path: row.sampler.choose(logits[node], path))
        self.cache.keep(slot.row, row.start, torch.tensor([0, *res.accepted], dtype=torch.long))
        slot.held.extend([seq.root] + res.tokens[:-1])
        drafter.commit(list(res.tokens), row.draft, res.accepted)
        self.engine.stats.record(res, drafted=n - 1, draft_s=row.draft.draft_s, target_s=pass_s)
        if self.engine.planner is not None:
            self.engine.planner.observe(row.draft, n, pass_s, len(res.accepted), pass_tokens=tokens_in_pass)
        ev = StepEvent(list(res.tokens), tree_size=n, accepted=len(res.accepted), target_pass_s=pass_s,
                       draft_s=row.draft.draft_s, streamed_bytes=streamed, budget=row.budget,
                       drafter=row.draft.drafter)
        if cfg.logprobs:
            nodes = [0, *res.accepted]  # token i was chosen from node nodes[i]'s logits
            ev.logprobs = [TokenLogprob(t, *top_logprobs(logits[r], t, cfg.logprobs)) for r, t in zip(nodes, res.tokens)]
        seq.root = res.next_token
        return ev

    def _prefill_done(self, seq: Sequence) -> None:
        seq.prefilled = True
        seq.stats.decode_s = 0.0
        seq.started_s = time.perf_counter()  # decoding time starts here, as in stream_text

    def _emit(self, seq: Sequence, ev: StepEvent, out: list) -> None:
        """Enforce the limits on ev's tokens (end-of-text, stop strings, max tokens), count it, add its text."""
        cut_event(ev, seq.cfg.max_new_tokens - seq.stats.tokens, seq.stop_ids, seq.stops)
        seq.stats.add_step(ev)
        seq.stats.decode_s = time.perf_counter() - seq.started_s
        seq.stats.peak_rss_bytes, seq.stats.peak_device_bytes = peak_memory()
        seq.token_ids.extend(ev.tokens)
        seq.logprobs.extend(ev.logprobs)
        out.append((seq, TextEvent(seq.text.push(ev.tokens, final=ev.finish is not None), ev)))
        if ev.finish:
            seq.finished = True
            self._release(seq)

    def _fail(self, seq: Sequence, exc: Exception, out: list) -> None:
        seq.finished = True
        self._clear(self.slots[seq.slot])
        out.append((seq, exc))

    def close(self) -> None:
        """Close the forked drafters (the engine's own is closed with the engine)."""
        for slot in self.slots[1:]:
            if slot.drafter is not None:
                slot.drafter.close()
