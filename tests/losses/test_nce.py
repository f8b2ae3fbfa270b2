import logging
import math

import pytest
import torch
import torch.nn.functional as F

from instdisc.losses import NCELoss, ProximalLoss, estimate_log_z, nce_loss, sample_negatives
from instdisc.memory_bank import MemoryBank


def reference_nce(logits, log_z, num_items):
    """The paper's formula, literally, one sample at a time: slow and obvious."""
    p, m_pn = torch.exp(logits - log_z), (logits.shape[1] - 1) / num_items
    return torch.stack([-(torch.log(r[0] / (r[0] + m_pn)) + torch.log(m_pn / (r[1:] + m_pn)).sum())
                        for r in p]).mean()


def make_bank(num_items=50, dim=8, seed=0):
    return MemoryBank(num_items, dim, momentum=0.5, generator=torch.Generator().manual_seed(seed))


def unit(*shape, seed=0):
    return F.normalize(torch.randn(*shape, generator=torch.Generator().manual_seed(seed)), dim=-1)


def replay_logits(loss_fn, features, indices, seed):
    """The logits NCELoss computes after torch.manual_seed(seed), recomputed by hand."""
    torch.manual_seed(seed)
    noise = sample_negatives(indices, loss_fn.bank.num_items, loss_fn.num_negatives)
    rows = torch.cat([indices[:, None], noise], dim=1)
    return torch.stack([loss_fn.bank.features[r] @ f for r, f in zip(rows, features)]) \
        / loss_fn.temperature


@pytest.mark.parametrize("batch_size", [1, 5])
@pytest.mark.parametrize("num_negatives", [1, 16])
def test_nce_loss_matches_reference(batch_size, num_negatives):
    logits = torch.randn(batch_size, 1 + num_negatives, dtype=torch.float64) / 0.07
    log_z = estimate_log_z(logits, num_items=1000)
    expected = reference_nce(logits, log_z, 1000).item()
    assert nce_loss(logits, log_z, 1000).item() == pytest.approx(expected)


def test_estimate_log_z_matches_brute_force():
    logits = torch.randn(4, 9, dtype=torch.float64) * 3
    brute = math.log(1000 * torch.exp(logits).mean().item())
    assert estimate_log_z(logits, 1000).item() == pytest.approx(brute, rel=1e-12)


def test_no_overflow_with_small_temperature_and_large_logits():
    logits = torch.full((4, 17), 100.0)  # cos = 1 at tau = 0.01: exp(100) overflows float32
    logits[:, 1:] = -100.0
    log_z = estimate_log_z(logits, 10**6)
    loss = nce_loss(logits, log_z, 10**6)
    assert torch.isfinite(log_z) and torch.isfinite(loss)
    bank = make_bank()
    loss_fn = NCELoss(bank, num_negatives=16, temperature=0.01)
    features = bank.features[:4].clone().requires_grad_()  # positive logits = 1 / 0.01
    out = loss_fn(features, torch.arange(4))
    out.backward()
    assert torch.isfinite(out) and torch.isfinite(features.grad).all()


def test_sample_negatives_never_draws_the_positive_and_is_uniform():
    torch.manual_seed(0)
    n, m = 5, 4000
    indices = torch.arange(n).repeat(3)  # (15,)
    draws = sample_negatives(indices, n, m)
    assert draws.shape == (15, m) and draws.dtype == torch.long
    assert not (draws == indices[:, None]).any()
    assert draws.min() >= 0 and draws.max() < n
    for row, positive in zip(draws, indices.tolist()):
        counts = torch.bincount(row, minlength=n).double()
        others = torch.cat([counts[:positive], counts[positive + 1:]])
        expected = m / (n - 1)
        chi2 = ((others - expected) ** 2 / expected).sum().item()
        assert chi2 < 20.0  # 3 degrees of freedom: P(chi2 > 20) ~ 2e-4


def test_nce_module_matches_reference_formula():
    bank, features, indices = make_bank(), unit(6, 8), torch.tensor([0, 3, 7, 7, 20, 49])
    loss_fn = NCELoss(bank, num_negatives=10, temperature=0.07)
    torch.manual_seed(1)
    loss = loss_fn(features, indices)
    logits = replay_logits(loss_fn, features, indices, seed=1)
    log_z = estimate_log_z(logits, bank.num_items)
    assert loss.item() == pytest.approx(reference_nce(logits, log_z, 50).item(), rel=1e-5)
    assert loss_fn.log_z.item() == pytest.approx(log_z.item(), rel=1e-6)
    assert loss_fn.z == pytest.approx(math.exp(log_z.item()), rel=1e-5)


def test_z_accumulates_over_first_batches_then_stays_fixed():
    bank = make_bank()
    loss_fn = NCELoss(bank, num_negatives=7, temperature=0.1, z_batches=3)
    assert math.isnan(loss_fn.z) and torch.isnan(loss_fn.log_z)
    seen = []
    for step in range(5):
        features, indices = unit(4, 8, seed=step), torch.randint(0, 50, (4,))
        torch.manual_seed(100 + step)
        loss = loss_fn(features, indices)
        logits = replay_logits(loss_fn, features, indices, seed=100 + step)
        if step < 3:
            seen.append(logits)
            running = estimate_log_z(torch.cat(seen), bank.num_items)  # current batch included
            assert loss.item() == pytest.approx(nce_loss(logits, running, 50).item(), rel=1e-5)
            assert loss_fn.z == pytest.approx(math.exp(running.item()), rel=1e-5)
            assert loss_fn.z_fixed == (step == 2)
        else:
            assert loss.item() == pytest.approx(nce_loss(logits, fixed, 50).item(), rel=1e-5)
        if step == 2:
            fixed = loss_fn.log_z.clone()
            assert fixed.item() == pytest.approx(running.item(), rel=1e-6)
    assert torch.equal(loss_fn.log_z, fixed)


def test_z_momentum_updates_z_as_an_ema_after_the_estimate():
    bank = make_bank()
    loss_fn = NCELoss(bank, num_negatives=7, temperature=0.1, z_batches=1, z_momentum=0.9)
    loss_fn(unit(4, 8, seed=0), torch.arange(4))
    z0 = loss_fn.z
    features, indices = unit(4, 8, seed=1) * -1, torch.arange(4, 8)
    torch.manual_seed(5)
    loss_fn(features, indices)
    logits = replay_logits(loss_fn, features, indices, seed=5)
    z_batch = math.exp(estimate_log_z(logits, 50).item())
    assert loss_fn.z == pytest.approx(0.9 * z0 + 0.1 * z_batch, rel=1e-5)
    assert loss_fn.z != pytest.approx(z0, rel=1e-3)


def test_z_is_logged_once_and_restored_from_state_dict(caplog):
    bank = make_bank()
    loss_fn = NCELoss(bank, num_negatives=5, temperature=0.1, z_batches=2)
    with caplog.at_level(logging.INFO, logger="instdisc.losses.nce"):
        for step in range(4):
            loss_fn(unit(3, 8, seed=step), torch.arange(3))
    assert sum("fixed after 2 batches" in r.getMessage() for r in caplog.records) == 1
    state = ProximalLoss(loss_fn, bank, 0.1).state_dict()
    assert {"base.log_z", "base.z_lse", "base.z_count", "base.z_batches_seen"} <= set(state)
    restored = NCELoss(make_bank(seed=1), num_negatives=5, temperature=0.1, z_batches=2)
    ProximalLoss(restored, restored.bank, 0.1).load_state_dict(state)  # nested load hooks run
    assert restored.z_fixed and torch.equal(restored.log_z, loss_fn.log_z)
    assert torch.equal(restored.bank.features, bank.features)


def test_gradient_flows_to_features_not_to_the_bank():
    bank = make_bank()
    features = unit(4, 8).requires_grad_()
    NCELoss(bank, num_negatives=5, temperature=0.07)(features, torch.arange(4)).backward()
    assert features.grad is not None and features.grad.abs().sum() > 0
    assert not bank.features.requires_grad and bank.features.grad is None


def test_nce_rejects_bad_arguments():
    with pytest.raises(ValueError, match=r"num_negatives must be >= 1, got 0"):
        NCELoss(make_bank(), num_negatives=0, temperature=0.07)
    with pytest.raises(ValueError, match=r"z_momentum must be in \[0, 1\), got 1.0"):
        NCELoss(make_bank(), num_negatives=4, temperature=0.07, z_momentum=1.0)
