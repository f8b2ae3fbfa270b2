import pytest
import torch
import torch.nn.functional as F

from instdisc.memory_bank import MemoryBank


def make_bank(momentum=0.5, num_items=10, dim=4):
    return MemoryBank(num_items, dim, momentum, generator=torch.Generator().manual_seed(0))


def test_memory_bank_rejects_momentum_of_one():
    with pytest.raises(ValueError, match=r"momentum must be in \[0, 1\), got 1.0"):
        MemoryBank(num_items=10, dim=4, momentum=1.0)


def test_bank_starts_with_reproducible_unit_rows_in_a_buffer():
    bank = make_bank()
    assert (bank.num_items, bank.dim) == (10, 4) and bank.features.shape == (10, 4)
    assert torch.allclose(bank.features.norm(dim=1), torch.ones(10))
    assert torch.equal(bank.features, make_bank().features)
    assert "features" in bank.state_dict() and list(bank.parameters()) == []
    assert bank.to(torch.float64).features.dtype == torch.float64  # buffers follow .to()


def test_update_matches_hand_computation():
    bank = make_bank(momentum=0.5)
    old = bank.features.clone()
    features = F.normalize(torch.randn(2, 4), dim=1)
    bank.update(torch.tensor([3, 7]), features)
    for row, f in zip([3, 7], features):
        mixed = 0.5 * old[row] + 0.5 * f
        assert torch.allclose(bank.features[row], mixed / mixed.norm(), atol=1e-7)
    untouched = [i for i in range(10) if i not in (3, 7)]
    assert torch.equal(bank.features[untouched], old[untouched])


def test_momentum_zero_copies_the_normalised_feature():
    bank = make_bank(momentum=0.0)
    features = torch.tensor([[3.0, 0.0, 4.0, 0.0]])
    bank.update(torch.tensor([2]), features)
    assert torch.allclose(bank.features[2], torch.tensor([0.6, 0.0, 0.8, 0.0]))


def test_duplicate_indices_last_occurrence_wins():
    bank = make_bank(momentum=0.5)
    old = bank.features.clone()
    features = F.normalize(torch.randn(4, 4), dim=1)
    bank.update(torch.tensor([5, 1, 5, 5]), features)
    expected = F.normalize(0.5 * old[5] + 0.5 * features[3], dim=0)  # last write, from old v_5
    assert torch.allclose(bank.features[5], expected, atol=1e-7)
    assert torch.allclose(bank.features[1], F.normalize(0.5 * old[1] + 0.5 * features[1], dim=0))


def test_rows_stay_unit_norm_and_update_takes_no_grad():
    bank = make_bank(momentum=0.3, num_items=50, dim=16)
    for step in range(20):
        features = torch.randn(8, 16, requires_grad=True) * (step + 1)  # not even unit norm
        bank.update(torch.randint(0, 50, (8,)), features.bfloat16())
    assert torch.allclose(bank.features.norm(dim=1), torch.ones(50), atol=1e-6)
    assert bank.features.dtype == torch.float32 and not bank.features.requires_grad


def test_update_rejects_mismatched_shapes():
    with pytest.raises(ValueError, match=r"expected indices \(B,\) and features \(B, 4\)"):
        make_bank().update(torch.tensor([1, 2]), torch.randn(2, 5))
