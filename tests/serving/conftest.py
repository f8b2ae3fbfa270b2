"""Fixtures of the serving tests: one tiny exported encoder for the whole session (read only)."""

import pytest
from serving_helpers import tiny_export

from instdisc.serving.embedder import Embedder


@pytest.fixture(scope="session")
def tiny(tmp_path_factory):
    return tiny_export(tmp_path_factory)


@pytest.fixture(scope="module")
def embedder(tiny):
    return Embedder(tiny.onnx_path, device="cpu", batch_size=4)
