"""Preparing a training run: everything that can fail on bad input, checked before any output
is written: the dataset (loaded, diagnosed, observation keys selected, episode lengths against
``model.max_ep_len``), the env's spaces and action bounds, what the checkpoint will carry
(``policy_info_for``), whether a run directory may be started or resumed, and the files a run
writes before its first checkpoint (``RunFiles``, which takes them back when the run fails)."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import shutil
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from dtlab import checkpoint, locks
from dtlab.atomic import dumps_json, write_text_atomic
from dtlab.checkpoint import PolicyInfo
from dtlab.config import TrainConfig, setting_differences
from dtlab.data.diagnostics import warn_findings
from dtlab.data.episodes import EpisodeSet
from dtlab.envs import actions_outside_bounds, describe_space, env_info, make_env, reference_scores
from dtlab.errors import ConfigError, DatasetError, DtlabWarning, EnvError
from dtlab.metrics import METRICS_FILE, MetricsLog
from dtlab.normalizer import Normalizer
from dtlab.rollout import episode_limit
from dtlab.spaces import (ContinuousActions, DictObservations, action_space_from_gym, check_against_env)

TRAIN_CONFIG_FILE = "train_config.json"


def select_observations(episodes: EpisodeSet, obs_keys: tuple[str, ...]) -> EpisodeSet:
    """Dict observations: the ``obs_keys`` columns, in that order (``select_observation_keys``).
    ConfigError naming the dataset when a Dict dataset comes without ``obs_keys`` (listing its
    keys), when a key is not there, or when ``obs_keys`` is given for other observations."""
    spec = episodes.observation_space
    if isinstance(spec, DictObservations) and not obs_keys:
        raise ConfigError(f"obs_keys: {episodes.source} has Dict observations; choose the keys "
                          f"to train on with obs_keys (available keys: {', '.join(spec.keys)})")
    return episodes.select_observation_keys(obs_keys) if obs_keys else episodes


def check_action_bounds(episodes: EpisodeSet, env, *, strict: bool) -> None:
    """Warn (or, strict, fail) when dataset actions lie outside the env's action bounds. (Action
    indices outside the space are caught by check_against_env: they cannot be clipped.)"""
    if not isinstance(episodes.action_space, ContinuousActions):
        return
    outside = actions_outside_bounds(episodes.actions, env.action_space)  # (N,)
    if outside.any():
        first = int(np.argmax(outside))
        msg = (f"{episodes.source}: {int(outside.sum())} of {episodes.num_transitions} actions lie "
               f"outside the action bounds of {env.spec.id if env.spec else 'the env'} (first at "
               f"transition {first}: {episodes.actions[first].tolist()})")
        if strict:
            raise DatasetError(msg)
        warnings.warn(msg + "; they are clipped for training", DtlabWarning, stacklevel=3)


def _return_scale(cfg: TrainConfig) -> float:
    """The configured return scale, else the env registry's (1000 for MuJoCo locomotion)."""
    scale = cfg.data.return_scale
    return float(scale if scale is not None else env_info(cfg.data.env).return_scale)


def policy_info_for(cfg: TrainConfig, episodes: EpisodeSet, env) -> PolicyInfo:
    """Everything derived from data and env that the checkpoint must carry."""
    # The env's action space: its bounds for continuous actions, all of its n actions for indices.
    actions = action_space_from_gym(env.action_space)
    if isinstance(actions, ContinuousActions) and actions.low is None:
        raise EnvError(f"{cfg.data.env}: action space {describe_space(env.action_space)} is "
                       "unbounded; dtlab's tanh action head needs finite bounds")
    meta = episodes.metadata
    recorded = episodes.provenance
    ref_min, ref_max = reference_scores(cfg.data.env, recorded.ref_min_score, recorded.ref_max_score)
    return_scale = _return_scale(cfg)
    return PolicyInfo(
        model=cfg.model, observation_space=episodes.observation_space, action_space=actions,
        normalizer=Normalizer.from_episodes(episodes, return_scale, actions),
        env_id=cfg.data.env, ref_min_score=ref_min, ref_max_score=ref_max,
        dataset={"path": str(episodes.source), **episodes.summary(),
                 "metadata": {k: v for k, v in meta.items() if isinstance(v, (str, int, float, bool))}},
    )


# ---- preparing a run ------------------------------------------------------------------------------
def prepare(cfg: TrainConfig, episodes: EpisodeSet | None = None) -> tuple[EpisodeSet, PolicyInfo]:
    """Load and check everything that can fail on bad input, before any output is written."""
    if cfg.evaluation.eval_episodes and not (cfg.evaluation.eval_targets
                                             or env_info(cfg.data.env).targets):
        raise ConfigError(f"evaluation.eval_episodes given but no eval_targets, and dtlab knows no "
                          f"default targets for {cfg.data.env}")
    if episodes is None:
        from dtlab.data.formats import load_episodes  # (imports h5py and minari)

        episodes = load_episodes(cfg.data.dataset)
    episodes = select_observations(episodes, cfg.data.obs_keys)
    return_scale = _return_scale(cfg)
    # Valid-but-suspicious data, one warning line each; constant observation dimensions are
    # warned where the Normalizer is built (policy_info_for), which says how it treats them.
    warn_findings(episodes, env_id=cfg.data.env, return_scale=return_scale,
                  skip=("constant_observations",))
    longest = int(episodes.episode_lengths.max())
    if longest > cfg.model.max_ep_len:
        if cfg.data.truncate_long_episodes:
            episodes = episodes.truncate_episodes(cfg.model.max_ep_len)
        else:
            ep = int(np.argmax(episodes.episode_lengths))
            raise DatasetError(f"{episodes.source}: episode {ep} has {longest} steps, more than "
                               f"model.max_ep_len={cfg.model.max_ep_len}; raise model.max_ep_len "
                               "or set truncate_long_episodes")
    env = make_env(cfg.data.env)
    check_against_env(env, episodes.observation_space, episodes.action_space,
                      what=f"dataset {episodes.source}", exact_n=False)
    check_action_bounds(episodes, env, strict=cfg.data.strict)
    if cfg.optim.warmup_steps >= cfg.run.steps:
        warnings.warn(f"warmup_steps ({cfg.optim.warmup_steps}) >= steps ({cfg.run.steps}): the "
                      f"learning rate never reaches lr ({cfg.optim.lr:g}); it ends at "
                      f"{cfg.optim.lr * cfg.run.steps / max(cfg.optim.warmup_steps, 1):.3g}",
                      DtlabWarning, stacklevel=3)
    if cfg.evaluation.eval_episodes:  # refuse now what the first evaluation would refuse
        episode_limit(env, cfg.data.env, None, cfg.model.max_ep_len)
    info = policy_info_for(cfg, episodes, env)
    env.close()
    if cfg.data.top_fraction is not None:  # Percentile BC; normalization from all data (DT code)
        episodes = episodes.top_fraction(cfg.data.top_fraction)
        info = dataclasses.replace(info, dataset={**info.dataset, "top_fraction": {
            "fraction": cfg.data.top_fraction, "episodes": episodes.num_episodes,
            "transitions": episodes.num_transitions,
            "min_episode_return": float(episodes.episode_returns.min())}})
    return episodes, info


def check_resume_config(out: Path, cfg: TrainConfig) -> None:
    """Refuse to resume with settings that change the sequence of updates
    (``TrainConfig.resume_groups``: data, model, optim, and steps for a cosine schedule)."""
    path = out / TRAIN_CONFIG_FILE
    try:
        saved = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ConfigError(f"{path}: cannot read the run's configuration to resume: {exc}") from None
    if not isinstance(saved, dict):
        raise ConfigError(f"{path}: cannot read the run's configuration to resume: not an object")
    groups = cfg.resume_groups()
    if isinstance(saved.get("optim"), dict):
        run = saved.get("run") if isinstance(saved.get("run"), dict) else {}
        recorded = {**saved, "steps": run.get("steps")}
    else:  # runs before issue 9 saved the data and optim fields (and steps) at the top level
        recorded = {"data": saved, "model": saved.get("model"), "optim": saved,
                    "steps": saved.get("steps")}
    saved_optim = recorded["optim"] if isinstance(recorded["optim"], dict) else {}
    if groups["optim"].precision == "auto" and saved_optim.get("precision") in ("fp32", "bf16"):
        # auto resumes at the precision the run resolved it to (train() does the same).
        groups["optim"] = dataclasses.replace(groups["optim"], precision=saved_optim["precision"])
    # A field added since the run was saved (e.g. model.architecture) had its default.
    defaults = {name: {f.name: f.default for f in dataclasses.fields(group)
                       if f.default is not dataclasses.MISSING}
                for name, group in groups.items() if dataclasses.is_dataclass(group)}
    now = {k: dataclasses.asdict(v) if dataclasses.is_dataclass(v) else v for k, v in groups.items()}
    differ = setting_differences(recorded, _jsonable(now), defaults=_jsonable(defaults),
                                 exempt=TrainConfig.RESUME_MAY_CHANGE)
    if differ:
        shown = ", ".join(f"{k}: {a!r} -> {b!r}" for k, a, b in differ)
        raise ConfigError(f"{path}: resume with different settings than the run ({shown}); "
                          "resume with the same settings, or start a new run")


def _jsonable(value: Any) -> Any:
    return json.loads(json.dumps(value))  # tuples -> lists, as saved


def resume_point(out: Path, cfg: TrainConfig) -> Path | None:
    """The checkpoint a run continues from, or None to start at step 0.

    Without ``resume`` the run directory must not hold a checkpoint. With it: a directory with a
    checkpoint resumes from it; one with this run's settings but no checkpoint yet (a job killed
    before its first save) starts from step 0 with a one-line note; anything else is an error.
    """
    if out.exists() and not out.is_dir():
        raise ConfigError(f"{out}: is a file; out must be a run directory")
    parent = next((p for p in out.parents if p.exists()), None)
    if parent is not None and not parent.is_dir():
        raise ConfigError(f"{out}: {parent} is a file; out must be a run directory")
    has_checkpoint = (out / checkpoint.LATEST_FILE).is_file()
    if not cfg.run.resume:
        if (out / checkpoint.LATEST_FILE).exists():
            raise ConfigError(f"{out}: run directory already holds a run; set resume to continue it, or "
                              "choose another out")
        return None
    if has_checkpoint:
        check_resume_config(out, cfg)
        return checkpoint.resolve(out)
    if (out / TRAIN_CONFIG_FILE).is_file():
        check_resume_config(out, cfg)
        warnings.warn(f"{out}: resume found the run's settings but no checkpoint yet; starting "
                      "from step 0", DtlabWarning, stacklevel=3)
        return None
    raise ConfigError(f"{out}: resume is set but the run directory has no checkpoint")


def first_missing(path: Path) -> Path | None:
    """The outermost directory of ``path`` that does not exist yet (what ``mkdir(parents=True)``
    would create first), or None when ``path`` exists."""
    missing = None
    for p in (path, *path.parents):
        if p.exists():
            break
        missing = p
    return missing


LOCK_FILE = ".lock"  # in a run directory: held (flock) by the process training the run


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


@contextlib.contextmanager
def one_writer(out: Path, main: bool = True, *, activity: str = "training",
               advice: str = "let it finish or stop it, or choose another out"
               ) -> Iterator[Path | None]:
    """Hold the run directory ``out`` for this process while the block runs: one process writes
    a directory at a time (``dtlab train`` started twice on one ``--out``, or a requeued job
    beside a live one, would interleave checkpoints; a calibration beside a live run would write
    into a checkpoint that the run's pruning removes). ``out`` is created if missing, and its
    ``LOCK_FILE`` is locked (``dtlab.locks.acquire``, recording this process's pid and
    ``activity``). A refused process's ConfigError names the holder's pid and activity and ends
    with ``advice``.

    Yields the outermost directory this call created (None when ``out`` existed); when the block
    raises before the run has a checkpoint, the directories it created are removed again
    (``remove_created``), or in an ``out`` that existed, the lock file if this call made it
    (``RunFiles`` takes back the run's own files). ConfigError when another process holds
    ``out``, or removed or replaced it meanwhile; only the empty directories this call made are
    removed then. Not locked, and otherwise the same: torchrun ranks other than 0 (``main``
    False), a directory or lock file that cannot be created for want of permission (the
    writers then say why) or because a file is in the way (``resume_point`` says so), a file
    system that cannot lock, and platforms without ``fcntl`` (Windows).
    """
    path = Path(os.path.abspath(out))  # "new/../run": the directories really made
    created = first_missing(path)
    if not main:
        yield created
        return
    lock_path = path / LOCK_FILE
    lock_existed = lock_path.exists()
    fd = _lock(out, path, created, activity, advice)
    try:
        yield created
    except BaseException:
        if not (path / checkpoint.LATEST_FILE).exists():
            if created is not None:
                remove_created(path, created)
            elif not lock_existed:
                with contextlib.suppress(OSError):  # e.g. ``out`` is a file: no lock file
                    lock_path.unlink(missing_ok=True)
        raise
    finally:
        locks.release(fd)


def _lock(out: Path, path: Path, created: Path | None, activity: str, advice: str) -> int | None:
    """``one_writer``'s lock on ``path`` (``out``, absolute): the open, locked lock file's
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


@dataclass
class RunFiles:
    """What a run writes before its first checkpoint, so that a failure can take it back."""

    out: Path
    metrics: MetricsLog | None = None
    existed: frozenset = frozenset()  # the run files that were there before (a resumed run's)
    main: bool = True  # False: a torchrun rank other than 0, which writes none of these

    def __post_init__(self) -> None:
        self.existed = frozenset(name for name in (TRAIN_CONFIG_FILE, METRICS_FILE, "tb")
                                 if (self.out / name).exists())

    def start(self, cfg: TrainConfig, resume_from: int | None) -> None:
        if not self.main:
            self.metrics = NoMetrics()
            return
        self.out.mkdir(parents=True, exist_ok=True)
        write_text_atomic(self.out / TRAIN_CONFIG_FILE, dumps_json(dataclasses.asdict(cfg)))
        self.metrics = MetricsLog(self.out, resume_from=resume_from,
                                  tensorboard=cfg.run.tensorboard)

    def discard_if_no_checkpoint(self) -> None:
        if self.metrics is not None:
            self.metrics.close()
        if not self.main or (self.out / checkpoint.LATEST_FILE).exists():
            return
        # Only the run's own files: the directories it created are one_writer's to remove.
        for name in {TRAIN_CONFIG_FILE, METRICS_FILE} - self.existed:
            (self.out / name).unlink(missing_ok=True)
        if "tb" not in self.existed:
            shutil.rmtree(self.out / "tb", ignore_errors=True)


class NoMetrics:
    """The metrics log of a torchrun rank other than 0: rank 0 writes the run's metrics."""

    path = None

    def write(self, record: dict) -> None:
        pass

    def close(self) -> None:
        pass
