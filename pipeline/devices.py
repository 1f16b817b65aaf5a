"""Choosing a torch device, the precision `--precision auto` computes in on it, and autocast for
reduced precision."""

from __future__ import annotations

import contextlib
import functools
import platform
import subprocess
from pathlib import Path

import torch

from pipeline.errors import DeviceError


def choose_device(request: str) -> torch.device:
    """`auto` picks cuda, then mps, then cpu; an explicit device that is missing is an error."""
    if request == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    device = torch.device(request)
    if device.type == "cuda":
        build = (
            "a CPU-only build"
            if torch.version.cuda is None
            else f"built for CUDA {torch.version.cuda}"
        )
        if not torch.cuda.is_available():
            raise DeviceError(
                f"--device {request} asked for, but CUDA is not available (torch "
                f"{torch.__version__}, {build}); "
                "use --device cpu or --device auto"
            )
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise DeviceError(
                f"--device {request}: only {torch.cuda.device_count()} CUDA device(s) here"
            )
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise DeviceError(
            f"--device {request} asked for, but MPS is not available; use --device cpu or auto"
        )
    return device


def autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    if precision == "fp32":
        return contextlib.nullcontext()
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[precision]
    return torch.autocast(device_type=device.type, dtype=dtype)


# The CPU flags that mean bf16 arithmetic in hardware: x86's AVX512-BF16 and AMX-BF16, Arm's BF16.
NATIVE_BF16_FLAGS = ("avx512_bf16", "amx_bf16", "bf16")


@functools.cache
def cpu_flags() -> frozenset[str]:
    """The CPU's feature flags as the operating system reports them (Linux: /proc/cpuinfo's
    `flags` or `Features`; macOS: the `hw.optional.arm.FEAT_*` sysctls); empty where unknown."""
    try:
        if platform.system() == "Darwin":
            found = subprocess.run(
                ["sysctl", "hw.optional.arm"], capture_output=True, text=True, timeout=5
            ).stdout
            return frozenset(
                line.split(":")[0].rsplit("FEAT_", 1)[-1].lower()
                for line in found.splitlines()
                if "FEAT_" in line and line.strip().endswith(": 1")
            )
        text = Path("/proc/cpuinfo").read_text(errors="replace")
    except (OSError, subprocess.SubprocessError):
        return frozenset()
    for line in text.splitlines():
        key, _, values = line.partition(":")
        if key.strip() in ("flags", "Features"):
            return frozenset(values.split())
    return frozenset()


def auto_precision(device: torch.device) -> tuple[str, str]:
    """(precision, why) for `--precision auto` on `device`: bf16 where it is computed natively (a
    CPU whose flags include AVX512-BF16, AMX-BF16 or Arm BF16, and whose oneDNN build runs bf16; a
    CUDA GPU that supports bf16), fp16 on other CUDA GPUs, fp32 otherwise."""
    if device.type == "cuda":
        if torch.cuda.is_bf16_supported():
            return "bf16", f"{torch.cuda.get_device_name(device)} computes bf16"
        return "fp16", f"{torch.cuda.get_device_name(device)} has no bf16; fp16 autocast"
    if device.type == "cpu":
        native = sorted(set(NATIVE_BF16_FLAGS) & cpu_flags())
        if native and _onednn_bf16():
            return "bf16", f"this CPU computes bf16 natively ({', '.join(native)})"
        return "fp32", "this CPU has no native bf16 (no AVX512-BF16, AMX or Arm BF16)"
    return "fp32", f"{device.type}: fp32"


def _onednn_bf16() -> bool:
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False
