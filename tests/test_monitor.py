"""The per-epoch monitor: label-free metrics beside kNN, the epoch-0 (random init) row, progress
lines, agreement with kNN across epochs, and the figure."""

from __future__ import annotations

import dataclasses
import logging
import math

import pytest
import torch

from instdisc import runtime
from instdisc.config import PretrainParams
from instdisc.data.prepared import PreparedDataset
from instdisc.evaluate.knn import knn_accuracy
from instdisc.evaluate.label_free import METRICS, agreement_with_knn
from instdisc.plots import plot_monitor
from instdisc.train import build_trainer, fit

TINY = PretrainParams(width=0.125, feature_dim=16, loss="softmax", epochs=2, batch_size=16,
                      lr_milestones=(), monitor_queries=12, monitor_label_free=10, num_workers=0,
                      channels_last=False, log_every=2)
CPU = torch.device("cpu")


def test_every_epoch_has_label_free_metrics_and_epoch_0_is_the_random_init(small_prepared,
                                                                           tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="instdisc.train")
    trainer = fit(TINY, seed=0, device=CPU, prepared_dir=small_prepared,
                  checkpoint_path=tmp_path / "a.pt")
    assert [row["epoch"] for row in trainer.history] == [1, 2]
    for row in [trainer.initial, *trainer.history]:
        assert set(METRICS) <= set(row)
        assert 0.0 <= row["alignment"] <= 4.0 and -4.0 <= row["uniformity"] <= 0.0
    assert trainer.initial["epoch"] == 0
    # epoch 0 is the encoder before any step: the seeded random init, kNN on its own features
    runtime.seed_everything(0)
    fresh = build_trainer(TINY, PreparedDataset.open(small_prepared), CPU, runtime.DistInfo())
    data = fresh.data
    queries, labels = data.monitor_features(fresh.encoder)
    expected = knn_accuracy(data.train_features(fresh.encoder), data.train_labels, queries,
                            labels, num_classes=3, k=48, sigma=TINY.temperature)["top1"]
    assert trainer.initial["knn_top1"] == pytest.approx(expected)
    assert trainer.initial == {"epoch": 0, "knn_top1": trainer.initial["knn_top1"],
                               **data.label_free_metrics(fresh.encoder, seed=0)}
    assert trainer.history[-1]["alignment"] != trainer.initial["alignment"]
    # 48 images / batch 16 = 3 steps: one progress line (step 2) per epoch, with an ETA
    lines = [r.getMessage() for r in caplog.records if " step " in r.getMessage()]
    assert len(lines) == 2 and all("step 2/3" in line and "img/s" in line and "ETA 0:00:"
                                   in line for line in lines)


def test_the_monitor_does_not_change_training(small_prepared, tmp_path):
    """The monitor's views are drawn from their own generators and the global RNG is restored:
    switching it off gives the same losses and the same bank."""
    on = fit(TINY, seed=0, device=CPU, prepared_dir=small_prepared,
             checkpoint_path=tmp_path / "on.pt")
    quiet = dataclasses.replace(TINY, monitor_label_free=0, monitor_queries=0, log_every=0)
    off = fit(quiet, seed=0, device=CPU, prepared_dir=small_prepared,
              checkpoint_path=tmp_path / "off.pt")
    assert [r["loss"] for r in on.history] == [r["loss"] for r in off.history]
    assert torch.equal(on.bank.features, off.bank.features)
    assert not set(METRICS) & set(off.history[0]) and math.isnan(off.initial["knn_top1"])


def test_resume_keeps_the_epoch_0_row(small_prepared, tmp_path):
    path = tmp_path / "last.pt"
    first = fit(TINY, seed=0, device=CPU, prepared_dir=small_prepared, checkpoint_path=path,
                stop_after=1)
    resumed = fit(TINY, seed=0, device=CPU, prepared_dir=small_prepared, checkpoint_path=path)
    assert len(resumed.history) == 2 and resumed.initial == first.initial


def rows(knn, **columns):
    return [{"epoch": e, "knn_top1": k, **{n: v[e] for n, v in columns.items()}}
            for e, k in enumerate(knn)]


def test_agreement_is_the_signed_rank_correlation_with_knn():
    knn = [20.0, 30.0, 35.0, 41.0]
    out = agreement_with_knn(rows(knn, uniformity=[-0.1, -1.0, -1.5, -2.0],  # lower is better
                                  retrieval_top1=[2.0, 5.0, 4.0, 9.0],
                                  alignment=[0.01, 0.2, 0.3, 0.4],            # worse as kNN rises
                                  alignment_ratio=[0.5, 0.5, 0.5, 0.5]))
    assert out["uniformity"] == pytest.approx(1.0) and out["alignment"] == pytest.approx(-1.0)
    assert out["retrieval_top1"] == pytest.approx(0.8)  # one swapped pair of 4: 1 - 6*2/60
    assert math.isnan(out["alignment_ratio"])           # constant: no ranking
    short = agreement_with_knn(rows([1.0, 2.0], uniformity=[0.0, -1.0]))
    assert math.isnan(short["uniformity"]) and math.isnan(short["retrieval_top1"])
    unlabeled = agreement_with_knn(rows([math.nan] * 4, uniformity=[0.0, -1.0, -2.0, -3.0]))
    assert math.isnan(unlabeled["uniformity"])


def test_monitor_figure_is_written_with_or_without_values(tmp_path):
    history = rows([20.0, 30.0, 35.0], uniformity=[-0.1, -1.0, -1.5])
    plot_monitor(history, tmp_path / "m.png", ["knn_top1", "uniformity", "alignment"],
                 titles={"uniformity": "uniformity\nrank corr. +1.00"})
    plot_monitor([{"epoch": 1, "knn_top1": math.nan}], tmp_path / "off.png", ["knn_top1"])
    for name in ("m.png", "off.png"):
        assert (tmp_path / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
