"""One run directory, and everything a run writes into it.

``RunDirectory(path)`` owns a run's directory: its lock (one writer at a time, ``hold``), the
resolved configuration (``train_config.json``, read back by ``saved_config`` so that
``--resume``, ``evaluate``, ``calibrate`` and ``evaluate --offline`` need only the path), the
checkpoints and the resume point (``resume_point``), the evaluation record
(``evaluations.jsonl``, one ``metrics.Evaluation`` a line), the metrics log, and taking back what
a run created when it fails before its first checkpoint.

Layout (docs/usage.md, "The run directory")::

    OUT/.lock                 held (flock) by the process writing the run; '<pid>@<host> <activity>'
    OUT/train_config.json     the resolved TrainConfig (precision as resolved, not "auto")
    OUT/metrics.jsonl         training records (dtlab.metrics)
    OUT/evaluations.jsonl     evaluation records (dtlab.metrics.Evaluation)
    OUT/tb/                   TensorBoard events
    OUT/step_XXXXXXXX/        checkpoints (dtlab.checkpoint), OUT/latest names the newest
    OUT/best/                 the checkpoint of the best evaluation so far (model only)
    OUT/learning_curve.png    drawn at each evaluation and at the end of a run
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import shutil
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from dtlab import checkpoint, locks
from dtlab.atomic import dumps_json, write_text_atomic
from dtlab.checkpoint import TRAIN_CONFIG_FILE
from dtlab.config import TrainConfig, from_dict, setting_differences
from dtlab.errors import ConfigError, DtlabWarning, TrainingError
from dtlab.metrics import METRICS_FILE, Evaluation, MetricsLog

EVALUATIONS_FILE = "evaluations.jsonl"
BEST_CHECKPOINT = "best"  # the weights of the best evaluation so far, beside the latest
LOCK_FILE = ".lock"  # held (flock) by the process writing the run


class RunDirectory:
    """The run directory ``path`` (it need not exist yet). ``main`` False: a torchrun rank other
    than 0, which reads the directory but writes nothing."""

    def __init__(self, path: str | Path, *, main: bool = True) -> None:
        self.path = Path(path)
        self.main = main
        self.metrics: MetricsLog | NoMetrics | None = None
        self._existed: frozenset[str] = frozenset()

    def __repr__(self) -> str:
        return f"RunDirectory({str(self.path)!r})"

    # ---- what it holds ---------------------------------------------------------------------------
    @property
    def config_file(self) -> Path:
        return self.path / TRAIN_CONFIG_FILE

    @property
    def evaluations_file(self) -> Path:
        return self.path / EVALUATIONS_FILE

    def is_run(self) -> bool:
        """Whether the directory holds a run (its configuration, with or without a checkpoint)."""
        return self.config_file.is_file()

    def has_checkpoint(self) -> bool:
        return (self.path / checkpoint.LATEST_FILE).is_file()

    def latest_checkpoint(self) -> Path | None:
        return checkpoint.resolve(self.path) if self.has_checkpoint() else None

    def saved_config_json(self) -> dict[str, Any]:
        """The run's ``train_config.json`` as saved. ConfigError naming the file when it is
        missing or unreadable."""
        try:
            saved = json.loads(self.config_file.read_text())
        except FileNotFoundError:
            raise ConfigError(f"{self.path}: not a dtlab run directory (no {TRAIN_CONFIG_FILE}); "
                              "give the --out of a dtlab train run") from None
        except (OSError, json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise ConfigError(f"{self.config_file}: cannot read the run's configuration: "
                              f"{exc}") from None
        if not isinstance(saved, dict):
            raise ConfigError(f"{self.config_file}: cannot read the run's configuration: not an "
                              "object")
        return saved

    def saved_config(self) -> TrainConfig:
        """The run's configuration as a TrainConfig (what ``--resume`` continues with)."""
        return read_train_config(self.config_file, flag="--resume")

    def saved_precision(self) -> str | None:
        """The precision the run resolved ``auto`` to (fp32 or bf16), else None. The one place of
        the rule "a resumed run keeps the precision its start chose"."""
        try:
            optim = self.saved_config_json().get("optim")
        except ConfigError:
            return None
        value = optim.get("precision") if isinstance(optim, dict) else None
        return value if value in ("fp32", "bf16") else None

    # ---- one writer ------------------------------------------------------------------------------
    @contextlib.contextmanager
    def hold(self, *, activity: str = "training",
             advice: str = "let it finish or stop it, or choose another --out"
             ) -> Iterator[Path | None]:
        """Hold the directory for this process while the block runs: one process writes a run
        directory at a time (``dtlab train`` started twice on one ``--out``, or a requeued job
        beside a live one, would interleave checkpoints; a calibration beside a live run would
        write into a checkpoint that the run's pruning removes). The directory is created if
        missing and its ``LOCK_FILE`` locked (``dtlab.locks.acquire``, recording this process's
        pid and ``activity``). A refused process's ConfigError names the holder's pid and
        activity and ends with ``advice``.

        Yields the outermost directory this call created (None when the path existed); when the
        block raises before the run has a checkpoint, the directories it created are removed
        again (``remove_created``), or in a directory that existed, the lock file if this call
        made it. ConfigError when another process holds it, or removed or replaced it meanwhile.
        Not locked, and otherwise the same: torchrun ranks other than 0 (``main`` False), a
        directory or lock file that cannot be created for want of permission (the writers then
        say why) or because a file is in the way (``resume_point`` says so), a file system that
        cannot lock, and platforms without ``fcntl`` (Windows).
        """
        path = Path(os.path.abspath(self.path))  # "new/../run": the directories really made
        created = first_missing(path)
        if not self.main:
            yield created
            return
        lock_path = path / LOCK_FILE
        lock_existed = lock_path.exists()
        fd = _lock(self.path, path, created, activity, advice)
        try:
            yield created
        except BaseException:
            if not (path / checkpoint.LATEST_FILE).exists():
                if created is not None:
                    remove_created(path, created)
                elif not lock_existed:
                    with contextlib.suppress(OSError):  # e.g. the path is a file: no lock file
                        lock_path.unlink(missing_ok=True)
            raise
        finally:
            locks.release(fd)

    # ---- resuming --------------------------------------------------------------------------------
    def resume_point(self, cfg: TrainConfig, source: str | None = None) -> Path | None:
        """The checkpoint a run continues from, or None to start at step 0.

        Without ``resume`` the directory must not hold a checkpoint. With it: a directory with a
        checkpoint resumes from it; one with this run's settings but no checkpoint yet (a job
        killed before its first save) starts from step 0 with a one-line note, which names the
        dataset as ``source`` (the name the user gave; default ``cfg.data.dataset``) where it is
        not the file the settings recorded; anything else is an error."""
        out = self.path
        if out.exists() and not out.is_dir():
            raise ConfigError(f"{out}: is a file; --out must be a run directory")
        parent = next((p for p in out.parents if p.exists()), None)
        if parent is not None and not parent.is_dir():
            raise ConfigError(f"{out}: {parent} is a file; --out must be a run directory")
        if not cfg.run.resume:
            if (out / checkpoint.LATEST_FILE).exists():
                raise ConfigError(f"{out}: run directory already holds a run; pass --resume to "
                                  "continue it, or choose another --out")
            return None
        if self.has_checkpoint():
            self.check_resume_config(cfg)
            return checkpoint.resolve(out)
        if self.is_run():
            self.check_resume_config(cfg)
            saved = (_recorded_groups(self.saved_config_json())["data"] or {}).get("dataset")
            other = (f", on {source or cfg.data.dataset} (the run's settings name {saved})"
                     if saved and os.path.abspath(str(saved)) != os.path.abspath(
                         str(cfg.data.dataset)) else "")
            warnings.warn(f"{out}: --resume found the run's settings but no checkpoint yet; "
                          f"starting from step 0{other}", DtlabWarning, stacklevel=3)
            return None
        raise ConfigError(f"{out}: --resume is set but the run directory has no checkpoint")

    def check_resume_config(self, cfg: TrainConfig) -> None:
        """Refuse to resume with settings that change the sequence of updates
        (``TrainConfig.resume_groups``: data, model, optim, and steps for a cosine schedule)."""
        recorded = _recorded_groups(self.saved_config_json())
        groups = cfg.resume_groups()
        saved_precision = self.saved_precision()
        if groups["optim"].precision == "auto" and saved_precision is not None:
            # auto resumes at the precision the run resolved it to (train() does the same).
            groups["optim"] = dataclasses.replace(groups["optim"], precision=saved_precision)
        # A field added since the run was saved (e.g. model.architecture) had its default.
        defaults = {name: {f.name: f.default for f in dataclasses.fields(group)
                           if f.default is not dataclasses.MISSING}
                    for name, group in groups.items() if dataclasses.is_dataclass(group)}
        now = {k: dataclasses.asdict(v) if dataclasses.is_dataclass(v) else v
               for k, v in groups.items()}
        differ = setting_differences(recorded, _jsonable(now), defaults=_jsonable(defaults),
                                     exempt=TrainConfig.RESUME_MAY_CHANGE)
        if differ:
            shown = ", ".join(f"{k}: {a!r} -> {b!r}" for k, a, b in differ)
            raise ConfigError(f"{self.config_file}: --resume with different settings than the run "
                              f"({shown}); resume with the run's own settings (--resume alone "
                              "reads them), or start a new run with another --out")

    # ---- writing ---------------------------------------------------------------------------------
    def start(self, cfg: TrainConfig, resume_from: int | None,
              evaluations_until: int | None = None) -> MetricsLog | "NoMetrics":
        """Write the resolved configuration and open the metrics log (records after
        ``resume_from`` are dropped: they will be redone; so are evaluation records after
        ``evaluations_until``, default ``resume_from``: a run whose evaluations count another
        step, dtlab finetune's online env steps, gives the checkpoint's in that unit). Returns
        the log."""
        self._existed = frozenset(name for name in (TRAIN_CONFIG_FILE, METRICS_FILE,
                                                    EVALUATIONS_FILE, "tb", BEST_CHECKPOINT)
                                  if (self.path / name).exists())
        if not self.main:
            self.metrics = NoMetrics()
            return self.metrics
        self.path.mkdir(parents=True, exist_ok=True)
        write_text_atomic(self.config_file, dumps_json(dataclasses.asdict(cfg)))
        if resume_from is None:
            self.evaluations_file.write_text("")
        elif self.evaluations_file.exists():  # evaluations after the checkpoint will be redone
            self._drop_best_after(resume_from)  # the best checkpoint's step is a gradient step
            until = resume_from if evaluations_until is None else evaluations_until
            keep = [e for e in self.evaluations() if e.step <= until]
            write_text_atomic(self.evaluations_file,
                              "".join(dumps_json(e.to_json(), indent=None) + "\n" for e in keep))
        self.metrics = MetricsLog(self.path, resume_from=resume_from,
                                  tensorboard=cfg.run.tensorboard,
                                  wandb_project=cfg.run.wandb_project if cfg.run.wandb else None,
                                  wandb_config=dataclasses.asdict(cfg))
        return self.metrics

    def record_evaluation(self, evaluation: Evaluation) -> None:
        """Append ``evaluation`` to evaluations.jsonl (and its scalars to TensorBoard)."""
        if not self.main:
            return
        with open(self.evaluations_file, "a") as f:
            f.write(dumps_json(evaluation.to_json(), indent=None) + "\n")
        if isinstance(self.metrics, MetricsLog):
            self.metrics.write_evaluation(evaluation)

    def evaluations(self) -> list[Evaluation]:
        """The run's evaluation records, oldest first; a partly written last line (a crash
        mid-write) is skipped."""
        if not self.evaluations_file.exists():
            return []
        found = []
        for line in self.evaluations_file.read_text().splitlines():
            try:
                found.append(Evaluation.from_json(json.loads(line)))
            except (json.JSONDecodeError, KeyError, TypeError, ValueError):
                continue
        return found

    def check_present(self) -> None:
        """TrainingError when the directory a run is writing was removed or moved while it
        trained (its configuration file is gone): checked before each checkpoint and evaluation
        record, so that the run stops in one line instead of recreating part of a directory."""
        if self.main and not self.config_file.is_file():
            raise TrainingError(f"{self.path}: the run directory was removed or moved while "
                                f"training ({TRAIN_CONFIG_FILE} is gone); stopped without "
                                "writing more (train again with --out)")

    def close(self) -> None:
        if self.metrics is not None:
            self.metrics.close()

    def discard_if_no_checkpoint(self) -> None:
        """A run that failed before its first checkpoint: remove the files it wrote (the
        directories it created are ``hold``'s to remove)."""
        self.close()
        if not self.main or self.has_checkpoint():
            return
        for name in {TRAIN_CONFIG_FILE, METRICS_FILE, EVALUATIONS_FILE} - self._existed:
            (self.path / name).unlink(missing_ok=True)
        for name in {"tb", BEST_CHECKPOINT} - self._existed:
            shutil.rmtree(self.path / name, ignore_errors=True)

    def _drop_best_after(self, step: int) -> None:
        """A resumed run redoes the evaluations after ``step``: a best checkpoint from one of
        them goes (the redone evaluations choose again)."""
        best = self.path / BEST_CHECKPOINT
        try:
            if checkpoint.load_info(best)[1].step > step:
                shutil.rmtree(best, ignore_errors=True)
        except Exception:  # no best checkpoint, or an unreadable one: nothing to keep
            shutil.rmtree(best, ignore_errors=True)


def read_train_config(path: Path, *, flag: str) -> TrainConfig:
    """A saved ``train_config.json`` as a TrainConfig (the configuration validates itself).
    ConfigError naming ``path`` and ``flag`` when it is missing, unreadable, not a training
    configuration, or in the flat format dtlab wrote before issue 9 (give the flags instead)."""
    try:
        saved = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise ConfigError(f"{path}: {flag}: file not found (give a run directory or its "
                          f"{TRAIN_CONFIG_FILE})") from None
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: {flag}: cannot read the configuration: {exc}") from None
    if not isinstance(saved, dict) or not isinstance(saved.get("optim"), dict):
        raise ConfigError(f"{path}: {flag}: not a training configuration of this dtlab (one "
                          "before issue 9 kept flat fields): give its flags instead")
    try:
        return from_dict(TrainConfig, saved)
    except (TypeError, ValueError, AttributeError) as exc:
        raise ConfigError(f"{path}: {flag}: not a training configuration: {exc}") from None


def _recorded_groups(saved: dict) -> dict:
    """A saved train_config.json's ``data``, ``model`` and ``optim`` groups and ``steps``: runs
    before issue 9 saved the data and optim fields (and steps) at the top level."""
    if isinstance(saved.get("optim"), dict):
        run = saved.get("run") if isinstance(saved.get("run"), dict) else {}
        return {**saved, "data": saved.get("data"), "steps": run.get("steps")}
    return {"data": saved, "model": saved.get("model"), "optim": saved, "steps": saved.get("steps")}


def _jsonable(value: Any) -> Any:
    return json.loads(json.dumps(value))  # tuples -> lists, as saved


def first_missing(path: Path) -> Path | None:
    """The outermost directory of ``path`` that does not exist yet (what ``mkdir(parents=True)``
    would create first), or None when ``path`` exists."""
    missing = None
    for p in (path, *path.parents):
        if p.exists():
            break
        missing = p
    return missing


def remove_created(out: Path, created: Path | None) -> None:
    """Take back what a failed run created, while it still holds ``out``'s lock: everything in
    ``out`` but the lock file (no other run can be in it), then the lock file, then ``out`` and
    each parent up to ``created`` (the outermost directory it made) while each is empty. A
    directory another run has entered meanwhile stays: ``out`` with a new run's lock file in it,
    a parent holding a sibling run (``--out sweep/a`` beside ``sweep/b``)."""
    if created is None:
        return
    try:
        entries = list(out.iterdir())
    except OSError:
        entries = []
    for entry in entries:
        if entry.name == LOCK_FILE:
            continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry, ignore_errors=True)
        else:
            entry.unlink(missing_ok=True)
    with contextlib.suppress(OSError):
        (out / LOCK_FILE).unlink(missing_ok=True)
    _remove_empty(out, created)


def _remove_empty(out: Path, created: Path | None) -> None:
    """``rmdir`` ``out``, then each parent up to ``created``, stopping at the first that is not
    empty (or not there)."""
    if created is None:
        return
    for directory in (out, *out.parents):
        if directory != created and created not in directory.parents:
            break
        try:
            directory.rmdir()
        except OSError:
            break


def _lock(out: Path, path: Path, created: Path | None, activity: str, advice: str) -> int | None:
    """``hold``'s lock on ``path`` (``out``, absolute): the open, locked lock file's
    descriptor, or None where nothing can be locked. ConfigError when another process holds it
    or removed it meanwhile (the empty directories this call made are removed first)."""
    replaced = (f"{out}: the run directory or its lock file {LOCK_FILE} was removed or replaced "
                "while this process was opening it (another run on it failing?); try again")
    try:
        path.mkdir(parents=True, exist_ok=True)
        return locks.acquire(path / LOCK_FILE, activity)
    except (FileNotFoundError, locks.Replaced):  # FileNotFoundError: a parent removed meanwhile
        problem = replaced
    except locks.Held as held:
        problem = f"{out}: {held.holder()} holds this run directory; {advice}"
    except OSError:  # no permission, a read-only file system, a file in the way
        return None
    _remove_empty(path, created)
    raise ConfigError(problem)


def one_writer(out: str | Path, main: bool = True, *, activity: str = "training",
               advice: str = "let it finish or stop it, or choose another --out"):
    """``RunDirectory(out, main=main).hold(...)``: for a directory that is not a training run's
    (the quickstart's output, a calibrated checkpoint's run)."""
    return RunDirectory(out, main=main).hold(activity=activity, advice=advice)


class NoMetrics:
    """The metrics log of a torchrun rank other than 0: rank 0 writes the run's metrics."""

    path = None

    def write(self, record: dict) -> None:
        pass

    def write_evaluation(self, evaluation: Evaluation) -> None:
        pass

    def close(self) -> None:
        pass
