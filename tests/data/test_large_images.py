"""prepare.max_shorter_side: file-backed images stored re-encoded at a bounded shorter side."""

import io
import json

import pytest
from image_trees import clean_tree, write_folder, write_zip
from PIL import Image
from test_file_transforms import jpeg, photo

from instdisc.config import ParamsError, PrepareParams
from instdisc.data.prepare import prepare
from instdisc.data.prepared import PreparedDataset
from instdisc.data.storage import shorter_side_size


def tree() -> dict[str, bytes]:
    """clean_tree (8 px PNGs) plus a large JPEG, a large PNG and a JPEG under the bound."""
    files = clean_tree(size=8)
    files["train/cat/big.jpg"] = jpeg(photo(160, 120, 1))
    png = io.BytesIO()
    Image.fromarray(photo(90, 150, 2)).save(png, format="PNG")
    files["train/dog/tall.png"] = png.getvalue()
    files["test/dog/small.jpg"] = jpeg(photo(40, 30, 3))
    return files


def run(tmp_path, source, out, **params):
    params = dict(max_in_memory_size=16, max_shorter_side=48, reencode_quality=85) | params
    return prepare(PrepareParams(source=str(source), **params), seed=0,
                   out_dir=tmp_path / out, progress=False)


def test_large_images_are_resized_and_reencoded(tmp_path):
    files = tree()
    report = run(tmp_path, write_zip(tmp_path / "src.zip", files), "prepared")
    assert report["storage"] == "manifest"
    entry = report["reencoded"]
    assert entry["count"] == 2 and entry["max_shorter_side"] == 48 and entry["quality"] == 85
    originals = files["train/cat/big.jpg"], files["train/dog/tall.png"]
    assert entry["bytes_before"] == sum(map(len, originals))
    assert 0 < entry["bytes_after"] < entry["bytes_before"]
    on_disk = json.loads((tmp_path / "prepared" / "report.json").read_text())["reencoded"]
    assert on_disk == entry
    data = PreparedDataset.open(tmp_path / "prepared")
    paths = {p.relative_to(tmp_path / "prepared").as_posix(): p
             for split in ("train", "test") for p in data.split(split).paths}
    big, tall = Image.open(paths["files/train/cat/big.jpg"]), \
        Image.open(paths["files/train/dog/tall.png.jpg"])
    assert (big.format, big.size) == ("JPEG", (64, 48))
    assert (tall.format, tall.size) == ("JPEG", (48, 80))
    assert not (tmp_path / "prepared" / "files" / "train" / "dog" / "tall.png").exists()
    assert paths["files/test/dog/small.jpg"].read_bytes() == files["test/dog/small.jpg"]


def test_reencoding_is_deterministic_and_the_same_from_a_folder(tmp_path):
    files = tree()
    first = run(tmp_path, write_zip(tmp_path / "src.zip", files), "a")
    second = run(tmp_path, write_zip(tmp_path / "src.zip", files), "b")
    folder = write_folder(tmp_path / "src", files)
    third = run(tmp_path, folder, "c")
    assert first["fingerprint"] == second["fingerprint"] == third["fingerprint"]
    for name in ("train/cat/big.jpg", "train/dog/tall.png.jpg"):
        assert (tmp_path / "a" / "files" / name).read_bytes() == \
            (tmp_path / "c" / "files" / name).read_bytes()
    assert (folder / "train" / "cat" / "big.jpg").read_bytes() == files["train/cat/big.jpg"]
    original = run(tmp_path, folder, "d", max_shorter_side=0)
    assert original["reencoded"] is None and original["fingerprint"] != first["fingerprint"]


def test_in_memory_storage_ignores_the_option(tmp_path):
    report = run(tmp_path, write_zip(tmp_path / "src.zip", clean_tree(size=8)), "p")
    assert report["storage"] == "array" and report["reencoded"] is None


def test_shorter_side_size_keeps_the_aspect():
    assert shorter_side_size((120, 160), 48) == (48, 64)
    assert shorter_side_size((1000, 333), 256) == (769, 256)


@pytest.mark.parametrize(("key", "value", "allowed"), [
    ("max_shorter_side", 4, "0 \\(keep the originals\\) or >= 8"),
    ("max_shorter_side", -1, "0 \\(keep the originals\\) or >= 8"),
    ("reencode_quality", 0, "1..95"),
    ("reencode_quality", 100, "1..95")])
def test_params_are_checked(key, value, allowed):
    with pytest.raises(ParamsError, match=f"{key} = {value}: allowed {allowed}"):
        PrepareParams(**{key: value})


def test_the_prepare_stage_reports_the_reencoded_count(tmp_path, monkeypatch):
    import yaml

    from instdisc.stages import prepare as prepare_stage

    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    source = write_zip(tmp_path / "src.zip", tree())
    (tmp_path / "params.yaml").write_text(yaml.safe_dump({"seed": 0, "prepare": {
        "source": str(source), "max_in_memory_size": 16, "max_shorter_side": 48}}))
    metrics = tmp_path / "prepare.json"
    assert prepare_stage.main(["--params", str(tmp_path / "params.yaml"), "--out",
                               str(tmp_path / "prepared"), "--metrics", str(metrics)]) == 0
    assert json.loads(metrics.read_text())["reencoded"] == 2
