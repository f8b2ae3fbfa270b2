"""Training objectives; all are `forward(features (B, D), indices (B,)) -> scalar` modules.

Wu et al. 2018, arXiv:1805.01978: NCE (Sec. 3.2), full non-parametric softmax (Sec. 3.1, Eq. 2),
parametric softmax baseline (Sec. 3.1, Eq. 1), optional proximal term (Sec. 3.3).
"""

from __future__ import annotations

from torch import nn

from instdisc.losses.nce import NCELoss, estimate_log_z, nce_loss, sample_negatives
from instdisc.losses.parametric import ParametricSoftmaxLoss
from instdisc.losses.proximal import ProximalLoss, proximal_term
from instdisc.losses.softmax import FullSoftmaxLoss, softmax_loss
from instdisc.memory_bank import MemoryBank

__all__ = ["FullSoftmaxLoss", "NCELoss", "ParametricSoftmaxLoss", "ProximalLoss",
           "build_loss", "estimate_log_z", "nce_loss", "proximal_term", "sample_negatives",
           "softmax_loss"]



def build_loss(name: str, *, bank: MemoryBank | None, num_items: int, feature_dim: int,
               num_negatives: int, temperature: float, z_batches: int = 1,
               z_momentum: float = 0.0, z_estimate: str = "batch",
               proximal_lambda: float = 0.0) -> nn.Module:
    """The objective `name` (params.yaml pretrain.loss), wrapped in ProximalLoss if lambda > 0.

    "nce" and "softmax" own `bank`; "parametric" has no bank and learns its own (n, D) weights, so
    it rejects proximal_lambda > 0 (the proximal term is defined against bank rows, Sec. 3.3).
    """
    constructors = {
        "nce": lambda: NCELoss(bank, num_negatives, temperature, z_batches, z_momentum,
                                     z_estimate),
        "softmax": lambda: FullSoftmaxLoss(bank, temperature),
        "parametric": lambda: ParametricSoftmaxLoss(num_items, feature_dim, temperature),
    }
    if name not in constructors:
        raise ValueError(f"unknown loss {name!r}; allowed: {list(constructors)}")
    if proximal_lambda < 0:
        raise ValueError(f"proximal_lambda must be >= 0, got {proximal_lambda}")
    if name == "parametric" and proximal_lambda > 0:
        raise ValueError(f"proximal_lambda = {proximal_lambda} needs a memory bank, but loss "
                         f"'parametric' has none; set proximal_lambda to 0")
    if name != "parametric":
        if bank is None:
            raise ValueError(f"loss {name!r} needs a memory bank, got bank=None")
        if (bank.num_items, bank.dim) != (num_items, feature_dim):
            raise ValueError(f"bank is ({bank.num_items}, {bank.dim}), expected "
                             f"(num_items, feature_dim) = ({num_items}, {feature_dim})")
    loss = constructors[name]()
    if proximal_lambda > 0:
        loss = ProximalLoss(loss, bank, proximal_lambda)
    return loss
