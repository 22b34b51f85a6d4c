"""Where and how the model runs: device, CPU threads, numeric precision.

Shared by training, evaluation and the benchmarks, so that neither loop imports the other.
"""

from __future__ import annotations

import contextlib
import os
import warnings
from pathlib import Path
from typing import Literal

import torch

from dtlab.errors import ConfigError, DtlabWarning

Precision = Literal["fp32", "bf16"]  # what runs
PrecisionChoice = Literal["auto", "fp32", "bf16"]  # what a user asks for (resolve_precision)

# bf16 autocast / fp32 time of a 3840x128 @ 128x512 matmul (the paper configuration's MLP input:
# batch 64 x 3K=60 tokens, width 128 -> 512), 1 thread, measured on the development machine (AMD
# EPYC with avx512_bf16) with oneDNN capped to the ISA in question (ONEDNN_MAX_CPU_ISA), paired
# medians of 5 repetitions (docs/benchmarks.md, "Precision"): natively (oneDNN
# brg_matmul:avx512_core_bf16) 0.43x; AVX-512 without bf16 (oneDNN gemm:jit:bf16, converting)
# 2.3x; AVX2 only (oneDNN has no bf16 kernel: ATen's reference gemm) 31x (the issue measured 27x
# on an AVX2-only CPU).
BF16_SLOWDOWN_AVX512 = 2.3
BF16_SLOWDOWN_AVX2 = 31.0


def available_devices() -> list[str]:
    """The devices torch can run on here: ``cpu``, then ``cuda:0`` ... ``cuda:N-1`` and ``mps``
    where present."""
    devices = ["cpu"] + [f"cuda:{i}" for i in range(torch.cuda.device_count())]
    return devices + (["mps"] if torch.backends.mps.is_available() else [])


def resolve_device(name: str | torch.device) -> torch.device:
    """``auto`` -> cuda if available, else cpu; otherwise the torch device ``name`` (a string or
    a ``torch.device``), checked to exist on this machine.

    Every device a user names (``--device``, the Python API's ``device=``) enters through here.
    Raises ConfigError naming the device, the ``--device`` flag and ``available_devices()`` for a
    malformed or unsupported name, CUDA or MPS on a machine without it, or a CUDA index past the
    device count.
    """
    if isinstance(name, torch.device):
        name = str(name)
    if not isinstance(name, str):
        raise ConfigError(f"device: must be a device name (auto, cpu, cuda, cuda:N, mps; --device), "
                          f"got {name!r}")
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    here = f"available here: auto, {', '.join(available_devices())}"
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ConfigError(f"device: invalid device '{name}' (auto, cpu, cuda, cuda:N, mps; "
                          f"{here}); set --device") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(f"device: '{name}' requested but CUDA is not available on this "
                              f"machine ({here}); set --device")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ConfigError(f"device: '{name}' requested but this machine has "
                              f"{torch.cuda.device_count()} CUDA device(s) ({here}); set --device")
    elif device.type == "mps":
        if not torch.backends.mps.is_available():
            raise ConfigError(f"device: '{name}' requested but MPS is not available on this "
                              f"machine ({here}); set --device")
    elif device.type != "cpu":
        raise ConfigError(f"device: '{name}' is not supported: dtlab runs on cpu, cuda, "
                          f"cuda:N or mps ({here}); set --device")
    return device


def set_threads(threads: int | None, default: int) -> int:
    """Pick torch's CPU thread count deliberately: ``threads``, else ``OMP_NUM_THREADS``, else
    ``default``; returns the count in effect.

    With more busy threads than free cores, torch's spinning threads collapse throughput 10-80x
    (measured: docs/benchmarks.md), so the default is chosen by the caller for its workload.
    """
    if threads is None:
        threads = omp_threads() or default
    torch.set_num_threads(max(1, threads))
    return torch.get_num_threads()


def omp_threads() -> int | None:
    """The thread count ``OMP_NUM_THREADS`` sets (a positive integer), else None."""
    env = os.environ.get("OMP_NUM_THREADS")
    return int(env) if env and env.isdigit() and int(env) > 0 else None


def setup(device: str, threads: int | None, default_threads: int) -> torch.device:
    """Resolve ``device``; on CPU also set the thread count (``default_threads`` when neither
    ``threads`` nor ``OMP_NUM_THREADS`` says otherwise)."""
    resolved = resolve_device(device)
    if resolved.type == "cpu":
        set_threads(threads, default=default_threads)
    return resolved


def autocast(device: torch.device, precision: Precision) -> contextlib.AbstractContextManager:
    """The matmul precision context: bf16 autocast (weights, optimizer state and loss stay fp32),
    or nothing for fp32. ``precision`` is a resolved one (``resolve_precision``): ConfigError for
    anything but fp32 or bf16."""
    if precision not in ("fp32", "bf16"):
        raise ConfigError(f"precision must be fp32 or bf16 here (resolve auto first), got "
                          f"{precision!r}")
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16")


def cpu_flags(cpuinfo: str | Path = "/proc/cpuinfo") -> frozenset[str]:
    """The CPU's feature flags (x86 ``flags``, Arm ``Features``) from ``cpuinfo``; empty when the
    file is missing or unreadable (macOS, Windows)."""
    try:
        text = Path(cpuinfo).read_text(errors="replace")
    except OSError:
        return frozenset()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features"):
            return frozenset(value.split())
    return frozenset()


def native_bf16(device: torch.device, flags: frozenset[str] | None = None) -> bool:
    """Whether ``device`` computes bf16 matmuls natively: a CUDA device for which
    ``torch.cuda.is_bf16_supported(including_emulation=False)`` (compute capability 8.0+); a CPU
    with ``avx512_bf16`` or ``amx_bf16`` (x86) or ``bf16`` (Arm) among its ``flags`` (default:
    ``cpu_flags()``). Anything else (MPS included) is False."""
    if device.type == "cuda":
        with torch.cuda.device(device):
            return torch.cuda.is_bf16_supported(including_emulation=False)
    if device.type == "cpu":
        flags = cpu_flags() if flags is None else flags
        return bool(flags & {"avx512_bf16", "amx_bf16", "bf16"})
    return False


def resolve_precision(choice: PrecisionChoice, device: torch.device,
                      flags: frozenset[str] | None = None) -> Precision:
    """``auto`` -> bf16 where ``native_bf16(device, flags)``, else fp32; fp32 and bf16 as asked.

    An explicit bf16 on a CPU without native bf16 warns (DtlabWarning, one line) with the
    slowdown measured for such CPUs (``BF16_SLOWDOWN_*``). ConfigError (field ``precision``) for
    anything else.
    """
    if choice == "auto":
        return "bf16" if native_bf16(device, flags) else "fp32"
    if choice not in ("fp32", "bf16"):
        raise ConfigError(f"precision must be auto, fp32 or bf16, got {choice!r}")
    if choice == "bf16" and device.type == "cpu" and not native_bf16(device, flags):
        flags = cpu_flags() if flags is None else flags
        avx512 = "avx512f" in flags
        slowdown = BF16_SLOWDOWN_AVX512 if avx512 else BF16_SLOWDOWN_AVX2
        warnings.warn(f"precision bf16: this CPU has no native bf16 (no avx512_bf16 or amx_bf16 "
                      f"flag): its bf16 matmuls are emulated, measured {slowdown:g}x slower than "
                      f"fp32 on {'AVX-512' if avx512 else 'AVX2'} CPUs (docs/benchmarks.md); "
                      "precision auto picks fp32 here", DtlabWarning, stacklevel=2)
    return choice
