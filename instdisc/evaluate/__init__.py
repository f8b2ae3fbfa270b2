"""Evaluation of learned features: weighted kNN (arXiv:1805.01978, Sec. 3.4)."""

from instdisc.evaluate.knn import compute_features, knn_accuracy, weighted_knn_predict

__all__ = ["compute_features", "knn_accuracy", "weighted_knn_predict"]
