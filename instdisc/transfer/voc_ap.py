"""PASCAL VOC average precision, the detection metric of arXiv:1805.01978, Sec. 4.4 (mAP@0.5).

Per class (Everingham et al., "The PASCAL VOC Challenge", IJCV 2010, and the VOC devkit):
1. all detections of the class, over all test images, are sorted by descending score (stable);
2. each is matched to the unmatched ground-truth box of the same image with the highest IoU; it
   is a true positive if that IoU exceeds `iou_threshold` (0.5) and the box is not yet matched,
   else a false positive (a second detection of one object is a false positive). A detection
   whose best match is a `difficult` box counts as neither;
3. recall = TP / npos (npos = non-difficult ground-truth boxes), precision = TP / (TP + FP);
4. AP is the area under the precision envelope p_interp(r) = max_{r' >= r} p(r'):
   - all-point interpolation (VOC2010 and later, the default here): the sum over the recall
     steps of (r_{i+1} - r_i) * p_interp(r_{i+1});
   - 11-point interpolation (VOC2007 devkit, `use_07_metric=True`): the mean of p_interp(t) for
     t in {0, 0.1, ..., 1}, with p_interp(t) = 0 where recall never reaches t.
mAP is the mean AP over the classes that have at least one non-difficult ground-truth box (a
class without any has no defined AP: NaN, left out of the mean).

Boxes are continuous (x0, y0, x1, y1) corners; IoU uses areas without the devkit's "+1", which
`instdisc.transfer.voc` already folds into the VOC -> continuous conversion.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np


def box_iou(box: np.ndarray, boxes: np.ndarray) -> np.ndarray:
    """IoU of one box (4,) with each of boxes (K, 4) -> (K,)."""
    w = np.clip(np.minimum(box[2], boxes[:, 2]) - np.maximum(box[0], boxes[:, 0]), 0, None)
    h = np.clip(np.minimum(box[3], boxes[:, 3]) - np.maximum(box[1], boxes[:, 1]), 0, None)
    inter = w * h                                                          # (K,)
    area = (box[2] - box[0]) * (box[3] - box[1])
    areas = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])      # (K,)
    return inter / np.maximum(area + areas - inter, np.finfo(np.float64).eps)


def voc_ap(recall: np.ndarray, precision: np.ndarray, use_07_metric: bool = False) -> float:
    """Area under the interpolated precision-recall curve (see the module docstring)."""
    recall, precision = np.asarray(recall, float), np.asarray(precision, float)
    if use_07_metric:
        return float(np.mean([precision[recall >= t].max() if (recall >= t).any() else 0.0
                              for t in np.linspace(0, 1, 11)]))
    mrec = np.concatenate(([0.0], recall, [1.0]))                          # (n+2,)
    mpre = np.concatenate(([0.0], precision, [0.0]))                       # (n+2,)
    mpre = np.maximum.accumulate(mpre[::-1])[::-1]                         # envelope from the right
    steps = np.nonzero(mrec[1:] != mrec[:-1])[0]                           # where recall changes
    return float(np.sum((mrec[steps + 1] - mrec[steps]) * mpre[steps + 1]))


def match_detections(scores: np.ndarray, boxes: np.ndarray, image_ids: Sequence[str],
                     gt: dict[str, tuple[np.ndarray, np.ndarray]],
                     iou_threshold: float) -> tuple[np.ndarray, np.ndarray]:
    """(tp, fp) flags per detection, in descending-score order. gt: id -> (boxes, difficult)."""
    order = np.argsort(-np.asarray(scores, float), kind="stable")          # (D,)
    matched = {image_id: np.zeros(len(b), bool) for image_id, (b, _) in gt.items()}
    tp, fp = np.zeros(len(order)), np.zeros(len(order))                    # (D,) each
    for rank, d in enumerate(order):
        gt_boxes, difficult = gt.get(image_ids[d], (np.zeros((0, 4)), np.zeros(0, bool)))
        if len(gt_boxes) == 0:
            fp[rank] = 1
            continue
        overlaps = box_iou(np.asarray(boxes[d], float), gt_boxes)          # (K,)
        best = int(overlaps.argmax())
        if overlaps[best] <= iou_threshold:
            fp[rank] = 1
        elif difficult[best]:
            continue                                                      # ignored
        elif not matched[image_ids[d]][best]:
            tp[rank], matched[image_ids[d]][best] = 1, True
        else:
            fp[rank] = 1                                                  # duplicate
    return tp, fp


def average_precision(scores: np.ndarray, boxes: np.ndarray, image_ids: Sequence[str],
                      gt: dict[str, tuple[np.ndarray, np.ndarray]], iou_threshold: float = 0.5,
                      use_07_metric: bool = False) -> float:
    """AP of one class; NaN when the class has no non-difficult ground-truth box."""
    npos = int(sum((~difficult).sum() for _, difficult in gt.values()))
    if npos == 0:
        return math.nan
    tp, fp = match_detections(scores, boxes, image_ids, gt, iou_threshold)
    tp, fp = np.cumsum(tp), np.cumsum(fp)                                  # (D,) each
    recall = tp / npos
    precision = tp / np.maximum(tp + fp, np.finfo(np.float64).eps)
    return voc_ap(recall, precision, use_07_metric)


def mean_average_precision(detections: Sequence[dict], ground_truths: Sequence[dict],
                           class_names: Sequence[str], iou_threshold: float = 0.5,
                           use_07_metric: bool = False) -> dict:
    """mAP over images: detections[i] = {boxes (D, 4), scores (D,), labels (D,)} for the image
    ground_truths[i] = {boxes (K, 4), labels (K,), difficult (K,)}; labels are 1-based.

    Returns {"map": float (NaN if no class has ground truth), "ap": {class name: AP}}.
    """
    if len(detections) != len(ground_truths):
        raise ValueError(f"{len(detections)} detection entries for {len(ground_truths)} images")
    aps = {}
    for label, name in enumerate(class_names, start=1):
        gt, scores, boxes, ids = {}, [], [], []
        for i, (det, truth) in enumerate(zip(detections, ground_truths)):
            keep = np.asarray(truth["labels"]) == label
            gt[str(i)] = (np.asarray(truth["boxes"], float).reshape(-1, 4)[keep],
                          np.asarray(truth["difficult"], bool)[keep])
            mine = np.asarray(det["labels"]) == label
            scores.extend(np.asarray(det["scores"], float)[mine].tolist())
            boxes.extend(np.asarray(det["boxes"], float).reshape(-1, 4)[mine].tolist())
            ids.extend([str(i)] * int(mine.sum()))
        aps[name] = average_precision(np.asarray(scores), np.asarray(boxes).reshape(-1, 4), ids,
                                      gt, iou_threshold, use_07_metric)
    defined = [ap for ap in aps.values() if not math.isnan(ap)]
    return {"map": float(np.mean(defined)) if defined else math.nan, "ap": aps}
