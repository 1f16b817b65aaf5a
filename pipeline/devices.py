"""Choosing a torch device, and autocast for reduced precision."""

from __future__ import annotations

import contextlib

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
