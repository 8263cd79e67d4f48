"""How much the device, RAM and disk can hold, and the one function that picks a mode."""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

import torch

RESIDENT_FRACTION = 0.5  # of free device memory: the rest is for the coder and optimizer
WINDOW_FRACTION = 0.25  # of available RAM, for the stream mode's two windows together
DISK_FRACTION = 0.5  # of the free disk, for a memmap mode file
MIN_WINDOW_TOKENS = 1 << 20


def available_ram() -> int:
    """Bytes the kernel says can be allocated without swapping (MemAvailable)."""
    try:
        import psutil

        return int(psutil.virtual_memory().available)
    except ImportError:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
        raise RuntimeError("/proc/meminfo: no MemAvailable line") from None


def resident_budget(device: torch.device, fraction: float = RESIDENT_FRACTION) -> int:
    """Bytes the resident mode may use: a share of the device's free memory (CUDA) or of
    available RAM (CPU), leaving the rest for the coder, its optimizer and activations."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free * fraction)
    return int(available_ram() * fraction)


def disk_budget(path: Path, fraction: float = DISK_FRACTION) -> int:
    """Bytes a decoded file may take on the disk that holds ``path``."""
    existing = path
    while not existing.exists():
        existing = existing.parent
    return int(shutil.disk_usage(existing).free * fraction)


def stream_window_rows(row_bytes: int, window_bytes: int | None = None) -> int:
    """Rows in one stream window: ``window_bytes``, by default a share of available RAM,
    raised to 1M tokens' worth when two such windows fit in half of it."""
    if window_bytes is None:
        ram = available_ram()
        window_bytes = int(ram * WINDOW_FRACTION / 2)
        if window_bytes < MIN_WINDOW_TOKENS * row_bytes <= ram // 4:
            window_bytes = MIN_WINDOW_TOKENS * row_bytes
    return max(1, window_bytes // row_bytes)


@dataclass(frozen=True)
class ModeChoice:
    mode: str
    reason: str


def choose_mode(
    requested: str,
    split_bytes: int,
    resident_max_bytes: int,
    memmap_path: Path,
    memmap_ready: bool,
) -> ModeChoice:
    """``auto``: resident when the split fits the resident budget, else memmap when the disk
    allows the decoded file (or it exists), else stream. An explicit mode is kept."""
    gib = 1 << 30
    if requested not in ("auto", "resident", "memmap", "stream"):
        raise ValueError(f"loader mode must be auto, resident, memmap or stream, not {requested!r}")
    if requested != "auto":
        return ModeChoice(requested, "requested")
    if split_bytes <= resident_max_bytes:
        return ModeChoice(
            "resident",
            f"split {split_bytes / gib:.2f} GiB fits the resident budget "
            f"{resident_max_bytes / gib:.2f} GiB",
        )
    if memmap_ready:
        return ModeChoice("memmap", f"split exceeds the resident budget; {memmap_path} exists")
    disk = disk_budget(memmap_path)
    if split_bytes <= disk:
        return ModeChoice(
            "memmap",
            f"split {split_bytes / gib:.2f} GiB exceeds the resident budget "
            f"{resident_max_bytes / gib:.2f} GiB; fits the disk budget {disk / gib:.2f} GiB",
        )
    return ModeChoice(
        "stream",
        f"split {split_bytes / gib:.2f} GiB exceeds the resident budget "
        f"{resident_max_bytes / gib:.2f} GiB and the disk budget {disk / gib:.2f} GiB",
    )
