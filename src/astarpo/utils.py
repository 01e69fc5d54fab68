"""Small helpers every stage uses, importable without pulling in the trainer."""

from __future__ import annotations

import os
import resource

import torch


def peak_memory_mb() -> float:
    """Peak GPU memory allocated when on CUDA, else the process's peak resident set size."""
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def cpu_processes() -> bool:
    """True when launched as several processes on a machine without CUDA: accelerate then needs ``cpu=True``
    to join them over gloo (otherwise each process would run alone)."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1 and not torch.cuda.is_available()
