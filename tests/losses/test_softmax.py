import math

import pytest
import torch
import torch.nn.functional as F

from instdisc.losses import FullSoftmaxLoss, softmax_loss
from instdisc.memory_bank import MemoryBank


def reference_softmax(features, bank_rows, indices, tau):
    """Eq. 2-3 of the paper, one sample at a time: -log(exp(v_i.f/tau) / sum_j exp(v_j.f/tau))."""
    losses = []
    for f, i in zip(features.tolist(), indices.tolist()):
        scores = [math.exp(sum(a * b for a, b in zip(v, f)) / tau) for v in bank_rows.tolist()]
        losses.append(-math.log(scores[i] / sum(scores)))
    return sum(losses) / len(losses)


def test_softmax_loss_matches_explicit_exp_sum():
    logits = torch.randn(3, 7, dtype=torch.float64)
    targets = torch.tensor([0, 6, 2])
    expected = -sum(math.log(math.exp(r[t]) / sum(math.exp(x) for x in r))
                    for r, t in zip(logits.tolist(), targets.tolist())) / 3
    assert softmax_loss(logits, targets).item() == pytest.approx(expected, rel=1e-12)


def test_full_softmax_matches_paper_formula_and_uses_bank_rows():
    bank = MemoryBank(20, 6, generator=torch.Generator().manual_seed(0))
    features = F.normalize(torch.randn(5, 6, generator=torch.Generator().manual_seed(1)), dim=1)
    indices = torch.tensor([0, 4, 4, 13, 19])
    loss = FullSoftmaxLoss(bank, temperature=0.5)(features, indices)
    expected = reference_softmax(features, bank.features, indices, 0.5)
    assert loss.item() == pytest.approx(expected, rel=1e-5)


def test_full_softmax_is_finite_at_small_temperature_and_grads_only_features():
    bank = MemoryBank(20, 6, generator=torch.Generator().manual_seed(0))
    features = bank.features[:4].clone().requires_grad_()
    loss = FullSoftmaxLoss(bank, temperature=0.01)(features, torch.arange(4))
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(features.grad).all()
    assert bank.features.grad is None and list(FullSoftmaxLoss(bank, 0.1).parameters()) == []
