import logging
import math

import pytest
import torch
import torch.nn.functional as F

from instdisc.losses import NCELoss, ProximalLoss, estimate_log_z, nce_loss, sample_negatives
from instdisc.losses.nce import bank_logits
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


def brute_log_z(noise_logits, num_items):
    """log(n * mean_j exp(logit_j)) over the noise logits, in plain Python floats."""
    values = [math.exp(v) for v in noise_logits.flatten().tolist()]
    return math.log(num_items * sum(values) / len(values))


def test_estimate_log_z_matches_brute_force():
    logits = torch.randn(4, 9, dtype=torch.float64) * 3
    assert estimate_log_z(logits, 1000).item() == pytest.approx(brute_log_z(logits, 1000),
                                                                rel=1e-12)


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
    loss_fn = NCELoss(bank, num_negatives=10, temperature=0.07)  # auto: batch for small m
    torch.manual_seed(1)
    loss = loss_fn(features, indices)
    logits = replay_logits(loss_fn, features, indices, seed=1)
    log_z = torch.tensor(brute_log_z(logits[:, 1:], 50), dtype=logits.dtype)  # noise columns
    assert loss.item() == pytest.approx(reference_nce(logits, log_z, 50).item(), rel=1e-5)
    assert loss_fn.log_z.item() == pytest.approx(log_z.item(), rel=1e-6)
    assert loss_fn.z == pytest.approx(math.exp(log_z.item()), rel=1e-5)


def test_z_estimate_ignores_the_positive_column():
    bank = make_bank()
    features, indices = bank.features[:4].clone(), torch.arange(4)  # positive logit = 1 / tau
    loss_fn = NCELoss(bank, num_negatives=3, temperature=0.05)
    torch.manual_seed(2)
    loss_fn(features, indices)
    logits = replay_logits(loss_fn, features, indices, seed=2)
    assert loss_fn.log_z.item() == pytest.approx(brute_log_z(logits[:, 1:], 50), rel=1e-6)
    assert loss_fn.log_z.item() < brute_log_z(logits, 50) - 1.0  # the positive would dominate


def test_batch_z_follows_every_batch():
    """Default: Z is re-estimated from each batch's noise logits, so it tracks the features."""
    bank = make_bank()
    loss_fn = NCELoss(bank, num_negatives=7, temperature=0.1, z_estimate="batch")
    assert math.isnan(loss_fn.z)
    estimates = []
    for step in range(4):
        features, indices = unit(4, 8, seed=step), torch.randint(0, 50, (4,))
        if step == 3:  # features aligned with bank rows: a much larger Z
            features = bank.features[:4].clone()
        torch.manual_seed(100 + step)
        loss = loss_fn(features, indices)
        logits = replay_logits(loss_fn, features, indices, seed=100 + step)
        expected = brute_log_z(logits[:, 1:], 50)
        assert loss_fn.log_z.item() == pytest.approx(expected, rel=1e-6)
        log_z = torch.tensor(expected, dtype=logits.dtype)
        assert loss.item() == pytest.approx(reference_nce(logits, log_z, 50).item(), rel=1e-5)
        estimates.append(expected)
    assert len({round(e, 4) for e in estimates}) == 4
    assert not loss_fn.z_fixed


def test_auto_z_is_per_row_for_many_negatives_and_pooled_for_few():
    assert NCELoss(make_bank(), num_negatives=10, temperature=0.1).z_estimate == "batch"
    bank = make_bank(num_items=300)
    assert NCELoss(bank, num_negatives=256, temperature=0.1).z_estimate == "row"
    assert NCELoss(bank, num_negatives=256, temperature=0.1,
                   z_estimate="fixed").z_estimate == "fixed"


def test_row_z_is_one_estimate_per_sample_from_its_own_noise_logits():
    bank = make_bank()
    loss_fn = NCELoss(bank, num_negatives=9, temperature=0.1, z_estimate="row")
    features, indices = unit(4, 8, seed=7), torch.tensor([1, 5, 9, 30])
    torch.manual_seed(8)
    loss = loss_fn(features, indices)
    logits = replay_logits(loss_fn, features, indices, seed=8)
    per_row = torch.tensor([[brute_log_z(r[1:], 50)] for r in logits], dtype=logits.dtype)
    assert loss.item() == pytest.approx(reference_nce(logits, per_row, 50).item(), rel=1e-5)
    batch = brute_log_z(logits[:, 1:], 50)
    assert loss.item() != pytest.approx(
        reference_nce(logits, torch.tensor(batch, dtype=logits.dtype), 50).item(), rel=1e-3)
    assert loss_fn.log_z.item() == pytest.approx(batch, rel=1e-6)  # logged: the batch value


def test_fixed_z_accumulates_over_first_batches_then_stays_fixed():
    bank = make_bank()
    loss_fn = NCELoss(bank, num_negatives=7, temperature=0.1, z_batches=3, z_estimate="fixed")
    assert math.isnan(loss_fn.z) and torch.isnan(loss_fn.log_z)
    seen = []
    for step in range(5):
        features, indices = unit(4, 8, seed=step), torch.randint(0, 50, (4,))
        torch.manual_seed(100 + step)
        loss = loss_fn(features, indices)
        logits = replay_logits(loss_fn, features, indices, seed=100 + step)
        if step < 3:
            seen.append(logits[:, 1:])
            running = brute_log_z(torch.cat(seen), 50)  # current batch included
            log_z = torch.tensor(running, dtype=logits.dtype)
            assert loss.item() == pytest.approx(reference_nce(logits, log_z, 50).item(), rel=1e-5)
            assert loss_fn.z == pytest.approx(math.exp(running), rel=1e-5)
            assert loss_fn.z_fixed == (step == 2)
        else:
            assert loss.item() == pytest.approx(reference_nce(logits, fixed, 50).item(), rel=1e-5)
        if step == 2:
            fixed = loss_fn.log_z.clone()
            assert fixed.item() == pytest.approx(running, rel=1e-6)
    assert torch.equal(loss_fn.log_z, fixed)


@pytest.mark.parametrize("z_estimate", ["batch", "fixed"])
def test_z_momentum_is_an_ema_of_the_batch_estimates(z_estimate):
    bank = make_bank()
    loss_fn = NCELoss(bank, num_negatives=7, temperature=0.1, z_batches=1, z_momentum=0.9,
                      z_estimate=z_estimate)
    torch.manual_seed(4)
    loss_fn(unit(4, 8, seed=0), torch.arange(4))
    first = replay_logits(loss_fn, unit(4, 8, seed=0), torch.arange(4), seed=4)
    z0 = math.exp(brute_log_z(first[:, 1:], 50))
    assert loss_fn.z == pytest.approx(z0, rel=1e-5)  # starts at the first batch's estimate
    features, indices = bank.features[4:8].clone(), torch.arange(4, 8)
    torch.manual_seed(5)
    loss_fn(features, indices)
    logits = replay_logits(loss_fn, features, indices, seed=5)
    z_batch = math.exp(brute_log_z(logits[:, 1:], 50))
    assert loss_fn.z == pytest.approx(0.9 * z0 + 0.1 * z_batch, rel=1e-5)
    assert loss_fn.z != pytest.approx(z0, rel=1e-3)


def test_fixed_z_is_logged_once_and_restored_from_state_dict(caplog):
    bank = make_bank()
    loss_fn = NCELoss(bank, num_negatives=5, temperature=0.1, z_batches=2, z_estimate="fixed")
    with caplog.at_level(logging.INFO, logger="instdisc.losses.nce"):
        for step in range(4):
            loss_fn(unit(3, 8, seed=step), torch.arange(3))
    assert sum("fixed after 2 batches" in r.getMessage() for r in caplog.records) == 1
    state = ProximalLoss(loss_fn, bank, 0.1).state_dict()
    assert {"base.log_z", "base.z_lse", "base.z_count", "base.z_batches_seen"} <= set(state)
    restored = NCELoss(make_bank(seed=1), num_negatives=5, temperature=0.1, z_batches=2,
                       z_estimate="fixed")
    ProximalLoss(restored, restored.bank, 0.1).load_state_dict(state)  # nested load hooks run
    assert restored.z_fixed and torch.equal(restored.log_z, loss_fn.log_z)
    assert torch.equal(restored.bank.features, bank.features)


def discrimination_accuracy(z_estimate, steps=150):
    """Free unit features trained against a fixed bank: fraction whose nearest row is their own."""
    torch.manual_seed(0)
    n, dim = 64, 16
    bank = MemoryBank(n, dim, generator=torch.Generator().manual_seed(0))
    raw = torch.nn.Parameter(torch.randn(n, dim, generator=torch.Generator().manual_seed(1)))
    loss_fn = NCELoss(bank, num_negatives=32, temperature=0.1, z_estimate=z_estimate)
    optimizer = torch.optim.SGD([raw], lr=5.0)
    for _ in range(steps):
        indices = torch.randperm(n)[:16]
        loss = loss_fn(F.normalize(raw[indices], dim=1), indices)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    nearest = (F.normalize(raw, dim=1) @ bank.features.T).argmax(dim=1)
    return (nearest == torch.arange(n)).float().mean().item()


def test_nce_learns_to_discriminate_instances():
    assert discrimination_accuracy("batch") > 0.9
    assert discrimination_accuracy("batch", steps=0) < 0.2


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
    with pytest.raises(ValueError, match=r"z_estimate must be one of \['auto', 'batch', 'row', "
                                         r"'fixed'\], "
                                         r"got 'ema'"):
        NCELoss(make_bank(), num_negatives=4, temperature=0.07, z_estimate="ema")


@pytest.mark.parametrize("num_negatives", [3, 40])  # gathered rows / one matmul over the bank
def test_bank_logits_are_the_dot_products_of_the_chosen_rows(num_negatives):
    bank, features = make_bank(), unit(5, 8, seed=3)
    rows = torch.randint(0, 50, (5, 1 + num_negatives), generator=torch.Generator().manual_seed(1))
    expected = torch.stack([bank.features[r] @ f for r, f in zip(rows, features)]) / 0.07
    assert torch.allclose(bank_logits(features, bank.features, rows, 0.07), expected, atol=1e-5)
