"""Drafters: what proposes the tree a target pass verifies. One interface, several kinds.

A drafter follows the committed context (`start`, then `commit` after every pass), grows a tree rooted at the
context's last token under a node budget (`grow`), and carries its cost curve, seconds against budget, for the
budget planner (`cost`). The engine and the verification are the same for all of them:

- `ModelDrafter`: a small resident model (a separate draft, or the target's own NF4 copy), SpecExec or Sequoia trees.
- `NgramDrafter`: no model compute; continuations of the context's longest earlier match, scored by their counts.
- `HybridDrafter`: a model tree plus n-gram continuations merged into one tree under one budget; a drafted leaf
  whose context the index matches is extended without draft forwards.
"""

from __future__ import annotations

import copy
import heapq
import logging
import math
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import torch

from offspec.runtime.sizing import PREFILL_TOKENS
from offspec.speculative.ngram import MIN_N, MIN_PROB, NgramIndex, propose
from offspec.speculative.specexec import CausalLM, GrowResult, RankLogits, advance_draft, grow_tree

RankAfter = Callable[[list[int]], RankLogits | None]  # path tokens -> the ranking of the step after that path
from offspec.speculative.tree import DraftTree
from offspec.speculative.tree_size import DraftCost

log = logging.getLogger("offspec")


@dataclass(frozen=True)
class GrowOptions:
    """How a tree is grown: shape policy, expansion width, depth, and how a model draft ranks children."""

    tree: str = "specexec"  # specexec: the top-budget nodes, level by level | sequoia: DP shape (model drafters only)
    branch: int = 8
    max_depth: int = 32
    rank_logits: RankLogits | None = None  # the target's rule and noise (None: the draft's own logits)
    sequoia_p: tuple[float, ...] = ()  # acceptance by child rank for Sequoia shapes


@dataclass
class Draft:
    """A proposed tree and what it cost (any tree is verified by following the target's choice)."""

    tree: DraftTree
    draft_s: float
    rounds: int = 0  # draft model forwards (0: bookkeeping only)
    grown: GrowResult | None = None  # a model drafter's cache bookkeeping
    ngram_nodes: int = 0  # nodes the n-gram index contributed
    ahead: bool = False  # grown during the previous target pass (its draft_s was hidden behind that pass)
    drafter: str = ""  # the name of the drafter that grew it


class Drafter(Protocol):
    """What the engine needs from a drafter."""

    name: str
    cost: DraftCost

    def start(self, ids: list[int]) -> None:
        """The committed context is ids (prompt, or the whole conversation); its last token roots the next tree."""

    def grow(self, budget: int, opts: GrowOptions) -> Draft:
        """A tree of at most `budget` drafted nodes under the context's last token (root only: nothing to propose)."""

    def commit(self, tokens: list[int], draft: Draft | None = None, accepted: list[int] | None = None) -> None:
        """The context grew by tokens: a plain step's token, or a verified draft's accepted nodes + the target token."""

    def reset(self) -> None: ...

    def close(self) -> None: ...

    def fork(self, cache_tokens: int) -> Drafter:
        """A drafter of the same kind and model with state of its own (a KV cache for cache_tokens, an index), for
        another sequence drafted alongside this one."""


def common_prefix(a: list[int], b: list[int]) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


def sync_cache(model: CausalLM, held: list[int], ids: list[int], keep_last: int = 1) -> list[int]:
    """Crop model's cache to its common prefix with ids (leaving >= keep_last tokens pending); return the pending ones."""
    c = min(common_prefix(held, ids), len(ids) - keep_last)
    model.cache.crop(c)
    del held[c:]
    return ids[c:]


def prefill(model: CausalLM, held: list[int], tokens: list[int], chunk: int = PREFILL_TOKENS) -> None:
    """Run tokens through the model causally (into its cache), in chunks; logits of the last row only where the
    model offers that (an OffloadedModel), so the lm_head does not run over the whole prompt."""
    kwargs = {"last_only": True} if getattr(model, "supports_logit_rows", False) else {}
    for s in range(0, len(tokens), chunk):
        part = tokens[s : s + chunk]
        start = model.cache.length
        model.forward(torch.tensor([part]), torch.arange(start, start + len(part))[None], None, **kwargs)
        held.extend(part)


# ---------------------------------------------------------------------- model drafts
class ModelDrafter:
    """A resident draft model: SpecExec best-first growth or Sequoia shapes over its own KV cache."""

    def __init__(self, model: CausalLM, name: str = "model", shapes_path: Path | None = None) -> None:
        self.model, self.name = model, name
        self.held: list[int] = []  # token ids in the draft's KV cache
        self.pending: list[int] = []  # committed tokens not yet in it (the last one roots the next tree)
        self.cost = DraftCost()
        self.shapes = ShapeCache(shapes_path) if shapes_path is not None else None
        self._ahead: _Ahead | None = None  # growth running during the target pass
        self._ready: Draft | None = None  # a tree grown during the previous pass, kept by verification

    @property
    def draft_model(self) -> CausalLM:
        return self.model

    def start(self, ids: list[int]) -> None:
        self._drop_ready()
        pending = sync_cache(self.model, self.held, ids)
        prefill(self.model, self.held, pending[:-1])
        self.pending = pending[-1:]

    def grow(self, budget: int, opts: GrowOptions) -> Draft:
        if self._ready is not None:
            ready, self._ready = self._ready, None
            if opts.tree == "specexec":
                return self._fit(ready, budget)
            self.model.cache.crop(ready.grown.cache_start - 1)  # not wanted: its root becomes pending again
            self.pending = [self.held.pop()]
        if opts.tree == "sequoia":
            from offspec.speculative.sequoia import fill_tree, optimal_tree_shape

            if self.shapes is not None:
                self.shapes.load()
            shape = optimal_tree_shape(opts.sequoia_p or (0.5,), budget, opts.max_depth)
            if self.shapes is not None:
                self.shapes.save()
            grown = fill_tree(self.model, self.pending, shape, opts.rank_logits)
        else:
            grown = grow_tree(self.model, self.pending, budget=budget, branch=opts.branch, max_depth=opts.max_depth,
                              rank_logits=opts.rank_logits)
        self.held.extend(self.pending)
        self.pending = []
        return Draft(grown.tree, grown.draft_s, grown.rounds, grown, drafter=self.name)

    def commit(self, tokens: list[int], draft: Draft | None = None, accepted: list[int] | None = None) -> None:
        if self._ahead is not None and self._ahead.base is draft:
            self._settle_ahead(tokens, accepted or [])
            return
        self._drop_ready()
        if draft is None or draft.grown is None:
            self.pending.extend(tokens)
            return
        pending = advance_draft(self.model, draft.grown, accepted or [], tokens[-1])
        self.held.extend(tokens[: len(tokens) - len(pending)])
        self.pending = pending

    # ------------------------------------------------------------------ drafting during the target pass
    def draft_ahead(self, draft: Draft, budget: int, opts: GrowOptions, rank_after: RankAfter | None = None) -> bool:
        """Start growing, in a thread, the tree that follows draft's likeliest leaf (call right before the target
        pass that verifies draft; `commit` keeps it if verification accepts that leaf). False if not started.

        rank_after(path tokens) -> how the early tree ranks children (the target's rule and noise at the positions
        after that path), needed when opts ranks by the target's rule (sampling, penalties)."""
        if opts.tree != "specexec" or draft.grown is None or self._ahead is not None:
            return False
        if opts.rank_logits is not None and rank_after is None:
            return False
        path = draft.tree.likeliest_path()
        if not path:
            return False
        tokens = draft.tree.tokens[torch.tensor(path, dtype=torch.long, device=draft.tree.device)].tolist()
        rank = rank_after(tokens) if opts.rank_logits is not None else None
        self.model.cache.crop(draft.grown.cache_start)  # the tree's slots go: the path is appended causally instead
        job = _Ahead(draft, path, tokens)

        early_budget = budget + max(1, budget // 4)  # re-rooted at the target's token, it loses that node and siblings
        threads = max(1, torch.get_num_threads() // 2)  # the target's pass keeps the rest (per-thread setting)

        def run() -> None:
            try:
                torch.set_num_threads(threads)
                job.grown = grow_tree(self.model, tokens, budget=early_budget, branch=opts.branch,
                                      max_depth=opts.max_depth + 1, rank_logits=rank)
            except BaseException as exc:  # noqa: BLE001 - re-raised in the engine's thread
                job.error = exc

        job.thread = threading.Thread(target=run, name="offspec-draft-ahead", daemon=True)
        job.thread.start()
        self._ahead = job
        return True

    def _settle_ahead(self, tokens: list[int], accepted: list[int]) -> None:
        """Verification is done: keep the early tree if the target accepted its root's path, else drop it."""
        job, self._ahead = self._ahead, None
        job.thread.join()
        if job.error is not None:
            raise job.error
        early = job.grown
        base_start = job.base.grown.cache_start
        child = -1
        if accepted == job.path:
            kids = early.tree.children_of(0)
            match = kids[early.tree.tokens[kids] == tokens[-1]]
            child = int(match[0]) if match.numel() else -1
        slot_of = {node: s for s, node in enumerate(early.cached_nodes)}
        if child < 0 or child not in slot_of:  # missed: back to the base tree's prefix, the tokens are pending
            self.model.cache.crop(base_start)
            self.pending = list(tokens)
            return
        sub, remap = early.tree.subtree(child)
        r = remap.tolist()
        kept = [s for s, node in enumerate(early.cached_nodes) if r[node] >= 0]  # child first, then descendants
        self.model.cache.keep(early.cache_start, torch.tensor(kept, dtype=torch.long))
        self.held.extend(tokens)  # the path and the target's token (the new root) are cached now
        self.pending = []
        cached = [r[early.cached_nodes[s]] for s in kept[1:]]
        grown = GrowResult(sub, cached, early.cache_start + 1, early.rounds, early.draft_s, early.level_rows,
                           early.level_s)
        self._ready = Draft(sub, early.draft_s, early.rounds, grown, ahead=True, drafter=self.name)

    def _fit(self, ready: Draft, budget: int) -> Draft:
        """The kept early tree cut to its `budget` likeliest nodes (the draft cache keeps the slots that remain)."""
        if ready.tree.budget <= budget:
            return ready
        g = ready.grown
        keep = torch.cat([torch.zeros(1, dtype=torch.long), ready.tree.best_nodes(budget).sort().values])
        tree, remap = ready.tree.select(keep)
        r = remap.tolist()
        slots = [s for s, node in enumerate(g.cached_nodes) if r[node] >= 0]
        if slots:
            self.model.cache.keep(g.cache_start, torch.tensor(slots, dtype=torch.long))
        else:
            self.model.cache.crop(g.cache_start)
        grown = GrowResult(tree, [r[g.cached_nodes[s]] for s in slots], g.cache_start, g.rounds, g.draft_s,
                           g.level_rows, g.level_s)
        return Draft(tree, ready.draft_s, ready.rounds, grown, ahead=True, drafter=self.name)

    def _drop_ready(self) -> None:
        """Forget a kept early tree (its root stays cached); wait for a running one and undo it."""
        if self._ahead is not None:
            job, self._ahead = self._ahead, None
            job.thread.join()
            self.model.cache.crop(job.base.grown.cache_start)
        if self._ready is not None:
            self.model.cache.crop(self._ready.grown.cache_start)
            self._ready = None

    def reset(self) -> None:
        self._drop_ready()
        self.model.cache.reset()
        self.held.clear()
        self.pending = []

    def close(self) -> None:
        if hasattr(self.model, "close"):
            self.model.close()

    def fork(self, cache_tokens: int) -> ModelDrafter:
        return ModelDrafter(self.model.fork(cache_tokens), self.name, self.shapes.path if self.shapes else None)


@dataclass
class _Ahead:
    """A tree growing during the target pass from the likeliest leaf of `base`."""

    base: Draft
    path: list[int]  # base's nodes on the likeliest path
    tokens: list[int]
    thread: threading.Thread | None = None
    grown: GrowResult | None = None
    error: BaseException | None = None


class ShapeCache:
    """Sequoia shapes persisted per model pair (the acceptance vector is part of each entry's key): loaded once,
    written back when new shapes were computed; a read-only folder skips the write with one warning."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.loaded = False
        self.saved_count = -1
        self.warned = False

    def load(self) -> None:
        from offspec.speculative.sequoia import cached_shapes, load_shapes

        if self.loaded:
            return
        self.loaded = True
        try:
            if self.path.is_file():
                load_shapes(self.path)
        except (OSError, ValueError, KeyError, TypeError) as exc:
            log.warning("ignoring the unreadable Sequoia shape cache %s (%s)", self.path, exc)
        self.saved_count = cached_shapes()

    def save(self) -> None:
        from offspec.speculative.sequoia import cached_shapes, save_shapes

        if cached_shapes() == self.saved_count or self.warned:
            return
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            save_shapes(self.path)
            self.saved_count = cached_shapes()
        except OSError as exc:
            self.warned = True
            log.warning("not saving Sequoia shapes to %s (%s); they are recomputed next time",
                        self.path, exc.strerror or exc)


# ---------------------------------------------------------------------- n-gram drafts
class NgramDrafter:
    """Draft-free trees from an n-gram index over the context (and an optional datastore)."""

    def __init__(self, index: NgramIndex | None = None, min_n: int = MIN_N, name: str = "ngram",
                 min_prob: float = MIN_PROB) -> None:
        self.index = index if index is not None else NgramIndex()
        self.min_n, self.name, self.min_prob = min_n, name, min_prob
        self.cost = DraftCost()

    def start(self, ids: list[int]) -> None:
        self.index.sync(ids)

    def grow(self, budget: int, opts: GrowOptions) -> Draft:
        t0 = time.perf_counter()
        ctx = self.index.ids
        tree = DraftTree(ctx[-1], capacity=budget + 1)
        parents, tokens, scores = propose(self.index, ctx, budget, opts.max_depth, self.min_n, opts.branch, self.min_prob)
        add_levels(tree, parents, tokens, scores)
        return Draft(tree, time.perf_counter() - t0, 0, None, len(tokens), drafter=self.name)

    def commit(self, tokens: list[int], draft: Draft | None = None, accepted: list[int] | None = None) -> None:
        self.index.extend(tokens)

    def reset(self) -> None:
        self.index.truncate(0)

    def close(self) -> None:
        pass

    def fork(self, cache_tokens: int = 0) -> NgramDrafter:
        """The datastore's counts copied, the live string empty."""
        index = copy.deepcopy(self.index)
        index.truncate(0)
        return NgramDrafter(index, self.min_n, self.name, self.min_prob)


def add_levels(tree: DraftTree, parents: list[int], tokens: list[int], scores: list[float]) -> None:
    """Add drafted nodes under the root (parents index earlier nodes; -1 = the root) in one batch per depth."""
    depth: list[int] = []
    for p in parents:
        depth.append(depth[p] + 1 if p >= 0 else 1)
    where = [0] * len(parents)  # drafted node -> tree node
    for d in range(1, max(depth, default=0) + 1):
        level = [i for i in range(len(parents)) if depth[i] == d]
        par = torch.tensor([where[parents[i]] if parents[i] >= 0 else 0 for i in level], dtype=torch.long)
        idx = tree.add(par, [tokens[i] for i in level], [scores[i] for i in level]).tolist()
        for i, t in zip(level, idx):
            where[i] = t


def extend_with_ngrams(tree: DraftTree, index: NgramIndex, context: list[int], budget: int, max_depth: int,
                       min_n: int = MIN_N, branch: int = 8, min_prob: float = 0.0) -> int:
    """Add n-gram continuations to tree (root = context[-1]) until it holds `budget` drafted nodes; returns how many.

    Every node of the tree (drafted leaves included) is a starting point: its context is context + its path. New
    nodes are chosen best-first by the node's cumulative score + log(count / total), like the index's own trees,
    and never duplicate an existing child. The tree is read once and the new nodes are added one batch per depth.
    """
    room = budget - tree.budget
    if room <= 0:
        return 0
    lists = tree.lists()
    parents, tokens, depths = list(lists.parents), list(lists.tokens), list(lists.depths)
    scores = tree.logprobs.tolist()
    child_tokens: list[set[int]] = [set() for _ in tokens]
    for i, p in enumerate(parents):
        if p >= 0:
            child_tokens[p].add(tokens[i])
    tail = list(context[-index.max_n :])
    heap: list[tuple[float, int, int, int]] = []  # (-score, order, token, parent)
    paths: dict[int, list[int]] = {}
    order = 0

    def path_of(node: int) -> list[int]:
        if node not in paths:
            paths[node] = [] if node == 0 else (path_of(parents[node]) + [tokens[node]])[-index.max_n :]
        return paths[node]

    def push(node: int, base: float) -> None:
        nonlocal order
        if depths[node] >= max_depth:
            return
        _, counts = index.continuations((tail + path_of(node))[-index.max_n :], min_n)
        if not counts:
            return
        total = sum(counts.values())
        for tok, c in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))[:branch]:
            if tok not in child_tokens[node]:
                heapq.heappush(heap, (-(base + math.log(c / total)), order, tok, node))
        order += 1

    n_old = len(tokens)
    for node in range(n_old):
        push(node, scores[node])
    floor = math.log(min_prob) if min_prob > 0 else -math.inf
    while heap and len(tokens) - n_old < room:
        neg, _, tok, parent = heapq.heappop(heap)
        if -neg < floor:
            break
        if tok in child_tokens[parent]:
            continue
        node = len(tokens)
        parents.append(parent)
        tokens.append(tok)
        depths.append(depths[parent] + 1)
        scores.append(-neg)
        child_tokens.append(set())
        child_tokens[parent].add(tok)
        push(node, -neg)
    new = list(range(n_old, len(tokens)))
    where = list(range(n_old)) + [-1] * len(new)  # host node -> tree node
    for d in sorted({depths[i] for i in new}):
        level = [i for i in new if depths[i] == d]
        dev = tree.device
        idx = tree.append(torch.tensor([where[parents[i]] for i in level], dtype=torch.long, device=dev),
                          torch.tensor([tokens[i] for i in level], dtype=torch.long, device=dev),
                          torch.tensor([scores[i] for i in level], dtype=torch.float32, device=dev))
        for i, t in zip(level, idx.tolist()):
            where[i] = t
    return len(new)


class AutoDrafter:
    """Several drafters behind one: before each tree the budget planner picks the one (and the budget) with the most
    expected tokens per second (`select`), from each one's own cost curve and acceptance. Every member follows the
    committed context; the ones not drafting catch up at their next tree."""

    def __init__(self, members: list[Drafter]) -> None:
        if not members:
            raise ValueError("AutoDrafter needs at least one drafter")
        self.members: dict[str, Drafter] = {}
        for m in members:
            name, k = m.name, 2
            while name in self.members:  # two drafts of one kind: model, model-2
                name, k = f"{m.name}-{k}", k + 1
            m.name = name
            self.members[name] = m
        self.name = "auto(" + ",".join(self.members) + ")"
        self.cost = {name: m.cost for name, m in self.members.items()}
        self.current: Drafter = members[0]

    @property
    def draft_model(self) -> CausalLM | None:
        return next((m.draft_model for m in self.members.values() if hasattr(m, "draft_model")), None)

    def select(self, name: str) -> None:
        """The member that drafts the next tree (an unknown name keeps the current one)."""
        self.current = self.members.get(name, self.current)

    def start(self, ids: list[int]) -> None:
        for m in self.members.values():
            m.start(ids)

    def grow(self, budget: int, opts: GrowOptions) -> Draft:
        return self.current.grow(budget, opts)

    def draft_ahead(self, draft: Draft, budget: int, opts: GrowOptions, rank_after: RankAfter | None = None) -> bool:
        m = self.members.get(draft.drafter)
        return m.draft_ahead(draft, budget, opts, rank_after) if hasattr(m, "draft_ahead") else False

    def commit(self, tokens: list[int], draft: Draft | None = None, accepted: list[int] | None = None) -> None:
        for name, m in self.members.items():
            if draft is not None and draft.drafter == name:
                m.commit(tokens, draft, accepted)
            else:
                m.commit(tokens)

    def reset(self) -> None:
        for m in self.members.values():
            m.reset()

    def close(self) -> None:
        for m in self.members.values():
            m.close()

    def fork(self, cache_tokens: int) -> AutoDrafter:
        return AutoDrafter([m.fork(cache_tokens) for m in self.members.values()])


class HybridDrafter:
    """A model (or self) draft and an n-gram index merged into one tree under one budget.

    The model grows its share of the budget; the index then fills the rest from every node of that tree, so
    drafted leaves whose context it matches are extended without draft forwards."""

    def __init__(self, model: ModelDrafter, ngram: NgramDrafter, ngram_share: float = 0.25) -> None:
        self.model, self.ngram = model, ngram
        self.ngram_share = ngram_share
        self.name = f"{model.name}+ngram"
        self.cost = DraftCost()

    @property
    def draft_model(self) -> CausalLM:
        return self.model.model

    def start(self, ids: list[int]) -> None:
        self.model.start(ids)
        self.ngram.start(ids)

    def grow(self, budget: int, opts: GrowOptions) -> Draft:
        model_budget = max(1, budget - int(budget * self.ngram_share)) if budget > 1 else budget
        d = self.model.grow(model_budget, opts)
        t0 = time.perf_counter()
        added = extend_with_ngrams(d.tree, self.ngram.index, self.ngram.index.ids, budget, opts.max_depth,
                                   self.ngram.min_n, opts.branch, self.ngram.min_prob)
        d.draft_s += time.perf_counter() - t0
        d.ngram_nodes = added
        d.drafter = self.name
        return d

    def draft_ahead(self, draft: Draft, budget: int, opts: GrowOptions, rank_after: RankAfter | None = None) -> bool:
        model_budget = max(1, budget - int(budget * self.ngram_share)) if budget > 1 else budget
        return self.model.draft_ahead(draft, model_budget, opts, rank_after)

    def commit(self, tokens: list[int], draft: Draft | None = None, accepted: list[int] | None = None) -> None:
        self.model.commit(tokens, draft, accepted)
        self.ngram.commit(tokens)

    def reset(self) -> None:
        self.model.reset()
        self.ngram.reset()

    def close(self) -> None:
        self.model.close()

    def fork(self, cache_tokens: int) -> HybridDrafter:
        return HybridDrafter(self.model.fork(cache_tokens), self.ngram.fork(), self.ngram_share)


__all__ = ["AutoDrafter", "Draft", "Drafter", "GrowOptions", "HybridDrafter", "ModelDrafter", "NgramDrafter", "ShapeCache",
           "common_prefix", "extend_with_ngrams", "prefill", "sync_cache"]
