import torch

from offspec.runtime.kv_cache import StaticKVCache


def _fill(cache, start, n):
    k = torch.arange(start, start + n, dtype=torch.float32).view(1, 1, n, 1).expand(1, cache.num_kv_heads, n, 4)
    for layer in range(cache.num_layers):
        cache.update(k, k + 1000, layer)
    cache.advance(n)


def test_update_appends_in_place_and_returns_the_valid_prefix():
    cache = StaticKVCache(2, 2, 4, 8, torch.float32)
    _fill(cache, 0, 3)
    k, v = cache.update(torch.zeros(1, 2, 2, 4), torch.zeros(1, 2, 2, 4), 0)
    assert k.shape == (1, 2, 5, 4) and cache.length == 3


def test_keep_compacts_chosen_new_positions():
    cache = StaticKVCache(2, 2, 4, 16, torch.float32)
    _fill(cache, 0, 10)
    cache.keep(4, torch.tensor([0, 2, 5]))
    assert cache.length == 7
    got = cache.keys[1][0, 0, :7, 0].tolist()
    assert got == [0, 1, 2, 3, 4, 6, 9]
    assert cache.values[0][0, 1, :7, 0].tolist() == [x + 1000 for x in got]


def test_crop_and_growth_keep_contents():
    cache = StaticKVCache(1, 1, 4, 4, torch.float32)
    _fill(cache, 0, 4)
    cache.ensure(10)
    assert cache.capacity >= 14
    assert cache.keys[0][0, 0, :4, 0].tolist() == [0, 1, 2, 3]
    cache.crop(2)
    assert cache.length == 2
