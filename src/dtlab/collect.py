"""Behaviour policies and episode collection: Gymnasium rollouts -> D4RL-style ``EpisodeSet``.

A behaviour policy is a small stateful object (d3rlpy / Gymnasium style): ``reset(rng)`` at each
episode start, then ``act(observation)`` once per step for a single environment. Randomness comes
only from the ``np.random.Generator`` handed to ``reset``, so a collection is reproducible from
its seed.

``collect_episodes`` runs one plain (non-vectorized) Gymnasium env and records, for an episode of
T steps, T observations (the state *before* each action: the D4RL view), T actions, T rewards and
Gymnasium's ``terminated`` / ``truncated`` flags separately.

``PendulumSwingUp`` is a scripted near-optimal controller for ``Pendulum-v1`` with a ``quality``
knob; ``pendulum_mixed_dataset`` mixes qualities per episode into the small dataset that
``dtlab quickstart`` trains on.

Reproduce the measured numbers in this module with ``python -m dtlab.collect``.
"""

from __future__ import annotations

import functools
import json
import math
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

import gymnasium
import numpy as np

import dtlab
from dtlab.data.episodes import EpisodeSet
# The Pendulum-v1 reference returns (random policy, scripted controller) live in the env registry.
from dtlab.envs import PENDULUM_RANDOM_RETURN, PENDULUM_SCRIPTED_RETURN  # noqa: F401
from dtlab.envs import describe_space, make_env
from dtlab.errors import ConfigError, EnvError
from dtlab.normalizer import from_unit_interval


# ---- policy interface ------------------------------------------------------------------------


class BehaviourPolicy(Protocol):
    """A stateful policy for one environment, used to collect data.

    ``reset`` is called at the start of every episode with the generator the policy must draw all
    its randomness from; ``act`` maps one observation (obs_dim,) to one action: (act_dim,) float32
    for a Box action space, an integer index for a Discrete one.
    A policy made for particular spaces (e.g. ``ActorPolicy``) may also define ``check_env(env)``,
    raising EnvError on a mismatch; ``collect_episodes`` calls it once per policy before acting.
    """

    name: str  # recorded in the dataset's provenance

    def reset(self, rng: np.random.Generator) -> None: ...

    def act(self, observation: np.ndarray) -> np.ndarray: ...


class RandomPolicy:
    """Uniform random actions: over a bounded ``Box``, or over the indices of a ``Discrete``."""

    name = "random"

    def __init__(self, action_space: gymnasium.spaces.Space) -> None:
        self.n: int | None = None
        if isinstance(action_space, gymnasium.spaces.Discrete):
            self.n, self.start = int(action_space.n), int(action_space.start)
        elif not isinstance(action_space, gymnasium.spaces.Box) or not action_space.is_bounded():
            raise EnvError(f"RandomPolicy needs a bounded Box or a Discrete action space, got "
                           f"{describe_space(action_space)}")
        else:
            self.low = action_space.low.astype(np.float32)  # (act_dim,)
            self.high = action_space.high.astype(np.float32)  # (act_dim,)
        self._rng: np.random.Generator | None = None

    def reset(self, rng: np.random.Generator) -> None:
        self._rng = rng

    def act(self, observation: np.ndarray) -> np.ndarray:
        if self._rng is None:
            raise RuntimeError("RandomPolicy.act called before reset(rng)")
        if self.n is not None:
            return np.int64(self.start + self._rng.integers(self.n))
        return self._rng.uniform(self.low, self.high).astype(np.float32)  # (act_dim,)


# ---- scripted Pendulum-v1 controller ---------------------------------------------------------

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
    (a linear d = 1 - quality saturates above quality ~0.6); see ``python -m dtlab.collect``.
    """

    def __init__(self, quality: float = 1.0) -> None:
        if not 0.0 <= quality <= 1.0:
            raise ConfigError(f"PendulumSwingUp quality must be in [0, 1], got {quality}")
        self.quality = float(quality)
        self.name = f"pendulum_swingup(quality={self.quality:.3f})"
        self._degradation = math.sqrt(1.0 - self.quality)
        self._noise_std = 0.5 * self._degradation  # torque units (max torque 2)
        self._gain = _pendulum_lqr_gain()
        self._rng: np.random.Generator | None = None

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


# ---- collection ------------------------------------------------------------------------------


def _stream(seed: int, key: int) -> np.random.Generator:
    """An independent random stream derived from ``seed``.

    Not ``default_rng(seed)``: that is exactly the stream Gymnasium's ``reset(seed=seed)`` uses
    (``gymnasium.utils.seeding.np_random``), so its numbers would repeat the env's initial states.
    """
    return np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(key,)))


_POLICY_STREAM = 1  # collect_episodes: the generator handed to policy.reset
_MIXTURE_STREAM = 2  # pendulum_mixed_dataset: per-episode quality draws

_SEEDING = ("env.reset(seed=seed) before the first episode, env.reset() (env RNG continues) before "
            "the others; policies draw from one generator SeedSequence(seed, spawn_key=(1,)) "
            "passed to policy.reset at every episode start")


def collect_episodes(
    env_id: str,
    policy: BehaviourPolicy | Callable[[int], BehaviourPolicy],
    *,
    num_episodes: int | None = None,
    num_transitions: int | None = None,
    seed: int = 0,
    metadata: dict | None = None,
) -> EpisodeSet:
    """Roll out ``policy`` in ``make_env(env_id)`` and return the episodes (D4RL view).

    Give exactly one budget: ``num_episodes`` complete episodes, or ``num_transitions`` steps (the
    last episode is cut at the budget and marked truncated, unless it terminated on that step).

    ``policy`` is a ``BehaviourPolicy`` used for every episode, or a callable that receives the
    episode index (0, 1, ...) and returns the policy for that episode (e.g. to vary quality).

    Seeding (deterministic for a given ``seed``): ``env.reset(seed=seed)`` before the first episode
    and ``env.reset()`` before the others, so initial states follow the env's own RNG as in
    Gymnasium's usual practice; all policy randomness comes from one generator derived from
    ``seed`` (independent of the env's), handed to ``policy.reset`` at every episode start.

    ``metadata`` adds caller provenance to what is recorded here (env_id, gymnasium and dtlab
    versions, policy names, seed, seeding scheme, episode-return statistics, counts); it may not
    override those keys.
    """
    if (num_episodes is None) == (num_transitions is None):
        raise ConfigError("collect_episodes needs exactly one of num_episodes, num_transitions")
    budget = num_episodes if num_episodes is not None else num_transitions
    if budget < 1:
        raise ConfigError(f"collection budget must be at least 1, got {budget}")
    make_policy = policy if not callable(getattr(policy, "act", None)) else (lambda i: policy)


    env = make_env(env_id)
    observations: list[np.ndarray] = []  # N x (obs_dim,)
    actions: list[np.ndarray] = []  # N x (act_dim,) float32, or N x () int64 (Discrete)
    rewards: list[float] = []
    terminations: list[bool] = []
    truncations: list[bool] = []
    episode_starts: list[int] = []
    names: list[str] = []  # unique policy names, first use order
    episode_policy: list[int] = []  # (E,) index into names
    policy_rng = _stream(seed, _POLICY_STREAM)
    try:
        space = env.action_space
        discrete = isinstance(space, gymnasium.spaces.Discrete)
        if discrete and int(space.start) != 0:
            raise EnvError(f"{env_id}: Discrete action spaces must start at 0, got "
                           f"{describe_space(space)}")
        if not (discrete or isinstance(space, gymnasium.spaces.Box)):
            raise EnvError(f"{env_id}: only Box and Discrete action spaces are supported, "
                           f"got {describe_space(space)}")

        def budget_left(episode: int) -> bool:
            if num_episodes is not None:
                return episode < num_episodes
            return len(rewards) < num_transitions

        episode = 0
        while budget_left(episode):
            pol = make_policy(episode)
            if pol.name not in names:
                check_env = getattr(pol, "check_env", None)
                if callable(check_env):
                    check_env(env)
                names.append(pol.name)
            episode_policy.append(names.index(pol.name))
            pol.reset(policy_rng)
            obs, _ = env.reset(seed=seed if episode == 0 else None)
            episode_starts.append(len(rewards))
            while True:
                raw = np.asarray(pol.act(obs))
                if discrete and not (raw.dtype.kind in "iu" or np.array_equal(raw, np.round(raw))):
                    raise EnvError(f"{env_id}: policy {pol.name} returned {raw.tolist()} for a "
                                   f"{describe_space(space)} action space (needs an integer index)")
                action = raw.astype(np.int64 if discrete else np.float32).reshape(space.shape)
                next_obs, reward, terminated, truncated, _ = env.step(action)
                observations.append(np.asarray(obs, dtype=np.float32))  # state before the action
                actions.append(action)
                rewards.append(float(reward))
                terminations.append(bool(terminated))
                truncations.append(bool(truncated))
                if terminated or truncated:
                    break
                if num_transitions is not None and len(rewards) >= num_transitions:
                    truncations[-1] = True  # cut off by the budget
                    break
                obs = next_obs
            episode += 1
    finally:
        env.close()

    episodes = EpisodeSet(
        np.stack(observations),  # (N, obs_dim)
        np.stack(actions),  # (N, act_dim), or (N,) int64 if discrete
        np.asarray(rewards, dtype=np.float32),  # (N,)
        np.asarray(terminations),  # (N,)
        np.asarray(truncations),  # (N,)
        np.asarray(episode_starts, dtype=np.int64),  # (E,)
        source=f"<collected from {env_id}>",
    )
    provenance: dict[str, Any] = {
        "env_id": env_id,
        "gymnasium_version": gymnasium.__version__,
        "dtlab_version": dtlab.__version__,
        "policies": names,
        "seed": int(seed),
        "seeding": _SEEDING,
        **_counts(episodes),
    }
    if len(names) > 1:
        provenance["episode_policy"] = episode_policy  # which entry of "policies" ran each episode
    clash = sorted(set(metadata or {}) & set(provenance))
    if clash:
        raise ConfigError(f"metadata may not override collected provenance keys {clash}")
    return episodes.with_metadata({**provenance, **(metadata or {})})


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
    qualities = _stream(seed, _MIXTURE_STREAM).beta(0.5, 0.5, size=num_episodes)  # (E,)
    return collect_episodes(
        "Pendulum-v1", lambda i: PendulumSwingUp(quality=float(qualities[i])),
        num_episodes=num_episodes, seed=seed,
        metadata={"dataset": "pendulum-mixed",
                  "quality_distribution": "beta(0.5, 0.5) per episode"},
    )


# ---- measurements (python -m dtlab.collect) --------------------------------------------------


def env_action_space(env_id: str) -> gymnasium.spaces.Space:
    """The action space of ``env_id`` (an env is made and closed to read it)."""
    env = make_env(env_id)
    space = env.action_space
    env.close()
    return space


def _report() -> None:
    """Print the reference returns, quality table and timings quoted in this module's comments."""
    pendulum = "Pendulum-v1"
    policies = (("random", RandomPolicy(env_action_space(pendulum))),
                ("scripted quality=1", PendulumSwingUp(1.0)))
    for label, pol in policies:
        ret = collect_episodes(pendulum, pol, num_episodes=100, seed=0).episode_returns
        print(f"{pendulum} {label:>18}: mean {ret.mean():8.1f}  std {ret.std():6.1f}  "
              f"(100 episodes, seed 0)")

    print("\nquality -> episode return over 50 episodes (seed 0)")
    print(f"{'quality':>8} {'mean':>8} {'std':>7} {'min':>8} {'max':>8}")
    for quality in np.linspace(0.0, 1.0, 11):
        pol = PendulumSwingUp(float(quality))
        ret = collect_episodes(pendulum, pol, num_episodes=50, seed=0).episode_returns
        print(f"{quality:8.1f} {ret.mean():8.1f} {ret.std():7.1f} {ret.min():8.1f} "
              f"{ret.max():8.1f}")

    start = time.perf_counter()
    mixed = pendulum_mixed_dataset()
    seconds = time.perf_counter() - start
    ret = mixed.episode_returns
    print(f"\npendulum_mixed_dataset(): {mixed.num_episodes} episodes, {mixed.num_transitions} "
          f"steps in {seconds:.2f} s; return mean {ret.mean():.1f} std {ret.std():.1f} "
          f"min {ret.min():.1f} max {ret.max():.1f}")
    counts, edges = np.histogram(ret, bins=np.arange(-2000.0, 1.0, 200.0))
    print("  episodes per return bin: "
          + "  ".join(f"[{lo:.0f},{lo + 200:.0f}):{c}" for lo, c in zip(edges, counts)))

    space = env_action_space("Hopper-v5")
    start = time.perf_counter()
    data = collect_episodes("Hopper-v5", lambda i: RandomPolicy(space), num_transitions=20000,
                            seed=0)
    seconds = time.perf_counter() - start
    print(f"\nHopper-v5 random, 20000 steps: {data.num_episodes} episodes in {seconds:.2f} s; "
          f"return mean {data.episode_returns.mean():.1f}")


if __name__ == "__main__":
    _report()


# ---- trained behaviour agents ------------------------------------------------------------------

# Stable-Baselines3's SAC actor clamps log-std to [-20, 2] (stable_baselines3/sac/policies.py,
# LOG_STD_MIN / LOG_STD_MAX) and squashes Gaussian samples with tanh.
_LOG_STD_MIN, _LOG_STD_MAX = -20.0, 2.0


class ActorPolicy:
    """A SAC actor (MLP, ReLU, squashed Gaussian) from a safetensors file, run in numpy.

    The file holds SB3's actor weights (``latent_pi.{0,2,...}``, ``mu``, ``log_std``) and, as
    safetensors metadata, the env id and action bounds; it loads without unpickling anything.
    Stochastic by default (D4RL sampled actions from its behaviour policies); ``deterministic``
    acts with tanh(mean). All sampling uses the generator passed to ``reset``.
    """

    def __init__(self, path: str, *, deterministic: bool = False) -> None:
        from safetensors import SafetensorError, safe_open

        try:
            with safe_open(path, framework="numpy") as f:
                self.meta = dict(f.metadata() or {})
                weights = {k: f.get_tensor(k).astype(np.float64) for k in f.keys()}
        except (OSError, SafetensorError) as exc:
            raise ConfigError(f"{path}: cannot load actor weights: {exc}") from None
        layers = sorted({int(k.split(".")[1]) for k in weights if k.startswith("latent_pi.")})
        try:
            self.hidden = [(weights[f"latent_pi.{i}.weight"], weights[f"latent_pi.{i}.bias"]) for i in layers]
            self.mu = (weights["mu.weight"], weights["mu.bias"])
            self.log_std = (weights["log_std.weight"], weights["log_std.bias"])
            self.low = np.asarray(json.loads(self.meta["action_low"]), dtype=np.float64)
            self.high = np.asarray(json.loads(self.meta["action_high"]), dtype=np.float64)
        except KeyError as exc:
            raise ConfigError(f"{path}: not a dtlab SAC actor file (missing {exc})") from None
        self.path = str(path)
        self.deterministic = deterministic
        self.obs_dim = self.hidden[0][0].shape[1]
        self.act_dim = self.mu[0].shape[0]
        if self.low.shape != (self.act_dim,) or self.high.shape != (self.act_dim,):
            raise ConfigError(f"{path}: action bounds {self.low.shape} do not match the actor's "
                              f"{self.act_dim} action dims")
        self.name = f"sac_actor({Path(path).name}{', deterministic' if deterministic else ''})"
        self._rng: np.random.Generator | None = None

    def check_env(self, env: gymnasium.Env) -> None:
        """EnvError unless ``env`` is the env these weights were trained on: same env id (when the
        file records one), observation/action shapes and action bounds."""
        env_id = env.spec.id if env.spec is not None else None
        trained_on = self.meta.get("env_id")
        if trained_on and env_id and trained_on != env_id:
            raise EnvError(f"{self.path}: actor was trained on {trained_on}, not {env_id}")
        obs_shape, space = env.observation_space.shape, env.action_space
        if obs_shape != (self.obs_dim,) or space.shape != (self.act_dim,):
            raise EnvError(f"{self.path}: actor maps observations ({self.obs_dim},) to actions "
                           f"({self.act_dim},), but {env_id or 'the env'} has observations "
                           f"{obs_shape} and actions {space.shape}")
        if not (np.allclose(space.low, self.low) and np.allclose(space.high, self.high)):
            raise EnvError(f"{self.path}: actor's action bounds [{self.low.tolist()}, "
                           f"{self.high.tolist()}] differ from {env_id or 'the env'}'s "
                           f"[{space.low.tolist()}, {space.high.tolist()}]")

    def reset(self, rng: np.random.Generator) -> None:
        self._rng = rng

    def act(self, observation: np.ndarray) -> np.ndarray:
        h = np.asarray(observation, dtype=np.float64)  # (obs_dim,)
        for w, b in self.hidden:
            h = np.maximum(w @ h + b, 0.0)  # (hidden,)
        mean = self.mu[0] @ h + self.mu[1]  # (act_dim,)
        if not self.deterministic:
            log_std = np.clip(self.log_std[0] @ h + self.log_std[1], _LOG_STD_MIN, _LOG_STD_MAX)
            mean = mean + np.exp(log_std) * self._rng.standard_normal(self.act_dim)
        squashed = np.tanh(mean)  # in [-1, 1]
        return from_unit_interval(squashed, self.low, self.high).astype(np.float32)


def _same_action_space(a: gymnasium.spaces.Space, b: gymnasium.spaces.Space) -> bool:
    """Same kind and size: Box shapes equal, or Discrete with the same n and start."""
    if isinstance(a, gymnasium.spaces.Discrete) or isinstance(b, gymnasium.spaces.Discrete):
        return (isinstance(a, gymnasium.spaces.Discrete) and isinstance(b, gymnasium.spaces.Discrete)
                and int(a.n) == int(b.n) and int(a.start) == int(b.start))
    return type(a) is type(b) and a.shape == b.shape


class SB3Policy:
    """A Stable-Baselines3 model zip (SAC/TD3/PPO/...) used through ``model.predict``.

    SB3 zips contain pickled Python objects: loading one can run arbitrary code. dtlab loads them
    only when the caller passes ``trust=True`` (``--trust-pickle`` on the command line). Prefer
    exported actor weights (``ActorPolicy``, safetensors) for files you did not write.
    """

    def __init__(self, path: str, env_id: str, *, trust: bool, deterministic: bool = False) -> None:
        if not trust:
            raise ConfigError(f"{path}: Stable-Baselines3 files contain pickles that can run code "
                              "when loaded; pass --trust-pickle if you trust this file")
        import stable_baselines3 as sb3

        env = make_env(env_id)
        env.close()
        model = None
        errors = []
        for algo in ("SAC", "TD3", "PPO", "DDPG", "A2C", "DQN"):
            try:
                model = getattr(sb3, algo).load(path, device="cpu")
                break
            except Exception as exc:  # SB3 raises many types for a zip of another algorithm
                errors.append(f"{algo}: {type(exc).__name__}")
        if model is None:
            raise ConfigError(f"{path}: not a loadable Stable-Baselines3 model ({', '.join(errors)})")
        if model.observation_space.shape != env.observation_space.shape or \
                not _same_action_space(model.action_space, env.action_space):
            raise EnvError(f"{path}: model spaces {model.observation_space.shape} -> "
                           f"{describe_space(model.action_space)} do not match {env_id}'s "
                           f"{env.observation_space.shape} -> {describe_space(env.action_space)}")
        self.model, self.deterministic = model, deterministic
        self.name = f"sb3:{type(model).__name__}({Path(path).name})"

    def reset(self, rng: np.random.Generator) -> None:
        import torch

        # SB3 samples with torch's global generator: seed it from the collection's stream.
        torch.manual_seed(int(rng.integers(0, 2**31 - 1)))

    def act(self, observation: np.ndarray) -> np.ndarray:
        action, _ = self.model.predict(observation, deterministic=self.deterministic)
        return np.asarray(action)  # float32 (Box) or an integer index (Discrete)


# ---- D4RL-style presets from committed behaviour weights ---------------------------------------

PRESET_DIR = Path(__file__).parent / "presets"
# Gymnasium ids of the D4RL MuJoCo families, by D4RL's lowercase dataset prefix.
_FAMILIES = {"hopper": "Hopper", "halfcheetah": "HalfCheetah", "walker2d": "Walker2d"}
VARIANTS = ("random", "medium", "expert", "medium-expert", "medium-replay")
# D4RL's dataset sizes: 1M transitions for random, medium and expert; medium-expert concatenates
# medium and expert (2M); medium-replay is the replay buffer up to the medium snapshot.
PRESET_TRANSITIONS = 1_000_000


def parse_preset(name: str) -> tuple[str, str]:
    """``hopper-medium-v5`` -> (``Hopper-v5``, ``medium``)."""
    parts = name.split("-")
    if len(parts) < 3 or parts[0] not in _FAMILIES or not parts[-1].startswith("v"):
        raise ConfigError(f"unknown preset '{name}': expected <{'|'.join(_FAMILIES)}>-<"
                          f"{'|'.join(VARIANTS)}>-v5, e.g. hopper-medium-v5")
    variant = "-".join(parts[1:-1])
    if variant not in VARIANTS:
        raise ConfigError(f"unknown preset variant '{variant}' in '{name}' (one of {', '.join(VARIANTS)})")
    return f"{_FAMILIES[parts[0]]}-{parts[-1]}", variant


def _preset_manifest_path(env_id: str) -> Path:
    return PRESET_DIR / env_id.lower() / "manifest.json"


def preset_manifest(env_id: str) -> dict[str, Any]:
    path = _preset_manifest_path(env_id)
    if not path.exists():
        raise ConfigError(f"no committed behaviour policies for {env_id} ({path} is missing); train "
                          f"them with 'dtlab train-behaviour --env {env_id}'")
    try:
        manifest = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ConfigError(f"{path}: cannot read the preset manifest: {exc}") from None
    if not isinstance(manifest, dict):
        raise ConfigError(f"{path}: the preset manifest is not a JSON object")
    return manifest


def _preset_actor(env_id: str, variant: str) -> tuple[Path, int]:
    """Path and training step of a committed medium/expert actor, from the preset manifest."""
    manifest = preset_manifest(env_id)
    try:
        entry = manifest[variant]
        return PRESET_DIR / env_id.lower() / str(entry["file"]), int(entry["step"])
    except (KeyError, TypeError, ValueError) as exc:
        raise ConfigError(f"{_preset_manifest_path(env_id)}: no valid '{variant}' entry with "
                          f"'file' and 'step' ({type(exc).__name__}: {exc})") from None


# Presets are collected in this many shards, one process each (at most this many run at once), so
# the dataset is the same on every machine whatever its core count.
PRESET_SHARDS = 2


def collect_sharded(env_id: str, policy, *, num_transitions: int, seed: int, shards: int,
                    processes: int | None = None, metadata: dict | None = None) -> EpisodeSet:
    """``collect_episodes`` split into ``shards`` independent parts collected in parallel
    processes and concatenated in shard order.

    Shard i collects its share of the transitions with seed ``SeedSequence([seed, i])``, so the
    result depends on (seed, shards) only, not on how many processes ran. Each shard's last
    episode is cut at its share (marked truncated), as D4RL's files end with a cut-off episode.
    """
    import multiprocessing as mp

    if shards < 1 or num_transitions < shards:
        raise ConfigError(f"need 1 <= shards <= transitions, got {shards} shards, {num_transitions}")
    shares = [num_transitions // shards + (i < num_transitions % shards) for i in range(shards)]
    seeds = [int(np.random.SeedSequence([seed, i]).generate_state(1)[0]) for i in range(shards)]

    def one(i: int) -> EpisodeSet:
        return collect_episodes(env_id, policy, num_transitions=shares[i], seed=seeds[i])

    processes = min(shards, processes or os.cpu_count() or 1)
    if processes <= 1:
        parts = [one(i) for i in range(shards)]
    else:
        # fork: the policy (and any closure) is inherited, not pickled; results come back as
        # plain arrays through a pipe.
        parts = _fork_map(mp.get_context("fork"), one, range(shards), processes)
    first = parts[0].metadata
    data = EpisodeSet.concatenate(parts, source=f"<collected from {env_id}>", metadata={
        **{k: v for k, v in first.items() if k not in ("seed", "num_episodes", "num_transitions",
                                                        "episode_return")},
        "seed": int(seed), "shards": shards, "shard_seeds": seeds,
        "seeding": f"{shards} shards, shard i seeded with SeedSequence([seed, i]); "
                   + str(first.get("seeding", "")),
        **(metadata or {})})
    return data.with_metadata(_counts(data))


def _counts(episodes: EpisodeSet) -> dict[str, Any]:
    """Size and episode-return statistics, recorded with every collected dataset."""
    returns = episodes.episode_returns.astype(np.float64)  # (E,)
    return {"num_episodes": episodes.num_episodes, "num_transitions": episodes.num_transitions,
            "episode_return": {"mean": float(returns.mean()), "std": float(returns.std()),
                               "min": float(returns.min()), "max": float(returns.max())}}


def _fork_map(ctx, fn, items, processes: int) -> list:
    """Run ``fn(item)`` in forked children (``processes`` at a time); results in item order."""
    items = list(items)
    results: dict[int, Any] = {}
    pending = list(enumerate(items))
    running: list[tuple[int, Any, Any]] = []
    while pending or running:
        while pending and len(running) < processes:
            k, item = pending.pop(0)
            recv, send = ctx.Pipe(duplex=False)

            def child(send=send, item=item):
                try:
                    d = fn(item)
                    send.send(("ok", (d.observations, d.actions, d.rewards, d.terminations,
                                      d.truncations, d.episode_starts, dict(d.metadata))))
                except BaseException as exc:  # report to the parent; never fall through
                    send.send(("error", exc))
                finally:
                    send.close()

            proc = ctx.Process(target=child)
            proc.start()
            send.close()
            running.append((k, proc, recv))
        k, proc, recv = running.pop(0)
        status, payload = recv.recv()
        proc.join()
        if status == "error":
            for _, other, _ in running:
                other.terminate()
            raise payload
        obs, act, rew, term, trunc, starts, meta = payload
        results[k] = EpisodeSet(obs, act, rew, term, trunc, starts, metadata=meta)
    return [results[k] for k in range(len(items))]


def preset_dataset(name: str, *, seed: int = 0, num_transitions: int = PRESET_TRANSITIONS,
                   behaviour_run: str | None = None, trust: bool = False) -> EpisodeSet:
    """Regenerate a D4RL-style preset dataset deterministically (stochastic actions, as D4RL).

    medium-replay reads the replay buffer of ``behaviour_run``, a pickle: only with ``trust=True``.
    """
    env_id, variant = parse_preset(name)
    base = {"dataset": name, "variant": variant}
    if variant == "random":
        data = collect_sharded(env_id, RandomPolicy(env_action_space(env_id)), shards=PRESET_SHARDS,
                               num_transitions=num_transitions, seed=seed, metadata=base)
    elif variant in ("medium", "expert"):
        path, step = _preset_actor(env_id, variant)
        data = collect_sharded(env_id, ActorPolicy(str(path)), num_transitions=num_transitions,
                               shards=PRESET_SHARDS, seed=seed,
                               metadata={**base, "policy_training_steps": step})
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
        data = data.with_metadata(_counts(data))
    else:  # medium-replay
        if behaviour_run is None:
            raise ConfigError(f"{name} is built from the behaviour agent's replay buffer, which is not "
                              "in git: pass --behaviour-run DIR (made by dtlab train-behaviour) and "
                              "--trust-pickle (the buffer is a pickle)")
        from dtlab.behaviour import replay_until_medium

        data = replay_until_medium(behaviour_run, env_id, trust=trust).with_metadata(base)
    return _record_reference(data, env_id)


def _record_reference(data: EpisodeSet, env_id: str) -> EpisodeSet:
    """Reference scores of dtlab's own presets (random and expert policy returns), when known."""
    if not _preset_manifest_path(env_id).exists():
        return data
    manifest = preset_manifest(env_id)
    found = {}
    for key in ("ref_min_score", "ref_max_score"):
        if key in manifest:
            try:
                value = float(manifest[key])
            except (TypeError, ValueError):
                raise ConfigError(f"{_preset_manifest_path(env_id)}: {key} must be a number, got "
                                  f"{manifest[key]!r}") from None
            found[f"dtlab_{key}"] = value
    return data.with_metadata({k: v for k, v in found.items() if k not in data.metadata})
