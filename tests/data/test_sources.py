from pathlib import Path

import pytest
from image_trees import clean_tree, messy_tree, write_folder, write_tar, write_zip

from instdisc.data.archive import source_kind
from instdisc.data.decode import decode_rgb
from instdisc.data.sources import ImageSource, iter_source


def listing(path: Path) -> list[tuple[str, str, str, bytes]]:
    return [(r.entry.split, r.entry.class_name, r.entry.name, r.read()) for r in iter_source(path)]


def test_folder_zip_and_tar_list_the_same_sorted_records(tmp_path):
    files = messy_tree()
    folder = listing(write_folder(tmp_path / "tree", files))
    assert folder == listing(write_zip(tmp_path / "tree.zip", files))
    assert folder == listing(write_tar(tmp_path / "tree.tar", files))
    assert folder == listing(write_tar(tmp_path / "tree.tgz", files, prefix="wrapper/"))
    assert folder == listing(write_zip(tmp_path / "wrapped.zip", files, prefix="cifar/"))
    keys = [(s, c, n) for s, c, n, _ in folder]
    assert keys == sorted(keys)
    names = [f"{s}/{c}/{n}" for s, c, n in keys]
    assert "train/cat/README.txt" in names and "val/cat/000.png" in names
    assert not any("DS_Store" in n or "MACOSX" in n for n in names)


def test_files_outside_class_folders_are_ignored_not_yielded(tmp_path):
    files = clean_tree() | {"README.md": b"x", "train/labels.txt": b"y"}
    with ImageSource(write_zip(tmp_path / "a.zip", files, prefix="top/")) as source:
        assert source.ignored == ["top/README.md", "top/train/labels.txt"]
        assert source.splits == ["test", "train"] and source.classes("train") == ["cat", "dog"]
        assert source.entries[0].member == "top/test/cat/000.png"


@pytest.mark.parametrize("member", ["../evil/train/cat/x.png", "/abs/train/cat/x.png",
                                    "train/cat/../../../x.png"])
def test_path_traversal_in_archives_is_rejected(tmp_path, member):
    zip_path = write_zip(tmp_path / "evil.zip", {member: b"x"})
    with pytest.raises(ValueError, match="unsafe member"):
        ImageSource(zip_path)
    tar_path = write_tar(tmp_path / "evil.tar", {member: b"x"})
    with pytest.raises(ValueError, match="unsafe member"):
        ImageSource(tar_path)


def test_missing_or_unknown_source_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        source_kind(tmp_path / "nowhere")
    (tmp_path / "data.rar").write_bytes(b"x")
    with pytest.raises(ValueError, match=r"data.rar.*neither a folder nor one of"):
        source_kind(tmp_path / "data.rar")


def test_decode_rgb_converts_modes(tmp_path):
    files = messy_tree()
    for rel, mode in [("train/dog/gray.jpg", "L"), ("train/dog/rgba.png", "RGBA"),
                      ("train/dog/palette.png", "P"), ("test/cat/cmyk.jpg", "CMYK")]:
        image, original = decode_rgb(files[rel])
        assert (image.mode, image.size, original) == ("RGB", (8, 8), mode)
    with pytest.raises(OSError, match="(?i)truncated"):
        decode_rgb(files["train/cat/bad.jpg"])
    with pytest.raises(ValueError, match="empty file"):
        decode_rgb(b"")


@pytest.mark.parametrize("mode", ["I;16", "I", "F"])
def test_wide_grayscale_is_scaled_to_8_bits_by_its_range(mode):
    import io

    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    top, dtype = {"I;16": (65535, np.uint16), "I": (65535, np.int32), "F": (1.0, np.float32)}[mode]
    values = (rng.random((700, 3000)) * top).astype(dtype)                      # (H, W)
    values[0, :2] = [0, top]
    buffer = io.BytesIO()
    Image.fromarray(values).save(buffer, format="PNG" if mode == "I;16" else "TIFF")
    image, original = decode_rgb(buffer.getvalue())
    expected = np.clip(values.astype(np.float64) / top * 255 + 0.5, 0, 255).astype(np.uint8)
    assert original == mode and image.mode == "RGB" and image.size == (3000, 700)
    got = np.asarray(image)                                                     # (H, W, 3)
    assert (got == expected[..., None]).all()  # every block of rows, each channel
    assert got[0, :2, 0].tolist() == [0, 255]


def test_damaged_archives_are_errors_naming_the_archive_or_member(tmp_path):
    (tmp_path / "junk.zip").write_bytes(b"this is not a zip")
    with pytest.raises(ValueError, match=r"cannot read archive '.*junk.zip'"):
        ImageSource(tmp_path / "junk.zip")
    path = write_zip(tmp_path / "crc.zip", {"train/cat/a.png": b"A" * 64, "test/cat/b.png": b"x"})
    raw = path.read_bytes()
    path.write_bytes(raw.replace(b"A" * 64, b"A" * 63 + b"B"))  # stored data no longer matches CRC
    with ImageSource(path) as source, pytest.raises(ValueError,
                                                    match="cannot read 'train/cat/a.png'"):
        list(source.records())
