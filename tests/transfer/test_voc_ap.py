"""VOC average precision against hand-computed values (all-point and VOC2007 11-point)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from instdisc.transfer.voc_ap import (average_precision, box_iou, mean_average_precision,
                                     voc_ap)

BOXES = np.array([[0, 0, 10, 10], [20, 20, 30, 30], [40, 40, 50, 50]], float)


def gt(boxes, difficult=None):
    boxes = np.asarray(boxes, float).reshape(-1, 4)
    return boxes, np.zeros(len(boxes), bool) if difficult is None else np.asarray(difficult)


def test_box_iou_by_hand():
    half = box_iou(np.array([0, 0, 10, 10.]), np.array([[5, 0, 15, 10.]]))[0]
    assert half == pytest.approx(50 / 150)
    assert box_iou(np.array([0, 0, 10, 10.]), np.array([[10, 10, 20, 20.]]))[0] == 0.0


@pytest.mark.parametrize("use_07", [False, True])
def test_perfect_detections_give_ap_one(use_07):
    ap = average_precision(np.array([0.9, 0.8, 0.7]), BOXES, ["a", "a", "b"],
                           {"a": gt(BOXES[:2]), "b": gt(BOXES[2:])}, use_07_metric=use_07)
    assert ap == pytest.approx(1.0)


def test_known_pr_curve():
    """3 objects; ranked detections TP, FP, TP, FP, TP.

    precision 1, 1/2, 2/3, 2/4, 3/5 at recall 1/3, 1/3, 2/3, 2/3, 1.
    All-point: 1/3 * 1 + 1/3 * 2/3 + 1/3 * 3/5 = 0.75556.
    11-point: t = 0..0.3 -> 1 (4 points), t = 0.4..0.6 -> 2/3 (3), t = 0.7..1 -> 3/5 (4): 8.4 / 11.
    """
    far = [100, 100, 110, 110]
    boxes = np.array([BOXES[0], far, BOXES[1], far, BOXES[2]], float)
    scores = np.array([0.9, 0.8, 0.7, 0.6, 0.5])
    truth = {"img": gt(BOXES)}
    ids = ["img"] * 5
    assert average_precision(scores, boxes, ids, truth) == pytest.approx((1 + 2 / 3 + 3 / 5) / 3)
    ap07 = average_precision(scores, boxes, ids, truth, use_07_metric=True)
    assert ap07 == pytest.approx(8.4 / 11)


def test_voc_ap_from_curves():
    assert voc_ap(np.array([0.5, 1.0]), np.array([1.0, 0.5])) == pytest.approx(0.75)
    assert voc_ap(np.array([0.5]), np.array([1.0])) == pytest.approx(0.5)       # recall never 1
    assert voc_ap(np.array([0.5]), np.array([1.0]), use_07_metric=True) == pytest.approx(6 / 11)


def test_a_second_detection_of_one_object_is_a_false_positive():
    """A, A again, B: precision 1, 1/2, 2/3 at recall 1/2, 1/2, 1 -> AP = 1/2 + 1/2 * 2/3."""
    boxes = np.array([BOXES[0], BOXES[0] + 0.5, BOXES[1]], float)
    ap = average_precision(np.array([0.9, 0.8, 0.7]), boxes, ["img"] * 3, {"img": gt(BOXES[:2])})
    assert ap == pytest.approx(0.5 + 0.5 * 2 / 3)


def test_difficult_boxes_are_neither_found_nor_missed():
    """npos counts only the easy box; a hit on the difficult one is neither TP nor FP."""
    truth = {"img": gt(BOXES[:2], difficult=[False, True])}
    boxes = np.array([BOXES[1], BOXES[0]], float)
    assert average_precision(np.array([0.9, 0.8]), boxes, ["img"] * 2, truth) == 1.0
    late = average_precision(np.array([0.9, 0.8]), np.array([[60, 60, 70, 70], BOXES[0]]),
                             ["img", "img"], truth)
    assert late == pytest.approx(0.5)                                     # FP first, then TP


def test_iou_must_exceed_the_threshold():
    shifted = np.array([[0, 0, 10, 10 * 2 / 3]])                           # IoU exactly 2/3
    truth = {"img": gt(BOXES[:1])}
    assert average_precision(np.array([1.0]), shifted, ["img"], truth, iou_threshold=0.6) == 1.0
    assert average_precision(np.array([1.0]), shifted, ["img"], truth,
                             iou_threshold=2 / 3) == 0.0


def test_no_detections_give_zero_and_no_ground_truth_gives_nan():
    assert average_precision(np.zeros(0), np.zeros((0, 4)), [], {"img": gt(BOXES)}) == 0.0
    assert math.isnan(average_precision(np.array([0.5]), BOXES[:1], ["img"], {"img": gt([])}))


def test_mean_average_precision_skips_classes_without_ground_truth():
    dets = [{"boxes": BOXES[:2], "scores": [0.9, 0.8], "labels": [1, 2]}]
    truths = [{"boxes": BOXES[:1], "labels": [1], "difficult": [False]}]
    result = mean_average_precision(dets, truths, ["cat", "dog", "cow"])
    assert result["ap"]["cat"] == 1.0
    assert math.isnan(result["ap"]["dog"]) and math.isnan(result["ap"]["cow"])
    assert result["map"] == 1.0


def test_detections_on_the_wrong_image_are_false_positives():
    dets = [{"boxes": BOXES[:1], "scores": [0.9], "labels": [1]},
            {"boxes": np.zeros((0, 4)), "scores": [], "labels": []}]
    truths = [{"boxes": np.zeros((0, 4)), "labels": [], "difficult": []},
              {"boxes": BOXES[:1], "labels": [1], "difficult": [False]}]
    assert mean_average_precision(dets, truths, ["cat"])["map"] == 0.0


def test_mismatched_lengths_are_rejected():
    with pytest.raises(ValueError, match="1 detection entries for 2 images"):
        mean_average_precision([{}], [{}, {}], ["cat"])
