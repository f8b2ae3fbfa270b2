"""Serving an exported encoder: `Embedder` (ONNX Runtime session), embedding indexes, search.

Needs onnxruntime(-gpu), numpy and Pillow only (no torch, no mlflow).
"""
