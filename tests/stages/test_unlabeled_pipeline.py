"""An unlabelled flat folder of photos through the stage modules: prepare -> pretrain -> evaluate,
and the label-needing stages skip with a reason instead of failing."""

from __future__ import annotations

import json
import logging

import numpy as np
import yaml
from PIL import Image

from conftest import tiny_params
from instdisc import tracking
from instdisc.data.prepared import PreparedDataset
from instdisc.evaluate.label_free import COMPARED, METRICS
from instdisc.stages import evaluate, export, linear, prepare, pretrain, semi_supervised


def test_unlabeled_folder_prepares_pretrains_and_evaluates(tmp_path, monkeypatch, caplog):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    monkeypatch.delenv(tracking.PARENT_RUN_ENV, raising=False)
    photos = tmp_path / "photos"
    photos.mkdir()
    for i in range(40):
        pixels = np.random.default_rng(i).integers(0, 256, (16, 16, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(photos / f"{i:03d}.png")
    (photos / "copy.png").write_bytes((photos / "000.png").read_bytes())
    params = tiny_params({"device": "cpu",
                          "prepare": {"source": str(photos), "holdout_fraction": 0.25},
                          "pretrain": {"epochs": 1, "lr_milestones": [1]},
                          "evaluate": {"label_free_images": 8},
                          "export": {"int8": True}})  # asked for, but nothing to gate it with
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    metrics = tmp_path / "metrics"
    prepared_dir, encoder = tmp_path / "data" / "prepared", tmp_path / "models" / "encoder.pt"

    assert prepare.main(["--out", str(prepared_dir), "--metrics", str(metrics / "p.json")]) == 0
    report = json.loads((prepared_dir / "report.json").read_text())
    assert report["labeled"] is False and report["split_folders"]["train"] == "."
    assert report["duplicates"] == [["000.png", "copy.png"]]
    assert json.loads((metrics / "p.json").read_text())["num_classes"] == 0
    assert not PreparedDataset.open(prepared_dir).labeled

    assert pretrain.main(["--data", str(prepared_dir), "--out", str(encoder), "--checkpoint",
                          str(tmp_path / "ckpt" / "last.pt"), "--plots", str(tmp_path / "plots"),
                          "--metrics", str(metrics / "t.json")]) == 0
    trained = json.loads((metrics / "t.json").read_text())
    assert trained["epochs"] == 1 and trained["knn_top1_monitor"] is None  # nan -> null
    # the label-free monitor needs no labels: epoch 0 (random init) and epoch 1
    assert set(trained["label_free"]) == set(trained["random_init"]) - {"knn_top1"} == set(METRICS)

    caplog.set_level(logging.WARNING)
    assert evaluate.main(["--data", str(prepared_dir), "--encoder", str(encoder),
                          "--metrics", str(metrics / "e.json")]) == 0
    scores = json.loads((metrics / "e.json").read_text())
    assert scores["knn"]["skipped"].startswith("no labels")
    assert scores["random_init"]["knn"]["skipped"].startswith("no labels")
    free, base = scores["label_free"], scores["random_init"]["label_free"]
    assert free["images"] == base["images"] == 8
    assert 0.0 <= free["alignment"] <= 4.0 and -4.0 <= free["uniformity"] <= 0.0
    assert 0.0 <= free["retrieval_top1"] <= 100.0
    assert set(scores["beats_random_init"]) == set(COMPARED)  # and no knn_top1
    assert "kNN skipped: no labels" in caplog.text

    for stage, name in ((linear, "linear"), (semi_supervised, "semi_supervised")):
        out = metrics / f"{name}.json"
        assert stage.main(["--data", str(prepared_dir), "--encoder", str(encoder),
                           "--metrics", str(out)]) == 0
        assert json.loads(out.read_text())["skipped"].startswith("no labels")
        assert f"{name} skipped: no labels" in caplog.text

    onnx_path = tmp_path / "models" / "encoder.onnx"
    assert export.main(["--data", str(prepared_dir), "--encoder", str(encoder), "--out",
                        str(onnx_path), "--metrics", str(metrics / "x.json")]) == 0
    exported = json.loads((metrics / "x.json").read_text())
    assert exported["parity"]["passed"] and onnx_path.is_file()
    assert exported["int8_parity"]["skipped"].startswith("int8 is gated on kNN top-1")
    assert list((tmp_path / "models" / "int8").iterdir()) == []  # the dvc.yaml out exists, empty
