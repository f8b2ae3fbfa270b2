"""Proximal regularisation of the memory-bank objective.

Wu et al. 2018, arXiv:1805.01978, Sec. 3.3, Eq. 10-11: at step t the loss for image i gains
lambda * ||v_i^(t) - v_i^(t-1)||^2, where v_i^(t) = f_theta(x_i) is the current feature and
v_i^(t-1) the bank row from the previous visit, which damps oscillation of the features and
stabilises training.
"""

from __future__ import annotations

from torch import Tensor, nn

from instdisc.memory_bank import MemoryBank


def proximal_term(features: Tensor, bank_rows: Tensor) -> Tensor:
    """mean_b ||f_b - v_b||^2. features, bank_rows: (B, D) -> scalar."""
    return (features - bank_rows).pow(2).sum(dim=1).mean()


class ProximalLoss(nn.Module):
    """base(features, indices) + lam * mean_i ||f_i - v_i^(t-1)||^2 (arXiv:1805.01978, Sec. 3.3).

    Must be called before `bank.update` of the same step, so the bank rows are v^(t-1); they are
    buffers, so the gradient flows only into `features`.
    """

    def __init__(self, base: nn.Module, bank: MemoryBank, lam: float) -> None:
        super().__init__()
        if not lam >= 0:
            raise ValueError(f"lam must be >= 0, got {lam}")
        self.base = base
        self.bank = bank
        self.lam = lam  # lambda

    def forward(self, features: Tensor, indices: Tensor) -> Tensor:
        previous = self.bank.features[indices].to(features.dtype)  # (B, D), v^(t-1)
        return self.base(features, indices) + self.lam * proximal_term(features, previous)

    def extra_repr(self) -> str:
        return f"lam={self.lam}"
