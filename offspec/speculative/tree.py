"""DraftTree: a token tree in flat tensors on the draft's device (node 0 = root = last committed token, not yet in the
target cache)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class TreeLists:
    """A host copy of a tree's structure (read once), for walks that visit nodes one by one."""

    tokens: list[int]
    parents: list[int]
    depths: list[int]

    def children(self) -> list[list[int]]:
        """Children of every node, in creation order."""
        out: list[list[int]] = [[] for _ in self.tokens]
        for i, p in enumerate(self.parents):
            if p >= 0:
                out[p].append(i)
        return out


class DraftTree:
    """Flat tensors on one device with capacity doubling, and nothing mirrored in Python lists; node i's parent
    always has a smaller index than i, and children are kept in creation order (their index order)."""

    def __init__(self, root_token: int, capacity: int = 64, device: torch.device | str = "cpu") -> None:
        cap = max(2, capacity)
        self.device = torch.device(device)
        self._tokens = torch.zeros(cap, dtype=torch.long, device=self.device)
        self._parents = torch.full((cap,), -1, dtype=torch.long, device=self.device)
        self._depths = torch.zeros(cap, dtype=torch.long, device=self.device)
        self._logprobs = torch.zeros(cap, dtype=torch.float32, device=self.device)
        self._ancestors = torch.zeros(cap, cap, dtype=torch.bool, device=self.device)
        self._tokens[0] = int(root_token)
        self._ancestors[0, 0] = True
        self._size = 1

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
        return int(self._tokens[i])

    def parent(self, i: int) -> int:
        return int(self._parents[i])

    def children_of(self, i: int) -> torch.Tensor:
        """Long [C]: children of i in creation order (= draft rank order for grown trees), on the tree's device."""
        return torch.nonzero(self.parents == i).reshape(-1)

    def children(self, i: int) -> list[int]:
        return self.children_of(i).tolist()

    def rank(self, i: int) -> int:
        """Position of i among its parent's children (0 for the root)."""
        p = self.parent(i)
        return 0 if p < 0 else int((self._parents[:i] == p).sum())

    @property
    def ranks(self) -> torch.Tensor:
        """Long [N]: each node's position among its parent's children (creation order; 0 for the root)."""
        n = self._size
        parents = self.parents
        order = torch.sort(parents, stable=True).indices  # siblings grouped, in creation order
        grouped = parents[order]
        first = torch.searchsorted(grouped, grouped)  # where each node's sibling group starts
        out = torch.empty(n, dtype=torch.long, device=self.device)
        out[order] = torch.arange(n, device=self.device) - first
        return out

    def lists(self) -> TreeLists:
        """The tree's tokens, parents and depths as Python lists: one read per field, for host-side walks."""
        return TreeLists(self.tokens.tolist(), self.parents.tolist(), self.depths.tolist())

    def paths_tokens(self, nodes: torch.Tensor) -> list[list[int]]:
        """Token paths (root first) of several nodes, read in one transfer."""
        nodes = torch.as_tensor(nodes, dtype=torch.long).to(self.device)
        rows = self.ancestors[nodes].tolist()  # [E][N]
        tokens = self.tokens.tolist()
        return [[t for t, on in zip(tokens, row) if on] for row in rows]

    def path(self, i: int) -> list[int]:
        """Node indices from the root to i, both included (the ancestor row, in index order)."""
        return torch.nonzero(self._ancestors[i, : self._size]).reshape(-1).tolist()

    def path_tokens(self, i: int) -> list[int]:
        return self._tokens[: self._size][self._ancestors[i, : self._size]].tolist()

    def _reserve(self, n: int) -> None:
        cap = self._tokens.shape[0]
        if n <= cap:
            return
        new = max(n, 2 * cap)
        grow = new - cap
        dev = self.device
        self._tokens = torch.cat([self._tokens, torch.zeros(grow, dtype=torch.long, device=dev)])
        self._parents = torch.cat([self._parents, torch.full((grow,), -1, dtype=torch.long, device=dev)])
        self._depths = torch.cat([self._depths, torch.zeros(grow, dtype=torch.long, device=dev)])
        self._logprobs = torch.cat([self._logprobs, torch.zeros(grow, dtype=torch.float32, device=dev)])
        ancestors = torch.zeros(new, new, dtype=torch.bool, device=dev)
        ancestors[:cap, :cap] = self._ancestors
        self._ancestors = ancestors

    def add(
        self,
        parent_idx: int | torch.Tensor,
        tokens: Sequence[int] | torch.Tensor,
        logprobs: Sequence[float] | torch.Tensor,
    ) -> torch.Tensor:
        """Add children (cumulative logprobs) under parent_idx (int, or Long[K] one parent per token); Long[K] indices."""
        dev = self.device
        tok = torch.as_tensor(tokens, dtype=torch.long).reshape(-1).to(dev)  # [K]
        lp = torch.as_tensor(logprobs, dtype=torch.float32).reshape(-1).to(dev)  # [K]
        k = tok.shape[0]
        if isinstance(parent_idx, torch.Tensor):
            par = parent_idx.to(dtype=torch.long, device=dev).reshape(-1)
        else:
            par = torch.full((k,), int(parent_idx), dtype=torch.long, device=dev)
        if lp.shape[0] != k or par.shape[0] != k:
            raise ValueError("tokens, logprobs and parents must have the same length")
        if k == 0:
            return torch.zeros(0, dtype=torch.long, device=dev)
        if isinstance(parent_idx, torch.Tensor):
            lo, hi = torch.aminmax(par)
            if int(lo) < 0 or int(hi) >= self._size:
                raise IndexError("parent index out of range")
        elif not 0 <= int(parent_idx) < self._size:
            raise IndexError("parent index out of range")
        start = self._size
        self._reserve(start + k)
        idx = torch.arange(start, start + k, device=dev)
        self._tokens[idx] = tok
        self._parents[idx] = par
        self._depths[idx] = self._depths[par] + 1
        self._logprobs[idx] = lp
        self._ancestors[idx] = self._ancestors[par]
        self._ancestors[idx, idx] = True
        self._size = start + k
        return idx

    def append(self, parents: torch.Tensor, tokens: torch.Tensor, logprobs: torch.Tensor) -> torch.Tensor:
        """Add children (Long [K] parents, all < size; tensors on the tree's device) without reading anything back
        to the host; Long[K] indices."""
        k = int(tokens.shape[0])
        start = self._size
        self._reserve(start + k)
        idx = torch.arange(start, start + k, device=self.device)
        self._tokens[idx] = tokens
        self._parents[idx] = parents
        self._depths[idx] = self._depths[parents] + 1
        self._logprobs[idx] = logprobs.float()
        self._ancestors[idx] = self._ancestors[parents]
        self._ancestors[idx, idx] = True
        self._size = start + k
        return idx

    def best_nodes(self, k: int | None = None) -> torch.Tensor:
        """Long [<= k]: drafted nodes by cumulative logprob, best first; ties go to the older node, so every prefix
        is ancestor-closed (a child never outscores its parent)."""
        order = torch.sort(self.logprobs[1:], descending=True, stable=True).indices + 1
        return order if k is None else order[:k]

    def mask_rows(self, rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
        """Bool [R, C]: is node cols[c] an ancestor of (or equal to) node rows[r]; cols < 0 are never visible."""
        rows = torch.as_tensor(rows, dtype=torch.long).to(self.device)
        cols = torch.as_tensor(cols, dtype=torch.long).to(self.device)
        valid = cols >= 0  # [C]
        out = self._ancestors[rows][:, cols.clamp_min(0)]  # [R, C]
        return out & valid[None, :]

    def _subset(self, keep: torch.Tensor, root: int, room: int = 0) -> tuple[DraftTree, torch.Tensor]:
        """A new tree of the nodes keep (ascending, ancestor-closed under `root`, starting with it), and Long[N]
        old->new index (-1 dropped); depths and logprobs relative to `root`; capacity for `room` more nodes."""
        k = keep.shape[0]
        remap = torch.full((self._size,), -1, dtype=torch.long, device=self.device)
        remap[keep] = torch.arange(k, device=self.device)
        parents = self._parents[keep]  # [K]
        new_parents = torch.where(parents >= 0, remap[parents.clamp_min(0)], parents)
        new_parents[0] = -1
        out = DraftTree(0, capacity=k + room, device=self.device)
        out._tokens[:k] = self._tokens[keep]
        out._parents[:k] = new_parents
        out._depths[:k] = self._depths[keep] - self._depths[root]
        out._logprobs[:k] = self._logprobs[keep] - self._logprobs[root]
        out._ancestors[:k, :k] = self._ancestors[keep][:, keep]
        out._size = k
        return out, remap

    def select(self, keep: torch.Tensor) -> tuple[DraftTree, torch.Tensor]:
        """A new tree of the nodes keep (ascending, ancestor-closed, with 0) and Long[N] old->new index (-1 dropped)."""
        keep = torch.as_tensor(keep, dtype=torch.long).to(self.device)
        if keep.numel() == 0 or int(keep[0]) != 0:
            raise ValueError("select must keep the root")
        parents = self._parents[keep[1:]]
        if not bool(torch.isin(parents, keep).all()):
            raise ValueError("select needs an ancestor-closed set of nodes")
        return self._subset(keep, 0)

    def __repr__(self) -> str:
        return f"DraftTree(size={self._size}, depth={int(self.depths.max())})"

    def subtree(self, node: int) -> tuple[DraftTree, torch.Tensor]:
        """The subtree under node as a new tree rooted at it (logprobs relative to it), and Long[N] old->new index."""
        keep = torch.nonzero(self.ancestors[:, node]).reshape(-1)  # node and its descendants, ascending
        return self._subset(keep, node)

    def likeliest_path(self) -> list[int]:
        """Drafted nodes from the root down, each the likeliest child of the previous (the path the drafter
        expects the target to accept); ties go to the older child."""
        path, node = [], 0
        while True:
            kids = self.children_of(node)
            if kids.numel() == 0:
                return path
            best = torch.sort(self._logprobs[kids], descending=True, stable=True).indices[0]
            node = int(kids[best])
            path.append(node)
