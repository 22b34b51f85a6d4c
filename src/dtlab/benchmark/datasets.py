"""The benchmark's datasets: their directory names, their targets (the env's paper targets,
with a data-fitted one where those lie far beyond the data, or --eval-targets) and the record
(dataset.json) the report reads instead of loading them again."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

import numpy as np

from dtlab.data.records import ReturnStats
from dtlab.data.returns import normalized_score
from dtlab.errors import ConfigError

if TYPE_CHECKING:
    from dtlab.data.episodes import EpisodeSet

RUNS_DIR = "runs"  # OUT/runs/<dataset>/...: dtlab.benchmark.plan's layout
PAPER, DATA_FITTED, GIVEN = "paper", "data-fitted", "--eval-targets"  # where a target came from


@dataclass(frozen=True)
class DatasetEntry:
    """One dataset of the benchmark: its directory name, source, env, the decision transformer's
    targets (``targets[i]`` came from ``target_kinds[i]``: PAPER, DATA_FITTED or GIVEN) and why."""

    name: str
    source: str
    env: str
    targets: tuple[float, ...]
    target_kinds: tuple[str, ...]
    why: str  # one line for the console: the targets and why these
    episodes: EpisodeSet


def dataset_name(source: str) -> str:
    """Directory name of a dataset: a file's name without its suffix (hopper-medium-v5.hdf5 ->
    hopper-medium-v5), a Minari id with '/' as '-' (minari:mujoco/hopper/medium-v0 ->
    mujoco-hopper-medium-v0)."""
    name = source[len("minari:"):].replace("/", "-") if source.startswith("minari:") \
        else Path(source).stem
    return re.sub(r"[^A-Za-z0-9._-]", "_", name) or "dataset"


def data_fitted_target(paper_targets: tuple[float, ...], episode_returns: np.ndarray
                       ) -> float | None:
    """The data's best episode return rounded to 3 significant digits, when a paper target lies
    beyond what the data supports (``ReturnStats.fitted_target``, as ``dtlab.rollout``'s
    default targets); else None."""
    return ReturnStats.of(episode_returns).fitted_target(paper_targets)


def choose_targets(env: str, given: tuple[float, ...], episode_returns: np.ndarray
                   ) -> tuple[tuple[float, ...], tuple[str, ...], str]:
    """(targets, their kinds, the reason in words) of a dataset's decision-transformer cells:
    ``given`` (--eval-targets), else the env's paper targets plus the data-fitted one where they
    lie far beyond the data. ConfigError when neither gives a target."""
    from dtlab.envs import env_info  # (imports gymnasium: not at the CLI's start)

    best = float(np.max(episode_returns))
    if given:
        return (tuple(map(float, given)), (GIVEN,) * len(given),
                f"{_targets_text(given)} (--eval-targets; the data's best return is {best:.4g})")
    info = env_info(env)
    paper, whose = tuple(map(float, info.targets)), f"{info.targets_from} for {env}"
    if not paper:
        raise ConfigError(f"dtlab knows no target returns for {env} (env registry, dtlab/envs.py); "
                          "give them with --eval-targets")
    fitted = data_fitted_target(paper, episode_returns)
    if fitted is None or fitted in paper:
        return (paper, (PAPER,) * len(paper),
                f"{_targets_text(paper)} ({whose}; the data's best return is "
                f"{best:.4g})")
    beyond = max(paper)
    return (paper + (fitted,), (PAPER,) * len(paper) + (DATA_FITTED,),
            f"{_targets_text(paper)} ({whose}) and {fitted:g} (data-fitted: the "
            f"data's best return {best:.4g}, rounded; the paper's {beyond:g} is "
            f"{_times(beyond, best)} beyond the data)")


def _targets_text(targets) -> str:
    return ", ".join(f"{t:g}" for t in targets)


def _times(target: float, best: float) -> str:
    return f"{target / best:.1f}x" if best > 0 else f"{target - best:g}"


def load(sources: Sequence[str], env: str | None, eval_targets: tuple[float, ...]
         ) -> list[DatasetEntry]:
    """Load every dataset (``sources``: --datasets) and pick its env (``env``: --env, else its
    recorded env_id) and targets (``choose_targets``; ``eval_targets``: --eval-targets).
    ConfigError when two datasets share a name, a dataset records no env, or there are no
    targets; EnvError for an unknown env; DatasetError for unreadable data."""
    from dtlab.data.formats import load_episodes
    from dtlab.envs import make_env

    entries: list[DatasetEntry] = []
    seen: dict[str, str] = {}
    for source in sources:
        name = dataset_name(source)
        if name in seen:
            raise ConfigError(f"--datasets: {seen[name]} and {source} would share the directory "
                              f"{RUNS_DIR}/{name}; rename one")
        seen[name] = source
        episodes = load_episodes(source)
        env_id = env or episodes.provenance.env_id
        if not isinstance(env_id, str) or not env_id:
            raise ConfigError(f"{source}: the dataset records no env_id; give --env")
        make_env(env_id).close()  # EnvError for an id Gymnasium does not know
        targets, kinds, why = choose_targets(env_id, eval_targets, episodes.episode_returns)
        entries.append(DatasetEntry(name, source, env_id, targets, kinds, why, episodes))
    return entries


def dataset_record(entry: DatasetEntry) -> dict[str, Any]:
    """dataset.json: what the report needs about a dataset without loading it again."""
    from dtlab.envs import reference_scores

    stats = entry.episodes.return_stats
    recorded = entry.episodes.provenance
    ref_min, ref_max = reference_scores(entry.env, recorded.ref_min_score, recorded.ref_max_score)
    return {
        "name": entry.name, "source": entry.source, "env": entry.env,
        "targets": list(entry.targets), "target_kinds": list(entry.target_kinds),
        "episodes": entry.episodes.num_episodes,
        "transitions": entry.episodes.num_transitions,
        "score": "normalized" if ref_min is not None else "return",
        "ref_min_score": ref_min, "ref_max_score": ref_max,
        "behaviour": {"mean_return": stats.mean, "std_return": stats.std,
                      "best_return": stats.max,
                      "normalized": None if ref_min is None
                      else float(normalized_score(stats.mean, ref_min, ref_max))},
        "episode_returns": entry.episodes.episode_returns.astype(np.float64).tolist(),
    }
