"""Running the benchmark's cells: each an independent ``dtlab train`` process (then ``dtlab
calibrate`` for a decision-transformer cell with --calibrate), ``--jobs`` at a time.

The processes are the plan's command lines (``plan.cell_commands``) run as ``sys.executable -m
dtlab ...``, their output appended to ``OUT/logs/<dataset>/<algorithm>-seed<k>.log``. A cell whose
training finished is not run again; one that started continues with ``dtlab train --resume``
(bit for bit, train's own resume). Each run directory is held by its ``dtlab train`` process
(train's lock), so a second benchmark on the same --out that reaches a cell being trained gets
that process's one-line refusal.

Stopping: ``should_stop`` (the CLI wires SIGINT/SIGTERM to it) passes SIGINT on to every running
cell, whose ``dtlab train`` stops at its next step with a checkpoint; the runner waits for them.
A cell that fails stops the others the same way, and its error (the last line it printed) is
raised here. A cell process left behind by a benchmark killed with SIGKILL trains its cell to
the end; a rerun meanwhile reports that cell as held by it.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from dtlab import runtime
from dtlab.benchmark import plan, report
from dtlab.benchmark.plan import BenchmarkConfig, Cell
from dtlab.errors import ConfigError, TrainingError
from dtlab.metrics import on_terminal

POLL_S = 0.05  # how often the runner looks at its cells and at should_stop
INTERRUPTED = {128 + signal.SIGINT, 128 + signal.SIGTERM, -signal.SIGINT, -signal.SIGTERM}


@dataclass
class BenchmarkResult:
    report: dict  # results.json's content
    interrupted: bool
    trained: int  # cells finished in this call


def run_benchmark(cfg: BenchmarkConfig, *, should_stop: Callable[[], bool] = lambda: False,
                  echo: bool = False) -> BenchmarkResult:
    """Run (or continue) every cell of ``cfg``, then rebuild the report from the finished cells.
    Raises DtlabError subclasses for bad input before any cell starts, and a cell's error (after
    the other cells stopped with checkpoints)."""
    entries, cells = plan.prepare_benchmark(cfg)
    for entry in entries:
        print(f"{entry.name} ({entry.env}): decision-transformer targets {entry.why}",
              file=sys.stderr)
    interrupted, done = run_cells(cfg, cells, should_stop)
    result = report.build_report(Path(cfg.out), cfg, expected=len(cells), echo=echo)
    return BenchmarkResult(result, interrupted, done)


def run_cells(cfg: BenchmarkConfig, cells: list[Cell], should_stop: Callable[[], bool]
              ) -> tuple[bool, int]:
    """Run what is left of ``cells`` in order, ``cfg.jobs`` at a time; returns (interrupted,
    cells finished in this call)."""
    out = Path(cfg.out)
    todo = [(c, cmds) for c in cells if (cmds := plan.cell_commands(c))]
    progress = RunProgress(len(cells), len(cells) - len(todo), enabled=cfg.progress,
                           jobs=cfg.jobs)
    env = dict(os.environ)
    if cfg.jobs > 1 and cfg.threads is None and runtime.omp_threads() is None:
        env["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // cfg.jobs))  # cores shared
    running: dict[str, _CellProcess] = {}
    interrupted, done, error = False, 0, None
    try:
        while todo or running:
            if not interrupted and error is None and should_stop():
                interrupted = True
                for proc in running.values():
                    proc.stop()
            while todo and len(running) < cfg.jobs and not interrupted and error is None:
                cell, commands = todo.pop(0)
                running[cell.label] = _CellProcess(cell, commands, cell.log_file(out), env)
                progress.start(cell.label)
            for label, proc in list(running.items()):
                code = proc.poll()
                if code is None:
                    continue
                del running[label]
                if code == 0:
                    done += 1
                    progress.finish(label, time.perf_counter() - proc.started)
                    continue
                progress.finish(label, None)
                if code in INTERRUPTED:
                    interrupted = True
                elif error is None:
                    error = proc.error(code)
                for other in running.values():  # stop the rest, each with a checkpoint
                    other.stop()
                interrupted = interrupted or error is not None
            if running:
                time.sleep(POLL_S)
            elif interrupted or error is not None:
                break
    finally:
        for proc in running.values():  # e.g. a KeyboardInterrupt in this process
            proc.stop()
        for proc in running.values():
            proc.wait()
        progress.close()
    if error is not None:
        raise error
    return interrupted, done


class _CellProcess:
    """A cell's remaining commands, run one after the other as processes of this Python."""

    def __init__(self, cell: Cell, commands: list[list[str]], log: Path, env: dict) -> None:
        self.cell, self.commands, self.log, self.env = cell, list(commands), log, env
        self.started = time.perf_counter()
        self.stopped = False
        log.parent.mkdir(parents=True, exist_ok=True)
        self.proc = self._start(self.commands.pop(0))

    def _start(self, args: list[str]) -> subprocess.Popen:
        with open(self.log, "a") as log:
            log.write(f"$ {plan.shell_line([args])}\n")
            log.flush()
            return subprocess.Popen([sys.executable, "-m", "dtlab", *args], stdout=log,
                                    stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                    env=self.env)

    def poll(self) -> int | None:
        """None while running; the exit code of the last command run (0: all succeeded)."""
        code = self.proc.poll()
        if code == 0 and self.commands:
            if self.stopped:  # its calibration is left for the next call
                return 128 + signal.SIGINT
            self.proc = self._start(self.commands.pop(0))
            return None
        return code

    def stop(self) -> None:
        """Ask the cell to stop (SIGINT: dtlab train stops at its next step with a checkpoint)."""
        self.stopped = True
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)

    def wait(self) -> None:
        self.proc.wait()

    def error(self, code: int) -> Exception:
        """The failed cell's error: its last ``dtlab: error:`` line (exit code 2: bad input, or
        its run held by another process), else the exit code and where its log is."""
        lines = self.log.read_text(errors="replace").splitlines()
        said = next((line for line in reversed(lines) if line.startswith("dtlab: error: ")), None)
        if code == 2 and said:
            return ConfigError(f"cell {self.cell.label}: {said.removeprefix('dtlab: error: ')}")
        return TrainingError(f"cell {self.cell.label} failed (exit code {code}; see {self.log}); "
                             "the other cells stopped with checkpoints: run the same command "
                             "again to continue")


class RunProgress:
    """Cells done / total and an estimate of the time left; a rich bar on a terminal, else (or
    when disabled) one printed line per cell.

    The estimate takes each cell to last the mean time of the cells finished in this call: a
    running cell has that less its elapsed time left (at least 0), and the cells not started
    go, in order, to whichever of the ``jobs`` slots frees first; the estimate is when the last
    slot frees. ``clock`` gives the time in seconds (time.perf_counter)."""

    def __init__(self, total: int, done: int, enabled: bool, jobs: int = 1,
                 clock: Callable[[], float] = time.perf_counter) -> None:
        enabled = enabled and on_terminal()
        self.total, self.done, self.enabled, self.jobs = total, done, enabled, jobs
        self.seconds: list[float] = []
        self.started: dict[str, float] = {}  # running cells: their start on ``clock``
        self.clock = clock
        self._bar = None
        if enabled:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

            self._bar = Progress(TextColumn("cells"), BarColumn(), MofNCompleteColumn(),
                                 TextColumn("ETA {task.fields[eta]}  {task.fields[run]}"))
            self._bar.start()
            self._task = self._bar.add_task("cells", total=total, completed=done, eta="-",
                                            run="")

    @property
    def running(self) -> list[str]:
        return list(self.started)

    def eta(self) -> str:
        if not self.seconds:
            return "-"
        mean, now = sum(self.seconds) / len(self.seconds), self.clock()
        slots = sorted(max(0.0, mean - (now - t)) for t in self.started.values())
        slots += [0.0] * max(0, self.jobs - len(slots))
        for _ in range(self.total - self.done - len(self.started)):  # cells not started
            slots[0] += mean
            slots.sort()
        left = round(max(slots))
        return f"{left // 3600}:{left // 60 % 60:02d}:{left % 60:02d}"

    def start(self, label: str) -> None:
        self.started[label] = self.clock()
        if self._bar is not None:
            self._bar.update(self._task, run=", ".join(self.running))

    def finish(self, label: str, seconds: float | None) -> None:
        """``seconds`` None: the cell stopped unfinished (not counted)."""
        self.started.pop(label, None)
        if seconds is None:
            if self._bar is not None:
                self._bar.update(self._task, run=", ".join(self.running))
            return
        self.done += 1
        self.seconds.append(seconds)
        if self._bar is not None:
            self._bar.update(self._task, completed=self.done, eta=self.eta(),
                             run=", ".join(self.running))
        else:
            print(f"cell {self.done}/{self.total} done: {label} ({seconds:.0f} s; ETA "
                  f"{self.eta()})", file=sys.stderr, flush=True)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.stop()
