"""D4RL-style preset datasets: names, the manifest of committed behaviour policies, and recipes.

A preset is ``<hopper|halfcheetah|walker2d>-<variant>-v5``. ``preset_dataset`` regenerates it
deterministically from the behaviour policies committed under ``src/dtlab/presets/<env>/``: the
medium and expert SAC actors (safetensors) and ``manifest.json`` (``PresetManifest``, read and
written only in this module), which ``export_presets`` writes from a ``dtlab train-behaviour`` run.
"""

from __future__ import annotations

import dataclasses
import json
import math
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from dtlab.atomic import dumps_json, write_text_atomic
from dtlab.behaviour.policies import ActorPolicy, BehaviourPolicy, RandomPolicy
from dtlab.behaviour.sac import export_actor, pick_snapshots, read_run_manifest, replay_until_medium
from dtlab.collect import collect_episodes, collect_sharded, collection_counts
from dtlab.data.episodes import EpisodeSet
from dtlab.errors import ConfigError, DtlabWarning

PRESET_DIR = Path(__file__).parent / "presets"
MANIFEST = "manifest.json"
# Gymnasium ids of the D4RL MuJoCo families, by D4RL's lowercase dataset prefix.
_FAMILIES = {"hopper": "Hopper", "halfcheetah": "HalfCheetah", "walker2d": "Walker2d"}
VARIANTS = ("random", "medium", "expert", "medium-expert", "medium-replay")
# Presets whose regeneration needs more than the committed policies, committed as datasets
# instead (docs/datasets.md): path in the repository.
COMMITTED_FILES = {name: f"datasets/{name}.hdf5" for name in (
    "hopper-medium-replay-v5", "halfcheetah-medium-replay-v5", "walker2d-medium-replay-v5")}
# D4RL's dataset sizes: 1M transitions for random, medium and expert; medium-expert concatenates
# medium and expert (2M); medium-replay is the replay buffer up to the medium snapshot.
PRESET_TRANSITIONS = 1_000_000
# Presets are collected in this many shards, one process each (at most this many run at once), so
# the dataset is the same on every machine whatever its core count.
PRESET_SHARDS = 2


def parse_preset(name: str) -> tuple[str, str]:
    """``hopper-medium-v5`` -> (``Hopper-v5``, ``medium``); ConfigError for other names."""
    parts = name.split("-")
    if len(parts) < 3 or parts[0] not in _FAMILIES or not parts[-1].startswith("v"):
        raise ConfigError(f"unknown preset '{name}': expected <{'|'.join(_FAMILIES)}>-<"
                          f"{'|'.join(VARIANTS)}>-v5, e.g. hopper-medium-v5")
    variant = "-".join(parts[1:-1])
    if variant not in VARIANTS:
        raise ConfigError(f"unknown preset variant '{variant}' in '{name}' (one of {', '.join(VARIANTS)})")
    return f"{_FAMILIES[parts[0]]}-{parts[-1]}", variant


# ---- the manifest ------------------------------------------------------------------------------


@dataclass(frozen=True)
class ReturnStats:
    """Undiscounted episode returns of a policy, measured with ``collect_episodes``."""

    mean: float
    std: float
    episodes: int


@dataclass(frozen=True)
class PresetActor:
    """A committed SAC actor (medium or expert) and its measured returns."""

    file: str  # actor file name, next to the manifest
    step: int  # environment steps of the SAC run at this snapshot
    training_eval_return: float  # the run's deterministic evaluation at this snapshot
    return_stochastic: ReturnStats  # sampled actions, as the presets collect
    return_deterministic: ReturnStats  # tanh(mean) actions


@dataclass(frozen=True)
class PresetManifest:
    """``src/dtlab/presets/<env>/manifest.json``: JSON with these keys in this order, except
    ``random``, written as ``{"random": {"return_stochastic": {...}}}``.

    ``ref_min_score`` / ``ref_max_score`` are the presets' own reference scores (the random and
    the expert policy's mean stochastic return), recorded in each preset's metadata.
    """

    env_id: str
    algorithm: str  # of the behaviour run
    training_seed: int
    measured_over_episodes: int
    measurement_seed: int
    run_steps: int  # last snapshot of the behaviour run
    snapshot_every: int | None  # steps between the run's snapshots (None with a single one)
    expert: PresetActor
    medium: PresetActor
    random: ReturnStats  # the uniform random policy
    ref_min_score: float
    ref_max_score: float

    def to_json(self) -> str:
        fields = dataclasses.asdict(self)
        fields["random"] = {"return_stochastic": fields["random"]}
        return dumps_json(fields)


def preset_manifest_path(env_id: str) -> Path:
    return PRESET_DIR / env_id.lower() / MANIFEST


def _returns(raw: Any) -> ReturnStats:
    return ReturnStats(float(raw["mean"]), float(raw["std"]), int(raw["episodes"]))


def _actor(raw: Any) -> PresetActor:
    return PresetActor(str(raw["file"]), int(raw["step"]), float(raw["training_eval_return"]),
                       _returns(raw["return_stochastic"]), _returns(raw["return_deterministic"]))


# How each manifest key is read; a failure names the key.
_READERS = {
    "env_id": str, "algorithm": str, "training_seed": int, "measured_over_episodes": int,
    "measurement_seed": int, "run_steps": int,
    "snapshot_every": lambda raw: None if raw is None else int(raw),
    "expert": _actor, "medium": _actor, "random": lambda raw: _returns(raw["return_stochastic"]),
    "ref_min_score": float, "ref_max_score": float,
}


def read_preset_manifest(env_id: str) -> PresetManifest:
    """The committed manifest of ``env_id``'s behaviour policies.

    ConfigError naming the file when it is missing, unreadable, or lacks a valid entry.
    """
    path = preset_manifest_path(env_id)
    if not path.exists():
        raise ConfigError(f"no committed behaviour policies for {env_id} ({path} is missing); train "
                          f"them with 'dtlab train-behaviour --env {env_id}'")
    try:
        raw = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ConfigError(f"{path}: cannot read the preset manifest: {exc}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: the preset manifest is not a JSON object")
    fields = {}
    for key, read in _READERS.items():
        try:
            fields[key] = read(raw[key])
        except (KeyError, TypeError, ValueError) as exc:
            raise ConfigError(f"{path}: no valid '{key}' entry ({type(exc).__name__}: {exc})") from None
    return PresetManifest(**fields)


def write_preset_manifest(dest: str | Path, manifest: PresetManifest) -> Path:
    """Write ``manifest`` as ``dest/manifest.json``, atomically."""
    path = Path(dest) / MANIFEST
    write_text_atomic(path, manifest.to_json())
    return path


# ---- export from a behaviour run ---------------------------------------------------------------


def _measure(env_id: str, policy: BehaviourPolicy, episodes: int, seed: int) -> ReturnStats:
    data = collect_episodes(env_id, policy, num_episodes=episodes, seed=seed)
    ret = data.episode_returns.astype(np.float64)  # (E,)
    return ReturnStats(float(ret.mean()), float(ret.std()), int(ret.size))


def export_presets(run_dir: str | Path, dest: str | Path, *, env_id: str, episodes: int = 20,
                   seed: int = 0) -> PresetManifest:
    """Export the medium and expert actors of a ``train_behaviour`` run to ``dest`` with a manifest
    of their measured returns over ``episodes`` episodes (stochastic, as used for collection, and
    deterministic) and the reference scores of the presets: min = random policy's mean return,
    max = expert's. ConfigError when the run has no snapshots."""
    run_dir, dest = Path(run_dir), Path(dest)
    run = read_run_manifest(run_dir)
    if run is None or not run.snapshots:
        raise ConfigError(f"{run_dir}: no behaviour snapshots to export")
    chosen = pick_snapshots(run)
    by_step = {s.step: s for s in run.snapshots}
    actors = {}
    for variant, step in chosen.items():
        path = export_actor(run_dir / "snapshots" / f"step_{step:08d}.zip",
                            dest / f"{variant}.safetensors", env_id=env_id,
                            extra={"step": step, "variant": variant})
        actors[variant] = PresetActor(
            path.name, step, by_step[step].return_mean,
            _measure(env_id, ActorPolicy(str(path)), episodes, seed),
            _measure(env_id, ActorPolicy(str(path), deterministic=True), episodes, seed))
    random = _measure(env_id, RandomPolicy.for_env(env_id), episodes, seed)
    steps = [s.step for s in run.snapshots]
    manifest = PresetManifest(
        env_id=env_id, algorithm=run.algorithm, training_seed=run.seed,
        measured_over_episodes=episodes, measurement_seed=seed, run_steps=steps[-1],
        snapshot_every=steps[1] - steps[0] if len(steps) > 1 else None,
        expert=actors["expert"], medium=actors["medium"], random=random,
        ref_min_score=random.mean, ref_max_score=actors["expert"].return_stochastic.mean)
    write_preset_manifest(dest, manifest)
    return manifest


# ---- recipes -----------------------------------------------------------------------------------


def preset_dataset(name: str, *, seed: int = 0, num_transitions: int = PRESET_TRANSITIONS,
                   behaviour_run: str | None = None, trust: bool = False,
                   medium_step: int | None = None) -> EpisodeSet:
    """Regenerate a D4RL-style preset dataset deterministically (stochastic actions, as D4RL).

    medium-replay reads the replay buffer of ``behaviour_run``, a pickle: only with ``trust=True``,
    up to its snapshot at ``medium_step`` (None: the preset's step for the preset's own run, else
    D4RL's rule on the run's snapshots). ConfigError for an unknown name, a missing or invalid
    manifest, a missing behaviour run, or ``medium_step`` with another variant or not one of the
    run's snapshot steps.
    """
    env_id, variant = parse_preset(name)
    if medium_step is not None and variant != "medium-replay":
        raise ConfigError(f"medium_step is for a medium-replay preset, not {name}")
    base = {"dataset": name, "variant": variant}
    if variant == "random":
        data = collect_sharded(env_id, RandomPolicy.for_env(env_id), shards=PRESET_SHARDS,
                               num_transitions=num_transitions, seed=seed, metadata=base)
    elif variant in ("medium", "expert"):
        actor = getattr(read_preset_manifest(env_id), variant)
        path = preset_manifest_path(env_id).parent / actor.file
        data = collect_sharded(env_id, ActorPolicy(str(path)), num_transitions=num_transitions,
                               shards=PRESET_SHARDS, seed=seed,
                               metadata={**base, "policy_training_steps": actor.step})
    elif variant == "medium-expert":
        family = name.split("-")[0]
        version = name.split("-")[-1]
        parts = [preset_dataset(f"{family}-{v}-{version}", seed=seed + i, num_transitions=num_transitions)
                 for i, v in enumerate(("medium", "expert"))]
        per_part = ("policies", "policy_training_steps", "seed", "shard_seeds", "dataset", "variant",
                    "num_episodes", "num_transitions", "episode_return")
        data = EpisodeSet.concatenate(parts, source=f"<preset {name}>", metadata={
            **{k: v for k, v in parts[0].metadata.items() if k not in per_part},
            **base, "seed": int(seed),
            "parts": [{k: p.metadata.get(k) for k in per_part} for p in parts]})
        data = data.with_metadata(collection_counts(data))
    else:  # medium-replay
        if behaviour_run is None:
            committed = (f" ({name} itself is committed in dtlab's repository as "
                         f"{COMMITTED_FILES[name]})" if name in COMMITTED_FILES else "")
            raise ConfigError(f"{name} is built from the behaviour agent's replay buffer, which is not "
                              "in git: pass --behaviour-run DIR (made by dtlab train-behaviour) and "
                              f"--trust-pickle (the buffer is a pickle){committed}")
        if medium_step is None:
            medium_step = _preset_medium_step(env_id, behaviour_run)
        data = replay_until_medium(behaviour_run, env_id, trust=trust,
                                   medium_step=medium_step).with_metadata(base)
    return _record_reference(data, env_id)


def _preset_medium_step(env_id: str, behaviour_run: str) -> int | None:
    """The committed preset's medium snapshot step when ``behaviour_run`` is the run the preset
    came from (its evaluation at that step equals the manifest's ``training_eval_return``: SAC
    reruns with the preset's seed are deterministic on one machine), so that a rerun stopped at
    that step reproduces the preset. Otherwise None, the run's own snapshots decide (D4RL's
    rule), with a warning that its medium-replay is its own, not the preset's; None without a
    preset manifest."""
    if not preset_manifest_path(env_id).exists():
        return None
    medium = read_preset_manifest(env_id).medium
    run = read_run_manifest(behaviour_run)
    at_step = [s for s in (run.snapshots if run else []) if s.step == medium.step]
    if at_step and math.isclose(at_step[0].return_mean, medium.training_eval_return,
                                rel_tol=1e-9, abs_tol=1e-6):
        return medium.step
    got = f"{at_step[0].return_mean:.2f}" if at_step else "no evaluation"
    warnings.warn(f"{behaviour_run}: at the preset's medium step {medium.step} this run has {got}, "
                  f"the preset's run {medium.training_eval_return:.2f}: another run, so its "
                  "medium snapshot is picked from its own evaluations (D4RL's rule) and its "
                  "medium-replay is not the preset's", DtlabWarning, stacklevel=3)
    return None


def _record_reference(data: EpisodeSet, env_id: str) -> EpisodeSet:
    """Reference scores of dtlab's own presets (random and expert policy returns), when the env has
    a manifest: ``dtlab_ref_min_score`` / ``dtlab_ref_max_score`` in the metadata."""
    if not preset_manifest_path(env_id).exists():
        return data
    manifest = read_preset_manifest(env_id)
    found = {"dtlab_ref_min_score": manifest.ref_min_score,
             "dtlab_ref_max_score": manifest.ref_max_score}
    return data.with_metadata({k: v for k, v in found.items() if k not in data.metadata})
