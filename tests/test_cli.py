"""The command line: one-line errors with exit status 2, config precedence, info, the Makefile
demo."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys

import pytest

from pipeline import cli
from pipeline.config import FeaturesConfig

from helpers import REPO, make_folder, write_image
from helpers.faults import FAST


def run_cli(capsys, *argv: str) -> tuple[int, str, str]:
    code = cli.main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def assert_user_error(capsys, pattern: str, *argv: str) -> None:
    code, _, err = run_cli(capsys, *argv)
    assert code == 2, err
    lines = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1 and "Traceback" not in err, err
    assert re.search(pattern, lines[0]), lines[0]


@pytest.mark.parametrize(
    ("setup", "pattern"),
    [
        (
            lambda p: p / "missing",
            r"data folder .*missing does not exist; expected ROOT/<class>/<image>",
        ),
        (lambda p: (p / "empty").mkdir() or p / "empty", r"contains no class folders"),
        (
            lambda p: make_folder(p / "one", classes=("solo",)),
            r"has 1 class \(solo\); a classifier needs at least two",
        ),
        (
            lambda p: (make_folder(p / "d"), (p / "d" / "bird").mkdir())[0],
            r"class folder .*d/bird contains no images; add images or remove the folder",
        ),
    ],
    ids=["missing-folder", "empty-folder", "one-class", "empty-class-folder"],
)
def test_bad_data_folders(capsys, tmp_path, setup, pattern):
    assert_user_error(capsys, pattern, "features", "--data", str(setup(tmp_path)), *FAST)


def test_csv_row_with_missing_file(capsys, tmp_path):
    write_image(tmp_path / "a.png", (9, 9, 9))
    (tmp_path / "m.csv").write_text("path,label\na.png,x\nmissing.png,y\n")
    assert_user_error(
        capsys,
        r"m\.csv line 3: image .*missing\.png does not exist; fix the path",
        "features",
        "--data",
        str(tmp_path / "m.csv"),
        *FAST,
    )


def test_unknown_backbone_and_weights(capsys, folder):
    assert_user_error(
        capsys,
        r"unknown backbone 'resnet9'; did you mean resnet50, resnet34, resnet18\? `pipeline "
        r"backbones` lists",
        "features",
        "--data",
        str(folder),
        "--backbone",
        "resnet9",
    )
    assert_user_error(
        capsys,
        r"unknown weights 'IMAGENET' for resnet18; choose one of: IMAGENET1K_V1, DEFAULT, none",
        "features",
        "--data",
        str(folder),
        "--backbone",
        "resnet18",
        "--weights",
        "IMAGENET",
    )


@pytest.mark.parametrize("kind", ["text-as-jpg", "truncated"])
def test_corrupt_images_stop_the_run(capsys, tmp_path, kind):
    root = make_folder(tmp_path / "img", per_class=2)
    bad = root / "dog" / "bad.jpg"
    if kind == "text-as-jpg":
        bad.write_text("hello")
        reason = "cannot identify image file"
    else:
        write_image(bad, (1, 2, 3), size=(80, 80))
        bad.write_bytes(bad.read_bytes()[:250])
        reason = "file is truncated"
    out = tmp_path / "c.h5"
    assert_user_error(
        capsys,
        rf"cannot read 1 image\(s\): .*dog/bad\.jpg: {reason}; fix or remove them, or rerun "
        r"with --skip-bad-images",
        "features",
        "--data",
        str(root),
        "--out",
        str(out),
        *FAST,
    )
    code, _, err = run_cli(
        capsys, "features", "--data", str(root), "--out", str(out), "--skip-bad-images", *FAST
    )
    assert code == 0 and "skipped 1 unreadable images" in err


def test_bad_options(capsys, folder, tmp_path):
    assert_user_error(
        capsys, r"no images given; pass --data FOLDER_OR_CSV or --dataset NAME", "features"
    )
    assert_user_error(
        capsys,
        r"--val-fraction 1.5 is out of range; expected a fraction in \[0, 1\)",
        "features",
        "--data",
        str(folder),
        "--val-fraction",
        "1.5",
    )
    assert_user_error(
        capsys,
        r"--device 'gpu' is not a device; choose auto, cpu, cuda, cuda:N or mps",
        "features",
        "--data",
        str(folder),
        "--device",
        "gpu",
    )
    assert_user_error(
        capsys,
        r"no cache at .*nothing\.h5; build it with `pipeline features --data YOUR_IMAGES --out "
        r".*nothing\.h5`",
        "info",
        str(tmp_path / "nothing.h5"),
    )
    # A choice is checked by the config, in one line, not by argparse's usage screen.
    assert_user_error(
        capsys,
        r"--precision 'fp8' is not allowed; choose one of: auto, fp32, bf16, fp16",
        "features",
        "--precision",
        "fp8",
    )
    assert_user_error(  # argparse's own errors (a missing value) are one line too, exit status 2
        capsys,
        r"pipeline features: argument --precision: expected one argument; see `pipeline features "
        r"--help`",
        "features",
        "--precision",
    )
    assert_user_error(
        capsys, r"pipeline: argument COMMAND: invalid choice: 'frobnicate'", "frobnicate"
    )


def test_config_file_errors(capsys, tmp_path):
    bad_key = tmp_path / "a.toml"
    bad_key.write_text('[features]\ndataset = "digits"\nbatchsize = 3\n')
    assert_user_error(
        capsys,
        r"a\.toml \[features\]: unknown key 'batchsize'; valid keys: data, data_val, data_test, "
        r"label_key, dataset",
        "features",
        "--config",
        str(bad_key),
    )
    bad_type = tmp_path / "b.toml"
    bad_type.write_text('[features]\ndataset = "digits"\nbatch_size = "big"\n')
    assert_user_error(
        capsys,
        r"batch_size = 'big' should be int; fix the value in the file",
        "features",
        "--config",
        str(bad_type),
    )
    broken = tmp_path / "c.toml"
    broken.write_text("[features\n")
    assert_user_error(
        capsys, r"config file .*c\.toml is not valid TOML", "features", "--config", str(broken)
    )
    assert_user_error(
        capsys,
        r"config file .*none\.toml does not exist",
        "features",
        "--config",
        str(tmp_path / "none.toml"),
    )


def test_flags_override_the_file_which_overrides_defaults(tmp_path):
    path = tmp_path / "x.toml"
    path.write_text(
        '[features]\ndataset = "digits"\nbatch_size = 4\nimage-size = 48\nval_fraction = 0\n'
    )
    args = cli.build_parser().parse_args(["features", "--config", str(path), "--batch-size", "8"])
    cfg = cli._config(args, FeaturesConfig, "features")
    assert (cfg.batch_size, cfg.image_size, cfg.val_fraction, cfg.backbone) == (
        8,
        48,
        0.0,
        "resnet50",
    )
    assert cfg.out_path.name == "digits-resnet50.h5"


def test_info_describes_the_cache(capsys, folder, tmp_path):
    out = tmp_path / "c.h5"
    code, _, err = run_cli(
        capsys,
        "features",
        "--data",
        str(folder),
        "--out",
        str(out),
        "--val-fraction",
        "0.25",
        *FAST,
    )
    assert code == 0 and "wrote" in err
    code, text, _ = run_cli(capsys, "info", str(out))
    assert code == 0
    for needle in (
        "complete",
        "(10, 512) float32",
        "classes      2: cat, dog",
        "train 6, val 2, test 2",
        "test carved from train (20%, seed 0); val carved from train (25%, seed 0)",
        "weights        none (random init, seed 0)",
        "torch ",
    ):
        assert needle in text, needle


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("make") is None, reason="needs make")
def test_make_features_and_make_head_run_the_offline_demo(tmp_path):
    """The README's `make features && make head`, with this interpreter, in a scratch working
    directory."""
    make = [
        "make",
        "-s",
        "-f",
        str(REPO / "Makefile"),
        f"PY={sys.executable}",
        f"CONFIG={REPO / 'configs/demo.toml'}",
    ]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    first = subprocess.run(
        [*make, "features"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300
    )
    assert first.returncode == 0, first.stderr
    assert (
        "random initialisation (seed 0)" in first.stderr
        and "wrote cache/digits-resnet18.h5" in first.stderr
    )
    again = subprocess.run(
        [*make, "features"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120
    )
    assert again.returncode == 0 and "is current (1797 rows); nothing to do" in again.stderr
    info = subprocess.run(
        [*make, "info"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120
    )
    assert info.returncode == 0 and "(1797, 512) float32" in info.stdout
    head = subprocess.run(
        [*make, "head"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300
    )
    assert head.returncode == 0, head.stderr
    assert (
        "chosen on val by top1-0.5se from 45 values; trained on train+val; scored once on test"
        in head.stdout
    )
    top1 = float(
        next(line for line in head.stdout.splitlines() if line.startswith("top-1")).split()[2]
    )
    assert top1 > 0.9, "random resnet18 features still separate the digits"
    for name in (
        "result.json",
        "curve.csv",
        "head.json",
        "head.npz",
        "validation_curve.png",
        "confusion_matrix.png",
    ):
        assert (tmp_path / "results" / "digits-logreg" / name).exists(), name


@pytest.mark.parametrize(
    ("argv", "pattern"),
    [
        (
            ["--joblib-backend", "spark"],
            r"--joblib-backend 'spark' is not allowed; choose one of: loky, threading",
        ),
        (
            ["--solver", "newton"],
            r"--solver 'newton' is not allowed; choose one of: auto, lbfgs, adam, sgd",
        ),
        (["--select", "best"], r"--select 'best' is not allowed; choose one of: top1-1se"),
        (
            ["--preprocess", "zscore"],
            r"--preprocess 'zscore' is not allowed; choose one of: auto, standardize, l2, "
            r"center-l2, none",
        ),
        (["--tol", "nan"], r"--tol nan must be a positive, finite number"),
        (["--lr", "inf"], r"--lr inf is out of range; expected \(0, 100\]"),
        (["--lr", "1e30"], r"--lr 1e\+30 is out of range; expected \(0, 100\]"),
    ],
)
def test_a_bad_choice_or_number_is_one_line_from_the_registry(capsys, argv, pattern):
    assert_user_error(capsys, pattern, "head", "--features", "cache/none.h5", *argv)


@pytest.mark.parametrize(
    "command",
    ["features", "head", "study", "compare", "predict", "export", "info", "pack", "backbones"],
)
def test_help_reads_grouped_with_one_default_each(capsys, command):
    with pytest.raises(SystemExit):
        cli.main([command, "--help"])
    text = capsys.readouterr().out
    assert "(default: None)" not in text and not re.search(
        r"\(default: [^)]*\) \(default:", text.replace("\n", " ")
    )
    assert not re.search(r"^  --[\w-]+(?: \S+)?\s*$\n(?!  {10,})", text, re.MULTILINE), (
        "every flag has help"
    )
    groups = {
        "features": ("data:", "backbone:", "compute:", "output:"),
        "head": (
            "input:",
            "head kind:",
            "selection:",
            "solver:",
            "long tail and calibration:",
            "output:",
        ),
    }
    for group in groups.get(command, ()):
        assert f"\n{group}\n" in text, group


def test_head_takes_the_cache_as_its_first_argument(capsys, synthetic_cache, tmp_path):
    out = tmp_path / "run"
    code, _, err = run_cli(
        capsys,
        "head",
        str(synthetic_cache),
        "--out",
        str(out),
        "--grid",
        "0.1",
        "1",
        "--bootstrap",
        "0",
    )
    assert code == 0 and (out / "result.json").exists()
    header, sweep = err.index("head: torch on"), err.find("sweep")
    assert sweep == -1 or header < sweep, "the header is printed before the progress bar"
    assert_user_error(
        capsys,
        r"two caches given: .* and --features other\.h5; pass one",
        "head",
        str(synthetic_cache),
        "--features",
        "other.h5",
    )
