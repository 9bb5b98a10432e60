"""Speculative decoding with large draft trees: SpecExec growth, Sequoia shapes, verification, budget, stats."""

from offspec.speculative.tree_size import expected_tokens_by_budget, interpolate_pass_s, pick_budget
from offspec.speculative.sampling import SamplingParams, choose, gumbel_noise, probs, process_logits
from offspec.speculative.sequoia import (
    TreeShape,
    expected_accepted,
    fill_tree,
    load_shapes,
    optimal_tree_shape,
    save_shapes,
)
from offspec.speculative.drafters import Draft, Drafter, GrowOptions, HybridDrafter, ModelDrafter, NgramDrafter
from offspec.speculative.ngram import NgramIndex
from offspec.speculative.specexec import GrowResult, advance_draft, forward_nodes, forward_pending, grow_tree
from offspec.speculative.stats import AcceptanceStats
from offspec.speculative.tree import DraftTree
from offspec.speculative.verify import (
    VerifyResult,
    commit_target,
    forward_tree,
    verify_greedy,
    verify_tree,
)

__all__ = [
    "AcceptanceStats",
    "Draft",
    "DraftTree",
    "Drafter",
    "GrowOptions",
    "HybridDrafter",
    "ModelDrafter",
    "NgramDrafter",
    "NgramIndex",
    "GrowResult",
    "SamplingParams",
    "TreeShape",
    "VerifyResult",
    "advance_draft",
    "choose",
    "commit_target",
    "expected_accepted",
    "expected_tokens_by_budget",
    "fill_tree",
    "forward_nodes",
    "forward_pending",
    "forward_tree",
    "grow_tree",
    "gumbel_noise",
    "interpolate_pass_s",
    "load_shapes",
    "optimal_tree_shape",
    "pick_budget",
    "probs",
    "process_logits",
    "save_shapes",
    "verify_greedy",
    "verify_tree",
]
