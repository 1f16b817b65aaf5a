"""Sample lists from folders, CSV manifests and the digits demo; splits; image modes; bad input."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from pipeline.data.images import load_image
from pipeline.data.sources import load_samples, read_manifest, scan_folder
from pipeline.errors import BadImageError, DataError, MissingError
from pipeline.splits import stratified_holdout

from helpers import make_folder, write_image

CARVE = {"val_fraction": 0.25, "test_fraction": 0.2, "seed": 0}


def test_flat_folder_gets_stratified_test_and_val_carved(tmp_path):
    samples = scan_folder(make_folder(tmp_path, ("a", "b", "c"), per_class=10), **CARVE)
    assert samples.classes == ["a", "b", "c"]
    assert len(samples) == 30
    assert samples.split_sizes() == {"train": 18, "val": 6, "test": 6}
    for code in range(3):  # every class in every split: stratified
        assert sorted(np.unique(samples.labels[samples.split == code])) == [0, 1, 2]
    assert np.all(np.diff(samples.split) >= 0), "rows are ordered by split"
    assert set(samples.carved) == {"test", "val"}
    assert samples.carved["val"] == {
        "from": "train",
        "fraction": 0.25,
        "seed": 0,
        "stratified": True,
    }


def test_split_is_deterministic_and_seeded(tmp_path):
    root = make_folder(tmp_path, per_class=12)
    a, b = scan_folder(root, **CARVE), scan_folder(root, **CARVE)
    assert a.ids == b.ids and a.digest() == b.digest()
    c = scan_folder(root, **{**CARVE, "seed": 1})
    assert set(c.ids) == set(a.ids) and c.digest() != a.digest()


def test_split_folders_keep_official_splits_and_carve_only_val(tmp_path):
    root = make_folder(tmp_path, per_class=4, splits=("train", "test"))
    samples = scan_folder(root, **CARVE)
    assert samples.split_sizes() == {"train": 6, "val": 2, "test": 8}
    assert list(samples.carved) == ["val"]
    test_ids = [i for i, s in zip(samples.ids, samples.split, strict=True) if s == 2]
    assert all(i.startswith("test/") for i in test_ids)
    assert (
        samples.ids[0] == "train/cat/train00.png"
    )  # ids are relative: moving the folder keeps the cache


def test_official_val_folder_is_used_as_is(tmp_path):
    root = make_folder(tmp_path, per_class=3, splits=("train", "val", "test"))
    samples = scan_folder(root, **CARVE)
    assert samples.split_sizes() == {"train": 6, "val": 6, "test": 6}
    assert samples.carved == {}


def test_stratified_holdout_keeps_one_of_each_class_behind():
    labels = np.array([0] * 10 + [1] * 2 + [2])
    held = stratified_holdout(labels, 0.5, seed=3)
    assert held[:10].sum() == 5 and held[10:12].sum() == 1 and not held[12]


def test_csv_manifest_relative_absolute_and_split(tmp_path):
    a = write_image(tmp_path / "imgs" / "a.png", (200, 0, 0))
    b = write_image(tmp_path / "elsewhere" / "b.png", (0, 200, 0))
    for name in "cde":
        write_image(tmp_path / "imgs" / f"{name}.png", (0, 0, 200))
    manifest = tmp_path / "imgs" / "list.csv"
    d = tmp_path / "imgs" / "d.png"
    rows = [
        "path,label,split",
        "a.png,10,train",
        f"{b},2,train",
        "c.png,2,test",
        f"{d},10,test",
        "../imgs/e.png,2,train",
    ]
    manifest.write_text("\n".join(rows) + "\n")
    samples = read_manifest(manifest, **{**CARVE, "val_fraction": 0.0})
    assert samples.classes == ["2", "10"], "numeric labels sort numerically"
    assert samples.split_sizes() == {"train": 3, "val": 0, "test": 2}
    assert samples.items[0] == str(a) and samples.items[1] == str(b)
    assert samples.read(0).mode == "RGB"


def test_csv_without_split_column(tmp_path):
    make_folder(tmp_path / "x", per_class=5)
    lines = ["path,label"] + [f"x/{c}/img{n:02d}.png,{c}" for c in ("cat", "dog") for n in range(5)]
    (tmp_path / "m.csv").write_text("\n".join(lines))
    samples = load_samples(data=str(tmp_path / "m.csv"), val_fraction=0.2, test_fraction=0.2)
    assert len(samples) == 10 and samples.classes == ["cat", "dog"]


def test_digits_demo_is_written_once_as_an_image_folder(tmp_path):
    samples = load_samples(dataset="digits", root=str(tmp_path))
    assert len(samples) == 1797 and samples.classes == [str(d) for d in range(10)]
    assert samples.split_sizes()["test"] == 451
    stamp = (tmp_path / "digits" / "train").stat().st_mtime_ns
    again = load_samples(dataset="DIGITS", root=str(tmp_path))
    assert (
        again.digest() == samples.digest()
        and (tmp_path / "digits" / "train").stat().st_mtime_ns == stamp
    )


@pytest.mark.parametrize("mode", ["L", "RGBA", "P", "CMYK", "I;16", "1", "LA"])
def test_image_modes_become_rgb(tmp_path, mode):
    rgb = Image.fromarray(np.random.default_rng(0).integers(0, 255, (12, 10, 3), dtype=np.uint8))
    if mode == "I;16":
        image = Image.fromarray(np.asarray(rgb.convert("L"), dtype=np.uint16) * 257)
    elif mode == "P":
        image = rgb.convert("P")
    else:
        image = rgb.convert(mode)
    path = tmp_path / ("x.tiff" if mode == "CMYK" else "x.png")
    image.save(path)
    loaded = load_image(path)
    assert loaded.mode == "RGB" and loaded.size == (10, 12)
    if mode == "I;16":  # scaled down, not clipped at 255
        np.testing.assert_allclose(np.asarray(loaded)[..., 0], np.asarray(rgb.convert("L")), atol=1)


def test_corrupt_and_fake_images_raise_with_their_path(tmp_path):
    fake = tmp_path / "fake.jpg"
    fake.write_text("this is a text file, not a JPEG")
    with pytest.raises(BadImageError, match=r"fake\.jpg: cannot identify image file"):
        load_image(fake)
    truncated = tmp_path / "cut.jpg"
    Image.fromarray(np.full((64, 64, 3), 128, np.uint8)).save(truncated, quality=95)
    truncated.write_bytes(truncated.read_bytes()[:300])
    with pytest.raises(BadImageError, match=r"cut\.jpg: file is truncated"):
        load_image(truncated)


# ------------------------------------------------------------------------------ bad sources


def test_missing_folder(tmp_path):
    with pytest.raises(
        MissingError, match=r"data folder .*nope does not exist; expected ROOT/<class>/<image>"
    ):
        load_samples(data=str(tmp_path / "nope"))


def test_empty_folder(tmp_path):
    with pytest.raises(
        DataError, match=r"contains no class folders; expected ROOT/<class>/<image>"
    ):
        load_samples(data=str(tmp_path))


def test_images_without_class_folders(tmp_path):
    write_image(tmp_path / "a.png", (1, 2, 3))
    with pytest.raises(
        DataError, match=r"found 1 images directly in it; move them into class folders"
    ):
        load_samples(data=str(tmp_path))


def test_class_folder_without_images(tmp_path):
    make_folder(tmp_path, per_class=2)
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("no images here")
    with pytest.raises(
        DataError, match=r"class folder .*empty contains no images; add images or remove the folder"
    ):
        load_samples(data=str(tmp_path))


def test_fewer_than_two_classes(tmp_path):
    make_folder(tmp_path, classes=("only",), per_class=3)
    with pytest.raises(
        DataError, match=r"has 1 class \(only\); a classifier needs at least two classes"
    ):
        load_samples(data=str(tmp_path))


def test_split_layout_with_a_stray_folder(tmp_path):
    make_folder(tmp_path, per_class=1, splits=("train",))
    (tmp_path / "misc").mkdir()
    with pytest.raises(DataError, match=r"mixes split folders with 'misc'"):
        load_samples(data=str(tmp_path))


def test_csv_row_with_missing_file(tmp_path):
    write_image(tmp_path / "a.png", (1, 2, 3))
    (tmp_path / "m.csv").write_text("path,label\na.png,x\nb.png,y\nc.png,y\n")
    with pytest.raises(
        MissingError, match=r"m\.csv line 3: image .*b\.png does not exist \(and 1 more rows\); fix"
    ):
        load_samples(data=str(tmp_path / "m.csv"))


def test_csv_bad_header_and_split(tmp_path):
    (tmp_path / "h.csv").write_text("file,class\na.png,x\n")
    with pytest.raises(
        DataError, match=r"has columns \['file', 'class'\]; expected a header row path,label"
    ):
        load_samples(data=str(tmp_path / "h.csv"))
    write_image(tmp_path / "a.png", (1, 2, 3))
    (tmp_path / "s.csv").write_text("path,label,split\na.png,x,holdout\n")
    with pytest.raises(
        DataError, match=r"s\.csv line 2: split 'holdout' is not one of train, val, test"
    ):
        load_samples(data=str(tmp_path / "s.csv"))


def test_data_file_that_is_not_a_csv(tmp_path):
    path = write_image(tmp_path / "a.png", (1, 2, 3))
    with pytest.raises(DataError, match=r"is a file; expected an image folder or a \.csv manifest"):
        load_samples(data=str(path))
