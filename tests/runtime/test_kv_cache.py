import pytest
import torch

from offspec.runtime.kv_cache import SPAN_BUCKET, StaticKVCache


def _fill(cache, start, n):
    cache.begin(torch.arange(start, start + n)[None])
    k = torch.arange(start, start + n, dtype=torch.float32).view(1, 1, n, 1).expand(1, cache.num_kv_heads, n, 4)
    for layer in range(cache.num_layers):
        cache.update(k, k + 1000, layer)
    cache.advance(n)


@pytest.mark.parametrize("static", [False, True])
def test_update_writes_at_index_positions_and_returns_the_span(static):
    cache = StaticKVCache(2, 2, 4, 300, torch.float32, static=static)
    _fill(cache, 0, 3)
    cache.begin(torch.tensor([[3, 4]]))
    k, v = cache.update(torch.full((1, 2, 2, 4), 7.0), torch.zeros(1, 2, 2, 4), 0)
    assert k.shape == (1, 2, 300 if static else SPAN_BUCKET, 4) and cache.length == 3
    assert k[0, 0, :5, 0].tolist() == [0, 1, 2, 7, 7]
    assert cache.positions[:5].tolist() == [0, 1, 2, 3, 4]


def test_keep_compacts_chosen_new_positions_in_place():
    cache = StaticKVCache(2, 2, 4, 16, torch.float32)
    _fill(cache, 0, 10)
    before = cache.keys[1].data_ptr()
    cache.keep(4, torch.tensor([0, 2, 5]))
    assert cache.length == 7 and cache.keys[1].data_ptr() == before
    got = cache.keys[1][0, 0, :7, 0].tolist()
    assert got == [0, 1, 2, 3, 4, 6, 9]
    assert cache.values[0][0, 1, :7, 0].tolist() == [x + 1000 for x in got]
    assert cache.positions[:7].tolist() == got


def test_crop_and_growth_keep_contents():
    cache = StaticKVCache(1, 1, 4, 4, torch.float32)
    _fill(cache, 0, 4)
    cache.ensure(10)
    assert cache.capacity >= 14
    assert cache.keys[0][0, 0, :4, 0].tolist() == [0, 1, 2, 3]
    assert cache.positions[:4].tolist() == [0, 1, 2, 3]
    cache.crop(2)
    assert cache.length == 2
