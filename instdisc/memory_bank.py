"""The memory bank V of non-parametric instance discrimination (Wu et al. 2018, arXiv:1805.01978).

Row i holds v_i, the L2-normalised feature of training image i from the last time it was seen
(Sec. 3.1, "Learning with a memory bank"). Rows are refreshed with a momentum mix after every step:
v_i <- normalise(m * v_i + (1 - m) * f_i), where f_i is the current feature (the paper's Sec. 3.1
copies f_i, i.e. m = 0; the public code uses m = 0.5).

Under DDP (`torch.distributed` initialised with world size > 1) `update` all-gathers
(indices, features) from every rank and applies the same update everywhere, in rank order, so the
banks stay bit-identical across ranks.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn


def distributed_world_size() -> int:
    """The number of ranks when torch.distributed is initialised, else 1."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size()
    return 1


def all_gather_rows(x: Tensor) -> Tensor:
    """Concatenate `x` (N_r, ...) from every rank in rank order; N_r may differ between ranks.

    Every rank gets the same (sum_r N_r, ...) tensor. Rows are padded to the largest N_r for the
    collective (all_gather needs equal shapes) and trimmed afterwards. No autograd through it.
    """
    world = distributed_world_size()
    if world == 1:
        return x
    size = torch.tensor([x.shape[0]], dtype=torch.long, device=x.device)  # (1,)
    sizes = [torch.zeros_like(size) for _ in range(world)]  # world x (1,)
    dist.all_gather(sizes, size)
    counts = [int(s.item()) for s in sizes]
    padded = x.new_zeros((max(counts), *x.shape[1:]))  # (N_max, ...)
    padded[: x.shape[0]] = x
    gathered = [torch.empty_like(padded) for _ in range(world)]  # world x (N_max, ...)
    dist.all_gather(gathered, padded)
    return torch.cat([g[:c] for g, c in zip(gathered, counts)], dim=0)  # (sum N_r, ...)


def last_occurrence(indices: Tensor, num_items: int) -> Tensor:
    """For each position b, the position of the LAST occurrence of indices[b] in `indices`.

    (B,) -> (B,). Uses an exact scatter-max over positions, so the result is deterministic on
    every device (no order-dependent float accumulation) and needs no host sync.
    """
    positions = torch.arange(indices.shape[0], device=indices.device)  # (B,)
    last = torch.full((num_items,), -1, dtype=torch.long, device=indices.device)  # (n,)
    last.scatter_reduce_(0, indices, positions, reduce="amax")
    return last[indices]  # (B,)


class MemoryBank(nn.Module):
    """One L2-normalised feature per training image (Wu et al. 2018, arXiv:1805.01978, Sec. 3.1).

    `features` is a buffer (n, D): it moves with `.to(device)` and is saved in the state_dict.
    Rows start as random unit vectors drawn from `generator` (or the global torch RNG).

    Duplicate indices in one `update` call: the LAST occurrence wins, i.e. row i becomes
    normalise(m * v_i + (1 - m) * f_last), exactly as if the rows were written one after another
    from the same old v_i. Under DDP "last" refers to the gathered batch (rank 0's rows first).
    """

    def __init__(self, num_items: int, dim: int, momentum: float = 0.5,
                 generator: torch.Generator | None = None) -> None:
        super().__init__()
        if num_items < 1:
            raise ValueError(f"num_items must be >= 1, got {num_items}")
        if dim < 1:
            raise ValueError(f"dim must be >= 1, got {dim}")
        if not 0.0 <= momentum < 1.0:
            raise ValueError(f"momentum must be in [0, 1), got {momentum}")
        self.momentum = momentum
        init = torch.randn(num_items, dim, generator=generator)  # (n, D)
        self.register_buffer("features", F.normalize(init, dim=1))  # (n, D), unit rows

    @property
    def num_items(self) -> int:
        """n, the number of training images (rows)."""
        return self.features.shape[0]

    @property
    def dim(self) -> int:
        """D, the feature dimension."""
        return self.features.shape[1]

    @torch.no_grad()
    def update(self, indices: Tensor, features: Tensor) -> None:
        """v_i <- normalise(m * v_i + (1 - m) * f_i) for every i in `indices`.

        indices: (B,) int row ids; features: (B, D), detached inside. Under DDP every rank applies
        the same update with the (indices, features) of all ranks.
        """
        if indices.ndim != 1 or features.shape != (indices.shape[0], self.dim):
            raise ValueError(f"expected indices (B,) and features (B, {self.dim}), got "
                             f"{tuple(indices.shape)} and {tuple(features.shape)}")
        indices = indices.to(self.features.device, torch.long)  # (B,)
        features = features.detach().to(self.features.device, self.features.dtype)  # (B, D)
        indices = all_gather_rows(indices)  # (B_all,)
        features = all_gather_rows(features)  # (B_all, D)
        source = last_occurrence(indices, self.num_items)  # (B_all,)
        # duplicates all compute (and write) the same value, so index_put order cannot matter
        m = self.momentum
        mixed = m * self.features[indices] + (1 - m) * features[source]  # (B_all, D)
        self.features[indices] = F.normalize(mixed, dim=1)

    def extra_repr(self) -> str:
        return f"num_items={self.num_items}, dim={self.dim}, momentum={self.momentum}"
