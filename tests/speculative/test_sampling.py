"""Penalties, temperature, top-k, top-p and min-p processing; position-keyed Gumbel sampling (chi-square)."""

from __future__ import annotations

import pytest
import torch

from offspec.errors import ConfigError
from scipy.stats import chisquare

from offspec.speculative.sampling import SamplingParams, apply_penalties, choose, gumbel_noise, probs, process_logits

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
    assert choose(batch, SamplingParams(0.0), 0, [5, 5]).tolist() == [0, 3]
    draws = torch.cat([choose(P.log()[None], SamplingParams(1.0, top_k=2), seed, [3]) for seed in range(400)])
    assert set(draws.tolist()) == {0, 1}


def test_invalid_params() -> None:
    nan, inf = float("nan"), float("inf")
    for bad in [dict(temperature=-1.0), dict(top_p=0.0), dict(top_p=1.5), dict(top_k=-2), dict(temperature=nan),
                dict(temperature=inf), dict(top_p=nan), dict(min_p=1.0), dict(min_p=-0.1), dict(repeat_penalty=0.0),
                dict(repeat_penalty=nan), dict(presence_penalty=nan), dict(frequency_penalty=inf),
                dict(repeat_last_n=-2)]:
        with pytest.raises(ConfigError):
            SamplingParams(**bad)


def test_min_p_keeps_tokens_within_a_factor_of_the_likeliest() -> None:
    assert kept(SamplingParams(1.0, min_p=0.5)) == [0, 1]  # 0.3 >= 0.25, 0.15 < 0.25
    assert kept(SamplingParams(1.0, min_p=0.2)) == [0, 1, 2]
    assert kept(SamplingParams(1.0, min_p=0.11)) == [0, 1, 2]
    assert kept(SamplingParams(1.0, min_p=0.09)) == [0, 1, 2, 3]


def test_penalties_follow_llama_cpp() -> None:
    logits = torch.tensor([[2.0, -1.0, 0.5, 3.0]])
    hist = [[0, 1, 1, 1]]  # token 0 once, token 1 three times
    out = apply_penalties(logits, hist, SamplingParams(repeat_penalty=2.0))
    assert out.tolist() == [[1.0, -2.0, 0.5, 3.0]]  # positive divided, negative multiplied, unseen untouched
    out = apply_penalties(logits, hist, SamplingParams(presence_penalty=0.5, frequency_penalty=0.25))
    assert out[0].tolist() == pytest.approx([2.0 - 0.5 - 0.25, -1.0 - 0.5 - 0.75, 0.5, 3.0])
    window = apply_penalties(logits, [[0, 2, 3]], SamplingParams(presence_penalty=1.0, repeat_last_n=2))
    assert window.tolist() == [[2.0, -1.0, -0.5, 2.0]]  # only the last two tokens count
    assert apply_penalties(logits, hist, SamplingParams(repeat_penalty=2.0, repeat_last_n=0)).equal(logits)
    greedy = process_logits(logits[0], SamplingParams(0.0, repeat_penalty=4.0), hist)
    assert int(greedy.argmax()) == 3 and float(greedy[0]) == 0.5  # penalties apply to greedy decoding too


def test_gumbel_noise_is_a_pure_function_of_seed_position_and_token() -> None:
    a = gumbel_noise(7, [3, 4, 3], 50)
    assert torch.equal(a[0], a[2]) and not torch.equal(a[0], a[1])
    assert torch.equal(gumbel_noise(7, [4], 50)[0], a[1])
    assert not torch.equal(gumbel_noise(8, [3], 50)[0], a[0])
    assert not torch.equal(gumbel_noise(7 + (1 << 32), [3], 50)[0], a[0])  # the seed's high half counts too
    assert torch.equal(gumbel_noise(7, [3], 80)[0, :50], a[0])  # token i's noise does not depend on the vocab size
    assert a.dtype == torch.float32 and bool(torch.isfinite(a).all())
    big = gumbel_noise(1, torch.arange(64), 4096).flatten().double()  # [262144]
    assert big.mean().item() == pytest.approx(0.5772, abs=0.01)  # Euler-Mascheroni: the Gumbel mean
    assert big.var().item() == pytest.approx(torch.pi**2 / 6, abs=0.03)


SAMPLING_CASES = {
    "t1": SamplingParams(1.0),
    "t0.7-k3": SamplingParams(0.7, top_k=3),
    "t1.3-p0.8": SamplingParams(1.3, top_p=0.8),
    "min-p0.15": SamplingParams(1.0, min_p=0.15),
    "penalties": SamplingParams(0.9, repeat_penalty=1.5, presence_penalty=0.4, frequency_penalty=0.3),
}


@pytest.mark.parametrize("name", list(SAMPLING_CASES))
def test_gumbel_choice_follows_the_processed_distribution(name: str) -> None:
    """Over seeds (and over positions), choose() draws from softmax(processed logits): chi-square."""
    params = SAMPLING_CASES[name]
    logits = torch.tensor([1.2, 0.3, -0.4, 2.0, 0.0, -1.5, 0.8])
    hist = [[3, 3, 0, 6]]
    want = probs(logits, params, hist)
    by_seed = torch.cat([choose(logits[None], params, seed, [11], hist) for seed in range(1500)])
    by_pos = choose(logits.expand(3000, -1), params, 5, torch.arange(3000), hist * 3000)
    for draws in (by_seed, by_pos):
        counts = torch.bincount(draws, minlength=7).double()
        assert int(counts[want == 0].sum()) == 0
        keep = want > 0
        expected = want[keep].double() / want[keep].double().sum() * counts.sum()
        assert chisquare(counts[keep].tolist(), expected.tolist()).pvalue > 0.001
