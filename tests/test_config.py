"""params.yaml loading: every section loads; bad keys, types and ranges fail with a clear message."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

from instdisc import config
from instdisc.config import ParamsError

from conftest import REPO_ROOT


def write(tmp_path: Path, data: dict) -> Path:
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


@pytest.mark.parametrize("section", sorted(config.SECTIONS))
def test_every_section_of_the_repo_params_loads(section):
    loaded = config.load_section(REPO_ROOT / "params.yaml", section)
    assert isinstance(loaded, config.SECTIONS[section])


def test_every_dvc_param_key_exists_in_params_yaml():
    stages = yaml.safe_load((REPO_ROOT / "dvc.yaml").read_text())["stages"]
    params = yaml.safe_load((REPO_ROOT / "params.yaml").read_text())
    for name, stage in stages.items():
        for key in stage.get("params", []):
            node = params
            for part in key.split("."):
                assert part in node, f"dvc.yaml stage {name!r} names missing param {key!r}"
                node = node[part]


def test_every_dvc_stage_has_a_params_section_or_is_known():
    stages = yaml.safe_load((REPO_ROOT / "dvc.yaml").read_text())["stages"]
    params = yaml.safe_load((REPO_ROOT / "params.yaml").read_text())
    for name, stage in stages.items():
        assert stage["cmd"] == f"python -m instdisc.stages.{name}", name
        assert name in params and name in stage["params"], name


def test_defaults_are_the_papers_recipe():
    p = config.PretrainParams()
    assert (p.lr, p.momentum, p.weight_decay, p.batch_size, p.epochs) == (0.03, 0.9, 5e-4, 128, 200)
    assert (p.lr_milestones, p.lr_gamma, p.num_negatives, p.temperature) == ((120, 160), 0.1, 4096, 0.07)
    assert (p.crop_scale_min, p.color_jitter, p.grayscale_prob, p.bank_momentum) == (0.2, 0.4, 0.2, 0.5)


@pytest.mark.parametrize("section, value, message", [
    ("pretrain", {"lr": -0.1}, "params.yaml[pretrain]: lr = -0.1: allowed > 0"),
    ("pretrain", {"temperature": 0}, "temperature = 0.0: allowed > 0"),
    ("pretrain", {"loss": "triplet"}, "[pretrain][loss] = 'triplet': allowed one of ['nce', 'softmax', 'parametric']"),
    ("pretrain", {"epochs": "ten"}, "[pretrain][epochs] = 'ten': expected an integer"),
    ("pretrain", {"hflip": "yes"}, "[pretrain][hflip] = 'yes': expected true or false"),
    ("pretrain", {"bank_momentum": 1.0}, "bank_momentum = 1.0: allowed [0, 1)"),
    ("pretrain", {"lr_milestones": [10, "x"]}, "[pretrain][lr_milestones][1] = 'x': expected an integer"),
    ("pretrain", {"arch": "vgg16"}, "arch = 'vgg16': allowed one of resnet18, resnet34, resnet50"),
    ("pretrain", {"nproc_per_node": 0}, "nproc_per_node = 0: allowed >= 1"),
    ("pretrain", {"nnodes": 2}, "rdzv_endpoint = '': allowed a \"host:port\" rendezvous address"),
    ("pretrain", {"rdzv_endpoint": "node0"}, "rdzv_endpoint = 'node0': allowed \"\" or \"host:port\""),
    ("prepare", {"on_error": "ignore"}, "[prepare][on_error] = 'ignore'"),
    ("prepare", {"synthetic": {"num_classes": 1}}, "[prepare][synthetic]: num_classes = 1: allowed 2..100"),
    ("evaluate", {"k": 0}, "k = 0: allowed >= 1"),
])
def test_bad_values_name_key_value_and_what_is_allowed(tmp_path, section, value, message):
    path = write(tmp_path, {section: value})
    with pytest.raises(ParamsError, match=re.escape(message)):
        config.load_section(path, section)


def test_unknown_keys_are_rejected(tmp_path):
    path = write(tmp_path, {"pretrain": {"learning_rate": 0.1}})
    with pytest.raises(ParamsError, match=r"\[pretrain\] has unknown keys \['learning_rate'\]"):
        config.load_section(path, "pretrain")


def test_missing_file_and_section_are_named(tmp_path):
    with pytest.raises(ParamsError, match="does not exist"):
        config.load_section(tmp_path / "nope.yaml", "pretrain")
    with pytest.raises(ParamsError, match="has no section 'evaluate'"):
        config.load_section(write(tmp_path, {"pretrain": {}}), "evaluate")


def test_common_keys_are_validated(tmp_path):
    assert config.load_common(write(tmp_path, {"seed": 3, "device": "cuda:1"})).seed == 3
    with pytest.raises(ParamsError, match="device = 'gpu': allowed one of auto, cpu, cuda, cuda:N, mps"):
        config.load_common(write(tmp_path, {"device": "gpu"}))


def test_negatives_must_be_fewer_than_images():
    params = config.PretrainParams(num_negatives=100)
    params.check_dataset_size(101)
    with pytest.raises(ParamsError, match=r"num_negatives\] = 100: must be smaller than the number "
                                          r"of training images \(100\)"):
        params.check_dataset_size(100)


def test_loaded_params_are_frozen():
    params = config.PretrainParams()
    with pytest.raises(AttributeError):
        params.lr = 1.0  # type: ignore[misc]
