"""The cache describes exactly its images: changed files, symlink loops, files reached twice,
manifests with repeated rows, unreadable folders, FIFOs, non-UTF-8 names, CSV slips, binary configs.
"""

from __future__ import annotations

import os
import re
import shutil

import pytest

from pipeline.errors import DataError
from pipeline.features import stage

from helpers import make_folder, tiny, write_image
from helpers.faults import (
    FAST,
    assert_one_line_error,
    main_here,
    run_cli,
)

# --------------------------------------------------------- 2. the cache describes exactly its
# images


def test_a_changed_image_is_detected_and_named(tmp_path):
    root = make_folder(tmp_path / "img", per_class=4)
    out = tmp_path / "c.h5"
    stage.run(tiny(data=str(root), out=str(out)))
    write_image(root / "dog" / "img01.png", (0, 0, 0))  # new pixels, new size and time
    said = []
    result = stage.run(tiny(data=str(root), out=str(out)), report=said.append)
    assert (
        result.status == "updated" and result.computed == 1
    )  # only the changed image is extracted again
    assert any("changed 1: dog/img01.png (size, modified)" in m for m in said), said


@pytest.mark.slow
def test_verify_content_catches_a_change_that_keeps_size_and_time(tmp_path):
    root = make_folder(
        tmp_path / "img", per_class=4, ext=".bmp"
    )  # uncompressed: a pixel edit keeps the size
    out = tmp_path / "c.h5"
    cfg = tiny(data=str(root), out=str(out), verify_content=True)
    stage.run(cfg)
    image = root / "cat" / "img00.bmp"
    st = image.stat()
    data = bytearray(image.read_bytes())
    data[-20] ^= 0xFF  # same size; then the old modification time is put back
    image.write_bytes(bytes(data))
    os.utime(image, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert stage.run(tiny(data=str(root), out=str(out))).status == "built", (
        "size+time alone: a different cache"
    )
    said = []
    stage.run(cfg, report=said.append)
    assert stage.run(cfg).status == "current"
    data[-20] ^= 0x0F
    image.write_bytes(bytes(data))
    os.utime(image, ns=(st.st_atime_ns, st.st_mtime_ns))
    said = []
    result = stage.run(cfg, report=said.append)
    assert (
        result.status == "updated" and result.computed == 1
    )  # the sha256 tells the one changed file
    assert any("changed 1: cat/img00.bmp (content)" in m for m in said), said


def test_two_folders_with_the_same_names_do_not_share_a_cache(tmp_path):
    a = make_folder(tmp_path / "a", per_class=3)
    b = tmp_path / "b"
    shutil.copytree(a, b)
    write_image(b / "cat" / "img00.png", (1, 2, 3))
    out = tmp_path / "c.h5"
    stage.run(tiny(data=str(a), out=str(out)))
    assert stage.run(tiny(data=str(b), out=str(out))).status == "built"


def test_a_symlink_loop_is_entered_once_and_a_linked_class_is_one_class(tmp_path):
    root = make_folder(tmp_path / "img", per_class=3)
    (root / "cat" / "loop").symlink_to(root, target_is_directory=True)
    external = make_folder(tmp_path / "ext", classes=("owl",), per_class=2)
    (root / "owl").symlink_to(external / "owl", target_is_directory=True)
    from pipeline.data.sources import scan_folder

    samples = scan_folder(root, 0.0, 0.0, 0)
    assert len(samples) == 8 and samples.classes == ["cat", "dog", "owl"]
    assert len(set(samples.items)) == 8


def test_a_file_listed_twice_through_links_is_an_error(tmp_path):
    root = make_folder(tmp_path / "img", per_class=3)
    (root / "dog" / "copy.png").symlink_to(root / "cat" / "img00.png")
    code, err = main_here(["features", "--data", str(root), *FAST, "--out", str(tmp_path / "c.h5")])
    assert code == 2 and "are the same file (a link); an image may appear once" in err


@pytest.mark.parametrize(
    ("rows", "pattern"),
    [
        (["a.png,cat", "a.png,cat"], r"lines 2 and 3 name the same file 'a\.png'"),
        (["a.png,cat", "./a.png,dog"], r"lines 2 and 3 name the same file '\./a\.png'"),
    ],
)
def test_a_manifest_naming_a_file_twice_is_an_error(tmp_path, rows, pattern):
    for name in ("a.png", "b.png", "c.png"):
        write_image(tmp_path / name, (9, 9, 9))
    manifest = tmp_path / "m.csv"
    manifest.write_text("\n".join(["path,label", *rows, "b.png,dog", "c.png,cat"]) + "\n")
    with pytest.raises(DataError, match=pattern):
        from pipeline.data.sources import read_manifest

        read_manifest(manifest, 0.0, 0.0, 0)


def test_a_manifest_may_point_outside_its_folder(tmp_path):
    make_folder(tmp_path / "elsewhere", per_class=2)
    (tmp_path / "lists").mkdir()
    manifest = tmp_path / "lists" / "m.csv"
    rows = [f"../elsewhere/{c}/img{n:02d}.png,{c}" for c in ("cat", "dog") for n in range(2)]
    manifest.write_text("path,label\n" + "\n".join(rows) + "\n")
    from pipeline.data.sources import read_manifest

    assert len(read_manifest(manifest, 0.0, 0.0, 0)) == 4


def test_an_unreadable_folder_or_file_is_named(tmp_path, monkeypatch):
    root = make_folder(tmp_path / "img", per_class=3)
    from pipeline.data import sources

    real_scandir = os.scandir

    def refuse(path):
        if str(path).endswith("dog"):
            raise PermissionError(13, "Permission denied", str(path))
        return real_scandir(path)

    monkeypatch.setattr(sources.os, "scandir", refuse)
    with pytest.raises(DataError, match=r"cannot read folder .*img/dog: Permission denied"):
        sources.scan_folder(root, 0.0, 0.0, 0)
    monkeypatch.setattr(sources.os, "scandir", real_scandir)
    monkeypatch.setattr(
        sources.os, "access", lambda path, mode: not str(path).endswith("img01.png")
    )
    with pytest.raises(
        DataError, match=r"image .*cat/img01\.png is not readable \(permission denied\)"
    ):
        sources.scan_folder(root, 0.0, 0.0, 0)


@pytest.mark.slow
def test_a_fifo_named_like_an_image_is_refused_up_front(tmp_path):
    root = make_folder(tmp_path / "img", per_class=3)
    os.mkfifo(root / "cat" / "pipe.jpg")
    done = run_cli(
        "features", "--data", str(root), *FAST, "--out", str(tmp_path / "c.h5"), timeout=60
    )
    assert done.returncode == 2
    assert_one_line_error(done.stderr, r"pipe\.jpg is not a regular file \(a FIFO")


def test_a_file_name_that_is_not_utf8_is_named(tmp_path):
    root = make_folder(tmp_path / "img", per_class=3)
    shutil.copy(root / "cat" / "img00.png", os.fsencode(root / "cat") + b"/caf\xe9.png")
    code, err = main_here(["features", "--data", str(root), *FAST, "--out", str(tmp_path / "c.h5")])
    assert (
        code == 2 and r"file name b'caf\xe9.png'" in err and "is not valid UTF-8; rename it" in err
    )


@pytest.mark.parametrize(
    ("content", "pattern"),
    [
        (
            "path,label\ncaf\xe9.png,cat\n".encode("latin-1"),
            r"is not UTF-8 text \(byte 0xe9 at offset \d+\)",
        ),
        (b"path,label\na\0.png,cat\n", r"line \d+: contains a NUL byte"),
        (b"path,label\n" + b"x" * 200_000 + b",cat\n", r"line \d+: field larger than field limit"),
    ],
)
def test_csv_encoding_and_format_slips_are_one_line(tmp_path, content, pattern):
    manifest = tmp_path / "m.csv"
    manifest.write_bytes(content)
    code, err = main_here(
        ["features", "--data", str(manifest), *FAST, "--out", str(tmp_path / "c.h5")]
    )
    assert code == 2 and re.search(pattern, err), err


def test_a_binary_config_file_is_one_line(tmp_path):
    config = tmp_path / "c.toml"
    config.write_bytes(bytes(range(256)))
    code, err = main_here(["features", "--config", str(config)])
    assert code == 2 and f"config file {config} is not" in err
