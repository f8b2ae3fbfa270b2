"""The full non-parametric softmax over all n memory-bank rows.

Wu et al. 2018, arXiv:1805.01978, Sec. 3.1, Eq. 2:
P(i|v) = exp(v_i . v / tau) / sum_j exp(v_j . v / tau), with v = f_theta(x) the current feature
and v_j the (detached) bank rows; the objective is the negative log-likelihood
-sum_i log P(i | f_theta(x_i)) (Eq. 3). As in the paper's memory-bank formulation, the current
feature is NOT substituted into row i: all weights come from the bank.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from instdisc.memory_bank import MemoryBank


def softmax_loss(logits: Tensor, targets: Tensor) -> Tensor:
    """Mean of -log softmax(logits)[b, targets[b]]. logits: (B, n); targets: (B,) int."""
    return F.cross_entropy(logits, targets)


class FullSoftmaxLoss(nn.Module):
    """Non-parametric softmax, Eq. 2-3 of arXiv:1805.01978 (Sec. 3.1); O(n) per sample.

    forward(features (B, D) unit norm, indices (B,)) -> scalar. logits = f V^T / tau, (B, n),
    computed in float32 even under autocast; the gradient flows only into `features`.
    """

    def __init__(self, bank: MemoryBank, temperature: float) -> None:
        super().__init__()
        if not temperature > 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        self.bank = bank
        self.temperature = temperature  # tau

    def forward(self, features: Tensor, indices: Tensor) -> Tensor:
        with torch.autocast(features.device.type, enabled=False):
            logits = features.float() @ self.bank.features.float().T / self.temperature  # (B, n)
        return softmax_loss(logits, indices)

    def extra_repr(self) -> str:
        return f"temperature={self.temperature}"
