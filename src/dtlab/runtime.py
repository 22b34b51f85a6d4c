"""Where and how the model runs: device, CPU threads, numeric precision.

Shared by training, evaluation and the benchmarks, so that neither loop imports the other.
"""

from __future__ import annotations

import contextlib
import os
from typing import Literal

import torch

from dtlab.errors import ConfigError

Precision = Literal["fp32", "bf16"]


def resolve_device(name: str) -> torch.device:
    """``auto`` -> cuda if available, else cpu; otherwise the torch device ``name``.

    Raises ConfigError (field ``device``) for a malformed name or CUDA on a machine without it.
    """
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as exc:
        raise ConfigError(f"device: invalid device '{name}': {exc}") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(f"device: '{name}' requested but CUDA is not available on this machine")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ConfigError(f"device: '{name}' requested but this machine has "
                              f"{torch.cuda.device_count()} CUDA device(s)")
    elif device.type not in ("cpu", "mps"):
        raise ConfigError(f"device: '{name}' is not supported (auto, cpu, cuda, cuda:N)")
    return device


def set_threads(threads: int | None, default: int) -> int:
    """Pick torch's CPU thread count deliberately: ``threads``, else ``OMP_NUM_THREADS``, else
    ``default``; returns the count in effect.

    With more busy threads than free cores, torch's spinning threads collapse throughput 10-80x
    (measured: docs/benchmarks.md), so the default is chosen by the caller for its workload.
    """
    if threads is None:
        env = os.environ.get("OMP_NUM_THREADS")
        threads = int(env) if env and env.isdigit() and int(env) > 0 else default
    torch.set_num_threads(max(1, threads))
    return torch.get_num_threads()


def setup(device: str, threads: int | None, default_threads: int) -> torch.device:
    """Resolve ``device``; on CPU also set the thread count (``default_threads`` when neither
    ``threads`` nor ``OMP_NUM_THREADS`` says otherwise)."""
    resolved = resolve_device(device)
    if resolved.type == "cpu":
        set_threads(threads, default=default_threads)
    return resolved


def autocast(device: torch.device, precision: Precision) -> contextlib.AbstractContextManager:
    """The matmul precision context: bf16 autocast (weights, optimizer state and loss stay fp32),
    or nothing for fp32."""
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16")
