"""Detection transfer: our trunk inside torchvision's Faster R-CNN (arXiv:1805.01978, Sec. 4.4).

The paper fine-tunes Faster R-CNN (ResNet-50 backbone initialised from instance discrimination)
on VOC2007 trainval and reports mAP on VOC2007 test. Here:

- Backbone: the encoder's ResNet trunk (its 128-d embedding head is dropped) wrapped by
  torchvision's `BackboneWithFPN`: an `IntermediateLayerGetter` returns the pyramid stages, and
  an FPN with `fpn_channels` outputs plus a max-pooled extra level gives the maps. BatchNorm
  becomes `FrozenBatchNorm2d` with the pretrained statistics (detection batches of 2-4 images are
  too small for batch statistics), and only the top `trainable_layers` stages train
  (conv5, conv4, ..., conv1), as torchvision's `resnet_fpn_backbone`.
- Both stems work (`pyramid_layers`). ImageNet stem: FPN over conv2..conv5 at strides 4, 8, 16,
  32 (+ 64), torchvision's layout. CIFAR stem (3x3 stride 1, no max-pool): conv2 would sit at
  stride 1, a full-resolution level that made a training step ~1.7x slower on CPU for objects
  that are never that small, so the FPN takes conv3..conv5 at strides 2, 4, 8 (+ 16); conv2
  still runs inside the trunk. RoIAlign infers each level's scale from the map sizes; anchors are
  `anchor_scale` x the level's stride (8 x gives torchvision's 32..512 for the ImageNet stem).
- Heads: torchvision's RPN, a two-layer MLP box head of `representation_size` and a
  `FastRCNNPredictor`; `weights=None` everywhere, nothing is downloaded.
- Data: `instdisc.transfer.voc`; images resized once so the short side is `min_size`, with
  horizontal flips in training; `difficult` boxes are left out of training (as py-faster-rcnn)
  and ignored by the metric. Evaluation keeps detections with score >= 0.001 (at most 100 per
  image) and computes VOC mAP@`iou_threshold` with `instdisc.transfer.voc_ap`.
"""

from __future__ import annotations

import logging
import math
import sys
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torchvision.models.detection import FasterRCNN
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.backbone_utils import BackboneWithFPN
from torchvision.models.detection.faster_rcnn import FastRCNNPredictor, TwoMLPHead
from torchvision.ops import MultiScaleRoIAlign
from torchvision.ops.misc import FrozenBatchNorm2d
from tqdm import tqdm

from instdisc import checkpoint, runtime
from instdisc.config import DetectionParams
from instdisc.errors import StageError
from instdisc.transfer import voc
from instdisc.transfer.voc_ap import mean_average_precision

log = logging.getLogger(__name__)

STAGES = ("layer4", "layer3", "layer2", "layer1", "conv1")  # top first, as trainable_layers counts
LAYER_STRIDE = {"layer1": 1, "layer2": 2, "layer3": 4, "layer4": 8}  # relative to the stem output
SCORE_THRESH = 0.001


def pyramid_layers(cifar_stem: bool) -> list[str]:
    """Trunk stages fed to the FPN: conv2..conv5, or conv3..conv5 for the stride-1 CIFAR stem."""
    return ["layer2", "layer3", "layer4"] if cifar_stem else ["layer1", "layer2", "layer3",
                                                              "layer4"]


def freeze_batchnorm(module: nn.Module) -> nn.Module:
    """Replace every BatchNorm2d by a FrozenBatchNorm2d holding the same statistics (in place)."""
    for name, child in module.named_children():
        if isinstance(child, nn.BatchNorm2d):
            frozen = FrozenBatchNorm2d(child.num_features, eps=child.eps)
            frozen.weight.copy_(child.weight.detach())
            frozen.bias.copy_(child.bias.detach())
            frozen.running_mean.copy_(child.running_mean)
            frozen.running_var.copy_(child.running_var)
            setattr(module, name, frozen)
        else:
            freeze_batchnorm(child)
    return module


def detection_backbone(trunk: nn.Module, layers: list[str], fpn_channels: int,
                       trainable_layers: int) -> BackboneWithFPN:
    """FPN over `layers` of a ScalableResNet trunk; maps named "0", "1", ... and "pool"."""
    if not 0 <= trainable_layers <= 5:
        raise ValueError(f"trainable_layers must be in 0..5, got {trainable_layers}")
    trunk = freeze_batchnorm(trunk)
    train = STAGES[:trainable_layers]
    for name, p in trunk.named_parameters():
        stage = "conv1" if name.startswith(("conv1", "bn1")) else name.split(".")[0]
        p.requires_grad_(stage in train)
    in_channels = [_out_channels(getattr(trunk, name)) for name in layers]
    return_layers = {name: str(i) for i, name in enumerate(layers)}
    return BackboneWithFPN(trunk, return_layers, in_channels, fpn_channels)


def _out_channels(layer: nn.Sequential) -> int:
    """Output channels of a ResNet stage (its last block's last conv)."""
    convs = [m for m in layer.modules() if isinstance(m, nn.Conv2d)]
    return convs[-1].out_channels


def build_detector(trunk: nn.Module, cifar_stem: bool, num_classes: int, *, fpn_channels: int,
                   representation_size: int, anchor_scale: float, trainable_layers: int,
                   min_size: int, max_size: int, image_mean: list[float],
                   image_std: list[float]) -> FasterRCNN:
    """Faster R-CNN + FPN on `trunk`; `num_classes` includes the background class 0."""
    layers = pyramid_layers(cifar_stem)
    backbone = detection_backbone(trunk, layers, fpn_channels, trainable_layers)
    stem_stride = 1 if cifar_stem else 4
    strides = [stem_stride * LAYER_STRIDE[name] for name in layers]
    strides.append(2 * strides[-1])                                       # the max-pooled level
    sizes = tuple((anchor_scale * stride,) for stride in strides)
    anchors = AnchorGenerator(sizes, ((0.5, 1.0, 2.0),) * len(sizes))
    roi_pool = MultiScaleRoIAlign([str(i) for i in range(len(layers))], output_size=7,
                                  sampling_ratio=2)
    return FasterRCNN(
        backbone, num_classes=None, min_size=min_size, max_size=max_size,
        image_mean=list(image_mean), image_std=list(image_std), rpn_anchor_generator=anchors,
        box_roi_pool=roi_pool,
        box_head=TwoMLPHead(fpn_channels * 7 * 7, representation_size),
        box_predictor=FastRCNNPredictor(representation_size, num_classes),
        rpn_pre_nms_top_n_train=1000, rpn_post_nms_top_n_train=500,
        rpn_pre_nms_top_n_test=500, rpn_post_nms_top_n_test=300,
        rpn_batch_size_per_image=128, box_batch_size_per_image=128,
        box_score_thresh=SCORE_THRESH, box_detections_per_img=100)


def _batch(samples: list[voc.DetectionSample], device: torch.device,
           flips: Tensor) -> tuple[list[Tensor], list[dict[str, Tensor]]]:
    """Float images in [0, 1] and non-difficult targets on `device`, flipped where `flips`."""
    images, targets = [], []
    for sample, flip in zip(samples, flips.tolist()):
        image = sample.image.to(device).float().div_(255)                # (3, H, W)
        keep = ~sample.difficult                                         # (K,)
        boxes = sample.boxes[keep].to(device)                            # (K', 4)
        if flip:
            image = image.flip(-1)
            width = image.shape[-1]
            boxes = torch.stack([width - boxes[:, 2], boxes[:, 1], width - boxes[:, 0],
                                 boxes[:, 3]], dim=1)                    # (K', 4)
        images.append(image)
        targets.append({"boxes": boxes, "labels": sample.labels[keep].to(device)})
    return images, targets


def train_detector(model: FasterRCNN, samples: list[voc.DetectionSample], device: torch.device, *,
                   iterations: int, batch_size: int, lr: float, momentum: float,
                   weight_decay: float, warmup_iters: int, hflip: bool, seed: int) -> float:
    """SGD with linear warm-up then cosine decay; returns the mean loss of the last 10 steps."""
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay)

    def factor(step: int) -> float:
        warm = min(1.0, (step + 1) / warmup_iters) if warmup_iters else 1.0
        return warm * 0.5 * (1 + math.cos(math.pi * step / iterations))

    schedule = torch.optim.lr_scheduler.LambdaLR(opt, factor)
    generator = torch.Generator().manual_seed(seed)
    passes = -(-iterations * batch_size // len(samples))                 # reshuffled every pass
    order = torch.cat([torch.randperm(len(samples), generator=generator)
                       for _ in range(passes)]).view(-1)                 # (passes * n,)
    model.train()
    recent: list[float] = []
    for step in tqdm(range(iterations), desc="detection", disable=not sys.stderr.isatty()):
        picks = order[step * batch_size:(step + 1) * batch_size].tolist()  # (B,)
        flips = (torch.rand(batch_size, generator=generator) < 0.5) & hflip  # (B,)
        images, targets = _batch([samples[i] for i in picks], device, flips)
        losses = model(images, targets)
        loss = sum(losses.values())
        if not torch.isfinite(loss):
            raise StageError(f"detection loss is {loss.item()} at step {step}: "
                             f"{ {k: v.item() for k, v in losses.items()} }; lower lr")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        schedule.step()
        recent = (recent + [loss.item()])[-10:]
    return sum(recent) / len(recent)


@torch.no_grad()
def detect(model: FasterRCNN, samples: list[voc.DetectionSample], device: torch.device,
           batch_size: int = 8) -> list[dict[str, Tensor]]:
    """Eval-mode detections per sample (boxes (D, 4), scores (D,), labels (D,)) on the CPU."""
    model.eval()
    out = []
    no_flip = torch.zeros(batch_size, dtype=torch.bool)
    for start in range(0, len(samples), batch_size):
        images, _ = _batch(samples[start:start + batch_size], device, no_flip)
        out.extend({k: v.cpu() for k, v in d.items()} for d in model(images))
    return out


def run_detection(params: DetectionParams, encoder_path: Path, out_dir: Path,
                  device: torch.device, seed: int) -> dict[str, Any]:
    """Materialise the VOC source, fine-tune the detector, evaluate mAP on the test split."""
    root = voc.materialize(params.source, out_dir, seed=seed, num_train=params.synthetic_train,
                           num_test=params.synthetic_test, image_size=params.synthetic_size)
    classes = voc.read_classes(root)
    train = voc.load_split(root, params.train_split, classes, params.min_size, params.max_size)
    test = voc.load_split(root, params.test_split, classes, params.min_size, params.max_size)
    for name, split in ((params.train_split, train), (params.test_split, test)):
        if not split:
            raise ValueError(f"detection split {name!r} of {params.source!r} has no images")
    log.info("detection data %s: %d classes, %d %s / %d %s images", params.source, len(classes),
             len(train), params.train_split, len(test), params.test_split)
    encoder, meta = checkpoint.load_encoder(encoder_path, "cpu")
    runtime.seed_everything(seed)
    model = build_detector(
        encoder.trunk, bool(meta["encoder_config"].get("cifar_stem")), len(classes) + 1,
        fpn_channels=params.fpn_channels, representation_size=params.representation_size,
        anchor_scale=params.anchor_scale, trainable_layers=params.trainable_layers,
        min_size=params.min_size, max_size=params.max_size,
        image_mean=meta["preprocess"]["mean"], image_std=meta["preprocess"]["std"]).to(device)
    loss = train_detector(model, train, device, iterations=params.iterations,
                          batch_size=params.batch_size, lr=params.lr, momentum=params.momentum,
                          weight_decay=params.weight_decay, warmup_iters=params.warmup_iters,
                          hflip=params.hflip, seed=seed)
    detections = detect(model, test, device)
    truths = [{"boxes": s.boxes, "labels": s.labels, "difficult": s.difficult} for s in test]
    metric = mean_average_precision(detections, truths, classes, params.iou_threshold,
                                    params.use_07_metric)
    log.info("detection mAP@%.2g %.4f (%s AP)", params.iou_threshold, metric["map"],
             "11-point" if params.use_07_metric else "all-point")
    return {"map": metric["map"], "ap": metric["ap"], "final_loss": loss,
            "iou_threshold": params.iou_threshold,
            "ap_method": "voc07_11point" if params.use_07_metric else "all_point",
            "dataset": {"source": params.source, "classes": classes,
                        "classes_from": "labels.txt" if (root / "labels.txt").is_file()
                        else "annotations", "train": len(train), "test": len(test)}}
