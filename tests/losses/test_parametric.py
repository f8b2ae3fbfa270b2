import math

import pytest
import torch
import torch.nn.functional as F

from instdisc.losses import ParametricSoftmaxLoss


def reference_parametric(features, weights, indices, tau):
    """Eq. 1 of the paper (scaled by 1/tau), one sample at a time."""
    losses = []
    for v, i in zip(features.tolist(), indices.tolist()):
        scores = [math.exp(sum(a * b for a, b in zip(w, v)) / tau) for w in weights.tolist()]
        losses.append(-math.log(scores[i] / sum(scores)))
    return sum(losses) / len(losses)


@pytest.mark.parametrize("tau", [1.0, 0.1])
def test_parametric_softmax_matches_paper_formula(tau):
    torch.manual_seed(0)
    loss_fn = ParametricSoftmaxLoss(num_items=12, dim=5, temperature=tau)
    features = F.normalize(torch.randn(4, 5), dim=1)
    indices = torch.tensor([0, 11, 3, 3])
    expected = reference_parametric(features, loss_fn.classifier.weight.detach(), indices, tau)
    assert loss_fn(features, indices).item() == pytest.approx(expected, rel=1e-5)


def test_parametric_softmax_learns_its_weights():
    loss_fn = ParametricSoftmaxLoss(num_items=12, dim=5)
    assert [p.shape for p in loss_fn.parameters()] == [torch.Size([12, 5])]
    features = F.normalize(torch.randn(3, 5), dim=1).requires_grad_()
    loss_fn(features, torch.tensor([1, 2, 3])).backward()
    assert loss_fn.classifier.weight.grad.abs().sum() > 0 and features.grad is not None
