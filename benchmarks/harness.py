"""Measurement harness shared by the benchmarks: thread settings, a busy-core neighbour, A/B
alternation, summary statistics, machine facts and the JSON/markdown report.

Every comparison is a ratio of two rates measured in the same process and the same run, with the
cases alternated (A B, B A, A B, ...) so that drift in the machine's load hits both sides alike.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Callable, Iterator

import numpy as np
import torch

# Thread conditions of goal 4 ("no collapse"): name -> (torch threads, busy neighbour on a core).
CONDITIONS = {
    "t1": (1, False),  # one torch thread, nothing else running (the reference)
    "t2_busy": (2, True),  # two torch threads while another process keeps one core busy
    "t1_busy": (1, True),  # one torch thread with the same neighbour (for context)
}


def add_run_args(ap, *, collapse: bool = False, profile: bool = False) -> None:
    """The options every benchmark script shares: --seed, --json, and where the script has those
    phases, --no-collapse and --no-profile."""
    if collapse:
        ap.add_argument("--no-collapse", action="store_true", help="skip the busy-core phase")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", help="also write the JSON here")
    if profile:
        ap.add_argument("--no-profile", action="store_true")


def seed_everything(seed: int) -> None:
    import random

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


@contextmanager
def busy_core(enabled: bool = True) -> Iterator[None]:
    """Keep one core busy with a Python busy loop in a child process while inside the block."""
    if not enabled:
        yield
        return
    proc = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        time.sleep(0.2)  # let it get scheduled before timing starts
        yield
    finally:
        proc.kill()  # only the child we started, by its handle
        proc.wait()


@dataclass
class Samples:
    """Rates (units per second) of one case, one entry per repetition."""

    unit: str
    rates: list[float] = field(default_factory=list)
    extra: list[dict] = field(default_factory=list)

    def summary(self) -> dict:
        r = self.rates
        return {"unit": self.unit, "median": statistics.median(r), "min": min(r), "max": max(r),
                "reps": len(r)}


Case = Callable[[], tuple[float, float, dict]]  # -> (units done, seconds, extra info)


def alternate(cases: dict[str, Case], reps: int, units: dict[str, str],
              log: Callable[[str], None] | None = None) -> dict[str, Samples]:
    """Run every case once per repetition, the order reversed on every other repetition."""
    out = {name: Samples(units[name]) for name in cases}
    names = list(cases)
    for rep in range(reps):
        for name in (names if rep % 2 == 0 else names[::-1]):
            done, seconds, extra = cases[name]()
            out[name].rates.append(done / seconds)
            out[name].extra.append(extra)
            if log:
                log(f"  rep {rep + 1}/{reps} {name}: {done / seconds:.2f} {units[name]}")
    return out


def run_matrix(conditions: list[str], cases: dict[str, Case], reps: int, units: dict[str, str],
               log: Callable[[str], None] | None = None) -> dict[str, dict[str, Samples]]:
    """Every repetition visits every thread condition and, inside it, every case; both orders are
    reversed on every other repetition, so each repetition is a paired sample of all of them."""
    out = {c: {name: Samples(units[name]) for name in cases} for c in conditions}
    names = list(cases)
    for rep in range(reps):
        for cond in (conditions if rep % 2 == 0 else conditions[::-1]):
            threads, busy = CONDITIONS[cond]
            torch.set_num_threads(threads)
            with busy_core(busy):
                for name in (names if rep % 2 == 0 else names[::-1]):
                    done, seconds, extra = cases[name]()
                    out[cond][name].rates.append(done / seconds)
                    out[cond][name].extra.append({**extra, "load1": round(os.getloadavg()[0], 2)})
                    if log:
                        log(f"  rep {rep + 1}/{reps} {cond} {name}: {done / seconds:.1f} {units[name]}")
    torch.set_num_threads(1)
    return out


def alternating_ms(fns: dict[str, Callable[[], object]], rounds: int = 5, calls: int = 5) -> dict:
    """Median (over rounds) of ms per call of each function, the functions taking turns (order
    reversed every other round) so that background load hits them alike."""
    times: dict[str, list[float]] = {name: [] for name in fns}
    names = list(fns)
    for fn in fns.values():
        fn()
    for r in range(rounds):
        for name in (names if r % 2 == 0 else names[::-1]):
            t0 = time.perf_counter()
            for _ in range(calls):
                fns[name]()
            times[name].append((time.perf_counter() - t0) / calls * 1e3)
    return {name: statistics.median(v) for name, v in times.items()}


def ratio(a: Samples, b: Samples) -> dict:
    """a / b: the ratio of medians, and the median and range of the per-repetition ratios (each
    repetition's A and B ran back to back)."""
    paired = [x / y for x, y in zip(a.rates, b.rates)]
    return {"ratio_of_medians": statistics.median(a.rates) / statistics.median(b.rates),
            "paired_median": statistics.median(paired), "paired_min": min(paired),
            "paired_max": max(paired)}


def machine_info() -> dict:
    model = "unknown"
    try:
        for line in subprocess.run(["lscpu"], capture_output=True, text=True).stdout.splitlines():
            if line.startswith("Model name:"):
                model = line.split(":", 1)[1].strip()
    except OSError:
        pass
    info = {"cpu": model, "cores": os.cpu_count(), "python": platform.python_version(),
            "torch": torch.__version__, "numpy": np.__version__,
            "torch_default_threads": torch.get_num_threads(),
            "OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY"),
            "loadavg_at_start": os.getloadavg()}
    try:
        import transformers

        info["transformers"] = transformers.__version__
    except ImportError:
        info["transformers"] = None
    try:
        import gymnasium
        import mujoco

        info["gymnasium"], info["mujoco"] = gymnasium.__version__, mujoco.__version__
    except ImportError:
        pass
    return info


def fmt(x: float) -> str:
    return f"{x:.3g}" if abs(x) < 100 else f"{x:.0f}"


def markdown_table(results: dict[str, dict[str, Samples]], labels: dict[str, str]) -> str:
    """One row per (condition, case): median and min-max of the rate."""
    lines = ["| condition | case | unit | median | min - max | reps |",
             "|---|---|---|---:|---:|---:|"]
    for cond, cases in results.items():
        for name, s in cases.items():
            m = s.summary()
            lines.append(f"| {cond} | {labels.get(name, name)} | {m['unit']} | {fmt(m['median'])} | "
                         f"{fmt(m['min'])} - {fmt(m['max'])} | {m['reps']} |")
    return "\n".join(lines)


class Ratios:
    """Collects named ratios (a / b with their paired statistics) and the rows of their table."""

    def __init__(self) -> None:
        self.ratios: dict[str, dict] = {}
        self.rows: list[tuple[str, dict, str]] = []

    def add(self, key: str, a: "Samples", b: "Samples", goal: str = "") -> None:
        self.ratios[key] = ratio(a, b)
        self.rows.append((key, self.ratios[key], goal))


def ratio_table(rows: list[tuple[str, dict, str]]) -> str:
    """rows: (what, ratio dict, goal text)."""
    lines = ["| ratio | median of paired | paired min - max | ratio of medians | goal |",
             "|---|---:|---:|---:|---|"]
    for what, r, goal in rows:
        lines.append(f"| {what} | {r['paired_median']:.2f} | {r['paired_min']:.2f} - "
                     f"{r['paired_max']:.2f} | {r['ratio_of_medians']:.2f} | {goal} |")
    return "\n".join(lines)


def report(name: str, payload: dict, tables: list[str], json_path: str | None) -> None:
    text = json.dumps(payload, indent=2, default=float)
    print(f"\n=== {name}: JSON ===")
    print(text)
    print(f"\n=== {name}: markdown ===")
    print("\n\n".join(tables))
    if json_path:
        with open(json_path, "w") as f:
            f.write(text + "\n")


def samples_json(results: dict[str, dict[str, Samples]]) -> dict:
    return {cond: {name: {**s.summary(), "rates": s.rates,
                          **({"extra": s.extra} if any(s.extra) else {})}
                   for name, s in cases.items()}
            for cond, cases in results.items()}
