"""Environment registry: reference scores, return scales and evaluation defaults per env.

Reference min/max returns for D4RL normalized scores are D4RL's (``d4rl/infos.py``,
REF_MIN_SCORE / REF_MAX_SCORE, the random and expert policies' returns on the v2 MuJoCo tasks).
dtlab uses the same constants for the Gymnasium v3/v4/v5 versions of those tasks; v5 differs in
minor details from the v2 tasks D4RL measured on, so normalized scores on v5 are comparable but not
identical to published D4RL numbers.
"""

from __future__ import annotations

from dataclasses import dataclass

import gymnasium as gym
import numpy as np

from dtlab.errors import EnvError
from dtlab.spaces import describe_space  # noqa: F401  (its home before dtlab.spaces)


@dataclass(frozen=True)
class EnvInfo:
    """What dtlab knows about an environment family."""

    ref_min_score: float | None  # random-policy return (D4RL normalized score 0)
    ref_max_score: float | None  # expert-policy return (D4RL normalized score 100)
    return_scale: float  # return-to-go divisor (DT paper: 1000 for MuJoCo locomotion)
    targets: tuple[float, ...]  # default evaluation target returns (DT paper's gym configs)
    max_ep_len: int  # time limit of the task


# Targets from the DT paper's gym experiment (experiment.py): hopper 3600/1800,
# halfcheetah 12000/6000, walker2d 5000/2500. Reference scores from D4RL infos.py.
_MUJOCO = {
    "Hopper": EnvInfo(-20.272305, 3234.3, 1000.0, (3600.0, 1800.0), 1000),
    "HalfCheetah": EnvInfo(-280.178953, 12135.0, 1000.0, (12000.0, 6000.0), 1000),
    "Walker2d": EnvInfo(1.629008, 4592.3, 1000.0, (5000.0, 2500.0), 1000),
}

# Pendulum-v1 (the quickstart task): reference min/max are dtlab's own measurements, made with
# `python benchmarks/pendulum_references.py` (gymnasium 1.4.0): mean undiscounted return of 100
# episodes collected by `collect_episodes("Pendulum-v1", policy, num_episodes=100, seed=0)`.
PENDULUM_RANDOM_RETURN = -1240.1  # RandomPolicy (uniform torque); std 298.4 over the 100 episodes
PENDULUM_SCRIPTED_RETURN = -153.1  # PendulumSwingUp(quality=1.0); std 89.9 over the 100 episodes
PENDULUM_REF_MIN = PENDULUM_RANDOM_RETURN
PENDULUM_REF_MAX = PENDULUM_SCRIPTED_RETURN


# CartPole-v1 (discrete actions): min is dtlab's measurement, the mean return of 100 episodes of
# `collect_episodes("CartPole-v1", RandomPolicy(Discrete(2)), num_episodes=100, seed=0)` (std 15.5,
# gymnasium 1.4.0); max is the most the task pays: +1 per step up to its 500-step time limit.
CARTPOLE_RANDOM_RETURN = 23.93
CARTPOLE_MAX_RETURN = 500.0


def env_info(env_id: str) -> EnvInfo:
    """Registry entry for a Gymnasium id like ``Hopper-v5``; generic defaults for unknown tasks."""
    family = env_id.split("/")[-1].split("-")[0]
    if family in _MUJOCO:
        return _MUJOCO[family]
    if family == "Pendulum":
        return EnvInfo(PENDULUM_REF_MIN, PENDULUM_REF_MAX, 100.0, (-150.0, -500.0, -900.0), 200)
    if family == "CartPole":
        return EnvInfo(CARTPOLE_RANDOM_RETURN, CARTPOLE_MAX_RETURN, 100.0, (500.0, 250.0), 500)
    return EnvInfo(None, None, 1000.0, (), 1000)


def reference_scores(env_id: str, recorded_min: float | None = None,
                     recorded_max: float | None = None) -> tuple[float | None, float | None]:
    """The (min, max) returns that define normalized scores for ``env_id``: the registry's
    (D4RL's constants, dtlab's measured Pendulum/CartPole references) when it has them, else the
    ones recorded with a dataset or checkpoint (dtlab's presets, Minari's metadata), else None.
    The one place this precedence is decided."""
    info = env_info(env_id)
    if info.ref_min_score is not None:
        return info.ref_min_score, info.ref_max_score
    if recorded_min is None or recorded_max is None:
        return None, None
    return float(recorded_min), float(recorded_max)


def make_env(env_id: str, **kwargs) -> gym.Env:
    """``gymnasium.make`` with a one-line EnvError for ids Gymnasium does not know."""
    try:
        return gym.make(env_id, **kwargs)
    except gym.error.Error as exc:
        raise EnvError(f"unknown environment '{env_id}': {exc}") from None
    except ImportError as exc:
        raise EnvError(f"environment '{env_id}' needs a missing package: {exc}") from None


def actions_outside_bounds(actions: np.ndarray, space: gym.spaces.Space) -> np.ndarray:
    """(N,) bool: actions the space does not hold. Box: rows of ``actions`` (N, act_dim) outside
    it, with a relative tolerance of 1e-5 of the range (float32 round-off in stored data is not a
    violation). Discrete: indices (N,) outside [start, start + n)."""
    if isinstance(space, gym.spaces.Discrete):
        return (actions < space.start) | (actions >= space.start + space.n)
    tol = 1e-5 * np.maximum(1.0, space.high - space.low)
    return np.any((actions < space.low - tol) | (actions > space.high + tol), axis=1)
