"""The feature stage end to end: exact features, cache behaviour, resume, locking, bad images."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
import torchvision
from PIL import Image

from pipeline import devices, fsutil, read_features
from pipeline.backbones import backbone
from pipeline.cache import reader as cache_reader
from pipeline.cache import schema
from pipeline.cache import writer as cache_writer
from pipeline.errors import BadImageError, CacheError, DeviceError, Interrupted
from pipeline.features import extract, stage

from helpers import REPO, SLOW_WRITES, make_folder, tiny, write_image
from helpers.faults import rows_done


def _messages():
    said: list[str] = []
    return said, said.append


@pytest.mark.slow
def test_cached_features_equal_a_direct_forward_of_the_torchvision_model(tmp_path, offline_hub):
    """Same weights file, same preprocessing, fp32: row by row in stored order within 1e-5."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(11)
        state = torchvision.models.resnet18(weights=None).state_dict()
    offline_hub.mkdir(parents=True)
    torch.save(state, offline_hub / "resnet18-f37072fd.pth")
    root = make_folder(tmp_path / "img", per_class=3, splits=("train", "test"), size=(60, 45))
    cfg = tiny(data=str(root), weights="IMAGENET1K_V1", image_size=None, out=str(tmp_path / "c.h5"))
    stage.run(cfg)

    weights = torchvision.models.ResNet18_Weights.IMAGENET1K_V1
    model = torchvision.models.resnet18(weights=weights).eval()  # torchvision's own loading path
    model.fc = torch.nn.Identity()
    with h5py.File(cfg.out) as f:
        ids, cached = f["ids"].asstr()[...], f["features"][...]
    assert cached.shape == (12, 512) and cached.dtype == np.float32
    with torch.inference_mode():
        for row, sample_id in enumerate(ids):
            image = Image.open(root / sample_id).convert("RGB")
            direct = model(weights.transforms()(image)[None])[0].numpy()
            np.testing.assert_allclose(cached[row], direct, rtol=0, atol=1e-5, err_msg=sample_id)


def test_cache_file_describes_itself(folder, tmp_path):
    cfg = tiny(data=str(folder), out=str(tmp_path / "c.h5"), logits=True)
    result = stage.run(cfg)
    assert result.status == "built" and result.computed == 10
    with h5py.File(cfg.out) as f:
        assert f["features"].chunks[1] == 512 and f["features"].chunks[0] >= 1
        assert f["labels"].dtype == np.int64 and f["split"].dtype == np.int8
        assert list(f["split"].attrs["names"]) == ["train", "val", "test"]
        assert list(f["classes"].asstr()[...]) == ["cat", "dog"]
        assert f.attrs["schema_version"] == schema.SCHEMA_VERSION and f.attrs["complete"]
        assert f.attrs["rows_done"] == 10
        assert f["logits"].shape == (10, 1000)
        features, logits = f["features"][...], f["logits"][...]
    fs = read_features(cfg.out)
    assert (
        fs.fingerprint["backbone"] == "resnet18"
        and fs.fingerprint["weights"] == "none (random init, seed 0)"
    )
    assert fs.config["image_size"] == 32 and fs.attrs["versions"]
    assert sum(len(s) for s in fs.splits.values()) == 10
    model = backbone.build(backbone.describe("resnet18", "none"))
    expected = model.classifier(torch.from_numpy(features)).detach().numpy()
    np.testing.assert_allclose(logits, expected, rtol=1e-4, atol=1e-4)


def test_current_cache_is_not_recomputed(folder, tmp_path, monkeypatch):
    cfg = tiny(data=str(folder), out=str(tmp_path / "c.h5"))
    stage.run(cfg)
    monkeypatch.setattr(
        backbone, "build", lambda *a, **k: pytest.fail("a current cache must not build the model")
    )
    said, report = _messages()
    result = stage.run(cfg, report=report)
    assert result.status == "current" and result.computed == 0
    assert any("is current (10 rows); nothing to do" in m for m in said)


@pytest.mark.slow
def test_changed_fingerprint_rebuilds_and_lists_every_difference(folder, tmp_path):
    cfg = tiny(data=str(folder), out=str(tmp_path / "c.h5"))
    stage.run(cfg)
    before = read_features(cfg.out)["train"].X
    changed = tiny(data=str(folder), out=cfg.out, image_size=40, store_dtype="float16")
    with pytest.raises(
        CacheError,
        match=r"was built differently \(preprocessing: .*crop_size=\[32\].* -> .*"
        r"crop_size=\[40\].*; store_dtype: 'float32' -> 'float16'\); pass --on-mismatch rebuild",
    ):
        stage.run(
            tiny(
                data=str(folder),
                out=cfg.out,
                image_size=40,
                store_dtype="float16",
                on_mismatch="refuse",
            )
        )
    said, report = _messages()
    assert stage.run(changed, report=report).status == "built"
    assert any(
        "built differently, rebuilding: preprocessing:" in m and "store_dtype" in m for m in said
    )
    after = read_features(cfg.out)
    assert after["train"].X.dtype == np.float16 and not np.allclose(
        after["train"].X, before, atol=1e-2
    )


def test_force_rebuilds_a_current_cache(folder, tmp_path):
    cfg = tiny(data=str(folder), out=str(tmp_path / "c.h5"))
    stage.run(cfg)
    assert stage.run(tiny(data=str(folder), out=cfg.out, force=True)).status == "built"


@pytest.mark.slow
def test_interrupt_keeps_rows_and_the_rerun_resumes_to_the_same_features(
    folder, tmp_path, monkeypatch
):
    reference = tiny(data=str(folder), out=str(tmp_path / "ref.h5"), batch_size=2)
    stage.run(reference)
    cfg = tiny(data=str(folder), out=str(tmp_path / "c.h5"), batch_size=2)
    real_write, calls = cache_writer.CacheWriter.write, []

    def write_then_ctrl_c(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        real_write(self, *args, **kwargs)

    monkeypatch.setattr(cache_writer.CacheWriter, "write", write_then_ctrl_c)
    with pytest.raises(
        Interrupted,
        match=r"interrupted: 4 of 10 rows are saved in .*c\.h5\.partial; rerun the same",
    ):
        stage.run(cfg)
    assert not Path(cfg.out).exists(), "the final name appears only when the file is complete"
    with pytest.raises(
        CacheError, match=r"cache .*c\.h5 is incomplete \(4 of 10 rows in .*c\.h5\.partial\); rerun"
    ):
        read_features(cfg.out)
    monkeypatch.setattr(cache_writer.CacheWriter, "write", real_write)
    said, report = _messages()
    result = stage.run(cfg, report=report)
    assert result.status == "resumed" and result.computed == 6
    assert any("resuming" in m and "at row 4 of 10" in m for m in said)
    assert not schema.partial_path(cfg.out).exists()
    np.testing.assert_array_equal(
        read_features(cfg.out)["train"].X, read_features(reference.out)["train"].X
    )


_SLOW_RUN = SLOW_WRITES + "from pipeline import cli\nsys.exit(cli.main(sys.argv[1:]))\n"


@pytest.mark.slow
def test_kill_9_then_rerun_resumes_to_the_same_features(tmp_path):
    root = make_folder(tmp_path / "img", per_class=8)
    flags = [
        "--data",
        str(root),
        "--backbone",
        "resnet18",
        "--weights",
        "none",
        "--image-size",
        "32",
    ]
    flags += ["--batch-size", "2", "--workers", "0", "--no-progress", "--val-fraction", "0.25"]
    flags += ["--precision", "fp32", "--cut", "layer3"]  # a cut resumes as the features do
    out = tmp_path / "c.h5"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    job = subprocess.Popen(
        [sys.executable, "-c", _SLOW_RUN, "features", *flags, "--out", str(out)], env=env
    )
    partial = schema.partial_path(out)
    deadline = time.monotonic() + 60
    while rows_done(partial) < 4 and time.monotonic() < deadline and job.poll() is None:
        time.sleep(0.05)
    job.send_signal(signal.SIGKILL)
    job.wait()
    done = rows_done(partial)
    assert 4 <= done < 16 and not out.exists()

    said, report = _messages()
    cfg = tiny(data=str(root), batch_size=2, cut="layer3", out=str(out))
    result = stage.run(cfg, report=report)
    assert result.status == "resumed" and result.computed == 16 - done
    assert any(f"at row {done} of 16" in m for m in said)
    stage.run(tiny(data=str(root), batch_size=2, cut="layer3", out=str(tmp_path / "ref.h5")))
    for layer in (None, "cut:layer3"):
        ours = read_features(out, layer=layer)
        ref = read_features(tmp_path / "ref.h5", layer=layer)
        for split in ref.splits:
            np.testing.assert_array_equal(ours[split].X, ref[split].X)
            np.testing.assert_array_equal(ours[split].ids, ref[split].ids)


def test_a_second_writer_stops_with_a_clear_message(folder, tmp_path):
    cfg = tiny(data=str(folder), out=str(tmp_path / "c.h5"))
    with (
        fsutil.locked(cfg.out),
        pytest.raises(
            CacheError,
            match=rf"another run \(pid {os.getpid()}\) is writing .*c\.h5; wait for it to finish",
        ),
    ):
        stage.run(cfg)
    assert stage.run(cfg).status == "built", "the lock is released"
    assert not Path(f"{cfg.out}.lock").exists()


def _with_bad_images(root: Path) -> Path:
    make_folder(root, per_class=4)
    (root / "cat" / "img01.png").write_text("a text file named like an image")
    good = write_image(root / "dog" / "zz.jpg", (0, 0, 0), size=(64, 64))
    good.write_bytes(good.read_bytes()[:200])  # truncated JPEG
    return root


def test_bad_images_stop_the_run_with_their_paths_and_keep_earlier_rows(tmp_path):
    root = _with_bad_images(tmp_path / "img")
    cfg = tiny(
        data=str(root),
        out=str(tmp_path / "c.h5"),
        batch_size=3,
        val_fraction=0.0,
        test_fraction=0.0,
    )
    with pytest.raises(
        BadImageError,
        match=r"cannot read 1 image\(s\): .*cat/img01\.png: cannot identify image file; "
        r"fix or remove them, or rerun with --skip-bad-images "
        r".*\(1 rows saved, the rerun resumes\)",
    ):
        stage.run(cfg)
    assert rows_done(schema.partial_path(cfg.out)) == 1 and not Path(cfg.out).exists()


def test_skip_bad_images_records_them(tmp_path):
    root = _with_bad_images(tmp_path / "img")
    cfg = tiny(
        data=str(root),
        out=str(tmp_path / "c.h5"),
        skip_bad_images=True,
        val_fraction=0.0,
        test_fraction=0.0,
    )
    said, report = _messages()
    result = stage.run(cfg, report=report)
    assert sorted(result.skipped) == ["cat/img01.png", "dog/zz.jpg"]
    fs = read_features(cfg.out)
    assert sorted(fs.skipped) == ["cat/img01.png", "dog/zz.jpg"]
    assert len(fs["train"]) == 7 and np.isfinite(fs["train"].X).all()
    assert "dog/zz.jpg" not in fs["train"].ids
    assert any("skipped 2 unreadable images" in m for m in said)
    assert cache_reader.summary(cfg.out)["skipped"] == ["cat/img01.png", "dog/zz.jpg"]


def test_odd_image_modes_simply_work(tmp_path):
    root = make_folder(tmp_path / "img", per_class=2)
    rgb = np.asarray(Image.open(root / "cat" / "img00.png"))
    Image.fromarray(rgb).convert("L").save(root / "cat" / "gray.png")
    Image.fromarray(np.asarray(Image.fromarray(rgb).convert("L"), dtype=np.uint16) * 257).save(
        root / "cat" / "g16.png"
    )
    Image.fromarray(rgb).convert("RGBA").save(root / "dog" / "rgba.png")
    Image.fromarray(rgb).convert("P").save(root / "dog" / "palette.png")
    Image.fromarray(rgb).convert("CMYK").save(root / "dog" / "cmyk.jpg")
    cfg = tiny(data=str(root), out=str(tmp_path / "c.h5"), val_fraction=0.0, test_fraction=0.0)
    stage.run(cfg)
    train = read_features(cfg.out)["train"]
    row = {i: n for n, i in enumerate(train.ids)}
    assert len(train) == 9 and np.isfinite(train.X).all()
    np.testing.assert_allclose(train.X[row["cat/g16.png"]], train.X[row["cat/gray.png"]], atol=1e-3)


@pytest.mark.slow
def test_workers_and_reduced_precision_agree_with_the_plain_run(folder, tmp_path):
    plain = tiny(data=str(folder), out=str(tmp_path / "a.h5"))
    stage.run(plain)
    stage.run(tiny(data=str(folder), out=str(tmp_path / "b.h5"), workers=2, store_dtype="float16"))
    stage.run(tiny(data=str(folder), out=str(tmp_path / "c.h5"), precision="bf16"))
    a, b, c = (read_features(tmp_path / f"{n}.h5")["train"].X for n in "abc")
    assert b.dtype == np.float16
    np.testing.assert_allclose(b, a, rtol=1e-3, atol=1e-3)
    assert np.abs(c - a).max() < 0.05 * np.abs(a).max()


def test_float16_overflow_is_refused(tmp_path):
    writer = cache_writer.CacheWriter.open(
        tmp_path / "c.h5",
        fingerprint={"k": 1},
        ids=["a"],
        labels=np.zeros(1),
        split=np.zeros(1),
        classes=["x", "y"],
        dim=2,
        store_dtype="float16",
    )
    with pytest.raises(
        CacheError,
        match=r"feature values reach 1e\+05, beyond float16's 65504; rerun with --store-dtype",
    ):
        writer.write(0, np.array([[1e5, 0.0]], dtype=np.float32))
    writer.close()


def test_explicit_cuda_without_cuda_is_an_error(folder, tmp_path):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    with pytest.raises(
        DeviceError,
        match=r"--device cuda asked for, but CUDA is not available .*; use --device cpu",
    ):
        stage.run(tiny(data=str(folder), out=str(tmp_path / "c.h5"), device="cuda"))
    assert devices.choose_device("auto").type in {"cpu", "cuda", "mps"}


def _mixed_folder(root: Path) -> Path:
    """JPEG (RGB, grayscale, CMYK) and PNG images of two classes."""
    for c, color in enumerate([(200, 60, 60), (60, 60, 200)]):
        for n in range(3):
            write_image(root / f"k{c}" / f"p{n}.png", color, size=(70, 50))
            rgb = Image.open(root / f"k{c}" / f"p{n}.png")
            rgb.save(root / f"k{c}" / f"j{n}.jpg", quality=95)
        rgb.convert("L").save(root / f"k{c}" / "gray.jpg", quality=95)
        rgb.convert("CMYK").save(root / f"k{c}" / "cmyk.jpg", quality=95)
    return root


@pytest.mark.slow
def test_decode_on_device_matches_cpu_decoding(tmp_path):
    root = _mixed_folder(tmp_path / "img")
    common = dict(data=str(root), image_size=48, val_fraction=0.0, test_fraction=0.0)
    stage.run(tiny(out=str(tmp_path / "cpu.h5"), **common))
    stage.run(tiny(out=str(tmp_path / "dev.h5"), decode="device", workers=2, **common))
    cpu, dev = read_features(tmp_path / "cpu.h5"), read_features(tmp_path / "dev.h5")
    assert cpu.fingerprint["decode"] == extract.DECODE_FINGERPRINT["cpu"]
    assert dev.fingerprint["decode"] == "torchvision.io on the device"
    np.testing.assert_array_equal(cpu["train"].ids, dev["train"].ids)
    # Two decoders and two resize implementations: close, not identical.
    a, b = cpu["train"].X, dev["train"].X
    cosine = (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)
    assert cosine.min() > 0.99


def test_decode_on_device_reports_bad_jpegs(tmp_path):
    root = make_folder(tmp_path / "img", per_class=3, ext=".jpg")
    data = (root / "dog" / "img01.jpg").read_bytes()
    (root / "dog" / "img01.jpg").write_bytes(
        data[: len(data) // 2]
    )  # truncated: fails on the device
    (root / "cat" / "img02.jpg").write_text("not a jpeg")  # no JPEG marker: fails in the worker
    cfg = tiny(
        data=str(root),
        out=str(tmp_path / "c.h5"),
        decode="device",
        val_fraction=0.0,
        test_fraction=0.0,
    )
    with pytest.raises(
        BadImageError,
        match=r"cannot read 1 image\(s\): .*cat/img02\.jpg: cannot identify image file",
    ):
        stage.run(cfg)
    skip = tiny(
        data=str(root),
        out=str(tmp_path / "c.h5"),
        decode="device",
        skip_bad_images=True,
        val_fraction=0.0,
        test_fraction=0.0,
    )
    assert sorted(stage.run(skip).skipped) == ["cat/img02.jpg", "dog/img01.jpg"]
    assert "dog/img01.jpg" in cache_reader.summary(skip.out)["skipped"]


def test_compile_flag_compiles_the_backbone(folder, tmp_path, monkeypatch):
    compiled = []
    monkeypatch.setattr(torch, "compile", lambda model, **kw: compiled.append(model) or model)
    said, report = _messages()
    stage.run(tiny(data=str(folder), out=str(tmp_path / "c.h5"), compile=True), report=report)
    assert len(compiled) == 1 and isinstance(compiled[0], backbone.FeatureExtractor)
    assert any("compiled" in m for m in said)


def test_errors_in_the_writer_thread_reach_the_caller(tmp_path, monkeypatch):
    """A float16 overflow is detected while writing, on the background thread; the run still stops
    with it."""
    root = make_folder(tmp_path / "img", per_class=2)
    real = cache_writer.CacheWriter.write
    monkeypatch.setattr(
        cache_writer.CacheWriter, "write", lambda self, start, f, *a: real(self, start, f * 1e6, *a)
    )
    with pytest.raises(
        CacheError, match=r"beyond float16's 65504; rerun with --store-dtype float32"
    ):
        stage.run(tiny(data=str(root), out=str(tmp_path / "c.h5"), store_dtype="float16"))
