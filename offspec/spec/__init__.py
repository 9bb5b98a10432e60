"""Speculative decoding with large draft trees: SpecExec growth, Sequoia shapes, verification, budget, stats."""

from offspec.spec.budget import expected_tokens_by_budget, expected_tokens_from_tree, interpolate_pass_s, pick_budget
from offspec.spec.sampling import SamplingParams, probs, process_logits, sample
from offspec.spec.sequoia import (
    TreeShape,
    best_expected_accepted,
    estimate_acceptance,
    expected_accepted,
    fill_tree,
    load_shapes,
    optimal_tree_shape,
    save_shapes,
)
from offspec.spec.specexec import GrowResult, advance_draft, forward_nodes, forward_pending, grow_tree
from offspec.spec.stats import AcceptanceStats
from offspec.spec.tree import DraftTree
from offspec.spec.verify import (
    VerifyResult,
    commit_target,
    forward_tree,
    verify_greedy,
    verify_sample_match,
    verify_without_replacement,
)

__all__ = [
    "AcceptanceStats",
    "DraftTree",
    "GrowResult",
    "SamplingParams",
    "TreeShape",
    "VerifyResult",
    "advance_draft",
    "best_expected_accepted",
    "commit_target",
    "estimate_acceptance",
    "expected_accepted",
    "expected_tokens_by_budget",
    "expected_tokens_from_tree",
    "fill_tree",
    "forward_nodes",
    "forward_pending",
    "forward_tree",
    "grow_tree",
    "interpolate_pass_s",
    "load_shapes",
    "optimal_tree_shape",
    "pick_budget",
    "probs",
    "process_logits",
    "sample",
    "save_shapes",
    "verify_greedy",
    "verify_sample_match",
    "verify_without_replacement",
]
