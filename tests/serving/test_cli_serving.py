import json

import pytest
from PIL import Image
from serving_helpers import write_images
from serving_helpers import tiny  # noqa: F401 (fixtures)

from instdisc import cli


@pytest.mark.parametrize("command, options", [
    ("export", ["--params", "--encoder", "--data", "--out", "--metrics"]),
    ("embed", ["--output", "--model", "--device", "--strict-device", "--shard-size"]),
    ("search", ["--index", "-k", "--grid", "--chunk-size", "--model", "--device"]),
    ("serve", ["--model", "--index", "--host", "--port", "--max-batch", "--max-wait-ms",
               "--max-body-bytes", "--max-pixels", "--allow-cpu-fallback", "--threads"]),
])
def test_every_serving_subcommand_has_help(command, options, capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.build_parser().parse_args([command, "--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    assert all(option in text for option in options)


def test_embed_then_search_from_the_command_line(tiny, tmp_path, capsys):
    folder = tmp_path / "photos"
    write_images(folder, 6)
    (folder / "broken.png").write_bytes(b"\x89PNG broken")
    model = ["--model", str(tiny.onnx_path), "--device", "cpu"]
    assert cli.main(["embed", str(folder), "-o", str(tmp_path / "index"), *model]) == 0
    meta = json.loads((tmp_path / "index" / "index.json").read_text())
    assert meta["num_items"] == 6 and meta["failed"][0]["id"] == "broken.png"
    capsys.readouterr()
    assert cli.main(["search", str(folder / "img_003.png"), "--index", str(tmp_path / "index"),
                     "-k", "4", "--grid", str(tmp_path / "grid.png"), *model]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 4 and lines[0].split() == ["1", "1.0000", "img_003.png"]
    assert Image.open(tmp_path / "grid.png").format == "PNG"
    assert cli.main(["search", str(folder / "img_001.png"), "--index", str(tmp_path / "index"),
                     "--json", *model]) == 0
    hits = json.loads(capsys.readouterr().out)
    assert len(hits) == 6 and hits[0]["id"] == "img_001.png"
    assert hits[0]["score"] == pytest.approx(1.0, abs=1e-5)


def test_search_errors_are_reported_not_raised(tiny, tmp_path, caplog):
    assert cli.main(["search", str(tmp_path / "q.png"), "--index", str(tmp_path / "none"),
                     "--model", str(tiny.onnx_path)]) == 2
    assert "is not a finished index" in caplog.text
