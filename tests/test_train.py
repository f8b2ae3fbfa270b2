"""Training loop: schedule, one loop for every loss, resume equivalence, non-finite loss stop."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from instdisc import checkpoint, runtime
from instdisc.config import PrepareParams, PretrainParams, SyntheticParams
from instdisc.data.prepare import prepare
from instdisc.train import NonFiniteLossError, fit, lr_at

TINY = PretrainParams(width=0.125, feature_dim=16, num_negatives=8, epochs=3, batch_size=16,
                      lr_milestones=(2,), monitor_queries=12, num_workers=0, channels_last=False)
CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def prepared_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("prepared") / "prepared"
    params = PrepareParams(synthetic=SyntheticParams(num_classes=3, train_per_class=16,
                                                     test_per_class=4, image_size=16))
    prepare(params, seed=0, out_dir=out, progress=False)
    return out


def test_lr_schedule_is_the_papers_step_decay():
    lrs = [lr_at(e, 0.03, (120, 160), 0.1) for e in (0, 119, 120, 159, 160, 199)]
    assert lrs == pytest.approx([0.03, 0.03, 0.003, 0.003, 0.0003, 0.0003])


@pytest.mark.parametrize("loss", ["nce", "softmax", "parametric"])
def test_every_loss_trains_through_the_same_loop(prepared_dir, tmp_path, loss):
    params = dataclasses.replace(TINY, loss=loss, epochs=1, proximal_lambda=0.0)
    trainer = fit(params, seed=0, device=CPU, prepared_dir=prepared_dir,
                  checkpoint_path=tmp_path / "last.pt")
    row = trainer.history[0]
    assert math.isfinite(row["loss"]) and row["loss"] > 0
    assert 0.0 <= row["knn_top1"] <= 100.0
    norms = trainer.bank.features.norm(dim=1)
    assert torch.allclose(norms, torch.ones_like(norms), atol=1e-5)
    assert (tmp_path / "last.pt").is_file()
    if loss == "nce":
        assert math.isfinite(row["z"]) and row["z"] > 0


def test_nce_with_proximal_term_trains(prepared_dir, tmp_path):
    params = dataclasses.replace(TINY, epochs=1, proximal_lambda=0.5)
    trainer = fit(params, seed=0, device=CPU, prepared_dir=prepared_dir,
                  checkpoint_path=tmp_path / "last.pt")
    assert math.isfinite(trainer.history[0]["loss"])


def test_bank_rows_move_towards_the_features(prepared_dir, tmp_path):
    params = dataclasses.replace(TINY, epochs=1)
    runtime.seed_everything(0)
    trainer = fit(params, seed=0, device=CPU, prepared_dir=prepared_dir,
                  checkpoint_path=tmp_path / "last.pt")
    state = checkpoint.load(tmp_path / "last.pt")
    assert torch.equal(state["bank"]["features"], trainer.bank.features)
    assert state["epoch"] == 1 and len(state["history"]) == 1


def test_resume_ends_in_the_same_state_as_an_uninterrupted_run(prepared_dir, tmp_path):
    straight = fit(TINY, seed=1, device=CPU, prepared_dir=prepared_dir,
                   checkpoint_path=tmp_path / "a.pt")
    fit(TINY, seed=1, device=CPU, prepared_dir=prepared_dir, checkpoint_path=tmp_path / "b.pt",
        stop_after=1)
    assert checkpoint.load(tmp_path / "b.pt")["epoch"] == 1
    ran: list[int] = []
    resumed = fit(TINY, seed=1, device=CPU, prepared_dir=prepared_dir,
                  checkpoint_path=tmp_path / "b.pt", on_epoch_end=lambda r, e, h: ran.append(e))
    assert ran == [1, 2]                                   # only the epochs that were missing
    assert [r["loss"] for r in resumed.history] == [r["loss"] for r in straight.history]
    assert torch.equal(resumed.bank.features, straight.bank.features)
    for (name, a), b in zip(straight.encoder.state_dict().items(),
                            resumed.encoder.state_dict().values()):
        assert torch.equal(a, b), name


def test_checkpoint_of_other_params_is_not_resumed(prepared_dir, tmp_path):
    fit(dataclasses.replace(TINY, epochs=1), seed=0, device=CPU, prepared_dir=prepared_dir,
        checkpoint_path=tmp_path / "last.pt")
    other = dataclasses.replace(TINY, epochs=1, lr=0.01)
    trainer = fit(other, seed=0, device=CPU, prepared_dir=prepared_dir,
                  checkpoint_path=tmp_path / "last.pt")
    assert len(trainer.history) == 1                       # trained afresh, not "already done"
    assert checkpoint.load(tmp_path / "last.pt")["params"]["lr"] == 0.01


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(prepared_dir, tmp_path):
    path = tmp_path / "last.pt"
    fit(dataclasses.replace(TINY, epochs=1), seed=0, device=CPU, prepared_dir=prepared_dir,
        checkpoint_path=path)
    good = path.read_bytes()
    exploding = dataclasses.replace(TINY, epochs=1, lr=1e30, weight_decay=0.0)
    with pytest.raises(NonFiniteLossError, match="loss"):
        fit(exploding, seed=0, device=CPU, prepared_dir=prepared_dir, checkpoint_path=path)
    assert path.read_bytes() == good


def test_too_many_negatives_fail_before_training(prepared_dir, tmp_path):
    with pytest.raises(ValueError, match=r"num_negatives\] = 48: must be smaller than the number "
                                         r"of training images \(48\)"):
        fit(dataclasses.replace(TINY, num_negatives=48), seed=0, device=CPU,
            prepared_dir=prepared_dir, checkpoint_path=tmp_path / "last.pt")
    assert not (tmp_path / "last.pt").exists()
