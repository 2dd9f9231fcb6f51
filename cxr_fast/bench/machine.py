"""The machine a measurement ran on, its busy CPU time, the GPU's dense bf16 peak for MFU, and writing results."""

from __future__ import annotations

import json
import os
import platform
import re
import time
from pathlib import Path

import cv2
import torch

# Dense bf16 tensor-core peaks (TFLOP/s, without sparsity) by the device name torch reports, most specific first: the
# PCIe and NVL parts of the H100/H200 run at lower clocks and power than the SXM ones ("NVIDIA H100 80GB HBM3").
PEAK_TFLOPS = (
    (r"H100 PCIe", 756.0), (r"H100 NVL", 835.0), (r"H200 NVL", 835.0), (r"H100", 989.4), (r"H200", 989.4),
    (r"GH200", 989.4), (r"A100", 312.0), (r"L40S", 362.0), (r"L4\b", 121.0), (r"A10\b", 125.0),
)


def peak_tflops(device_name: str | None) -> float | None:
    """The dense bf16 peak of a GPU by its full name, or None where it is not listed (give --peak-tflops)."""
    if not device_name:
        return None
    return next((peak for pattern, peak in PEAK_TFLOPS if re.search(pattern, device_name)), None)


def device_peak(device: torch.device, override_tflops: float | None = None) -> tuple[str | None, float | None]:
    """(GPU name, peak FLOP/s): the override where given, else the table's value for this GPU; None on the CPU."""
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else None
    peak = override_tflops if override_tflops else peak_tflops(name)
    return name, peak * 1e12 if peak else None


def machine() -> dict:
    info = {"host": platform.node(), "cpu": platform.processor() or platform.machine(), "cpu_count": os.cpu_count(),
            "python": platform.python_version(), "torch": torch.__version__, "opencv": cv2.__version__,
            "date": time.strftime("%Y-%m-%d %H:%M:%S %Z")}
    try:
        import nvidia.dali  # optional: only its version is recorded

        info["dali"] = nvidia.dali.__version__
    except ImportError:
        info["dali"] = None
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
    return info


def cpu_busy_seconds() -> float:
    """Busy CPU time of the whole machine (all cores), from /proc/stat, in seconds."""
    with open("/proc/stat") as f:
        fields = [int(v) for v in f.readline().split()[1:]]
    idle = fields[3] + fields[4]
    return (sum(fields) - idle) / os.sysconf("SC_CLK_TCK")


def write_json(result: dict, path: str | Path | None) -> None:
    if path:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(json.dumps(result, indent=1))
