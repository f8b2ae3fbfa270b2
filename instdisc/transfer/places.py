"""Scene-recognition transfer: the linear probe on a scene dataset (arXiv:1805.01978, Sec. 4.2).

The paper's Table 3 takes the network learned on ImageNet, freezes it, and trains linear
classifiers on its conv1..conv5 features for Places205, to show that the features transfer to a
dataset the network never saw. Here the scene dataset is prepared with `instdisc.data.prepare`
from an image folder/archive in `<split>/<class>/<file>` layout (15-Scene, under
../shared/data/scene15, stands in for Places), or, by default, is a synthetic set made by
`instdisc.data.synthetic` with another seed (seed + seed_offset) and more classes than the
pretraining set, so the default pipeline needs no external data. The probe itself is
`instdisc.evaluate.linear` (same grid pooling, standardisation and heads).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch

from instdisc.config import PlacesParams, PrepareParams
from instdisc.data.prepare import prepare
from instdisc.data.prepared import PreparedDataset
from instdisc.evaluate.linear import probe_encoder_file

log = logging.getLogger(__name__)


def prepare_params(params: PlacesParams) -> PrepareParams:
    """The `prepare` settings that build the scene dataset."""
    return PrepareParams(source=params.source, on_error="skip", labels="folders",
                         max_in_memory_size=params.max_in_memory_size,
                         image_size=params.image_size, synthetic=params.synthetic)


def prepare_scenes(params: PlacesParams, seed: int, out_dir: Path) -> PreparedDataset:
    """Prepare the scene dataset into `out_dir` (replaced atomically) and open it.

    A synthetic source is generated with `seed + params.seed_offset`, so its images differ from
    the pretraining set's even where the classes coincide.
    """
    data_seed = seed + params.seed_offset if params.source == "synthetic" else seed
    prepare(prepare_params(params), seed=data_seed, out_dir=out_dir)
    scenes = PreparedDataset.open(out_dir)
    log.info("scene dataset %s: %d classes, %s images", params.source, len(scenes.classes),
             {s: info["num_items"] for s, info in scenes.meta["splits"].items()})
    return scenes


def run_places(params: PlacesParams, encoder_path: Path, out_dir: Path, device: torch.device,
               seed: int) -> dict[str, Any]:
    """Prepare the scene set, then probe the frozen encoder (and a random init) on it.

    Returns {"top1": {layer: %}, "dims", "grids", "random_init"?: {"top1"}, "dataset": {...}}.
    """
    scenes = prepare_scenes(params, seed, out_dir)
    result = probe_encoder_file(params.probe, encoder_path, scenes, device, seed)
    result["dataset"] = {"source": params.source, "num_classes": len(scenes.classes),
                         "train": scenes.meta["splits"]["train"]["num_items"],
                         "test": scenes.meta["splits"]["test"]["num_items"],
                         "fingerprint": scenes.fingerprint}
    return result
