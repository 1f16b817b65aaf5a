"""Heads on caches larger than memory (--max-memory), and the scikit-learn sweep's joblib
backends."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from pipeline.config import HeadConfig
from pipeline.errors import ConfigError
from pipeline.heads import choice, protocol
from pipeline.settings import parse_size
from pipeline.synthetic import write_synthetic_cache

from helpers import REPO

# Peak memory of one `pipeline head` run above a baseline taken after imports and a warm-up that
# touches what any run touches once (torch's thread pools and GEMM buffers, matplotlib's fonts).
_MEASURE = """
import json, os, sys, tempfile
import numpy as np
from pipeline import cli
from pipeline.evaluate import metrics
from pipeline.evaluate import report
from pipeline.heads.kinds.linear import TorchLinearClassifier
rng = np.random.default_rng(0)
X, y = rng.normal(size=(2048, 64)).astype(np.float32), rng.integers(0, 10, 2048)
TorchLinearClassifier(solver="adam", epochs=2).fit(X, y)
with tempfile.TemporaryDirectory() as d:
    report.plot_confusion([[3, 1], [0, 4]], ["a", "b"], os.path.join(d, "c.png"))
    table = metrics.reliability(np.array([0, 1]), np.array([[0.9, 0.1], [0.2, 0.8]]))
    report.plot_reliability(table, os.path.join(d, "r.png"))
    curve = [{"C": 1.0, "val_top1": 0.5, "val_balanced_accuracy": 0.5}]
    report.plot_validation_curve(curve, {"select": "top1", "C": 1.0}, os.path.join(d, "v.png"))
status = lambda key: next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith(key))
baseline = status("VmRSS")
with open("/proc/self/clear_refs", "w") as fh:  # restart the high-water mark (VmHWM) from here
    fh.write("5")
code = cli.main(sys.argv[1:])
# VmHWM, not ru_maxrss: Linux carries ru_maxrss over exec, so it can report the parent's size.
print(json.dumps({"code": code, "grown_mb": (status("VmHWM") - baseline) / 1024}))
"""


@pytest.fixture(scope="module")
def big_cache(tmp_path_factory):
    """120,000 x 512 float16 rows (123 MB on disk, ~0.75 GB as the in-memory head holds it), 10
    classes."""
    path = tmp_path_factory.mktemp("big") / "big.h5"
    return write_synthetic_cache(
        path, n_train=110_000, n_test=10_000, dim=512, classes=10, latent=32, sep=0.6, seed=1
    )


def test_sizes():
    assert parse_size("4GB") == 4_000_000_000 and parse_size("512 MiB") == 512 * 2**20
    assert parse_size("1.5g") == 1_500_000_000 and parse_size("1000") == 1000
    with pytest.raises(
        ConfigError, match=r"--max-memory 'lots' is not a size; write it like 4GB, 512MB or 1.5GiB"
    ):
        parse_size("lots")


@pytest.mark.slow
def test_streamed_head_stays_under_the_budget_and_matches_the_in_memory_fit(big_cache, tmp_path):
    budget_mb = 48
    assert big_cache.stat().st_size > 2.5 * budget_mb * 1e6
    args = [
        "head",
        "--features",
        str(big_cache),
        "--head",
        "torch",
        "--C",
        "0.001",
        "--no-progress",
    ]
    done = subprocess.run(
        [
            sys.executable,
            "-c",
            _MEASURE,
            *args,
            "--out",
            str(tmp_path / "streamed"),
            "--max-memory",
            f"{budget_mb}MB",
            "--epochs",
            "4",
            "--bootstrap",
            "200",
        ],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "streaming" in done.stderr and "--max-memory 48MB" in done.stderr
    measured = json.loads(done.stdout.strip().splitlines()[-1])
    assert measured["code"] == 0 and measured["grown_mb"] < budget_mb, measured

    streamed = json.loads((tmp_path / "streamed" / "result.json").read_text())
    in_memory = protocol.run(
        HeadConfig(
            features=str(big_cache),
            head="torch",
            C=0.001,
            out=str(tmp_path / "memory"),
            progress=False,
            bootstrap=0,
        )
    )
    gap = abs(streamed["test"]["top1"] - in_memory["test"]["top1"]) * 100
    assert gap <= 0.5, (streamed["test"]["top1"], in_memory["test"]["top1"])
    chosen = [run["protocol"].pop("selection") for run in (streamed, in_memory)]
    assert chosen[0]["rule"] == chosen[1]["rule"] == "fixed"  # --C: nothing is chosen
    rows = [run["protocol"].pop("rows") for run in (streamed, in_memory)]
    assert rows == ["streamed from the cache in blocks", "in memory"]
    assert streamed["protocol"] == in_memory["protocol"], "one protocol for both fitters"
    assert set(streamed) == set(in_memory) and set(streamed["final_fit"]) == set(
        in_memory["final_fit"]
    )
    assert streamed["final_fit"]["solver"] == "adam" and in_memory["final_fit"]["solver"] == "lbfgs"
    # Convergence is measured for the streamed fit too (its full gradient after the last epoch), not
    # assumed.
    assert streamed["final_fit"]["n_iter"] == 4 and isinstance(
        streamed["final_fit"]["converged"], bool
    )
    assert streamed["test_set"] == in_memory["test_set"]
    assert (tmp_path / "streamed" / "head.npz").exists()


@pytest.mark.slow
def test_streamed_sweep_selects_on_val(big_cache, tmp_path):
    cfg = HeadConfig(
        features=str(big_cache),
        head="torch",
        grid=(1e-4, 1e-2),
        max_memory="64MB",
        epochs=1,
        out=str(tmp_path / "r"),
        progress=False,
        bootstrap=0,
        class_weight="balanced",
        calibrate="temperature",
    )
    result = protocol.run(cfg)
    assert len(result["curve"]) == 2 and result["chosen"]["C"] in (1e-4, 1e-2)
    assert (
        result["posthoc"]["fitted_on"] == "a stratified holdout of train"
    )  # on the holdout's streamed blocks
    calibrated = result["posthoc"]["calibration"]
    assert calibrated["val_after"]["log_loss"] <= calibrated["val_before"]["log_loss"]
    assert result["chosen"]["index"] == choice.choose(result["curve"], "top1-0.5se"), (
        "the rule of the in-memory heads"
    )
    assert list(result["curve"][0]) == [
        "C",
        "val_top1",
        "val_top1_se",
        "val_balanced_accuracy",
        "val_balanced_accuracy_se",
        "val_log_loss",
        "n_iter",
        "converged",
        "status",
    ]
    assert result["protocol"]["selected_on"] == "holdout"
    assert result["protocol"]["selected_on_note"].startswith("a stratified holdout of train (10%")
    assert result["cache"]["rows"] == {"train": 110_000, "test": 10_000}


def test_scikit_learn_head_refuses_above_the_budget(synthetic_cache, tmp_path):
    cfg = HeadConfig(
        features=str(synthetic_cache), head="logreg", max_memory="10KB", out=str(tmp_path / "r")
    )
    with pytest.raises(
        ConfigError,
        match=r"the logreg head holds the whole cache in memory, about 0\.\d+ GB here, "
        r"above --max-memory 10KB; use --head torch, which streams the cache",
    ):
        protocol.run(cfg)
    tiny = HeadConfig(
        features=str(synthetic_cache), head="torch", max_memory="10KB", out=str(tmp_path / "r")
    )
    with pytest.raises(
        ConfigError, match=r"--max-memory 10KB does not cover the 45 weight matrices"
    ):
        protocol.run(tiny)
    roomy = HeadConfig(
        features=str(synthetic_cache),
        head="logreg",
        max_memory="1GB",
        out=str(tmp_path / "r"),
        grid=(1.0,),
        progress=False,
    )
    assert protocol.run(roomy)["test"]["top1"] > 0.5, "under the budget nothing changes"


@pytest.mark.parametrize("backend", ["threading", "dask"])
def test_joblib_backends_give_the_same_sweep(synthetic_cache, tmp_path, backend):
    if backend == "dask":
        distributed = pytest.importorskip("dask.distributed")
        cluster = distributed.LocalCluster(n_workers=2, processes=False, dashboard_address=None)
        client = distributed.Client(cluster)
    common = dict(
        features=str(synthetic_cache),
        head="logreg",
        grid=(0.01, 0.1, 1.0),
        progress=False,
        bootstrap=0,
    )
    try:
        default = protocol.run(HeadConfig(**common, out=str(tmp_path / "loky")))
        other = protocol.run(
            HeadConfig(**common, out=str(tmp_path / backend), joblib_backend=backend)
        )
    finally:
        if backend == "dask":
            client.close()
            cluster.close()
    np.testing.assert_allclose(
        [r["val_top1"] for r in other["curve"]], [r["val_top1"] for r in default["curve"]]
    )
    assert other["test"]["top1"] == default["test"]["top1"]


def test_unknown_joblib_backend_is_refused_by_the_config(synthetic_cache, tmp_path):
    with pytest.raises(
        ConfigError,
        match=r"--joblib-backend 'spark' is not allowed; choose one of: loky, threading",
    ):
        HeadConfig(
            features=str(synthetic_cache),
            head="logreg",
            joblib_backend="spark",
            out=str(tmp_path / "r"),
        )


def test_streamed_and_in_memory_heads_share_one_protocol_on_a_small_cache(
    synthetic_cache, tmp_path
):
    """The same select/refit/test code for both fitters: the same result fields, and at the same C
    with enough epochs the same test top-1 within a point; the streamed fit's convergence is
    measured."""
    common = dict(features=str(synthetic_cache), head="torch", C=1.0, progress=False, bootstrap=0)
    streamed = protocol.run(
        HeadConfig(**common, out=str(tmp_path / "s"), max_memory="100KB", epochs=200, lr=0.01)
    )
    in_memory = protocol.run(HeadConfig(**common, out=str(tmp_path / "m")))
    assert streamed["protocol"].pop("rows") == "streamed from the cache in blocks"
    assert in_memory["protocol"].pop("rows") == "in memory"
    for run in (streamed, in_memory):
        run["protocol"].pop("selection")
    assert streamed["protocol"] == in_memory["protocol"]
    assert set(streamed) == set(in_memory) and set(streamed["final_fit"]) == set(
        in_memory["final_fit"]
    )
    assert list(streamed["curve"][0]) == list(in_memory["curve"][0])
    assert abs(streamed["test"]["top1"] - in_memory["test"]["top1"]) <= 0.01
    fit = streamed["final_fit"]
    assert (
        fit["solver"] == "adam"
        and fit["n_iter"] == 200
        and fit["status"] in ("converged", "not converged")
    )


@pytest.mark.parametrize(
    ("flags", "pattern"),
    [
        (
            {"solver": "lbfgs"},
            r"--solver lbfgs \(it needs every row for each step; use adam or sgd\) "
            r"is not supported",
        ),
        (
            {"balanced_sampler": True},
            r"--balanced-sampler is not supported when the head streams the cache",
        ),
        (
            {"shots": 2},
            r"--shots is not supported when the head streams the cache \(about 0\.\d+ GB here",
        ),
        (
            {"imbalance_ratio": 10.0},
            r"--imbalance-ratio is not supported when the head streams the cache",
        ),
    ],
)
def test_what_streaming_cannot_do_is_refused_in_one_line(synthetic_cache, tmp_path, flags, pattern):
    cfg = HeadConfig(
        features=str(synthetic_cache),
        head="torch",
        max_memory="100KB",
        out=str(tmp_path / "r"),
        **flags,
    )
    with pytest.raises(ConfigError, match=pattern):
        protocol.run(cfg)
    assert not (tmp_path / "r").exists()
