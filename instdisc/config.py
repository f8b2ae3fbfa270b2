"""Typed, frozen views of `params.yaml`: one dataclass per top-level section.

`load_section` turns one section into its dataclass and rejects unknown keys, wrong types and
out-of-range values before any work starts, with a message that names the file, the key, the value
and what is allowed.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, TypeVar

import yaml

T = TypeVar("T")

ARCHS = ("resnet18", "resnet34", "resnet50")


class ParamsError(ValueError):
    """A params.yaml value is missing, unknown, of the wrong type or out of range."""


@dataclass(frozen=True)
class CommonParams:
    """Top-level keys shared by every stage."""

    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda | cuda:N | mps

    def __post_init__(self) -> None:
        _check(self.seed >= 0, "seed", self.seed, "an integer >= 0")
        ok = self.device in ("auto", "cpu", "cuda", "mps") or (
            self.device.startswith("cuda:") and self.device[5:].isdigit())
        _check(ok, "device", self.device, "one of auto, cpu, cuda, cuda:N, mps")


@dataclass(frozen=True)
class SyntheticParams:
    """The embedded default dataset (see `instdisc.data.synthetic`)."""

    num_classes: int = 10
    train_per_class: int = 300
    test_per_class: int = 100
    image_size: int = 32

    def __post_init__(self) -> None:
        _check(2 <= self.num_classes <= 100, "num_classes", self.num_classes, "2..100")
        _check(self.train_per_class >= 1, "train_per_class", self.train_per_class, ">= 1")
        _check(self.test_per_class >= 1, "test_per_class", self.test_per_class, ">= 1")
        _check(8 <= self.image_size <= 256, "image_size", self.image_size, "8..256")


@dataclass(frozen=True)
class SplitFolders:
    """Which source folder becomes which prepared split; "" = automatic (train; test, val or
    validation, in that order; without one, `holdout_fraction` of train is held out)."""

    train: str = ""
    test: str = ""

    def __post_init__(self) -> None:
        _check(not self.test or bool(self.train), "splits.train", self.train,
               "a folder name whenever splits.test is given")
        _check(not self.train or self.train != self.test, "splits.test", self.test,
               f"a folder other than splits.train ({self.train!r})")


# The embedded dataset's source is the file of its generator: dvc.yaml declares `${prepare.source}`
# a dep of `prepare`, so DVC hashes whatever the source is (the generator's code here; a user's
# folder, archive or `dvc add`-ed directory otherwise). "synthetic" is accepted as a short name.
SYNTHETIC_SOURCE = "instdisc/data/synthetic.py"


def is_synthetic(source: str) -> bool:
    """Whether `source` names the embedded generator ("synthetic" or SYNTHETIC_SOURCE)."""
    return source == "synthetic" or Path(source).as_posix().endswith(SYNTHETIC_SOURCE)


@dataclass(frozen=True)
class PrepareParams:
    """Stage `prepare`: where the images come from and how they are stored."""

    source: str = SYNTHETIC_SOURCE  # the embedded set, or a folder / .zip / .tar(.gz) of images
    on_error: Literal["skip", "fail"] = "skip"
    max_in_memory_size: int = 64  # images up to this many pixels a side are stored as one uint8 array
    image_size: int = 0  # resize in-memory images to this square size; 0 keeps the source size
    # File-backed images with a longer shorter side are resized to it (aspect kept) and stored
    # re-encoded as JPEG at reencode_quality (instdisc.data.storage); 0 keeps the originals.
    max_shorter_side: int = 0
    reencode_quality: int = 90
    train_fraction: float = 1.0  # keep this fraction of every class's training images (ablations)
    labels: Literal["auto", "folders", "none"] = "auto"  # class folders or not (sources.py)
    splits: SplitFolders = field(default_factory=SplitFolders)
    holdout_fraction: float = 0.1  # no evaluation split in the source: hold this much of train out
    synthetic: SyntheticParams = field(default_factory=SyntheticParams)

    def __post_init__(self) -> None:
        _check(bool(self.source), "source", self.source, f"{SYNTHETIC_SOURCE!r} or a path")
        _check(self.max_in_memory_size >= 1, "max_in_memory_size", self.max_in_memory_size, ">= 1")
        _check(self.image_size >= 0, "image_size", self.image_size, ">= 0")
        _check(self.max_shorter_side == 0 or self.max_shorter_side >= 8, "max_shorter_side",
               self.max_shorter_side, "0 (keep the originals) or >= 8 pixels")
        _check(1 <= self.reencode_quality <= 95, "reencode_quality", self.reencode_quality,
               "1..95 (JPEG quality; Pillow advises against more than 95)")
        _check(0.0 < self.train_fraction <= 1.0, "train_fraction", self.train_fraction, "(0, 1]")
        _check(0.0 <= self.holdout_fraction < 1.0, "holdout_fraction", self.holdout_fraction,
               "[0, 1) (0: the source must have an evaluation split)")


@dataclass(frozen=True)
class PretrainParams:
    """Stage `pretrain`: encoder, objective and the paper's optimisation recipe (Sec. 3, 4)."""

    arch: str = "resnet18"
    cifar_stem: bool = True  # 3x3 stem, no max-pool (small images)
    width: float = 1.0  # channel multiplier of the ResNet trunk; 1.0 is torchvision's network
    init: Literal["torchvision", "pytorch"] = "pytorch"  # trunk init; pytorch = each layer's own
    # default (the paper's CIFAR ResNet), torchvision = kaiming fan-out (torchvision's ResNet)
    feature_dim: int = 128
    loss: Literal["nce", "softmax", "parametric"] = "nce"
    num_negatives: int = 4096  # m in the paper
    temperature: float = 0.07  # tau
    bank_momentum: float = 0.5
    proximal_lambda: float = 0.0  # lambda of the proximal term; 0 turns it off
    z_estimate: Literal["auto", "batch", "row", "fixed"] = "auto"  # NCE: Z from every batch,
    # per sample from its own noise rows, or once and then fixed (the paper); auto: row if m >= 256
    z_batches: int = 1  # NCE, z_estimate fixed: Z is the mean over this many first batches
    z_momentum: float = 0.0  # NCE: > 0 smooths Z as an EMA of the batch estimates
    epochs: int = 200
    # at least this many SGD steps (0: off): a small set trains for more epochs than `epochs`,
    # ceil(min_steps / steps per epoch), and lr_milestones stretch by the same factor
    min_steps: int = 0
    batch_size: int = 128
    lr: float = 0.03
    momentum: float = 0.9
    weight_decay: float = 5e-4
    lr_milestones: tuple[int, ...] = (120, 160)
    lr_gamma: float = 0.1
    normalization: Literal["dataset", "imagenet"] = "dataset"  # input mean/std: the training
    # set's own (stored by `prepare`; lemniscate normalises CIFAR-10 by its own) or ImageNet's
    crop_scale_min: float = 0.2
    color_jitter: float = 0.4  # brightness, contrast and saturation factors in [1 - s, 1 + s]
    hue: float = 0.0  # hue shift in [-hue, hue] of the colour circle (paper: 0.4)
    color_jitter_prob: float = 0.8  # chance that a sample is jittered at all (paper: 1.0)
    grayscale_prob: float = 0.2
    hflip: bool = True
    image_size: int = 224  # crop size for images read from files (in-memory sets keep their size)
    amp: bool = True  # bf16 autocast on CUDA and on CPUs with native bf16 (AVX512-BF16/AMX)
    channels_last: bool = True
    compile: bool = False
    num_workers: int = 4  # DataLoader workers for file-backed datasets
    monitor_queries: int = 1000  # test images used by the per-epoch kNN monitor (0 = off)
    # held-out images for the per-epoch label-free metrics (alignment, uniformity, augmentation
    # retrieval; evaluate.label_free_images measures the final encoder the same way); 0 = off
    monitor_label_free: int = 1000
    # monitors every this many epochs; 0: as often as keeps them under 10% of training time
    # (train.MONITOR_SHARE); the first and last epoch always
    monitor_every: int = 0
    log_every: int = 50  # a progress log line (loss, img/s, ETA) every this many steps; 0 = off
    # Processes (GPUs) per machine: > 1 makes the stage launch itself under torchrun
    # (instdisc.runtime.launch_command), so `dvc repro` records multi-GPU runs in dvc.lock.
    nproc_per_node: int = 1
    nnodes: int = 1  # machines; > 1 needs rdzv_endpoint, the c10d rendezvous "host:port"
    rdzv_endpoint: str = ""  # "": a single machine (torchrun --standalone)
    # File-backed sets: decode (and augment) JPEGs in DataLoader workers ("cpu") or batch-wise on
    # the training device ("device": nvJPEG on CUDA; instdisc.data.device_decode); auto: device
    # on CUDA, cpu elsewhere.
    # The device path has been tested on the CPU only (no GPU run yet), hence cpu by default.
    decode: Literal["auto", "cpu", "device"] = "cpu"

    def __post_init__(self) -> None:
        _check(self.arch in ARCHS, "arch", self.arch, f"one of {', '.join(ARCHS)}")
        _check(self.nproc_per_node >= 1, "nproc_per_node", self.nproc_per_node, ">= 1")
        _check(self.nnodes >= 1, "nnodes", self.nnodes, ">= 1")
        _check(self.nnodes == 1 or _is_endpoint(self.rdzv_endpoint), "rdzv_endpoint",
               self.rdzv_endpoint, 'a "host:port" rendezvous address when nnodes > 1')
        _check(not self.rdzv_endpoint or _is_endpoint(self.rdzv_endpoint), "rdzv_endpoint",
               self.rdzv_endpoint, '"" or "host:port"')
        _check(0.0 < self.width <= 4.0, "width", self.width, "(0, 4]")
        _check(self.feature_dim >= 1, "feature_dim", self.feature_dim, ">= 1")
        _check(self.num_negatives >= 1, "num_negatives", self.num_negatives, ">= 1")
        _check(self.temperature > 0, "temperature", self.temperature, "> 0")
        _check(0.0 <= self.bank_momentum < 1.0, "bank_momentum", self.bank_momentum, "[0, 1)")
        _check(self.proximal_lambda >= 0, "proximal_lambda", self.proximal_lambda, ">= 0")
        _check(self.z_batches >= 1, "z_batches", self.z_batches, ">= 1")
        _check(0.0 <= self.z_momentum < 1.0, "z_momentum", self.z_momentum, "[0, 1)")
        _check(self.epochs >= 1, "epochs", self.epochs, ">= 1")
        _check(self.monitor_every >= 0, "monitor_every", self.monitor_every,
               ">= 0 (0: auto, under 10% of training time)")
        _check(self.min_steps >= 0, "min_steps", self.min_steps, ">= 0 (0: epochs alone)")
        _check(self.batch_size >= 2, "batch_size", self.batch_size, ">= 2")
        _check(self.lr > 0, "lr", self.lr, "> 0")
        _check(0.0 <= self.momentum < 1.0, "momentum", self.momentum, "[0, 1)")
        _check(self.weight_decay >= 0, "weight_decay", self.weight_decay, ">= 0")
        _check(all(m >= 1 for m in self.lr_milestones), "lr_milestones", self.lr_milestones,
               "epochs >= 1")
        _check(0.0 < self.lr_gamma <= 1.0, "lr_gamma", self.lr_gamma, "(0, 1]")
        _check(0.0 < self.crop_scale_min <= 1.0, "crop_scale_min", self.crop_scale_min, "(0, 1]")
        _check(0.0 <= self.color_jitter <= 1.0, "color_jitter", self.color_jitter, "[0, 1]")
        _check(0.0 <= self.hue <= 0.5, "hue", self.hue, "[0, 0.5]")
        _check(0.0 <= self.color_jitter_prob <= 1.0, "color_jitter_prob", self.color_jitter_prob,
               "[0, 1]")
        _check(0.0 <= self.grayscale_prob <= 1.0, "grayscale_prob", self.grayscale_prob, "[0, 1]")
        _check(self.image_size >= 8, "image_size", self.image_size, ">= 8")
        _check(self.num_workers >= 0, "num_workers", self.num_workers, ">= 0")
        _check(self.decode in ("auto", "cpu", "device"), "decode", self.decode,
               "one of auto, cpu, device")
        _check(self.monitor_queries >= 0, "monitor_queries", self.monitor_queries, ">= 0")
        _check(self.monitor_label_free >= 0, "monitor_label_free", self.monitor_label_free,
               ">= 0")
        _check(self.log_every >= 0, "log_every", self.log_every, ">= 0")

    def ignored_by_loss(self) -> list[str]:
        """The keys of this section that the chosen `loss` does not read (reported by the stage,
        refused by sweeps): NCE's knobs under softmax/parametric, the bank's under parametric."""
        nce_only = ["num_negatives", "z_estimate", "z_batches", "z_momentum"]
        if self.loss == "nce":
            return []
        return nce_only + (["bank_momentum"] if self.loss == "parametric" else [])

    def result_keys_differing(self, saved: dict[str, Any]) -> dict[str, tuple[Any, Any]]:
        """{key: (saved value, this value)} for the result-defining keys where a checkpoint's
        params `saved` differ from these: every key but OPERATIONAL_KEYS and the budget (`epochs`,
        which a resumed run may extend). A key the checkpoint predates counts as its default."""
        defaults = {f.name: f.default for f in dataclasses.fields(self)}
        differing = {}
        for key, value in dataclasses.asdict(self).items():
            if key in OPERATIONAL_KEYS or key in BUDGET_KEYS:
                continue
            old = saved.get(key, defaults[key])
            if _as_lists(old) != _as_lists(value):
                differing[key] = (old, value)
        return differing

    def check_dataset_size(self, num_items: int) -> None:
        """Checks that need the training-set size n (m < n: the positive is excluded)."""
        if self.loss == "nce" and self.num_negatives >= num_items:
            raise ParamsError(
                f"params.yaml[pretrain][num_negatives] = {self.num_negatives}: must be smaller "
                f"than the number of training images ({num_items})")


# Pretrain keys that decide how a run is computed, logged or monitored, not what it learns: a
# checkpoint made with other values of these is resumed (docs/DESIGN.md, "Resuming" says what each
# one keeps: logging and monitors leave training bit-identical; workers, decode, compile, layout,
# amp and the process count give the same run up to floating-point rounding and data order).
OPERATIONAL_KEYS = frozenset({
    "amp", "channels_last", "compile", "num_workers", "decode", "monitor_every",
    "monitor_queries", "monitor_label_free", "log_every",
    "nproc_per_node", "nnodes", "rdzv_endpoint",
})
BUDGET_KEYS = frozenset({"epochs"})  # a finished run resumed with more epochs trains the rest


def _as_lists(value: Any) -> Any:
    """Tuples as lists, so params that went through torch.save compare equal to fresh ones."""
    return list(value) if isinstance(value, (tuple, list)) else value


@dataclass(frozen=True)
class EvaluateParams:
    """Stage `evaluate`: weighted kNN on recomputed features (Sec. 3.4), label-free metrics."""

    k: int = 200
    sigma: float = 0.0  # weight exp(sim / sigma); 0 means "use pretrain.temperature"
    batch_size: int = 256
    chunk_size: int = 4096  # query rows scored against the bank at a time
    label_free_images: int = 1000  # test images for alignment/uniformity/retrieval (0 = off)

    def __post_init__(self) -> None:
        _check(self.k >= 1, "k", self.k, ">= 1")
        _check(0 <= self.label_free_images <= 20000, "label_free_images", self.label_free_images,
               "0..20000 (0 = off)")
        _check(self.sigma >= 0, "sigma", self.sigma, ">= 0 (0 = pretrain.temperature)")
        _check(self.batch_size >= 1, "batch_size", self.batch_size, ">= 1")
        _check(self.chunk_size >= 1, "chunk_size", self.chunk_size, ">= 1")


@dataclass(frozen=True)
class ExportParams:
    """Stage `export`: ONNX encoder for ONNX Runtime, with a parity gate and registration."""

    opset: int = 20
    dynamic_spatial: bool = True  # dynamic height/width besides dynamic batch
    fp16: bool = False  # also write an fp16 variant for GPU serving
    parity_batch: int = 16  # prepared test images compared between ORT and torch
    parity_atol: float = 1e-4
    parity_min_cosine: float = 0.9999
    fp16_atol: float = 1e-2
    # also write an INT8 (static quantization) variant for CPU serving: true = write it when it
    # passes its kNN gate (a rejection is reported, the stage still succeeds), "require" = a
    # rejection fails the stage, false = no INT8 file
    int8: Literal[True, False, "require"] = True
    int8_calibration_images: int = 256  # prepared training images for the activation ranges
    int8_max_knn_drop: float = 1.0  # kNN top-1 points int8 may lose against fp32 (test split)
    int8_gate_images: int = 5000  # at most this many train (bank) and test (query) images
    register: bool = True  # log to MLflow and register the model
    model_name: str = "instdisc-encoder"
    alias: str = "candidate"

    def __post_init__(self) -> None:
        _check(13 <= self.opset <= 23, "opset", self.opset, "13..23")
        _check(self.parity_batch >= 1, "parity_batch", self.parity_batch, ">= 1")
        _check(self.parity_atol > 0, "parity_atol", self.parity_atol, "> 0")
        _check(0 < self.parity_min_cosine <= 1, "parity_min_cosine", self.parity_min_cosine, "(0, 1]")
        _check(self.fp16_atol > 0, "fp16_atol", self.fp16_atol, "> 0")
        _check(isinstance(self.int8, bool) or self.int8 == "require", "int8", self.int8, "true, false or require")
        _check(self.int8_calibration_images >= 1, "int8_calibration_images",
               self.int8_calibration_images, ">= 1")
        _check(self.int8_max_knn_drop >= 0, "int8_max_knn_drop", self.int8_max_knn_drop, ">= 0")
        _check(self.int8_gate_images >= 1, "int8_gate_images", self.int8_gate_images, ">= 1")
        _check(bool(self.model_name), "model_name", self.model_name, "a non-empty name")
        _check(bool(self.alias), "alias", self.alias, "a non-empty alias")


@dataclass(frozen=True)
class IndexParams:
    """Stage `index`: the exported model's embeddings of a prepared split, for `serve --index`."""

    split: str = "train"  # prepared split to index
    ann: Literal["none", "hnsw", "ivf"] = "none"  # also a FAISS index (serve --ann)
    batch_size: int = 256

    def __post_init__(self) -> None:
        _check(bool(self.split), "split", self.split, "a prepared split name")
        _check(self.batch_size >= 1, "batch_size", self.batch_size, ">= 1")


LAYERS = ("conv1", "conv2", "conv3", "conv4", "conv5")


@dataclass(frozen=True)
class LinearParams:
    """Stage `linear`: linear classifiers on frozen, pooled conv1..conv5 features (Sec. 4.2, Table 2).

    Each stage's map is adaptive-average-pooled to a g x g grid with g = round(sqrt(target_dim / C))
    (clamped to [1, H]), so every layer gives about `target_dim` features; the paper uses ~9000.
    """

    layers: tuple[str, ...] = LAYERS
    target_dim: int = 2048
    optimizer: Literal["sgd", "adam"] = "adam"
    epochs: int = 30
    batch_size: int = 256
    lr: float = 0.001
    momentum: float = 0.9  # sgd only
    weight_decay: float = 0.0
    feature_batch_size: int = 256  # images per forward pass while caching features
    random_init_baseline: bool = True  # also probe a randomly initialised encoder (Table 2 "Random")

    def __post_init__(self) -> None:
        _check(len(self.layers) > 0 and set(self.layers) <= set(LAYERS)
               and len(set(self.layers)) == len(self.layers), "layers", self.layers,
               f"distinct names from {', '.join(LAYERS)}")
        _check(self.target_dim >= 1, "target_dim", self.target_dim, ">= 1")
        _check(self.epochs >= 1, "epochs", self.epochs, ">= 1")
        _check(self.batch_size >= 1, "batch_size", self.batch_size, ">= 1")
        _check(self.lr > 0, "lr", self.lr, "> 0")
        _check(0.0 <= self.momentum < 1.0, "momentum", self.momentum, "[0, 1)")
        _check(self.weight_decay >= 0, "weight_decay", self.weight_decay, ">= 0")
        _check(self.feature_batch_size >= 1, "feature_batch_size", self.feature_batch_size, ">= 1")


@dataclass(frozen=True)
class PlacesParams:
    """Stage `places`: the linear probe of `linear` on a scene dataset (Sec. 4.2, Table 3)."""

    source: str = "synthetic"  # or a folder / .zip / .tar in <split>/<class>/<file> layout
    image_size: int = 0  # in-memory images are resized to this square size; 0 keeps the source's
    max_in_memory_size: int = 256  # larger images are read from files at the encoder's image size
    seed_offset: int = 1000  # synthetic source: generated with seed + seed_offset (new images)
    synthetic: SyntheticParams = field(default_factory=lambda: SyntheticParams(
        num_classes=15, train_per_class=60, test_per_class=20, image_size=32))
    probe: LinearParams = field(default_factory=LinearParams)

    def __post_init__(self) -> None:
        _check(bool(self.source), "source", self.source, "'synthetic' or a path")
        _check(self.image_size >= 0, "image_size", self.image_size, ">= 0")
        _check(self.max_in_memory_size >= 1, "max_in_memory_size", self.max_in_memory_size, ">= 1")
        _check(self.seed_offset >= 0, "seed_offset", self.seed_offset, ">= 0")


@dataclass(frozen=True)
class SemiSupervisedParams:
    """Stage `semi_supervised`: fine-tune on 1% / 10% of the labels vs. from scratch (Sec. 4.3)."""

    fractions: tuple[float, ...] = (0.01, 0.1)
    steps: int = 60  # SGD steps per run, whatever the subset size
    batch_size: int = 32
    lr: float = 0.05
    momentum: float = 0.9
    weight_decay: float = 5e-4
    crop_scale_min: float = 0.5  # RandomResizedCrop scale; colour jitter is off (supervised recipe)
    hflip: bool = True
    eval_batch_size: int = 256
    scratch_baseline: bool = True  # the same runs from random initialisation

    def __post_init__(self) -> None:
        _check(len(self.fractions) > 0 and all(0.0 < f <= 1.0 for f in self.fractions),
               "fractions", self.fractions, "one or more numbers in (0, 1]")
        _check(self.steps >= 1, "steps", self.steps, ">= 1")
        _check(self.batch_size >= 2, "batch_size", self.batch_size, ">= 2")
        _check(self.lr > 0, "lr", self.lr, "> 0")
        _check(0.0 <= self.momentum < 1.0, "momentum", self.momentum, "[0, 1)")
        _check(self.weight_decay >= 0, "weight_decay", self.weight_decay, ">= 0")
        _check(0.0 < self.crop_scale_min <= 1.0, "crop_scale_min", self.crop_scale_min, "(0, 1]")
        _check(self.eval_batch_size >= 1, "eval_batch_size", self.eval_batch_size, ">= 1")


@dataclass(frozen=True)
class DetectionParams:
    """Stage `detection`: encoder trunk -> Faster R-CNN + FPN, short VOC fine-tune, mAP (Sec. 4.4)."""

    source: str = "synthetic"  # or a VOC-format folder / .zip (Annotations, JPEGImages, ImageSets)
    train_split: str = "trainval"
    test_split: str = "test"
    synthetic_train: int = 48  # images of the synthetic VOC set, per split
    synthetic_test: int = 16
    synthetic_size: int = 96  # side of the synthetic images, pixels
    min_size: int = 96  # images are resized once so that the short side is min_size ...
    max_size: int = 160  # ... and the long side at most max_size
    iterations: int = 80
    batch_size: int = 4
    lr: float = 0.02
    momentum: float = 0.9
    weight_decay: float = 1e-4
    warmup_iters: int = 20
    trainable_layers: int = 5  # conv5, conv4, ... counted from the top; 5 = all (BN is frozen)
    fpn_channels: int = 64  # torchvision: 256
    representation_size: int = 256  # box head MLP width; torchvision: 1024
    anchor_scale: float = 8.0  # anchor side = anchor_scale x stride of each FPN level
    hflip: bool = True
    iou_threshold: float = 0.5  # mAP@0.5
    use_07_metric: bool = False  # True: VOC2007 11-point AP; False: all-point (VOC2010+)

    def __post_init__(self) -> None:
        _check(bool(self.source), "source", self.source, "'synthetic' or a path")
        _check(bool(self.train_split) and bool(self.test_split), "train_split/test_split",
               (self.train_split, self.test_split), "non-empty ImageSets/Main names")
        _check(self.synthetic_train >= 1, "synthetic_train", self.synthetic_train, ">= 1")
        _check(self.synthetic_test >= 1, "synthetic_test", self.synthetic_test, ">= 1")
        _check(32 <= self.synthetic_size <= 1024, "synthetic_size", self.synthetic_size, "32..1024")
        _check(16 <= self.min_size <= self.max_size, "min_size", self.min_size,
               f"16..max_size ({self.max_size})")
        _check(self.iterations >= 1, "iterations", self.iterations, ">= 1")
        _check(self.batch_size >= 1, "batch_size", self.batch_size, ">= 1")
        _check(self.lr > 0, "lr", self.lr, "> 0")
        _check(0.0 <= self.momentum < 1.0, "momentum", self.momentum, "[0, 1)")
        _check(self.weight_decay >= 0, "weight_decay", self.weight_decay, ">= 0")
        _check(self.warmup_iters >= 0, "warmup_iters", self.warmup_iters, ">= 0")
        _check(0 <= self.trainable_layers <= 5, "trainable_layers", self.trainable_layers, "0..5")
        _check(self.fpn_channels >= 8, "fpn_channels", self.fpn_channels, ">= 8")
        _check(self.representation_size >= 8, "representation_size", self.representation_size,
               ">= 8")
        _check(self.anchor_scale > 0, "anchor_scale", self.anchor_scale, "> 0")
        _check(0.0 < self.iou_threshold < 1.0, "iou_threshold", self.iou_threshold, "(0, 1)")


SECTIONS: dict[str, type] = {
    "prepare": PrepareParams,
    "pretrain": PretrainParams,
    "evaluate": EvaluateParams,
    "export": ExportParams,
    "index": IndexParams,
    "linear": LinearParams,
    "places": PlacesParams,
    "semi_supervised": SemiSupervisedParams,
    "detection": DetectionParams,
}


def _is_endpoint(address: str) -> bool:
    """`host:port` with a numeric port (torchrun's --rdzv-endpoint)."""
    host, _, port = address.rpartition(":")
    return bool(host) and port.isdigit()


def _check(ok: bool, key: str, value: Any, allowed: str) -> None:
    if not ok:
        raise ParamsError(f"{key} = {value!r}: allowed {allowed}")


def read_params(path: Path) -> dict[str, Any]:
    """The whole params file as a dict, with a clear error for a missing or malformed file."""
    path = Path(path)
    if not path.is_file():
        raise ParamsError(f"params file {str(path)!r} does not exist")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise ParamsError(f"params file {str(path)!r} is not valid YAML: {err}") from err
    if not isinstance(raw, dict):
        raise ParamsError(f"params file {str(path)!r} must hold a mapping at the top level")
    return raw


def load_common(path: Path) -> CommonParams:
    """The shared top-level keys (`seed`, `device`)."""
    raw = read_params(path)
    names = {f.name for f in dataclasses.fields(CommonParams)}
    return build(CommonParams, {k: v for k, v in raw.items() if k in names}, f"{path}")


def load_section(path: Path, section: str, cls: type[T] | None = None) -> T:
    """Read one top-level section of params.yaml into its dataclass; unknown keys are errors."""
    cls = cls or SECTIONS.get(section)
    if cls is None:
        raise ParamsError(f"unknown params section {section!r}; known: {sorted(SECTIONS)}")
    raw = read_params(path)
    if section not in raw:
        raise ParamsError(f"params file {str(path)!r} has no section {section!r}")
    return build(cls, raw[section] or {}, f"{path}[{section}]")


def build(cls: type[T], raw: Any, where: str) -> T:
    """Construct dataclass `cls` from a mapping, checking keys and types; errors name `where`."""
    if not isinstance(raw, dict):
        raise ParamsError(f"{where} must be a mapping, got {type(raw).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(raw) - set(fields))
    if unknown:
        raise ParamsError(f"{where} has unknown keys {unknown}; allowed: {sorted(fields)}")
    hints = typing.get_type_hints(cls)
    values = {}
    for name, value in raw.items():
        values[name] = _coerce(hints[name], value, f"{where}[{name}]")
    try:
        return cls(**values)
    except ParamsError as err:
        raise ParamsError(f"{where}: {err}") from None


def _coerce(hint: Any, value: Any, where: str) -> Any:
    """Check `value` against the type `hint` (int, float, bool, str, Literal, tuple, dataclass)."""
    origin = typing.get_origin(hint)
    if dataclasses.is_dataclass(hint):
        return build(hint, value, where)
    if origin is Literal:
        allowed = typing.get_args(hint)
        if value not in allowed:
            raise ParamsError(f"{where} = {value!r}: allowed one of {list(allowed)}")
        return value
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(hint)
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(inner[0], value, where)
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise ParamsError(f"{where} = {value!r}: expected a list")
        item = typing.get_args(hint)[0]
        return tuple(_coerce(item, v, f"{where}[{i}]") for i, v in enumerate(value))
    if hint is bool:
        if not isinstance(value, bool):
            raise ParamsError(f"{where} = {value!r}: expected true or false")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ParamsError(f"{where} = {value!r}: expected an integer")
        return value
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ParamsError(f"{where} = {value!r}: expected a number")
        return float(value)
    if hint is str:
        if not isinstance(value, str):
            raise ParamsError(f"{where} = {value!r}: expected a string")
        return value
    raise AssertionError(f"unsupported params type {hint!r} at {where}")
