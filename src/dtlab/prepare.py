"""Preparing a training run: everything that can fail on bad input, checked before any output
is written: the dataset (loaded, diagnosed, observation keys selected, episode lengths against
``model.max_ep_len``), the env it is paired with (its recorded env id, spaces and action bounds)
and what the checkpoint will carry (``policy_info_for``); how the run records its dataset file
(``recorded_absolute``) and, on --resume, that the data is still the checkpoint's
(``check_same_data``). The run directory itself is dtlab.rundir's."""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import warnings
from pathlib import Path
from typing import Any

import numpy as np

from dtlab import checkpoint
from dtlab.checkpoint import PolicyInfo
from dtlab.config import TrainConfig
from dtlab.data.diagnostics import default_return_scale, warn_findings
from dtlab.data.episodes import EpisodeSet
from dtlab.envs import (actions_outside_bounds, check_same_env, describe_space, env_advice,
                        episode_limit, make_env, reference_scores)
from dtlab.errors import ConfigError, DatasetError, DtlabWarning, EnvError
from dtlab.normalizer import Normalizer
from dtlab.spaces import (ContinuousActions, DictObservations, action_space_from_gym,
                          check_against_env)


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


# A run's average should have forgotten its first steps' (near-random) weights: warned when they
# keep more than this share of it at the end (dtlab's choice; decay^(steps-1) = 1% at 0.999
# and 4,604 steps).
AVERAGE_START_SHARE = 0.01


def _warn_short_average(cfg: TrainConfig) -> None:
    """One warning when ``--ema-decay`` is too close to 1 for ``--steps``: the average (what is
    evaluated and saved) gives the first step's weights decay^(steps-1) of its mass at the end."""
    decay, steps = cfg.optim.ema_decay, cfg.run.steps
    share = decay ** max(steps - 1, 0) if decay else 0.0
    if share > AVERAGE_START_SHARE:
        warnings.warn(f"--ema-decay {decay:g} over --steps {steps}: the average that is evaluated "
                      f"and saved still gives {share:.0%} of its weight to the first step's "
                      f"weights at the end; use --ema-decay {1 - 5 / steps:.4g} or lower "
                      "(1 - 5/steps), 0 for no average, or more --steps", DtlabWarning,
                      stacklevel=4)


def _return_scale(cfg: TrainConfig, episodes: EpisodeSet) -> float:
    """The configured return scale, else the env registry's (1000 for MuJoCo locomotion), else
    (an env dtlab knows no scale for) one fitted to the data (``fitted_return_scale``)."""
    if cfg.data.return_scale is not None:
        return float(cfg.data.return_scale)
    return default_return_scale(cfg.data.env, episodes)[0]


def policy_info_for(cfg: TrainConfig, episodes: EpisodeSet, env, return_scale: float
                    ) -> PolicyInfo:
    """Everything derived from data and env that the checkpoint must carry; ``return_scale``:
    ``_return_scale`` of the data as loaded (before --truncate-long-episodes)."""
    # The env's action space: its bounds for continuous actions, all of its n actions for indices.
    actions = action_space_from_gym(env.action_space)
    if isinstance(actions, ContinuousActions) and actions.low is None:
        raise EnvError(f"{cfg.data.env}: action space {describe_space(env.action_space)} is "
                       "unbounded; dtlab's tanh action head needs finite bounds")
    meta = episodes.metadata
    recorded = episodes.provenance
    ref_min, ref_max = reference_scores(cfg.data.env, recorded.ref_min_score, recorded.ref_max_score)
    return PolicyInfo(
        model=cfg.model, observation_space=episodes.observation_space, action_space=actions,
        normalizer=Normalizer.from_episodes(episodes, return_scale, actions),
        env_id=cfg.data.env, ref_min_score=ref_min, ref_max_score=ref_max,
        dataset={"path": str(episodes.source), **episodes.summary(),
                 "fingerprint": episodes.fingerprint(),
                 "metadata": {k: v for k, v in meta.items() if isinstance(v, (str, int, float, bool))}},
    )


# ---- preparing a run ------------------------------------------------------------------------------
def _fit_episode_lengths(cfg: TrainConfig, episodes: EpisodeSet) -> EpisodeSet:
    """``episodes``, cut to ``model.max_ep_len`` steps with --truncate-long-episodes (one warning
    saying what was dropped); DatasetError for a longer episode without it."""
    longest = int(episodes.episode_lengths.max())
    if longest <= cfg.model.max_ep_len:
        return episodes
    if not cfg.data.truncate_long_episodes:
        ep = int(np.argmax(episodes.episode_lengths))
        raise DatasetError(f"{episodes.source}: episode {ep} has {longest} steps, more than "
                           f"model.max_ep_len={cfg.model.max_ep_len}; raise --model.max-ep-len "
                           "or pass --truncate-long-episodes")
    cut = episodes.truncate_episodes(cfg.model.max_ep_len)
    n = int((episodes.episode_lengths > cfg.model.max_ep_len).sum())
    warnings.warn(f"{episodes.source}: --truncate-long-episodes cut {n} of "
                  f"{episodes.num_episodes} episodes to --model.max-ep-len "
                  f"{cfg.model.max_ep_len} steps ({episodes.num_transitions - cut.num_transitions} "
                  f"of {episodes.num_transitions} transitions dropped; best episode return "
                  f"{episodes.return_stats.max:.1f} -> {cut.return_stats.max:.1f})",
                  DtlabWarning, stacklevel=4)
    return cut


def prepare(cfg: TrainConfig, episodes: EpisodeSet | None = None) -> tuple[EpisodeSet, PolicyInfo]:
    """Load and check everything that can fail on bad input, before any output is written."""
    if getattr(cfg.run, "wandb", False) and importlib.util.find_spec("wandb") is None:
        raise ConfigError("--wandb needs the wandb library: pip install 'dtlab[wandb]'")
    if episodes is None:
        from dtlab.data.formats import load_episodes  # (imports h5py and minari)

        episodes = load_episodes(cfg.data.dataset)
    episodes = select_observations(episodes, cfg.data.obs_keys)
    env = make_env(cfg.data.env)
    check_against_env(env, episodes.observation_space, episodes.action_space,
                      what=f"dataset {episodes.source}", exact_n=False,
                      advice=env_advice(episodes.provenance.env_id, cfg.data.env))
    check_same_env(episodes.provenance.env_id, cfg.data.env, what=str(episodes.source),
                   advice=f"pass --env {episodes.provenance.env_id}")
    return_scale = _return_scale(cfg, episodes)
    # Valid-but-suspicious data, one warning line each, once the data is known to be the env's;
    # constant observation dimensions are warned where the Normalizer is built
    # (policy_info_for), which says how it treats them.
    warn_findings(episodes, env_id=cfg.data.env, return_scale=return_scale,
                  skip=("constant_observations",))
    episodes = _fit_episode_lengths(cfg, episodes)
    check_action_bounds(episodes, env, strict=cfg.data.strict)
    if cfg.optim.warmup_steps > cfg.run.steps:
        warnings.warn(f"--warmup-steps {cfg.optim.warmup_steps} > --steps {cfg.run.steps}: the "
                      f"learning rate never reaches lr ({cfg.optim.lr:g}); it ends at "
                      f"{cfg.optim.lr * cfg.run.steps / max(cfg.optim.warmup_steps, 1):.3g}",
                      DtlabWarning, stacklevel=3)
    _warn_short_average(cfg)
    if cfg.evaluation.eval_episodes:  # refuse now what the first evaluation would refuse
        episode_limit(env, cfg.data.env, None, cfg.model.max_ep_len)
    info = policy_info_for(cfg, episodes, env, return_scale)
    env.close()
    if cfg.data.top_fraction is not None:  # Percentile BC; normalization from all data (DT code)
        episodes = episodes.top_fraction(cfg.data.top_fraction)
        info = dataclasses.replace(info, dataset={**info.dataset, "top_fraction": {
            "fraction": cfg.data.top_fraction, "episodes": episodes.num_episodes,
            "transitions": episodes.num_transitions,
            "min_episode_return": float(episodes.episode_returns.min())}})
    return episodes, info


# ---- a run's data, as recorded and as resumed -----------------------------------------------------
def recorded_absolute(cfg: TrainConfig, info: PolicyInfo) -> tuple[TrainConfig, PolicyInfo]:
    """The dataset file as the run records it (train_config.json, the checkpoints): by its
    absolute path, so that --resume and evaluate --offline find it from any directory. Messages
    keep the name the user gave (the data's ``source``)."""
    from dtlab.data.formats import absolute_source

    path = absolute_source(cfg.data.dataset)
    if path == str(cfg.data.dataset):  # already absolute, or not a file (minari:<id>, ...)
        return cfg, info
    return (dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, dataset=path)),
            dataclasses.replace(info, dataset={**info.dataset, "path": path}))


def check_same_data(resume_from: Path, info: PolicyInfo) -> PolicyInfo:
    """A resumed run continues on the data it started on: ConfigError naming what changed when
    the dataset's content fingerprint (or, for checkpoints before fingerprints, its size, return
    statistics and observation statistics) differs from what the checkpoint recorded. Its
    normalization statistics would otherwise be recomputed from other data and written into the
    next checkpoint. Returns ``info`` with the checkpoint's return scale: a default that changed
    since the run started (an env dtlab now fits a scale for) does not change the run's, said in
    one warning."""
    _, saved = checkpoint.load_info(resume_from)
    before = dict(saved.dataset)
    now = dict(info.dataset)
    if before.get("fingerprint"):
        keys: tuple[str, ...] = ("fingerprint",)
    else:
        keys = ("episodes", "transitions", "episode_return", "observation statistics")
        before["observation statistics"], now["observation statistics"] = (
            [list(map(float, n.obs_mean)), list(map(float, n.obs_std))]
            for n in (saved.normalizer, info.normalizer))
    changed = [k for k in keys if before.get(k) != now.get(k)]
    if changed:
        shown = ", ".join(f"{k} {_short(before.get(k))} -> {_short(now.get(k))}" for k in changed)
        raise ConfigError(f"{now.get('path')}: the dataset is not the one the run in "
                          f"{resume_from.parent} trained on ({shown}); --resume continues only on "
                          "the same data: restore the file, or start a new run with another --out")
    kept, fitted = saved.normalizer.return_scale, info.normalizer.return_scale
    if kept != fitted:
        warnings.warn(f"{resume_from.parent}: the run keeps the return scale it started with, "
                      f"{kept:g} (the default for this data is now {fitted:g})", DtlabWarning,
                      stacklevel=3)
        info = dataclasses.replace(info, normalizer=dataclasses.replace(info.normalizer,
                                                                        return_scale=kept))
    return info


def _short(value: Any) -> str:
    text = json.dumps(value) if not isinstance(value, str) else value
    return text if len(text) <= 40 else text[:37] + "..."
