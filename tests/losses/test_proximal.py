import pytest
import torch
import torch.nn.functional as F

from instdisc.losses import FullSoftmaxLoss, ProximalLoss, proximal_term
from instdisc.memory_bank import MemoryBank


def test_proximal_term_matches_hand_computation():
    f = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    v = torch.tensor([[0.0, 1.0], [0.0, 1.0]])
    assert proximal_term(f, v).item() == pytest.approx((2.0 + 0.0) / 2)


def test_proximal_loss_adds_lambda_times_distance_to_previous_bank_rows():
    bank = MemoryBank(10, 4, generator=torch.Generator().manual_seed(0))
    base = FullSoftmaxLoss(bank, temperature=0.1)
    features = F.normalize(torch.randn(3, 4), dim=1).requires_grad_()
    indices = torch.tensor([1, 5, 9])
    loss = ProximalLoss(base, bank, lam=0.7)(features, indices)
    distances = [((f - bank.features[i]) ** 2).sum().item() for f, i in zip(features, indices)]
    expected = base(features, indices).item() + 0.7 * sum(distances) / 3
    assert loss.item() == pytest.approx(expected, rel=1e-6)
    loss.backward()
    assert features.grad is not None and bank.features.grad is None
