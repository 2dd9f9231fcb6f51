"""The machine a measurement ran on, its busy CPU time, and writing results."""

from __future__ import annotations

import json
import os
import platform
import time
from pathlib import Path

import cv2
import torch

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
