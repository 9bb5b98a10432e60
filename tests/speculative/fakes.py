"""A fake causal LM whose logits depend only on what the attention mask lets each query see."""

from __future__ import annotations

import torch

POS_PERIOD = 7
COUNT_PERIOD = 5


class FakeCache:
    """Token ids and positions per cache slot, with the keep/crop protocol."""

    def __init__(self) -> None:
        self.tokens = torch.zeros(0, dtype=torch.long)
        self.positions = torch.zeros(0, dtype=torch.long)
        self.keeps = 0

    @property
    def length(self) -> int:
        return int(self.tokens.shape[0])

    def append(self, tokens: torch.Tensor, positions: torch.Tensor) -> None:
        self.tokens = torch.cat([self.tokens, tokens])
        self.positions = torch.cat([self.positions, positions])

    def keep(self, start: int, indices: torch.Tensor) -> None:
        idx = torch.as_tensor(indices, dtype=torch.long).cpu()
        assert 0 <= start <= self.length
        if idx.numel():
            assert bool((idx[1:] > idx[:-1]).all()), "keep indices must be sorted ascending"
            assert 0 <= int(idx.min()) and int(idx.max()) < self.length - start
        self.tokens = torch.cat([self.tokens[:start], self.tokens[start:][idx]])
        self.positions = torch.cat([self.positions[:start], self.positions[start:][idx]])
        self.keeps += 1

    def crop(self, length: int) -> None:
        assert 0 <= length <= self.length
        self.tokens = self.tokens[:length]
        self.positions = self.positions[:length]


class FakeLM:
    """Logits at a query = table[last two visible tokens by position] + f(position) + g(number of visible keys).

    strict: assert that each query sees exactly one key at every position 0..its own, and itself last.
    """

    def __init__(
        self, vocab: int = 8, seed: int = 0, scale: float = 2.0, dtype: torch.dtype = torch.float32, strict: bool = True
    ) -> None:
        g = torch.Generator().manual_seed(seed)
        self.vocab = vocab
        self.dtype = dtype
        self.strict = strict
        self.table = torch.randn((vocab + 1) * vocab, vocab, generator=g) * scale  # [(V + 1) * V, V]; V = BOS
        self.pos_table = torch.randn(POS_PERIOD, vocab, generator=g) * 0.5
        self.count_table = torch.randn(COUNT_PERIOD, vocab, generator=g) * 0.5
        self.cache = FakeCache()
        self.forwards = 0

    def perturbed(self, noise: float, seed: int) -> FakeLM:
        """A draft: same structure, logits table plus Gaussian noise."""
        g = torch.Generator().manual_seed(seed)
        out = FakeLM(self.vocab, seed, dtype=self.dtype, strict=self.strict)
        out.table = self.table + torch.randn(self.table.shape, generator=g) * noise
        out.pos_table = self.pos_table.clone()
        out.count_table = self.count_table.clone()
        return out

    def logits_at(self, prev: torch.Tensor, cur: torch.Tensor, pos: torch.Tensor, seen: torch.Tensor) -> torch.Tensor:
        """[B, V] logits from the previous token (V = none), current token, position, visible key count."""
        return self.table[prev * self.vocab + cur] + self.pos_table[pos % POS_PERIOD] + self.count_table[seen % COUNT_PERIOD]

    def next_logits(self, tokens: list[int]) -> torch.Tensor:
        """[V] logits after a plain sequence at positions 0..len-1 (reference)."""
        prev = tokens[-2] if len(tokens) > 1 else self.vocab
        n = len(tokens)
        return self.logits_at(torch.tensor([prev]), torch.tensor([tokens[-1]]), torch.tensor([n - 1]), torch.tensor([n]))[0]

    def forward(self, input_ids: torch.Tensor, position_ids: torch.Tensor, attn_mask: torch.Tensor | None) -> torch.Tensor:
        self.forwards += 1
        ids = input_ids[0].cpu()
        pos = position_ids[0].cpu()
        t, cached = ids.shape[0], self.cache.length
        assert input_ids.shape == position_ids.shape == (1, t)
        assert int(ids.min()) >= 0 and int(ids.max()) < self.vocab
        key_tok = torch.cat([self.cache.tokens, ids])  # [S]
        key_pos = torch.cat([self.cache.positions, pos])  # [S]
        if attn_mask is None:
            visible = torch.ones(t, cached + t, dtype=torch.bool)
            visible[:, cached:] = torch.ones(t, t, dtype=torch.bool).tril()
        else:
            assert attn_mask.shape == (1, 1, t, cached + t), attn_mask.shape
            assert attn_mask.dtype == self.dtype
            visible = attn_mask[0, 0].cpu() == 0  # [T, S]
        if self.strict:
            span = int(key_pos.max()) + 1
            counts = torch.zeros(t, span).scatter_add_(1, key_pos.expand(t, -1), visible.float())  # [T, span]
            want = (torch.arange(span)[None] <= pos[:, None]).float()
            assert torch.equal(counts, want), "a query must see exactly one key per position 0..its own"
            assert bool(visible[torch.arange(t), cached + torch.arange(t)].all()), "a query must see itself"
        score = torch.where(visible, key_pos.expand(t, -1), torch.full((t, 1), -1))  # [T, S]
        top = score.topk(min(2, score.shape[1]), dim=-1)
        cur = key_tok[top.indices[:, 0]]
        if top.values.shape[1] > 1:
            prev = torch.where(top.values[:, 1] >= 0, key_tok[top.indices[:, 1]], torch.full_like(cur, self.vocab))
        else:
            prev = torch.full_like(cur, self.vocab)
        logits = self.logits_at(prev, cur, pos, visible.sum(dim=-1))  # [T, V]
        self.cache.append(ids, pos)
        return logits[None].float()


def prefill(model: FakeLM, tokens: list[int]) -> None:
    """Causal forward of tokens from the current cache length."""
    start = model.cache.length
    model.forward(torch.tensor([tokens]), torch.arange(start, start + len(tokens))[None], None)
