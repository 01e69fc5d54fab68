"""Small helpers every stage uses, importable without pulling in the trainer."""

from __future__ import annotations

import resource
from typing import Any

import torch


def peak_memory_mb() -> float:
    """Peak GPU memory allocated when on CUDA, else the process's peak resident set size."""
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def rng_states() -> dict[str, Any]:
    """Every random stream a sampler may draw from: torch's CPU generator, each CUDA device's (where CUDA is up),
    Python's ``random`` and numpy's global generator. vLLM draws from different ones by build and version (its CPU
    build from torch's generator in this process; on CUDA its model runner seeds each request from numpy's), so a
    state that leaves one out is not restored."""
    import random

    import numpy as np

    states: dict[str, Any] = {"torch": torch.random.get_rng_state(), "random": random.getstate(),
                              "numpy": np.random.get_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def set_rng_states(states: dict[str, Any]) -> None:
    """Put back what :func:`rng_states` took."""
    import random

    import numpy as np

    torch.random.set_rng_state(states["torch"])
    random.setstate(states["random"])
    np.random.set_state(states["numpy"])
    if "cuda" in states:
        torch.cuda.set_rng_state_all(states["cuda"])
