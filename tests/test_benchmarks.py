"""The GPU benchmark's CPU-side logic: it refuses without CUDA, samples utilisation, and each
measurement runs (tiny) on the CPU."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from benchmarks import gpu
from pipeline.synthetic import write_photo_folder

from helpers import REPO


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_bench_gpu_refuses_without_cuda_in_one_line():
    done = subprocess.run(
        [sys.executable, "-m", "benchmarks.gpu"], cwd=REPO, capture_output=True, text=True
    )
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert done.stderr.strip().startswith("error: make bench-gpu measures a CUDA GPU")
    assert len(done.stderr.strip().splitlines()) == 1


def test_utilisation_is_sampled_while_the_block_runs():
    values = iter([50.0, None, 70.0, 90.0] + [100.0] * 100)
    import time

    with gpu.sampled(lambda: next(values), every=0.01) as samples:
        deadline = (
            time.monotonic() + 60
        )  # until three samples are in: a busy machine samples late, not wrong
        while len(samples) < 3 and time.monotonic() < deadline:
            time.sleep(0.01)
    assert samples[:3] == [50.0, 70.0, 90.0], "unreadable samples (None) are dropped"
    s = gpu.summary([10.0, 20.0, 30.0, 40.0])
    assert s == {"samples": 4, "mean": 25.0, "p10": 10.0, "p90": 40.0}
    assert gpu.summary([])["mean"] is None


@pytest.mark.slow
def test_each_measurement_runs_on_the_cpu(tmp_path, synthetic_cache, monkeypatch):
    monkeypatch.setattr(gpu, "OUT", tmp_path)
    assert gpu.forward_rate("resnet18", "bf16", False, "cpu", batch=2, size=32, batches=1) > 0
    photos = write_photo_folder(tmp_path / "photos", 4, classes=2)
    for decode in ("cpu", "device"):  # torchvision.io decodes on the CPU here, as on the GPU there
        measured = gpu.features_rate(photos, 4, decode, "cpu", lambda: 42.0, batch=2)
        assert measured["images_per_s"] > 0 and measured["utilisation"]["samples"] >= 1
    sweep = gpu.sweep_seconds(synthetic_cache, "cpu")
    assert sweep["seconds"] > 0 and 0 <= sweep["test_top1"] <= 1


def test_the_plan_scales_measured_costs_by_the_cited_gpu_rate():
    from benchmarks import plan

    measured = {"relative_cost": 2.0, "decode_500x375_s": 0.003, "decode_12mp_reduced_s": 0.03}
    measured |= {
        "decode_12mp_full_s": 0.13,
        "read_bytes_s": 1e-5,
        "row_bytes": 4250.0,
        "head_pass_per_row_s": 5e-5,
    }
    row = plan.plan(1e9, 64, 3382.0, measured, disk_gbps=2.0)
    assert row["extraction_hours"] == pytest.approx(
        1e9 / (1691.0 * 64) / 3600
    )  # half the rate: twice the cost
    assert row["cores_per_gpu_500x375"] == pytest.approx(1691.0 * 0.003)
    assert row["cache_tb"] == pytest.approx(4.25) and row["head_epoch_disk_hours"] == pytest.approx(
        4.25e12 / 2e9 / 3600
    )
    line = "  ".join(fmt.format(row[key]) for key, (_, fmt) in plan.COLUMNS.items())
    assert line.split()[0] == "1e+09" and len(line.split()) == len(plan.COLUMNS)


@pytest.mark.slow
def test_the_sweep_matrix_times_both_heads_and_prints_its_table(tmp_path, monkeypatch, capsys):
    from benchmarks import run

    monkeypatch.setattr(run, "OUT", tmp_path)
    monkeypatch.setattr(run, "ROWS", [])
    run.bench_matrix([(300, 16, 3)])
    rows = {r["benchmark"]: r for r in run.ROWS}
    speed = rows["N=300 D=16 K=3: torch speed-up over logreg"]
    gap = rows["N=300 D=16 K=3: test top-1 gap"]
    assert speed["value"] > 0 and speed["target"] == "> 1" and speed["ok"] == (speed["value"] > 1)
    assert 0 <= gap["value"] <= 100 and set(gap["chosen_index"]) == {"torch", "logreg"}
    out = capsys.readouterr().out
    assert "| N x D x K | torch head | logreg head |" in out and "| 300 x 16 x 3 |" in out


def test_the_solver_benchmark_counts_data_passes_per_setting():
    from sklearn.datasets import make_classification

    from benchmarks import solver as bench

    X, y = make_classification(200, 8, n_informative=5, n_classes=3, random_state=0)
    X = (X - X.mean(0)) / X.std(0)  # standardised, as the protocol does
    one = bench.measure(X.astype("float32"), y, 3, tol=1e-6, block=1)
    assert one["converged"] == 45 and one["grad_max"] <= 1e-6
    assert one["passes"] >= one["iterations"] > 0  # every iteration costs at least one pass
    together = bench.measure(X.astype("float32"), y, 3, tol=1e-6, block=45)
    assert together["passes"] >= 45  # 45 settings evaluated together count 45 per pass


@pytest.mark.slow
def test_the_finetune_benchmark_times_both_loops_on_the_same_tail(tmp_path):
    from benchmarks.finetune import bench_finetune

    rows = []

    def row(name, value, unit, target="", ok=None, **detail):
        rows.append((name, value, unit, ok))

    bench_finetune(row, tmp_path, n=8, name="resnet18", cut="layer3", batch=4)
    found = {name: (value, ok) for name, value, _, ok in rows}
    assert found["resnet18 cut at layer3: bytes per image (float16)"][0] == 2 * 256 * 14 * 14 / 1024
    ratio = found["resnet18 tail after layer3: plain loop / cached, per epoch"]
    assert ratio[0] > 0 and ratio[1] is None  # the >= 3 target is set for resnet50 at layer3
    assert found["resnet18 tail after layer3: seconds per epoch from the cache"][0] > 0
