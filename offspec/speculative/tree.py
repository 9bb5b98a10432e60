"""DraftTree: a token tree in flat CPU tensors (node 0 = root = last committed token, not yet in the target cache)."""

from __future__ import annotations

from collections.abc import Sequence

import torch


class DraftTree:
    """Flat tensors with capacity doubling; node i's parent always has a smaller index than i."""

    def __init__(self, root_token: int, capacity: int = 64) -> None:
        cap = max(2, capacity)
        self._tokens = torch.zeros(cap, dtype=torch.long)
        self._parents = torch.full((cap,), -1, dtype=torch.long)
        self._depths = torch.zeros(cap, dtype=torch.long)
        self._logprobs = torch.zeros(cap, dtype=torch.float32)
        self._ancestors = torch.zeros(cap, cap, dtype=torch.bool)
        self._tokens[0] = root_token
        self._ancestors[0, 0] = True
        self._size = 1
        self._token_list: list[int] = [int(root_token)]
        self._parent_list: list[int] = [-1]
        self._children: list[list[int]] = [[]]

    @property
    def size(self) -> int:
        return self._size

    @property
    def budget(self) -> int:
        """Drafted nodes (root excluded)."""
        return self._size - 1

    @property
    def tokens(self) -> torch.Tensor:
        return self._tokens[: self._size]  # [N]

    @property
    def parents(self) -> torch.Tensor:
        return self._parents[: self._size]  # [N]

    @property
    def depths(self) -> torch.Tensor:
        return self._depths[: self._size]  # [N]

    @property
    def logprobs(self) -> torch.Tensor:
        """Cumulative draft log-probability of each node's path (root 0.0)."""
        return self._logprobs[: self._size]  # [N]

    @property
    def ancestors(self) -> torch.Tensor:
        """Bool [N, N]: row i is True at i and at every ancestor of i."""
        return self._ancestors[: self._size, : self._size]

    def token(self, i: int) -> int:
        return self._token_list[i]

    def parent(self, i: int) -> int:
        return self._parent_list[i]

    def children(self, i: int) -> list[int]:
        """Children of i in creation order (= draft rank order for grown trees)."""
        return list(self._children[i])

    def rank(self, i: int) -> int:
        """Position of i among its parent's children (0 for the root)."""
        p = self._parent_list[i]
        return 0 if p < 0 else self._children[p].index(i)

    def path(self, i: int) -> list[int]:
        """Node indices from the root to i, both included."""
        out = [i]
        while self._parent_list[out[-1]] >= 0:
            out.append(self._parent_list[out[-1]])
        return out[::-1]

    def path_tokens(self, i: int) -> list[int]:
        return [self._token_list[j] for j in self.path(i)]

    def _reserve(self, n: int) -> None:
        cap = self._tokens.shape[0]
        if n <= cap:
            return
        new = max(n, 2 * cap)
        grow = new - cap
        self._tokens = torch.cat([self._tokens, torch.zeros(grow, dtype=torch.long)])
        self._parents = torch.cat([self._parents, torch.full((grow,), -1, dtype=torch.long)])
        self._depths = torch.cat([self._depths, torch.zeros(grow, dtype=torch.long)])
        self._logprobs = torch.cat([self._logprobs, torch.zeros(grow, dtype=torch.float32)])
        ancestors = torch.zeros(new, new, dtype=torch.bool)
        ancestors[:cap, :cap] = self._ancestors
        self._ancestors = ancestors

    def add(
        self,
        parent_idx: int | torch.Tensor,
        tokens: Sequence[int] | torch.Tensor,
        logprobs: Sequence[float] | torch.Tensor,
    ) -> torch.Tensor:
        """Add children (cumulative logprobs) under parent_idx (int, or Long[K] one parent per token); Long[K] indices."""
        tok = torch.as_tensor(tokens, dtype=torch.long).reshape(-1).cpu()  # [K]
        lp = torch.as_tensor(logprobs, dtype=torch.float32).reshape(-1).cpu()  # [K]
        k = tok.shape[0]
        if isinstance(parent_idx, torch.Tensor):
            par = parent_idx.to(dtype=torch.long, device="cpu").reshape(-1)
        else:
            par = torch.full((k,), int(parent_idx), dtype=torch.long)
        if lp.shape[0] != k or par.shape[0] != k:
            raise ValueError("tokens, logprobs and parents must have the same length")
        if k == 0:
            return torch.zeros(0, dtype=torch.long)
        if int(par.min()) < 0 or int(par.max()) >= self._size:
            raise IndexError("parent index out of range")
        start = self._size
        self._reserve(start + k)
        idx = torch.arange(start, start + k)
        self._tokens[idx] = tok
        self._parents[idx] = par
        self._depths[idx] = self._depths[par] + 1
        self._logprobs[idx] = lp
        self._ancestors[idx] = self._ancestors[par]
        self._ancestors[idx, idx] = True
        self._size = start + k
        par_list = par.tolist()
        self._token_list.extend(tok.tolist())
        self._parent_list.extend(par_list)
        for j, p in enumerate(par_list):
            self._children.append([])
            self._children[p].append(start + j)
        return idx

    def best_nodes(self, k: int | None = None) -> torch.Tensor:
        """Long [<= k]: drafted nodes by cumulative logprob, best first; ties go to the older node, so every prefix
        is ancestor-closed (a child never outscores its parent)."""
        order = torch.sort(self.logprobs[1:], descending=True, stable=True).indices + 1
        return order if k is None else order[:k]

    def mask_rows(self, rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
        """Bool [R, C]: is node cols[c] an ancestor of (or equal to) node rows[r]; cols < 0 are never visible."""
        rows = torch.as_tensor(rows, dtype=torch.long)
        cols = torch.as_tensor(cols, dtype=torch.long)
        valid = cols >= 0  # [C]
        out = self._ancestors[rows][:, cols.clamp_min(0)]  # [R, C]
        return out & valid[None, :]

    def select(self, keep: torch.Tensor) -> tuple[DraftTree, torch.Tensor]:
        """A new tree of the nodes keep (ascending, ancestor-closed, with 0) and Long[N] old->new index (-1 dropped)."""
        keep = torch.as_tensor(keep, dtype=torch.long).cpu()
        if keep.numel() == 0 or int(keep[0]) != 0:
            raise ValueError("select must keep the root")
        remap = torch.full((self._size,), -1, dtype=torch.long)
        remap[keep] = torch.arange(keep.shape[0])
        parents = self._parents[keep]  # [K]
        new_parents = torch.where(parents >= 0, remap[parents.clamp_min(0)], parents)
        if bool((new_parents[1:] < 0).any()):
            raise ValueError("select needs an ancestor-closed set of nodes")
        out = DraftTree(self._token_list[0], capacity=keep.shape[0])
        k = keep.shape[0]
        out._tokens[:k] = self._tokens[keep]
        out._parents[:k] = new_parents
        out._depths[:k] = self._depths[keep]
        out._logprobs[:k] = self._logprobs[keep]
        out._ancestors[:k, :k] = self._ancestors[keep][:, keep]
        out._size = k
        out._token_list = out._tokens[:k].tolist()
        out._parent_list = new_parents.tolist()
        out._children = [[] for _ in range(k)]
        for j, p in enumerate(out._parent_list):
            if p >= 0:
                out._children[p].append(j)
        return out, remap

    def __repr__(self) -> str:
        return f"DraftTree(size={self._size}, depth={int(self.depths.max())})"

    def subtree(self, node: int) -> tuple[DraftTree, torch.Tensor]:
        """The subtree under node as a new tree rooted at it (logprobs relative to it), and Long[N] old->new index."""
        keep = torch.nonzero(self.ancestors[:, node]).reshape(-1)  # node and its descendants, ascending
        remap = torch.full((self._size,), -1, dtype=torch.long)
        remap[keep] = torch.arange(keep.shape[0])
        k = keep.shape[0]
        out = DraftTree(self._token_list[node], capacity=k)
        parents = self._parents[keep]
        out._tokens[:k] = self._tokens[keep]
        out._parents[:k] = torch.where(remap[parents.clamp_min(0)] >= 0, remap[parents.clamp_min(0)], -1)
        out._parents[0] = -1
        out._depths[:k] = self._depths[keep] - self._depths[node]
        out._logprobs[:k] = self._logprobs[keep] - self._logprobs[node]
        out._ancestors[:k, :k] = self._ancestors[keep][:, keep]
        out._size = k
        out._token_list = out._tokens[:k].tolist()
        out._parent_list = out._parents[:k].tolist()
        out._children = [[] for _ in range(k)]
        for j, p in enumerate(out._parent_list):
            if p >= 0:
                out._children[p].append(j)
        return out, remap

    def likeliest_path(self) -> list[int]:
        """Drafted nodes from the root down, each the likeliest child of the previous (the path the drafter
        expects the target to accept)."""
        lp = self._logprobs
        path, node = [], 0
        while self._children[node]:
            node = max(self._children[node], key=lambda c: (float(lp[c]), -c))
            path.append(node)
        return path

