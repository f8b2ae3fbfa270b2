"""The parametric softmax baseline: an n-way linear instance classifier.

Wu et al. 2018, arXiv:1805.01978, Sec. 3.1, Eq. 1: P(i|v) = exp(w_i^T v) / sum_j exp(w_j^T v),
with one learned weight vector w_j per training image and v = f_theta(x) (unit norm here, the
same encoder output as the non-parametric losses).

Temperature (our choice): logits = W v / tau. With tau = 1 this is exactly Eq. 1; any other tau is
the reparametrisation w = w' / tau, which changes only the effective initial scale and learning
rate of W, so one `temperature` setting can be shared by all three losses.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from instdisc.losses.softmax import softmax_loss


class ParametricSoftmaxLoss(nn.Module):
    """Learned instance classifier W (n, D), no bias (arXiv:1805.01978, Sec. 3.1, Eq. 1).

    forward(features (B, D), indices (B,)) -> scalar cross-entropy. Has no memory bank; its
    parameters (`classifier.weight`) must be given to the optimiser together with the encoder's.
    """

    def __init__(self, num_items: int, dim: int, temperature: float = 1.0) -> None:
        super().__init__()
        if num_items < 2:
            raise ValueError(f"num_items must be >= 2, got {num_items}")
        if not temperature > 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        self.classifier = nn.Linear(dim, num_items, bias=False)  # W: (n, D)
        self.temperature = temperature  # tau

    def forward(self, features: Tensor, indices: Tensor) -> Tensor:
        with torch.autocast(features.device.type, enabled=False):
            logits = self.classifier(features.float()) / self.temperature  # (B, n)
        return softmax_loss(logits, indices)

    def extra_repr(self) -> str:
        return f"temperature={self.temperature}"
