"""What every benchmark records beside its figures: the device, the load, a GPU sync.

Imported as ``common`` by the scripts in this folder (run as ``python bench/NAME.py``).
"""

from __future__ import annotations

import os
import platform
from pathlib import Path

import torch


def cpu_model() -> str:
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def device_name(device: torch.device) -> str:
    """The GPU's name, or the CPU model with torch's thread count."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({cpu_model()}, {torch.get_num_threads()} threads)"


def load_average() -> list[float]:
    """1/5/15-minute load averages: a shared machine's figures need them beside."""
    return [round(x, 2) for x in os.getloadavg()]


def sync(device: torch.device) -> None:
    """Wait for queued GPU work, so a timer measures it."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
