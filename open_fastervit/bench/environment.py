"""What benchmark numbers depend on: versions, hardware, threads, machine load and time."""

from __future__ import annotations

import contextlib
import os
import platform
import time
from pathlib import Path
from typing import Any

import timm
import torch

from open_fastervit import __version__

__all__ = ["cpu_name", "environment", "load_average"]


def cpu_name() -> str:
    """The CPU model from /proc/cpuinfo, or the platform's description."""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def load_average() -> float | None:
    """The 1-minute load average of the machine (None where the platform has none)."""
    return os.getloadavg()[0] if hasattr(os, "getloadavg") else None


def environment(device: torch.device) -> dict[str, Any]:
    """Versions, hardware, threads, load and the UTC time of a run on ``device``, as a JSON-ready dict."""
    env: dict[str, Any] = {
        "date_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "timm": timm.__version__,
        "open_fastervit": __version__,
        "platform": platform.platform(),
        "cpu": cpu_name(),
        "cpu_count": os.cpu_count(),
        "threads": torch.get_num_threads(),
        "load_average_1m": load_average(),
        "device": str(device),
    }
    if device.type == "cuda":
        env.update(gpu=torch.cuda.get_device_name(device), cuda=torch.version.cuda,
                   cudnn=torch.backends.cudnn.version(), cudnn_benchmark=torch.backends.cudnn.benchmark,
                   tf32_matmul=torch.backends.cuda.matmul.allow_tf32)
    return env
