"""WebDataset tar shards as a source: indexed once, read by seeking, the same features as the same
images in a folder; labels from .cls or .json; bad members follow the bad-image rules; whole shards
per rank."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import h5py
import numpy as np
import pytest
from PIL import Image

from pipeline import cli
from pipeline.data.shards import index_shard
from pipeline.data.sources import load_samples
from pipeline.errors import BadImageError, DataError, MissingError
from pipeline.features import stage
from pipeline.features.distributed import World

from helpers import PALETTE, tiny, write_image
from helpers.shards import make_shards, write_shard

pytest.importorskip("webdataset")


def png(path: Path) -> bytes:
    return path.read_bytes()


def test_shards_give_the_features_of_the_same_images_in_a_folder(tmp_path):
    shards, folder = make_shards(tmp_path)
    pattern = str(shards / "train-{000..002}.tar")
    samples = load_samples(data=pattern, val_fraction=0.25, test_fraction=0.25)
    assert (
        len(samples) == 12
        and samples.classes == ["0", "1"]
        and samples.ids[0].startswith("train-00")
    )
    a = stage.run(
        tiny(data=pattern, val_fraction=0.0, test_fraction=0.0, out=str(tmp_path / "a.h5"))
    )
    b = stage.run(
        tiny(data=str(folder), val_fraction=0.0, test_fraction=0.0, out=str(tmp_path / "b.h5"))
    )
    with h5py.File(a.path) as fa, h5py.File(b.path) as fb:
        by_key = {i.split("/")[-1]: row for row, i in enumerate(fa["ids"].asstr()[...])}
        order = [by_key[Path(i).stem] for i in fb["ids"].asstr()[...]]
        np.testing.assert_allclose(
            fa["features"][...][order], fb["features"][...], rtol=0, atol=1e-6
        )
    assert (
        stage.run(tiny(data=pattern, val_fraction=0.0, test_fraction=0.0, out=a.path)).status
        == "current"
    )


def test_split_patterns_json_labels_and_a_file_url(tmp_path):
    image = png(write_image(tmp_path / "x.png", PALETTE[0], (40, 30)))
    for split, n in (("train", 6), ("val", 2), ("test", 2)):
        write_shard(
            tmp_path / f"{split}-000.tar",
            [
                (
                    f"{split}{i}",
                    image,
                    {"json": json.dumps({"species": ["owl", "emu"][i % 2]}).encode()},
                )
                for i in range(n)
            ],
        )
    samples = load_samples(
        data=f"file://{tmp_path}/train-000.tar",
        data_val=str(tmp_path / "val-000.tar"),
        data_test=str(tmp_path / "test-000.tar"),
        label_key="species",
    )
    assert samples.split_sizes() == {"train": 6, "val": 2, "test": 2} and samples.classes == [
        "emu",
        "owl",
    ]
    with pytest.raises(
        DataError,
        match=r"cannot read its label \(KeyError: 'label'\); expected an integer \.cls "
        r"or a \.json with a 'label' field \(--label-key\)",
    ):
        load_samples(data=str(tmp_path / "train-000.tar"))


def test_a_corrupt_member_is_a_bad_image_named_by_shard_and_member(tmp_path, capsys):
    good = png(write_image(tmp_path / "x.png", PALETTE[1], (40, 30)))
    write_shard(
        tmp_path / "s-000.tar",
        [
            ("a", good, {"cls": b"0"}),
            ("b", b"not a png", {"cls": b"1"}),
            ("c", good, {"cls": b"1"}),
            ("d", good, {"cls": b"0"}),
        ],
    )
    cfg = tiny(
        data=str(tmp_path / "s-000.tar"),
        val_fraction=0.0,
        test_fraction=0.0,
        out=str(tmp_path / "c.h5"),
    )
    with pytest.raises(BadImageError, match=r"s-000\.tar/b\.png: cannot identify image file"):
        stage.run(cfg)
    args = [
        "features",
        "--data",
        str(tmp_path / "s-000.tar"),
        "--backbone",
        "resnet18",
        "--weights",
        "none",
        "--image-size",
        "32",
        "--workers",
        "0",
        "--val-fraction",
        "0",
        "--test-fraction",
        "0",
        "--no-progress",
        "--out",
        str(tmp_path / "c.h5"),
        "--skip-bad-images",
    ]
    assert cli.main(args) == 0
    with h5py.File(tmp_path / "c.h5") as f:
        assert f["ok"][...].tolist() == [True, False, True, True]


def test_shard_errors_are_one_line(tmp_path):
    with pytest.raises(
        MissingError,
        match=r"shard .*nope-000\.tar does not exist or is not a file; check the --data",
    ):
        load_samples(data=str(tmp_path / "nope-{000..001}.tar"))
    (tmp_path / "junk.tar").write_bytes(b"\x00" * 10)
    with pytest.raises(
        DataError, match=r"junk\.tar is not a readable tar file .*; expected uncompressed \.tar"
    ):
        load_samples(data=str(tmp_path / "junk.tar"))
    write_shard(tmp_path / "nolabel.tar", [("a", b"x", {})])
    with pytest.raises(
        DataError, match=r"sample 'a' in shard .*nolabel\.tar has no label: add KEY\.cls"
    ):
        load_samples(data=str(tmp_path / "nolabel.tar"))
    with tarfile.open(tmp_path / "twice.tar", "w") as tar:
        for name in ("a.png", "a.jpg", "a.cls"):
            info = tarfile.TarInfo(name)
            info.size = 1
            tar.addfile(info, io.BytesIO(b"0"))
    with pytest.raises(
        DataError, match=r"sample 'a' in shard .*twice\.tar has two images \(a\.png, a\.jpg\)"
    ):
        load_samples(data=str(tmp_path / "twice.tar"))
    with pytest.raises(
        Exception, match=r"names compressed shards, which cannot be read by seeking; decompress"
    ):
        load_samples(data=str(tmp_path / "s-{000..003}.tar.gz"))
    with pytest.raises(Exception, match=r"--data-val and --data-test name shard patterns"):
        load_samples(data=str(tmp_path), data_val="v.tar")


def test_whole_shards_go_to_ranks_balanced_by_count():
    starts = np.array([0, 10, 20, 30, 40, 50])  # six shards of ten rows
    assert [World(rank, 3, rank, 3).shard(60, starts) for rank in range(3)] == [
        (0, 20),
        (20, 40),
        (40, 60),
    ]
    uneven = np.array([0, 50, 55, 60])  # one big shard, three small ones
    assert [World(rank, 2, rank, 2).shard(70, uneven) for rank in range(2)] == [(0, 50), (50, 70)]
    assert [World(rank, 2, rank, 2).shard(7) for rank in range(2)] == [(0, 4), (4, 7)]


def test_an_added_shard_extracts_only_its_images(tmp_path):
    shards, _ = make_shards(tmp_path, shards=2)
    cfg = tiny(data=str(shards / "train-{000..001}.tar"), out=str(tmp_path / "c.h5"))
    stage.run(cfg)
    image = png(next((tmp_path / "folder").rglob("*.png")))
    write_shard(
        shards / "train-002.tar", [(f"n{i}", image, {"cls": str(i % 2).encode()}) for i in range(4)]
    )
    grown = stage.run(tiny(data=str(shards / "train-{000..002}.tar"), out=cfg.out))
    assert grown.status == "updated" and grown.computed == 4


def test_shard_images_decode_like_files(tmp_path):
    image = Image.new("RGB", (64, 48), (10, 200, 30))
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=90)
    write_shard(tmp_path / "j.tar", [])  # an empty shard is allowed but holds nothing
    with tarfile.open(tmp_path / "j.tar", "w") as tar:
        for key in ("a", "b"):
            for name, data in (
                (f"{key}.jpg", buffer.getvalue()),
                (f"{key}.cls", b"0" if key == "a" else b"1"),
            ):
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    samples = load_samples(data=str(tmp_path / "j.tar"), val_fraction=0.0, test_fraction=0.0)
    assert samples.read(0).size == (64, 48) and samples.read(0, min_short_side=20).size == (32, 24)


def test_shards_that_end_early_or_hold_odd_members_are_one_line(tmp_path):
    """Cut short anywhere (a header, a member's bytes, where the end block should be): refused,
    never read as fewer samples. Odd members and patterns: one line each, nothing else."""
    image = png(write_image(tmp_path / "x.png", PALETTE[0], (20, 20)))
    labels = {"cls": b"0"}, {"cls": b"1"}
    whole = write_shard(
        tmp_path / "whole.tar", [(f"k{i:02d}", image, labels[i % 2]) for i in range(20)]
    )
    data = whole.read_bytes()
    with tarfile.open(whole) as tar:
        members = tar.getmembers()
    last = members[-1]
    cuts = {
        "header": members[22].offset + 100,  # inside the 12th sample's image header
        "member": members[10].offset_data + 10,  # inside an image's bytes
        "boundary": last.offset_data
        + -(-last.size // 512) * 512,  # every member whole, no end block
    }
    for name, size in cuts.items():
        cut = tmp_path / f"cut-{name}.tar"
        cut.write_bytes(data[:size])
        with pytest.raises(
            DataError, match=rf"cut-{name}\.tar (ends early|is not a readable tar file)"
        ):
            load_samples(data=str(cut))
    assert len(load_samples(data=str(whole), val_fraction=0.0, test_fraction=0.0)) == 20

    deep = write_shard(
        tmp_path / "deep.tar", [("a", image, {"json": b"[" * 100_000 + b"]" * 100_000})]
    )
    with pytest.raises(
        DataError, match=r"sample 'a' in shard .*deep\.tar: cannot read its label \(RecursionError"
    ):
        load_samples(data=str(deep))
    write_shard(tmp_path / "m-000.tar", [("a", image, {"cls": b"0"})])
    write_shard(
        tmp_path / "m-001.tar", [("b", image, {"json": json.dumps({"label": "owl"}).encode()})]
    )
    with pytest.raises(
        DataError,
        match=r"labels mix class numbers \(m-000\.tar/a\) and class names \(m-001\.tar/b\)",
    ):
        load_samples(data=str(tmp_path / "m-{000..001}.tar"))
    with tarfile.open(tmp_path / "odd.tar", "w", encoding="utf-8", errors="surrogateescape") as tar:
        for name, payload in (("caf\udce9.png", image), ("caf\udce9.cls", b"0")):
            info = tarfile.TarInfo(name)
            info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload))
    with pytest.raises(
        DataError, match=r"odd\.tar has a member whose name is not UTF-8 \(b'caf\\xe9\.png'\)"
    ):
        load_samples(data=str(tmp_path / "odd.tar"))
    with tarfile.open(tmp_path / "late.tar", "w") as tar:
        for name, payload in (("a.png", image), ("a.cls", b"0")):
            info = tarfile.TarInfo(name)
            info.size, info.mtime = len(payload), 10**15
            tar.addfile(info, io.BytesIO(payload))
    [(_, (_, _, mtime, _), _)] = index_shard(str(tmp_path / "late.tar"), "label")
    assert mtime == 0, "a time beyond 2242 is stored as unknown, not overflowed"
    with pytest.raises(
        DataError, match=r"names 1,000,000,000 shards, more than 100,000; check the numbers"
    ):
        load_samples(data=str(tmp_path / "s-{000000000..999999999}.tar"))
