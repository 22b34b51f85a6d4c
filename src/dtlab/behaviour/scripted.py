"""Scripted behaviour for Gymnasium ``Pendulum-v1``: a swing-up controller with a quality knob, and
the mixed-quality dataset ``dtlab quickstart`` trains on; and a goal-seeking controller for
gymnasium-robotics' PointMaze envs (Dict observations).

The measured numbers quoted here are reproduced by ``python benchmarks/pendulum_references.py``.
"""

from __future__ import annotations

import functools
import math

import gymnasium
import numpy as np

from dtlab.collect import collect_episodes, derived_stream
from dtlab.data.episodes import EpisodeSet
from dtlab.errors import ConfigError, EnvError

# Pendulum-v1 constants, from gymnasium/envs/classic_control/pendulum.py (gymnasium 1.4):
# g = 10, m = l = 1, dt = 0.05, max_torque = 2, max_speed = 8. Its dynamics (semi-implicit Euler):
#   thdot' = clip(thdot + (3g/(2l) sin(th) + 3/(m l^2) u) dt, -8, 8),   th' = th + thdot' dt,
# with th = 0 upright, and reward -(th^2 + 0.1 thdot^2 + 0.001 u^2).
_GRAVITY_GAIN = 3 * 10.0 / (2 * 1.0)  # 3g/(2l) = 15: angular acceleration per unit sin(th)
_TORQUE_GAIN = 3.0 / (1.0 * 1.0**2)  # 3/(m l^2) = 3: angular acceleration per unit torque
_DT = 0.05
_MAX_TORQUE = 2.0

# Controller tuning, chosen by a grid search on a vectorized numpy copy of the dynamics above over
# 2,000 random starts (mean return -146.6; the greedy policy of a finite-horizon dynamic program on
# a 256 x 257 (th, thdot) grid with 41 torques reached -139.6 on the same starts, so the heuristic
# is within ~1% of the random-to-optimal range from the optimum).
_CATCH_COS = 0.7  # hand over to the stabilizer when cos(th) > 0.7 (|th| < 45.6 deg)
_ENERGY_GAIN = 1.0  # pumping torque per unit of missing energy (saturates almost at once)
_LOOKAHEAD_STEPS = 2.0  # pump in the direction the pendulum will move 2 steps ahead

# Key of the per-episode quality draws in derived_stream(seed, key); collect_episodes uses key 1
# for the policies' generator.
_MIXTURE_STREAM = 2


@functools.cache
def _pendulum_lqr_gain() -> tuple[float, float]:
    """LQR gain K (u = -K [th, thdot]) of Pendulum-v1's dynamics linearized at the top.

    Linearizing sin(th) ~ th in the semi-implicit Euler step gives x' = A x + B u with
    A = [[1 + 15 dt^2, dt], [15 dt, 1]], B = [[3 dt^2], [3 dt]]; the cost weights are the env's
    reward weights Q = diag(1, 0.1), R = 0.001. The Riccati equation is iterated to convergence
    (K ~ [19.7, 5.26]; the torque then saturates far from the top, which the clip handles).
    """
    a = np.array([[1 + _GRAVITY_GAIN * _DT**2, _DT], [_GRAVITY_GAIN * _DT, 1.0]])  # (2, 2)
    b = np.array([[_TORQUE_GAIN * _DT**2], [_TORQUE_GAIN * _DT]])  # (2, 1)
    q, r = np.diag([1.0, 0.1]), np.array([[0.001]])
    p = q.copy()
    for _ in range(1000):
        k = np.linalg.solve(r + b.T @ p @ b, b.T @ p @ a)  # (1, 2)
        p = q + a.T @ p @ (a - b @ k)
    return float(k[0, 0]), float(k[0, 1])


class PendulumSwingUp:
    """Scripted swing-up and balance controller for Gymnasium ``Pendulum-v1``, with a quality knob.

    Far from the top it pumps energy: with E = thdot^2 / 2 + 15 cos(th) (conserved without torque,
    E = 15 at rest upright), dE/dt = 3 u thdot, so it applies torque along the motion until E
    reaches 15. The motion direction is judged two steps ahead (gravity included), which starts
    a pendulum resting near the bottom swinging the way gravity already pulls it. Within 45.6 deg of
    the top an LQR stabilizer takes over.

    ``quality`` in [0, 1] degrades it smoothly: with d = sqrt(1 - quality), each step takes a
    uniform random torque with probability d, and otherwise the controller's torque plus Gaussian
    noise of std 0.5 d (our choice), clipped to [-2, 2]. quality=0 is the random policy, quality=1
    the noiseless controller. The square root makes the mean return close to linear in quality
    (a linear d = 1 - quality saturates above quality ~0.6); see
    ``benchmarks/pendulum_references.py``. ConfigError for a quality outside [0, 1].
    """

    env_id = "Pendulum-v1"

    def __init__(self, quality: float = 1.0) -> None:
        if not 0.0 <= quality <= 1.0:
            raise ConfigError(f"PendulumSwingUp quality must be in [0, 1], got {quality}")
        self.quality = float(quality)
        self.name = f"pendulum_swingup(quality={self.quality:.3f})"
        self._degradation = math.sqrt(1.0 - self.quality)
        self._noise_std = 0.5 * self._degradation  # torque units (max torque 2)
        self._gain = _pendulum_lqr_gain()
        self._rng: np.random.Generator | None = None

    def check_env(self, env: gymnasium.Env) -> None:
        """EnvError unless ``env`` is Pendulum-v1 (the controller is tuned to its dynamics)."""
        env_id = env.spec.id if env.spec is not None else "an env without a registered id"
        if env_id != self.env_id:
            raise EnvError(f"policy pendulum-swingup is for {self.env_id}, not {env_id}")

    def reset(self, rng: np.random.Generator) -> None:
        self._rng = rng

    def controller_torque(self, cos_th: float, sin_th: float, thdot: float) -> float:
        """The undegraded controller's torque in [-2, 2] for one state."""
        if cos_th > _CATCH_COS:  # near the top: LQR stabilizer
            th = math.atan2(sin_th, cos_th)  # in (-pi, pi], 0 upright
            u = -(self._gain[0] * th + self._gain[1] * thdot)
        else:  # energy pumping
            energy = 0.5 * thdot * thdot + _GRAVITY_GAIN * cos_th
            thdot_ahead = thdot + _LOOKAHEAD_STEPS * _GRAVITY_GAIN * sin_th * _DT
            magnitude = min(_MAX_TORQUE, _ENERGY_GAIN * (_GRAVITY_GAIN - energy))  # < 0: brake
            u = math.copysign(1.0, thdot_ahead) * magnitude  # copysign: no stall at exactly 0
        return min(_MAX_TORQUE, max(-_MAX_TORQUE, u))

    def act(self, observation: np.ndarray) -> np.ndarray:
        if self._rng is None:
            raise RuntimeError("PendulumSwingUp.act called before reset(rng)")
        cos_th, sin_th, thdot = float(observation[0]), float(observation[1]), float(observation[2])
        u = self.controller_torque(cos_th, sin_th, thdot)
        if self._degradation > 0.0:
            # Draw both numbers every step so the random stream does not depend on the branch.
            coin, noise = self._rng.random(), self._rng.standard_normal()
            if coin < self._degradation:
                u = self._rng.uniform(-_MAX_TORQUE, _MAX_TORQUE)
            else:
                u = min(_MAX_TORQUE, max(-_MAX_TORQUE, u + self._noise_std * noise))
        return np.array([u], dtype=np.float32)  # (1,)


def pendulum_mixed_dataset(num_episodes: int = 300, seed: int = 0) -> EpisodeSet:
    """The ``dtlab quickstart`` dataset: Pendulum-v1 episodes of mixed quality.

    Each episode's ``PendulumSwingUp`` quality is drawn independently from Beta(0.5, 0.5) (from a
    stream derived from ``seed``, independent of the env's and the policies'). The mean return is
    close to linear in quality, so a uniform draw would already span random (~ -1200 mean, down to
    ~ -1800) to near-optimal (~ -150, up to ~ 0); the U-shaped Beta adds episodes at both ends,
    where the returns thin out, so that every return level is seen fairly evenly -- what a
    Decision Transformer needs to learn return conditioning. (300 episodes, seed 0: 19 to 53
    episodes in each 200-wide return bin from -1600 to 0; uniform qualities gave 9 to 67.)
    """
    qualities = derived_stream(seed, _MIXTURE_STREAM).beta(0.5, 0.5, size=num_episodes)  # (E,)
    return collect_episodes(
        "Pendulum-v1", lambda i: PendulumSwingUp(quality=float(qualities[i])),
        num_episodes=num_episodes, seed=seed,
        metadata={"dataset": "pendulum-mixed",
                  "quality_distribution": "beta(0.5, 0.5) per episode"},
    )


# PointMaze (gymnasium-robotics, envs/maze/point_maze.py): observation["observation"] is the ball's
# (x, y, vx, vy), observation["desired_goal"] the goal (x, y); actions are forces in [-1, 1]^2; the
# sparse reward is 1 while the ball is within 0.45 of the goal. Gains: a PD law toward the goal,
# chosen by hand on PointMaze_UMaze-v3 (seeds 0-11: returns 0 when a wall lies on the straight
# line to the goal, 230-285 otherwise; Kp 5-20 and Kd 0.5-2 gave the same picture).
_MAZE_KP = 5.0  # force per unit of distance to the goal
_MAZE_KD = 0.5  # force per unit of velocity (damping)


class PointMazeGoalSeeker:
    """Drive straight at the goal: force = clip(Kp (goal - position) - Kd velocity, -1, 1).

    It knows nothing of walls, so it reaches the goal when the straight line is free and stalls
    against a wall otherwise, which gives datasets a spread of returns. ``quality`` in [0, 1]
    degrades it as ``PendulumSwingUp``'s does: with d = sqrt(1 - quality), each step takes a
    uniform random force with probability d, else the controller's plus Gaussian noise of std
    0.5 d, clipped. ConfigError for a quality outside [0, 1].
    """

    def __init__(self, quality: float = 1.0) -> None:
        if not 0.0 <= quality <= 1.0:
            raise ConfigError(f"PointMazeGoalSeeker quality must be in [0, 1], got {quality}")
        self.quality = float(quality)
        self.name = f"pointmaze_goal(quality={self.quality:.3f})"
        self._degradation = math.sqrt(1.0 - self.quality)
        self._rng: np.random.Generator | None = None

    def check_env(self, env: gymnasium.Env) -> None:
        """EnvError unless ``env`` has PointMaze's spaces: a Dict with 'observation' (4 values)
        and 'desired_goal' (2), and Box(-1, 1, (2,)) actions."""
        env_id = env.spec.id if env.spec is not None else "the env"
        obs, act = env.observation_space, env.action_space
        fits = (isinstance(obs, gymnasium.spaces.Dict) and "observation" in obs.spaces
                and "desired_goal" in obs.spaces and obs["observation"].shape == (4,)
                and obs["desired_goal"].shape == (2,) and isinstance(act, gymnasium.spaces.Box)
                and act.shape == (2,))
        if not fits:
            raise EnvError(f"policy pointmaze-goal is for PointMaze envs (Dict observations with "
                           f"'observation' (4,) and 'desired_goal' (2,), 2 forces), not {env_id}")

    def reset(self, rng: np.random.Generator) -> None:
        self._rng = rng

    def act(self, observation) -> np.ndarray:
        if self._rng is None:
            raise RuntimeError("PointMazeGoalSeeker.act called before reset(rng)")
        state = np.asarray(observation["observation"], dtype=np.float64)  # (4,)
        goal = np.asarray(observation["desired_goal"], dtype=np.float64)  # (2,)
        force = np.clip(_MAZE_KP * (goal - state[:2]) - _MAZE_KD * state[2:], -1.0, 1.0)
        if self._degradation > 0.0:
            coin, noise = self._rng.random(), self._rng.standard_normal(2)
            if coin < self._degradation:
                force = self._rng.uniform(-1.0, 1.0, 2)
            else:
                force = np.clip(force + 0.5 * self._degradation * noise, -1.0, 1.0)
        return force.astype(np.float32)  # (2,)
