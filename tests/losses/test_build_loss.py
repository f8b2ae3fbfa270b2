import pytest
import torch

from instdisc.losses import (FullSoftmaxLoss, NCELoss, ParametricSoftmaxLoss, ProximalLoss,
                             build_loss)
from instdisc.memory_bank import MemoryBank

ARGS = dict(num_items=30, feature_dim=8, num_negatives=4, temperature=0.07, z_batches=2,
            z_momentum=0.0)


@pytest.mark.parametrize("name, cls", [("nce", NCELoss), ("softmax", FullSoftmaxLoss),
                                       ("parametric", ParametricSoftmaxLoss)])
def test_build_loss_builds_each_objective(name, cls):
    bank = MemoryBank(30, 8)
    loss_fn = build_loss(name, bank=bank, proximal_lambda=0.0, **ARGS)
    assert type(loss_fn) is cls
    assert loss_fn(torch.nn.functional.normalize(torch.randn(2, 8), dim=1),
                   torch.tensor([0, 29])).ndim == 0


def test_build_loss_wraps_bank_losses_in_the_proximal_term():
    bank = MemoryBank(30, 8)
    loss_fn = build_loss("nce", bank=bank, proximal_lambda=0.5, **ARGS)
    assert isinstance(loss_fn, ProximalLoss) and isinstance(loss_fn.base, NCELoss)
    assert loss_fn.bank is bank and loss_fn.base.bank is bank and loss_fn.lam == 0.5


def test_build_loss_rejects_unknown_names_and_bad_combinations():
    with pytest.raises(ValueError, match=r"unknown loss 'ncee'; allowed: \['nce', 'softmax', "
                                         r"'parametric'\]"):
        build_loss("ncee", bank=None, **ARGS)
    with pytest.raises(ValueError, match=r"proximal_lambda = 0.5 needs a memory bank"):
        build_loss("parametric", bank=None, proximal_lambda=0.5, **ARGS)
    with pytest.raises(ValueError, match=r"loss 'softmax' needs a memory bank"):
        build_loss("softmax", bank=None, **ARGS)
    with pytest.raises(ValueError, match=r"bank is \(31, 8\)"):
        build_loss("nce", bank=MemoryBank(31, 8), **ARGS)
