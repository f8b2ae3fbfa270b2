"""Checkpoints are dicts of state_dicts plus plain metadata, written atomically.

Two files come out of pretraining (`instdisc/stages/pretrain.py`):
- the *training* checkpoint (`models/checkpoints/last.pt`, written by `instdisc.train.fit` after
  every epoch): encoder, loss (incl. memory bank and Z), optimizer, scheduler, RNG states and the
  epoch, so an interrupted stage resumes where it stopped;
- the *encoder* file (`models/encoder.pt`, `save_encoder`): the encoder's weights, how to rebuild
  it and how to preprocess its input, which every downstream stage (evaluate, export, linear,
  places, semi_supervised, detection) reads through `load_encoder`. It is a DVC-cached output, so
  it holds nothing run-specific (no MLflow run id, no timings): same inputs, same bytes.

Nothing is pickled but tensors and plain containers: loading uses `torch.load(weights_only=True)`.
`torch.save` writes to an open handle, so the zip archive inside is always named "archive"
(given a path, torch would name it after the file, and the temporary name would leak in).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
from torch import nn

from instdisc.io import atomic_write

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
ENCODER_KEYS = ("format_version", "encoder", "encoder_config", "preprocess")


def atomic_save(obj: Any, path: Path) -> None:
    """`torch.save` to `path` atomically (temp file, fsync, rename)."""
    atomic_write(Path(path), lambda handle: torch.save(obj, handle))


def load(path: Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Read a checkpoint dict; a missing or unreadable file is an error that names it."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {str(path)!r} does not exist")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as err:  # torch raises several types for corrupt files
        raise ValueError(f"checkpoint {str(path)!r} cannot be read: {err}") from err
    if not isinstance(state, dict) or state.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"checkpoint {str(path)!r} is not an instdisc checkpoint "
                         f"(format_version {FORMAT_VERSION} expected)")
    return state


def load_state_strict(module: nn.Module, state: dict[str, torch.Tensor], what: str) -> None:
    """`load_state_dict` that names missing and unexpected keys in its error."""
    result = module.load_state_dict(state, strict=False)
    if result.missing_keys or result.unexpected_keys:
        raise ValueError(f"{what}: missing keys {result.missing_keys}, "
                         f"unexpected keys {result.unexpected_keys}")


def save_encoder(path: Path, encoder: nn.Module, preprocess: dict[str, Any],
                 extra: dict[str, Any] | None = None) -> None:
    """Write the deployable encoder file: weights, constructor config and preprocessing."""
    state = {
        "format_version": FORMAT_VERSION,
        "encoder": {k: v.detach().cpu() for k, v in encoder.state_dict().items()},
        "encoder_config": dict(encoder.config),
        "preprocess": dict(preprocess),
        **(extra or {}),
    }
    atomic_save(state, path)


def load_encoder(path: Path, device: str | torch.device = "cpu") -> tuple[nn.Module, dict[str, Any]]:
    """Rebuild the encoder from `save_encoder`'s file, in eval mode on `device`.

    Returns (encoder, meta) where meta holds every non-weight key (encoder_config, preprocess with
    `mean`, `std`, `image_size`, and whatever extra the trainer stored, such as `mlflow_run_id`).
    """
    from instdisc.models.encoder import build_encoder

    state = load(path)
    missing = [k for k in ENCODER_KEYS if k not in state]
    if missing:
        raise ValueError(f"encoder file {str(path)!r} lacks keys {missing}")
    encoder = build_encoder(**state["encoder_config"])
    load_state_strict(encoder, state["encoder"], f"encoder file {str(path)!r}")
    meta = {k: v for k, v in state.items() if k != "encoder"}
    return encoder.to(device).eval(), meta
