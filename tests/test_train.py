"""Training loop: schedule, one loop for every loss, resume equivalence, non-finite loss stop."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from instdisc import checkpoint, runtime
from instdisc.config import PretrainParams
from instdisc.data import loaders
from instdisc.data.prepared import PreparedDataset
from instdisc.evaluate.knn import compute_features, knn_accuracy
from instdisc.train import NonFiniteLossError, build_trainer, fit, lr_at, resume_state
from instdisc.train_data import TrainData, stratified_subset

TINY = PretrainParams(width=0.125, feature_dim=16, num_negatives=8, epochs=3, batch_size=16,
                      lr_milestones=(2,), monitor_queries=12, num_workers=0, channels_last=False)
CPU = torch.device("cpu")


def test_lr_schedule_is_the_papers_step_decay():
    lrs = [lr_at(e, 0.03, (120, 160), 0.1) for e in (0, 119, 120, 159, 160, 199)]
    assert lrs == pytest.approx([0.03, 0.03, 0.003, 0.003, 0.0003, 0.0003])


@pytest.mark.parametrize("loss", ["nce", "softmax", "parametric"])
def test_every_loss_trains_through_the_same_loop(small_prepared, tmp_path, loss):
    params = dataclasses.replace(TINY, loss=loss, epochs=1, proximal_lambda=0.0)
    runtime.seed_everything(0)
    initial = build_trainer(params, PreparedDataset.open(small_prepared), CPU, runtime.DistInfo())
    trainer = fit(params, seed=0, device=CPU, prepared_dir=small_prepared,
                  checkpoint_path=tmp_path / "last.pt")
    row = trainer.history[0]
    assert math.isfinite(row["loss"]) and row["loss"] > 0
    # every row was visited (48 images, 3 full batches) and refreshed, and stays unit norm
    moved = (trainer.bank.features - initial.bank.features).norm(dim=1)
    assert (moved > 1e-3).all()
    norms = trainer.bank.features.norm(dim=1)
    assert torch.allclose(norms, torch.ones_like(norms), atol=1e-5)
    # the monitor is kNN of the stratified test subset against the bank, recomputed here
    features, labels = trainer.data.monitor_features(trainer.encoder)
    expected = knn_accuracy(trainer.bank.features, trainer.data.train_labels, features, labels,
                            num_classes=3, k=48, sigma=params.temperature)["top1"]
    assert row["knn_top1"] == pytest.approx(expected)
    assert torch.bincount(labels).tolist() == [4, 4, 4]
    assert (tmp_path / "last.pt").is_file()
    if loss == "nce":
        assert math.isfinite(row["z"]) and row["z"] > 0
    else:
        assert math.isnan(row["z"])


def test_nce_with_proximal_term_trains(small_prepared, tmp_path):
    params = dataclasses.replace(TINY, epochs=1, proximal_lambda=0.5)
    trainer = fit(params, seed=0, device=CPU, prepared_dir=small_prepared,
                  checkpoint_path=tmp_path / "last.pt")
    assert math.isfinite(trainer.history[0]["loss"])


def mean_row_cosine(trainer):
    """Mean cos(v_i, f(x_i)) of bank row i and the encoder's feature of training image i."""
    batches = loaders.eval_batches(trainer.data.train, 64, CPU, mean=trainer.data.mean,
                                   std=trainer.data.std)
    features = compute_features(trainer.encoder, batches, trainer.data.num_items, CPU,
                                progress=False)
    return (features * trainer.bank.features).sum(dim=1).mean().item()


def test_bank_rows_move_towards_the_features(small_prepared, tmp_path):
    params = dataclasses.replace(TINY, epochs=2, loss="softmax")
    runtime.seed_everything(0)
    initial = build_trainer(params, PreparedDataset.open(small_prepared), CPU, runtime.DistInfo())
    trainer = fit(params, seed=0, device=CPU, prepared_dir=small_prepared,
                  checkpoint_path=tmp_path / "last.pt")
    assert abs(mean_row_cosine(initial)) < 0.2          # random rows vs random features
    assert mean_row_cosine(trainer) > 0.5               # each row now tracks its own image
    state = checkpoint.load(tmp_path / "last.pt")
    assert torch.equal(state["bank"]["features"], trainer.bank.features)
    assert state["epoch"] == 2 and len(state["history"]) == 2


def test_monitor_subset_is_stratified_and_seeded():
    labels = torch.arange(4).repeat_interleave(torch.tensor([50, 30, 10, 10]))  # sorted by class
    picked = stratified_subset(labels, 20, seed=3)
    assert torch.bincount(labels[picked], minlength=4).tolist() == [5, 5, 5, 5]
    assert len(set(picked.tolist())) == 20
    assert torch.equal(picked, stratified_subset(labels, 20, seed=3))
    assert not torch.equal(picked, stratified_subset(labels, 20, seed=4))
    assert torch.bincount(labels[stratified_subset(labels, 70, seed=0)]).tolist() == \
        [25, 25, 10, 10]                                # small classes run out, others fill


def test_ranks_share_the_shuffle_but_not_the_random_draws(small_prepared):
    """Under DDP the shards partition the epoch, while augmentation and NCE noise differ per rank;
    the same (seed, epoch, rank) reproduces the same draws."""
    prepared = PreparedDataset.open(small_prepared)

    def epoch(rank, seed=0):
        data = TrainData(prepared, dataclasses.replace(TINY, batch_size=8), CPU,
                         runtime.DistInfo(rank=rank, world_size=2))
        batches = list(data.epoch_batches(seed=seed, epoch=1))
        return torch.cat([i for _, i in batches]), batches[0][0], torch.rand(8)  # noise draw

    idx0, images0, noise0 = epoch(0)
    idx1, images1, noise1 = epoch(1)
    assert set(idx0.tolist()).isdisjoint(idx1.tolist())
    assert len(idx0) + len(idx1) == 48
    assert not torch.equal(noise0, noise1)
    again, images_again, noise_again = epoch(0)
    assert torch.equal(again, idx0) and torch.equal(images_again, images0)
    assert torch.equal(noise_again, noise0)
    # the same images on both ranks get different augmentations
    data = TrainData(prepared, TINY, CPU, runtime.DistInfo())
    views = []
    for rank in (0, 1):
        torch.manual_seed(runtime.rank_seed(0, 1, rank))
        views.append(data.augment(data.train.images[:8]))
    assert not torch.allclose(views[0], views[1])


def test_resume_ends_in_the_same_state_as_an_uninterrupted_run(small_prepared, tmp_path):
    straight = fit(TINY, seed=1, device=CPU, prepared_dir=small_prepared,
                   checkpoint_path=tmp_path / "a.pt")
    fit(TINY, seed=1, device=CPU, prepared_dir=small_prepared, checkpoint_path=tmp_path / "b.pt",
        stop_after=1)
    assert checkpoint.load(tmp_path / "b.pt")["epoch"] == 1
    ran: list[int] = []
    resumed = fit(TINY, seed=1, device=CPU, prepared_dir=small_prepared,
                  checkpoint_path=tmp_path / "b.pt", on_epoch_end=lambda r, e, h: ran.append(e))
    assert ran == [1, 2]                                   # only the epochs that were missing
    assert [r["loss"] for r in resumed.history] == [r["loss"] for r in straight.history]
    assert torch.equal(resumed.bank.features, straight.bank.features)
    for (name, a), b in zip(straight.encoder.state_dict().items(),
                            resumed.encoder.state_dict().values()):
        assert torch.equal(a, b), name


def test_checkpoint_of_other_params_is_not_resumed(small_prepared, tmp_path, caplog):
    fit(dataclasses.replace(TINY, epochs=1), seed=0, device=CPU, prepared_dir=small_prepared,
        checkpoint_path=tmp_path / "last.pt")
    other = dataclasses.replace(TINY, epochs=1, lr=0.01, hue=0.1, log_every=3)
    trainer = fit(other, seed=0, device=CPU, prepared_dir=small_prepared,
                  checkpoint_path=tmp_path / "last.pt")
    assert len(trainer.history) == 1                       # trained afresh, not "already done"
    assert checkpoint.load(tmp_path / "last.pt")["params"]["lr"] == 0.01
    refusal = next(r.getMessage() for r in caplog.records if "ignoring checkpoint" in r.message)
    assert "pretrain.lr: 0.03 -> 0.01" in refusal and "pretrain.hue: 0.0 -> 0.1" in refusal
    assert "log_every" not in refusal                      # operational: not a reason


def test_operational_keys_resume_a_finished_run_without_training(small_prepared, tmp_path, caplog):
    caplog.set_level("INFO", logger="instdisc.train")
    path = tmp_path / "last.pt"
    done = fit(dataclasses.replace(TINY, epochs=1), seed=0, device=CPU,
               prepared_dir=small_prepared, checkpoint_path=path)
    ops = dataclasses.replace(TINY, epochs=1, num_workers=2, log_every=7, monitor_queries=5,
                              monitor_label_free=0, channels_last=True, nproc_per_node=1)
    ran: list[int] = []
    again = fit(ops, seed=0, device=CPU, prepared_dir=small_prepared, checkpoint_path=path,
                on_epoch_end=lambda r, e, h: ran.append(e))
    assert ran == [] and again.history == done.history      # nothing retrained
    assert torch.equal(again.bank.features, done.bank.features)
    assert "operational keys changed: channels_last, log_every, monitor_label_free, " \
        "monitor_queries, num_workers" in caplog.text


def test_checkpoint_of_other_data_is_not_resumed(small_prepared, tmp_path, caplog):
    path = tmp_path / "last.pt"
    fit(dataclasses.replace(TINY, epochs=1), seed=0, device=CPU, prepared_dir=small_prepared,
        checkpoint_path=path)
    saved = checkpoint.load(path)["fingerprint"]
    assert resume_state(path, dataclasses.replace(TINY, epochs=1), saved) is not None
    assert resume_state(path, dataclasses.replace(TINY, epochs=1), "f" * 64) is None
    assert f"other data (dataset fingerprint {saved[:12]}, this data ffffffffffff)" in caplog.text


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(small_prepared, tmp_path):
    path = tmp_path / "last.pt"
    fit(dataclasses.replace(TINY, epochs=1), seed=0, device=CPU, prepared_dir=small_prepared,
        checkpoint_path=path)
    good = path.read_bytes()
    exploding = dataclasses.replace(TINY, epochs=1, lr=1e30, weight_decay=0.0)
    with pytest.raises(NonFiniteLossError, match="loss"):
        fit(exploding, seed=0, device=CPU, prepared_dir=small_prepared, checkpoint_path=path)
    assert path.read_bytes() == good


def test_too_many_negatives_fail_before_training(small_prepared, tmp_path):
    with pytest.raises(ValueError, match=r"num_negatives\] = 48: must be smaller than the number "
                                         r"of training images \(48\)"):
        fit(dataclasses.replace(TINY, num_negatives=48), seed=0, device=CPU,
            prepared_dir=small_prepared, checkpoint_path=tmp_path / "last.pt")
    assert not (tmp_path / "last.pt").exists()


def test_cpu_bf16_is_detected_from_the_cpu_flags():
    intel = "processor\t: 0\nflags\t\t: fpu sse avx2 avx512f avx512_bf16 amx_tile\n"
    assert runtime.cpu_has_bf16(intel)
    assert runtime.cpu_has_bf16("flags\t: fpu avx2 amx_bf16 amx_tile\n")
    assert not runtime.cpu_has_bf16("flags\t: fpu sse avx2 avx512f avx512_vnni\n")
    assert not runtime.cpu_has_bf16("processor\t: 0\nFeatures\t: fp asimd\n")  # arm64
    assert not runtime.cpu_has_bf16("")


@pytest.mark.parametrize("amp, native, expected", [(True, True, torch.bfloat16),
                                                   (True, False, torch.float32),
                                                   (False, True, torch.float32)])
def test_cpu_training_autocasts_to_bf16_only_where_the_cpu_has_it(
        small_prepared, tmp_path, monkeypatch, caplog, amp, native, expected):
    import logging

    from instdisc import train

    monkeypatch.setattr(runtime, "cpu_has_bf16", lambda: native)
    params = dataclasses.replace(TINY, epochs=1, amp=amp)
    caplog.set_level(logging.INFO, logger="instdisc.train")
    seen, embedded = [], []
    real = train.train_one_epoch

    def spy(encoder, *args, **kwargs):  # output dtypes of the trunk and the embedding
        hooks = [encoder.trunk.register_forward_hook(lambda m, i, out: seen.append(out.dtype)),
                 encoder.register_forward_hook(lambda m, i, out: embedded.append(out.dtype))]
        try:
            return real(encoder, *args, **kwargs)
        finally:
            for hook in hooks:
                hook.remove()

    monkeypatch.setattr(train, "train_one_epoch", spy)
    trainer = fit(params, seed=0, device=CPU, prepared_dir=small_prepared,
                  checkpoint_path=tmp_path / "last.pt")
    assert seen and set(seen) == {expected}
    assert set(embedded) == {torch.float32}  # head + normalisation in fp32 under autocast too
    assert trainer.bank.features.dtype == torch.float32  # the bank and the loss stay fp32
    assert math.isfinite(trainer.history[0]["loss"])
    words = {torch.bfloat16: "bf16 autocast on the CPU",
             torch.float32: "amp is off" if not amp else "no native bf16"}[expected]
    assert words in caplog.text


def test_min_steps_stretches_epochs_and_milestones_on_a_small_set():
    from instdisc.train import schedule

    params = dataclasses.replace(TINY, epochs=40, lr_milestones=(30, 36), min_steps=1800)
    assert schedule(params, 46) == (40, (30, 36), 46)  # 1840 steps already: unchanged
    small = schedule(params, 11)                          # 750 images at batch 64
    assert small.epochs == 164 and small.epochs * 11 >= 1800 > (small.epochs - 1) * 11
    assert small.milestones == (123, 148)                 # 30/40 and 36/40 of the run
    assert schedule(dataclasses.replace(params, min_steps=0), 11) == (40, (30, 36), 11)


def test_a_min_steps_run_trains_that_many_steps(small_prepared, tmp_path):
    params = dataclasses.replace(TINY, epochs=2, lr_milestones=(1,), min_steps=10)
    trainer = fit(params, seed=0, device=CPU, prepared_dir=small_prepared,
                  checkpoint_path=tmp_path / "last.pt")
    assert trainer.data.steps_per_epoch() == 3            # 48 images, batch 16
    assert len(trainer.history) == 4                      # ceil(10 / 3) epochs, not 2
    lrs = [r["lr"] for r in trainer.history]              # the milestone moves from 1 to 2
    assert lrs == pytest.approx([0.03, 0.03, 0.003, 0.003])


def test_monitor_plan_keeps_monitoring_under_its_share_of_training_time():
    from instdisc.train import MonitorPlan

    fixed = MonitorPlan(every=3, last_epoch=7)
    due = []
    for epoch in range(8):
        if fixed.due(epoch):
            due.append(epoch)
            fixed.record(epoch, train_seconds=1.0, monitor_seconds=5.0)  # ignored: fixed
    assert due == [0, 3, 6, 7]
    auto = MonitorPlan(every=0, last_epoch=99)
    auto.record(0, train_seconds=2.0, monitor_seconds=0.7)   # 35% of 2 s: every 4th epoch
    assert [e for e in range(1, 9) if auto.due(e)] == [4, 5, 6, 7, 8]
    auto.record(4, train_seconds=2.0, monitor_seconds=0.1)   # cheap now: every epoch
    assert auto.due(5) and auto.due(99)


def test_unmonitored_epochs_have_nan_monitor_columns(small_prepared, tmp_path):
    params = dataclasses.replace(TINY, epochs=4, lr_milestones=(), monitor_every=2,
                                 monitor_label_free=8)
    trainer = fit(params, seed=0, device=CPU, prepared_dir=small_prepared,
                  checkpoint_path=tmp_path / "last.pt")
    knn = [r["knn_top1"] for r in trainer.history]
    assert [math.isfinite(v) for v in knn] == [True, False, True, True]   # 0, 2 and the last
    free = [r["uniformity"] for r in trainer.history]
    assert [math.isfinite(v) for v in free] == [True, False, True, True]
    assert set(trainer.history[1]) == set(trainer.history[0])            # one CSV schema
    assert trainer.history[1]["monitor_seconds"] < trainer.history[0]["monitor_seconds"]
