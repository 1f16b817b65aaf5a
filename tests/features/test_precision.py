"""`--precision auto`: chosen by what the device computes natively, checked against fp32 on the
first images, printed, recorded in the cache and shown by `info`; an fp32 cache stays current."""

from __future__ import annotations

import json

import h5py
import numpy as np
import pytest
import torch

from pipeline import cli, devices, read_features
from pipeline.features import precision, stage

from helpers import make_folder, tiny


@pytest.fixture
def native_bf16(monkeypatch):
    """A CPU whose flags say AVX512-BF16, with oneDNN able to run it (as where it is real)."""
    monkeypatch.setattr(devices, "cpu_flags", lambda: frozenset({"avx512f", "avx512_bf16"}))
    monkeypatch.setattr(devices, "_onednn_bf16", lambda: True)


@pytest.fixture
def folder(tmp_path):
    return make_folder(tmp_path / "img", classes=("a", "b", "c"), per_class=6)


def test_auto_follows_the_cpu_flags(monkeypatch):
    cpu = torch.device("cpu")
    monkeypatch.setattr(devices, "_onednn_bf16", lambda: True)
    for flags, expected in (
        ({"avx2", "fma"}, "fp32"),
        ({"avx512f", "avx512bw"}, "fp32"),  # AVX-512 without its bf16 extension: emulated only
        ({"avx512f", "avx512_bf16"}, "bf16"),
        ({"amx_bf16", "amx_tile"}, "bf16"),
        ({"asimd", "bf16"}, "bf16"),  # Arm
    ):
        monkeypatch.setattr(devices, "cpu_flags", lambda flags=flags: frozenset(flags))
        assert devices.auto_precision(cpu)[0] == expected, flags
    monkeypatch.setattr(devices, "_onednn_bf16", lambda: False)  # a build without bf16 kernels
    assert devices.auto_precision(cpu) == ("fp32", devices.auto_precision(cpu)[1])
    assert "no native bf16" in devices.auto_precision(cpu)[1]


def test_auto_on_a_bf16_cpu_records_bf16_and_its_agreement(native_bf16, folder, tmp_path, capsys):
    said = []
    cfg = tiny(data=str(folder), out=str(tmp_path / "c.h5"), precision="auto")
    stage.run(cfg, report=said.append)
    line = next(m for m in said if m.startswith("precision: "))
    assert line.startswith("precision: bf16 (auto: this CPU computes bf16 natively (avx512_bf16)")
    with h5py.File(cfg.out, "r") as f:
        fingerprint = json.loads(f.attrs["fingerprint"])
        choice = json.loads(f.attrs["precision_choice"])
        config = json.loads(f.attrs["config"])
    assert fingerprint["precision"] == "bf16" and config["precision"] == "bf16"
    assert choice["requested"] == "auto" and choice["chosen"] == "bf16"
    assert precision.AGREEMENT <= choice["min_cosine_to_fp32"] <= 1
    assert choice["images_checked"] == 8
    fp32 = tiny(data=str(folder), out=str(tmp_path / "f.h5"))
    stage.run(fp32)
    a, b = (read_features(p)["train"].X for p in (cfg.out, fp32.out))
    cosine = np.sum(a * b, axis=1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)
    assert cosine.min() > precision.AGREEMENT  # the whole cache, not only the checked images
    assert cli.main(["info", cfg.out]) == 0
    assert "precision    bf16 (auto: this CPU computes bf16 natively" in capsys.readouterr().out


def test_too_little_agreement_falls_back_to_fp32_and_says_so(
    native_bf16, folder, tmp_path, monkeypatch
):
    monkeypatch.setattr(precision, "AGREEMENT", 1.01)  # no reduced precision can reach it
    said = []
    cfg = tiny(data=str(folder), out=str(tmp_path / "c.h5"), precision="auto")
    stage.run(cfg, report=said.append)
    line = next(m for m in said if m.startswith("precision: "))
    assert line.startswith("precision: fp32 (auto: bf16 agreed with fp32 to a cosine of only")
    assert "--precision bf16 forces it" in line
    with h5py.File(cfg.out, "r") as f:
        choice = json.loads(f.attrs["precision_choice"])
        assert json.loads(f.attrs["fingerprint"])["precision"] == "fp32"
    assert choice["chosen"] == "fp32" and choice["fallback_from"] == "bf16"


def test_an_fp32_cache_stays_current_under_fp32_and_under_auto(
    native_bf16, folder, tmp_path, monkeypatch
):
    cfg = tiny(data=str(folder), out=str(tmp_path / "c.h5"))  # fp32
    stage.run(cfg)
    before = (tmp_path / "c.h5").stat().st_mtime_ns

    def no_check(*args, **kwargs):
        raise AssertionError("a cache that is kept needs no check")

    monkeypatch.setattr(precision, "agreement", no_check)
    for requested in ("fp32", "auto"):
        said = []
        done = stage.run(tiny(data=str(folder), out=cfg.out, precision=requested), said.append)
        assert done.status == "current", (requested, said)
    assert (tmp_path / "c.h5").stat().st_mtime_ns == before
    make_folder(tmp_path / "img", classes=("d",), per_class=6)  # a changed image set: updated
    done = stage.run(tiny(data=str(folder), out=cfg.out, precision="auto"))
    assert done.status == "updated" and done.computed == 6
    with h5py.File(cfg.out, "r") as f:
        assert json.loads(f.attrs["fingerprint"])["precision"] == "fp32"


def test_auto_on_a_cpu_without_bf16_computes_fp32_without_a_check(folder, tmp_path, monkeypatch):
    monkeypatch.setattr(devices, "cpu_flags", lambda: frozenset({"avx2"}))

    def no_check(*args, **kwargs):
        raise AssertionError("fp32 needs no check")

    monkeypatch.setattr(precision, "agreement", no_check)
    said = []
    cfg = tiny(data=str(folder), out=str(tmp_path / "c.h5"), precision="auto")
    stage.run(cfg, report=said.append)
    assert "precision: fp32 (auto: this CPU has no native bf16" in "\n".join(said)
    with h5py.File(cfg.out, "r") as f:
        assert json.loads(f.attrs["fingerprint"])["precision"] == "fp32"
        assert json.loads(f.attrs["precision_choice"])["chosen"] == "fp32"


def test_a_cache_in_any_precision_is_kept_and_a_partial_one_resumed_as_it_is(
    folder, tmp_path, monkeypatch
):
    from pipeline.cache import schema

    from helpers.faults import start_slow, wait_rows

    monkeypatch.setattr(devices, "cpu_flags", lambda: frozenset())  # auto would say fp32 here
    half = tiny(data=str(folder), out=str(tmp_path / "h.h5"), precision="fp16")
    stage.run(half)  # made elsewhere, say on a GPU
    done = stage.run(tiny(data=str(folder), out=half.out, precision="auto"))
    assert done.status == "current"
    out = tmp_path / "p.h5"
    job = start_slow(
        out, folder, "--precision", "bf16", "--batch-size", "1", "--val-fraction", "0.25"
    )
    wait_rows(job, schema.partial_path(out), 3)
    job.kill()
    job.wait()
    done = stage.run(tiny(data=str(folder), out=str(out), precision="auto", batch_size=1))
    assert done.status == "resumed" and done.computed < 18
    with h5py.File(out, "r") as f:
        assert json.loads(f.attrs["fingerprint"])["precision"] == "bf16"


def test_a_complete_fp32_cache_wins_over_a_reduced_partial_beside_it(native_bf16, folder, tmp_path):
    import shutil

    from pipeline.cache import schema

    out = tmp_path / "c.h5"
    stage.run(tiny(data=str(folder), out=str(tmp_path / "b.h5"), precision="bf16"))
    shutil.copy(tmp_path / "b.h5", schema.partial_path(out))  # stands in for a bf16 build
    stage.run(tiny(data=str(folder), out=str(out)))  # fp32, complete
    done = stage.run(tiny(data=str(folder), out=str(out), precision="auto"))
    assert done.status == "current"
    with h5py.File(out, "r") as f:
        assert json.loads(f.attrs["fingerprint"])["precision"] == "fp32"


def test_info_shows_a_crafted_precision_record_without_a_traceback(native_bf16, folder, tmp_path):
    cfg = tiny(data=str(folder), out=str(tmp_path / "c.h5"), precision="auto")
    stage.run(cfg)
    for record in ('["auto"]', '"auto"', "3", "not json", b"\xff\xfe"):
        with h5py.File(cfg.out, "r+") as f:
            f.attrs["precision_choice"] = record
        assert cli.main(["info", cfg.out]) == 0
    with h5py.File(cfg.out, "r+") as f:
        f.attrs["precision_choice"] = json.dumps(
            {
                "requested": "auto",
                "why": "\x1b[31merror: x\n" + "y" * 5000,
                "min_cosine_to_fp32": "high",
            }
        )
    assert cli.main(["info", cfg.out]) == 0


def test_a_study_says_what_auto_chose_and_reuses_a_twin_of_any_precision(
    native_bf16, folder, tmp_path, capsys
):
    from pipeline import study

    stage.run(tiny(data=str(folder), out=str(tmp_path / "cache" / "mine.h5")))  # fp32
    file = tmp_path / "s.toml"
    file.write_text(
        f"""
[study]
name = "p"
results = "{tmp_path / "results"}"
cache = "{tmp_path / "cache"}"
rank = false
[features]
image_size = 32
workers = 0
val_fraction = 0.25
[[datasets]]
name = "d"
data = "{folder}"
[[backbones]]
name = "r18"
backbone = "resnet18"
weights = "none"
[[heads]]
head = "ncm"
"""
    )
    said = []
    summary = study.run(file, report=said.append, progress=False)
    err = capsys.readouterr().err
    assert "d-r18.h5: precision: bf16 (auto: this CPU computes bf16 natively" in err
    assert f"reusing {tmp_path / 'cache' / 'mine.h5'}" in err and summary["reused"]
    assert not (tmp_path / "cache" / "d-r18.h5").exists()
