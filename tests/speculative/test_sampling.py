"""Temperature, top-k and top-p processing of the target distribution."""

from __future__ import annotations

import pytest
import torch

from offspec.errors import ConfigError
from offspec.speculative.sampling import SamplingParams, probs, process_logits, sample

P = torch.tensor([0.5, 0.3, 0.15, 0.05])


def kept(params: SamplingParams) -> list[int]:
    return torch.nonzero(process_logits(P.log(), params) > float("-inf")).flatten().tolist()


def test_top_p_keeps_the_smallest_prefix_reaching_p() -> None:
    assert kept(SamplingParams(1.0, top_p=0.5)) == [0]
    assert kept(SamplingParams(1.0, top_p=0.7)) == [0, 1]
    assert kept(SamplingParams(1.0, top_p=0.81)) == [0, 1, 2]
    assert kept(SamplingParams(1.0, top_p=0.01)) == [0]
    assert probs(P.log(), SamplingParams(1.0, top_p=0.7)).tolist() == pytest.approx([0.625, 0.375, 0.0, 0.0])


def test_top_k_and_temperature() -> None:
    assert kept(SamplingParams(1.0, top_k=2)) == [0, 1]
    assert kept(SamplingParams(1.0, top_k=9)) == [0, 1, 2, 3]
    hot = probs(P.log(), SamplingParams(2.0))
    assert hot.tolist() == pytest.approx((P.sqrt() / P.sqrt().sum()).tolist())
    batch = torch.stack([P.log(), P.flip(0).log()])  # [2, V]
    assert probs(batch, SamplingParams(0.0)).tolist() == [[1, 0, 0, 0], [0, 0, 0, 1]]
    assert sample(batch, SamplingParams(0.0)).tolist() == [0, 3]
    draws = sample(P.log().expand(4000, -1), SamplingParams(1.0, top_k=2), torch.Generator().manual_seed(0))
    assert set(draws.tolist()) == {0, 1}


def test_invalid_params() -> None:
    for bad in [dict(temperature=-1.0), dict(top_p=0.0), dict(top_p=1.5), dict(top_k=-2)]:
        with pytest.raises(ConfigError):
            SamplingParams(**bad)
