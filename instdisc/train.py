"""The training loop shared by every objective (Wu et al. 2018, arXiv:1805.01978, Sec. 3).

`train_one_epoch` is one pass; `fit` builds the encoder, memory bank and loss from the params,
resumes from the last checkpoint when it matches, runs the epochs with the paper's step schedule,
monitors kNN accuracy from the bank and the label-free metrics of held-out images (also once before
the first step: the "epoch 0" row of the random-init encoder), writes a checkpoint after every epoch
and the encoder at the end. Long epochs log a progress line every `log_every` steps and show a tqdm
bar when stderr is a terminal.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import sys
import time
from collections.abc import Callable, Iterable
from contextlib import nullcontext
from pathlib import Path
from typing import Any, NamedTuple

import torch
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel
from torch.optim import Optimizer
from tqdm import tqdm

from instdisc import checkpoint, runtime
from instdisc.errors import StageError
from instdisc.config import OPERATIONAL_KEYS, PretrainParams
from instdisc.data.prepared import PreparedDataset
from instdisc.evaluate import label_free
from instdisc.evaluate.knn import compute_features, knn_accuracy
from instdisc.losses import build_loss
from instdisc.memory_bank import MemoryBank
from instdisc.models.encoder import build_encoder
from instdisc.train_data import TrainData

log = logging.getLogger(__name__)

EpochHook = Callable[[dict[str, float], int, list[dict[str, float]]], None]


class NonFiniteLossError(StageError):
    """The loss became NaN or infinite; the last good checkpoint is kept."""


def lr_at(epoch: int, base_lr: float, milestones: Iterable[int], gamma: float) -> float:
    """Step decay: base_lr * gamma^(number of milestones <= epoch), epochs counted from 0."""
    return base_lr * gamma ** sum(1 for m in milestones if epoch >= m)


class Schedule(NamedTuple):
    """How long a run trains and when its lr drops, in epochs (of `steps_per_epoch` steps)."""

    epochs: int
    milestones: tuple[int, ...]
    steps_per_epoch: int


def schedule(params: PretrainParams, steps_per_epoch: int) -> Schedule:
    """`params.epochs`, or more when that is fewer than `params.min_steps` SGD steps: then
    ceil(min_steps / steps_per_epoch) epochs, with lr_milestones stretched by the same factor
    (rounded), so the schedule keeps its shape on a set of any size."""
    epochs, milestones = params.epochs, tuple(params.lr_milestones)
    if params.min_steps and epochs * steps_per_epoch < params.min_steps:
        longer = -(-params.min_steps // max(1, steps_per_epoch))
        milestones = tuple(max(1, round(m * longer / epochs)) for m in milestones)
        epochs = longer
    return Schedule(epochs, milestones, steps_per_epoch)


MONITOR_SHARE = 0.10  # monitor_every 0: monitoring costs at most this share of training time


class MonitorPlan:
    """Which epochs run the per-epoch monitors (kNN and label-free). `every` >= 1: every that
    many epochs; 0: as often as keeps them under MONITOR_SHARE of the training time, priced on
    the last monitored epoch (a small set's epochs are short and its monitor is not). The first
    and the last epoch of a run are always monitored."""

    def __init__(self, every: int, last_epoch: int) -> None:
        self.every, self.last_epoch = every, last_epoch
        self.interval, self.next = max(1, every), 0

    def due(self, epoch: int) -> bool:
        return epoch >= self.next or epoch == self.last_epoch

    def record(self, epoch: int, train_seconds: float, monitor_seconds: float) -> None:
        if not self.every and train_seconds > 0:
            self.interval = max(1, math.ceil(monitor_seconds / (MONITOR_SHARE * train_seconds)))
        self.next = epoch + self.interval


class Progress:
    """Progress of one epoch: a log line every `log_every` steps (loss, img/s, ETA of the epoch)
    and a tqdm bar when stderr is a terminal. `world_size` scales img/s to all ranks; a disabled
    one (other ranks) does nothing. The loss is read (a device sync) only on logged steps."""

    def __init__(self, total_steps: int | None, log_every: int, desc: str = "",
                 world_size: int = 1, enabled: bool = True) -> None:
        self.total, self.log_every, self.desc = total_steps, log_every, desc
        self.world_size, self.enabled = world_size, enabled
        self.start = time.perf_counter()
        self.bar = tqdm(total=total_steps, desc=desc or "train", unit="step", leave=False,
                        disable=not enabled or not sys.stderr.isatty(), mininterval=1.0)

    def step(self, step: int, loss: Tensor, images: int) -> None:
        """After step `step` (0-based), `images` images seen so far on this rank."""
        if not self.enabled:
            return
        self.bar.update(1)
        if self.log_every <= 0 or (step + 1) % self.log_every:
            return
        elapsed = time.perf_counter() - self.start
        rate = images * self.world_size / elapsed if elapsed > 0 else math.nan
        eta = ""
        if self.total:
            eta = f"  ETA {_clock(elapsed / (step + 1) * (self.total - step - 1))}"
        value = loss.item()
        self.bar.set_postfix(loss=f"{value:.4f}", refresh=False)
        log.info("%s step %d/%s  loss %.4f  %.0f img/s%s", self.desc, step + 1,
                 self.total or "?", value, rate, eta)

    def close(self) -> None:
        self.bar.close()


def _clock(seconds: float) -> str:
    """h:mm:ss of a duration."""
    seconds = max(0, int(round(seconds)))
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


def train_one_epoch(encoder: nn.Module, loss_fn: nn.Module, bank: MemoryBank,
                    optimizer: Optimizer, batches: Iterable[tuple[Tensor, Tensor]],
                    autocast: Any = nullcontext, check_every: int = 50,
                    progress: Progress | None = None) -> dict[str, float]:
    """One pass over `batches`; the bank is refreshed after every step, outside autograd.

    Returns {"loss": mean loss, "images": count}. Raises NonFiniteLossError as soon as a
    non-finite loss is seen (checked every `check_every` steps and at the end, to avoid a
    device sync per step). `progress` is told of every step.
    """
    encoder.train()
    loss_fn.train()
    total, seen = None, 0
    for step, (images, indices) in enumerate(batches):
        with autocast():
            features = encoder(images)                       # (B, D), unit norm
        features = features.float()                          # loss math in fp32
        loss = loss_fn(features, indices)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        bank.update(indices, features.detach())              # explicit; never inside autograd
        weighted = loss.detach() * len(indices)
        total = weighted if total is None else total + weighted
        seen += len(indices)
        if progress is not None:
            progress.step(step, loss.detach(), seen)
        if step % check_every == check_every - 1 and not torch.isfinite(total):
            raise NonFiniteLossError(f"loss became {loss.item()} at step {step}")
    if total is None:
        raise ValueError("the training split yields no batch: batch_size exceeds the number "
                         "of training images")
    mean = (total / seen).item()
    if not math.isfinite(mean):
        raise NonFiniteLossError(f"mean loss of the epoch is {mean}")
    return {"loss": mean, "images": float(seen)}


def knn_monitor(encoder: nn.Module, bank: MemoryBank, data: TrainData,
                temperature: float) -> float:
    """Cheap per-epoch kNN top-1 (%): bank rows as the labelled set, against the test images of
    `data.monitor` (a fixed class-stratified subset; nan without one)."""
    if data.monitor is None:
        return float("nan")
    features, labels = data.monitor_features(encoder)
    acc = knn_accuracy(bank.features, data.train_labels, features, labels,
                       num_classes=data.num_classes, k=min(200, bank.num_items),
                       sigma=temperature)
    return acc["top1"]


@dataclasses.dataclass
class Trainer:
    """Everything `fit` builds once: modules, optimizer and data, on one device."""

    params: PretrainParams
    encoder: nn.Module
    bank: MemoryBank
    loss_fn: nn.Module
    optimizer: Optimizer
    data: TrainData
    device: torch.device
    dist: runtime.DistInfo
    history: list[dict] = dataclasses.field(default_factory=list)
    initial: dict[str, float] = dataclasses.field(default_factory=dict)  # the epoch-0 monitor row

    @property
    def schedule(self) -> Schedule:
        return schedule(self.params, self.data.steps_per_epoch())

    def state(self, epoch: int, history: list[dict], fingerprint: str) -> dict[str, Any]:
        """The resumable training checkpoint (dicts of state_dicts + plain metadata)."""
        return {
            "format_version": checkpoint.FORMAT_VERSION,
            "epoch": epoch,
            "params": dataclasses.asdict(self.params),
            "fingerprint": fingerprint,
            "encoder": _unwrap(self.encoder).state_dict(),
            "bank": self.bank.state_dict(),
            "loss": _loss_state(_unwrap(self.loss_fn), self.bank),
            "optimizer": self.optimizer.state_dict(),
            "history": history,
            "initial": self.initial,
            "rng": {"torch": torch.get_rng_state(),
                    "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []},
        }

    def restore(self, state: dict[str, Any]) -> None:
        checkpoint.load_state_strict(_unwrap(self.encoder), state["encoder"], "checkpoint[encoder]")
        checkpoint.load_state_strict(self.bank, state["bank"], "checkpoint[bank]")
        _load_loss_state(_unwrap(self.loss_fn), self.bank, state["loss"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.initial = dict(state.get("initial", {}))
        torch.set_rng_state(state["rng"]["torch"])
        if state["rng"]["cuda"] and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["rng"]["cuda"])


def _unwrap(module: nn.Module) -> nn.Module:
    module = getattr(module, "_orig_mod", module)                 # torch.compile
    return module.module if isinstance(module, DistributedDataParallel) else module


def _bank_keys(loss_fn: nn.Module, bank: MemoryBank) -> set[str]:
    """Keys of `loss_fn.state_dict()` that are the bank itself (saved once, as "bank")."""
    ptr = bank.features.data_ptr()
    return {k for k, v in loss_fn.state_dict().items() if v.data_ptr() == ptr}


def _loss_state(loss_fn: nn.Module, bank: MemoryBank) -> dict[str, Tensor]:
    skip = _bank_keys(loss_fn, bank)
    return {k: v for k, v in loss_fn.state_dict().items() if k not in skip}


def _load_loss_state(loss_fn: nn.Module, bank: MemoryBank, state: dict[str, Tensor]) -> None:
    result = loss_fn.load_state_dict(state, strict=False)
    missing = set(result.missing_keys) - _bank_keys(loss_fn, bank)
    if missing or result.unexpected_keys:
        raise ValueError(f"checkpoint[loss]: missing keys {sorted(missing)}, "
                         f"unexpected keys {result.unexpected_keys}")


def build_trainer(params: PretrainParams, prepared: PreparedDataset, device: torch.device,
                  dist: runtime.DistInfo, seed: int = 0) -> Trainer:
    """Encoder, bank, loss and SGD on `device` for the prepared dataset (validated first)."""
    data = TrainData(prepared, params, device, dist, seed)
    n = data.num_items
    params.check_dataset_size(n)
    encoder = build_encoder(params.arch, params.feature_dim, params.cifar_stem, params.width,
                            params.init)
    bank = MemoryBank(n, params.feature_dim, params.bank_momentum)
    loss_fn = build_loss(params.loss, bank=bank, num_items=n, feature_dim=params.feature_dim,
                         num_negatives=params.num_negatives, temperature=params.temperature,
                         z_batches=params.z_batches, z_momentum=params.z_momentum,
                         z_estimate=params.z_estimate,
                         proximal_lambda=params.proximal_lambda)
    memory_format = torch.channels_last if params.channels_last else torch.contiguous_format
    encoder = encoder.to(device, memory_format=memory_format)
    bank.to(device)
    loss_fn.to(device)
    trainable = list(encoder.parameters()) + list(loss_fn.parameters())
    optimizer = torch.optim.SGD(trainable, lr=params.lr, momentum=params.momentum,
                                weight_decay=params.weight_decay)
    if dist.world_size > 1:
        ids = [device.index] if device.type == "cuda" else None
        encoder = DistributedDataParallel(encoder, device_ids=ids)
        if any(p.requires_grad for p in loss_fn.parameters()):
            loss_fn = DistributedDataParallel(loss_fn, device_ids=ids, broadcast_buffers=False)
    if params.compile:
        encoder = torch.compile(encoder)
    return Trainer(params, encoder, bank, loss_fn, optimizer, data, device, dist)


def resume_state(path: Path, params: PretrainParams, fingerprint: str) -> dict[str, Any] | None:
    """The checkpoint at `path` if it was made on the same data (fingerprint) with the same
    result-defining params; operational keys (config.OPERATIONAL_KEYS) and `epochs` may differ.
    A refusal is logged with what differs."""
    if not path.is_file():
        return None
    state = checkpoint.load(path)
    if state["fingerprint"] != fingerprint:
        log.warning("ignoring checkpoint %s: made on other data (dataset fingerprint %s, this "
                    "data %s); training from scratch", path, state["fingerprint"][:12],
                    fingerprint[:12])
        return None
    differing = params.result_keys_differing(state["params"])
    if differing:
        log.warning("ignoring checkpoint %s: result-defining params differ (%s); training from "
                    "scratch", path, ", ".join(f"pretrain.{key}: {old!r} -> {new!r}"
                                              for key, (old, new) in differing.items()))
        return None
    changed = sorted(k for k in OPERATIONAL_KEYS
                     if k in state["params"] and state["params"][k] != getattr(params, k))
    log.info("resuming from %s after epoch %d%s", path, state["epoch"],
             f" (operational keys changed: {', '.join(changed)})" if changed else "")
    return state


def fit(params: PretrainParams, *, seed: int, device: torch.device, prepared_dir: Path,
        checkpoint_path: Path, dist: runtime.DistInfo = runtime.DistInfo(),
        on_epoch_end: EpochHook | None = None, stop_after: int | None = None) -> Trainer:
    """Train for `schedule(...)`'s epochs (`params.epochs`, more under `params.min_steps`),
    resuming when possible; returns the trained Trainer.

    `stop_after` ends the run after that many epochs of this call (used to test resumption).
    Only rank 0 writes the checkpoint; `on_epoch_end(row, epoch, history)` runs on rank 0.
    """
    prepared = PreparedDataset.open(prepared_dir)
    if ignored := params.ignored_by_loss():
        log.info("loss %r ignores pretrain.%s", params.loss, ", pretrain.".join(ignored))
    runtime.seed_everything(seed)
    trainer = build_trainer(params, prepared, device, dist, seed)
    state = resume_state(checkpoint_path, params, prepared.fingerprint)
    if state is not None:
        trainer.restore(state)
    history: list[dict] = list(state["history"]) if state else []
    start = state["epoch"] if state else 0
    if state is None:
        trainer.initial = initial_monitor(trainer, seed)
    autocast = _autocast(params, device)
    plan = trainer.schedule
    if plan.epochs != params.epochs:
        log.info("%d epochs of %d steps (pretrain.min_steps %d; pretrain.epochs %d), lr "
                 "milestones %s", plan.epochs, plan.steps_per_epoch, params.min_steps,
                 params.epochs, list(plan.milestones))
    monitors = MonitorPlan(params.monitor_every, plan.epochs - 1)
    for epoch in range(start, plan.epochs):
        if stop_after is not None and epoch - start >= stop_after:
            break
        due = monitors.due(epoch) or epoch == start
        row = run_epoch(trainer, epoch, seed, autocast, monitor=due)
        if due:
            monitors.record(epoch, row["seconds"], row["monitor_seconds"])
        history.append(row)
        if dist.is_main:
            checkpoint.atomic_save(trainer.state(epoch + 1, history, prepared.fingerprint),
                                   checkpoint_path)
            if on_epoch_end is not None:
                on_epoch_end(row, epoch, history)
    trainer.history = history
    return trainer


def initial_monitor(trainer: Trainer, seed: int) -> dict[str, float]:
    """The monitor before the first step ("epoch": 0): kNN top-1 of the random-init encoder's
    own training features (the bank is still random) and its label-free metrics. Restores the
    global RNG, so training draws what it would have drawn without it."""
    data = trainer.data
    with torch.random.fork_rng(devices=[]):
        knn_top1 = float("nan")
        if data.monitor is not None:
            features, labels = data.monitor_features(trainer.encoder)
            knn_top1 = knn_accuracy(data.train_features(trainer.encoder), data.train_labels,
                                    features, labels, num_classes=data.num_classes,
                                    k=min(200, data.num_items),
                                    sigma=trainer.params.temperature)["top1"]
        row = {"epoch": 0, "knn_top1": knn_top1, **data.label_free_metrics(trainer.encoder, seed)}
    log.info("epoch 0 (random init): %s", _monitor_text(row))
    return row


def _monitor_text(row: dict[str, float]) -> str:
    names = ("knn_top1", "alignment", "alignment_ratio", "uniformity", "retrieval_top1")
    return "  ".join(f"{name} {row[name]:.4g}" for name in names if name in row)


def run_epoch(trainer: Trainer, epoch: int, seed: int, autocast: Any,
              monitor: bool = True) -> dict[str, float]:
    """Reseed, set the learning rate, train one epoch, monitor (unless `monitor` is False: its
    columns are then nan); returns the history row, with the seconds spent on each."""
    params, plan = trainer.params, trainer.schedule
    lr = lr_at(epoch, params.lr, plan.milestones, params.lr_gamma)
    for group in trainer.optimizer.param_groups:
        group["lr"] = lr
    start = time.perf_counter()
    batches = trainer.data.epoch_batches(seed, epoch)     # reseeds: shuffle, then per rank
    progress = Progress(trainer.data.steps_per_epoch(), params.log_every,
                        f"epoch {epoch + 1}/{plan.epochs}", trainer.dist.world_size,
                        enabled=trainer.dist.is_main)
    try:
        stats = train_one_epoch(trainer.encoder, trainer.loss_fn, trainer.bank,
                                trainer.optimizer, batches, autocast, progress=progress)
    finally:
        progress.close()
    seconds = time.perf_counter() - start
    knn_top1 = float("nan")
    free = dict.fromkeys(label_free.METRICS if trainer.data.label_free_images is not None
                         else (), float("nan"))
    if monitor:
        knn_top1 = knn_monitor(trainer.encoder, trainer.bank, trainer.data, params.temperature)
        with torch.random.fork_rng(devices=[]):  # seeded views; training's RNG stream untouched
            free = trainer.data.label_free_metrics(trainer.encoder, seed)
    monitor_seconds = time.perf_counter() - start - seconds
    z = next((m.z for m in _unwrap(trainer.loss_fn).modules() if hasattr(m, "z")), float("nan"))
    row = {"epoch": epoch + 1, "loss": stats["loss"], "lr": lr, "z": float(z),
           "knn_top1": knn_top1, **free,
           "images_per_second": stats["images"] * trainer.dist.world_size / seconds,
           "seconds": seconds, "monitor_seconds": monitor_seconds}
    left = (time.perf_counter() - start) * (plan.epochs - epoch - 1)
    log.info("epoch %d/%d  loss %.4f  lr %.4g  Z %.4g  kNN %.2f%%  %.0f img/s  ETA %s  %s",
             epoch + 1, plan.epochs, row["loss"], lr, row["z"], knn_top1,
             row["images_per_second"], _clock(left), _monitor_text(free))
    return row


def _autocast(params: PretrainParams, device: torch.device) -> Any:
    """The encoder forward's autocast context: bf16 when `amp` on CUDA and on CPUs with native
    bf16 (`runtime.cpu_has_bf16`; emulated bf16 would be slower than fp32), else a no-op. The
    loss, the bank and the optimizer stay fp32 either way. Logs which one it is."""
    if not params.amp:
        log.info("pretrain.amp is off: training in fp32")
        return nullcontext
    if device.type == "cuda":
        log.info("bf16 autocast on %s (pretrain.amp)", device)
        return lambda: torch.autocast("cuda", dtype=torch.bfloat16)
    if device.type == "cpu":
        if runtime.cpu_has_bf16():
            log.info("bf16 autocast on the CPU (native bf16: %s; pretrain.amp)",
                     " or ".join(runtime.BF16_CPU_FLAGS))
            return lambda: torch.autocast("cpu", dtype=torch.bfloat16)
        log.info("fp32 on the CPU: it has no native bf16 (neither %s), where autocast would "
                 "be slower", " nor ".join(runtime.BF16_CPU_FLAGS))
        return nullcontext
    log.info("fp32 on %s: pretrain.amp applies to CUDA and bf16-capable CPUs", device)
    return nullcontext


def preprocess_meta(data: TrainData) -> dict[str, Any]:
    """How deployed models must preprocess images (stored in the encoder file)."""
    return {"mean": list(data.mean), "std": list(data.std),
            "image_size": list(data.eval_image_size),
            "resize": data.eval_resize}
