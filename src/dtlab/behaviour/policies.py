"""Behaviour policies: the interface ``collect_episodes`` drives, and the policies dtlab ships.

A behaviour policy is a small stateful object (d3rlpy / Gymnasium style) for one environment:
``check_env(env)`` once before it acts in an env, ``reset(rng)`` at each episode start, then
``act(observation)`` once per step. Randomness comes only from the ``np.random.Generator`` handed
to ``reset``, so a collection is reproducible from its seed.

This module also owns the SAC actor file (safetensors weights + metadata): ``write_actor`` writes
it (``dtlab.behaviour.sac.export_actor`` calls it), ``read_actor`` reads it, ``ActorPolicy`` acts
with it.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import gymnasium
import numpy as np

from dtlab.atomic import atomic_path, check_writable
from dtlab.envs import describe_space, make_env
from dtlab.errors import ConfigError, EnvError
from dtlab.normalizer import from_unit_interval


class BehaviourPolicy(Protocol):
    """A stateful policy for one environment, used to collect data.

    ``check_env`` is called once before the policy first acts in ``env``: it raises EnvError, with
    a one-line message, when the policy cannot act there (other spaces, another env id).
    ``reset`` is called at the start of every episode with the generator the policy must draw all
    its randomness from; ``act`` maps one observation (obs_dim,) to one action: (act_dim,) float32
    for a Box action space, an integer index for a Discrete one.
    """

    name: str  # recorded in the dataset's provenance

    def check_env(self, env: gymnasium.Env) -> None: ...

    def reset(self, rng: np.random.Generator) -> None: ...

    def act(self, observation: np.ndarray) -> np.ndarray: ...


def _env_name(env: gymnasium.Env) -> str:
    return env.spec.id if env.spec is not None else "the env"


def _same_action_space(a: gymnasium.spaces.Space, b: gymnasium.spaces.Space) -> bool:
    """Same kind and size: Box shapes equal, or Discrete with the same n and start."""
    if isinstance(a, gymnasium.spaces.Discrete) or isinstance(b, gymnasium.spaces.Discrete):
        return (isinstance(a, gymnasium.spaces.Discrete) and isinstance(b, gymnasium.spaces.Discrete)
                and int(a.n) == int(b.n) and int(a.start) == int(b.start))
    return type(a) is type(b) and a.shape == b.shape


class RandomPolicy:
    """Uniform random actions: over a bounded ``Box``, or over the indices of a ``Discrete``."""

    name = "random"

    def __init__(self, action_space: gymnasium.spaces.Space) -> None:
        self.space = action_space
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

    @classmethod
    def for_env(cls, env_id: str) -> RandomPolicy:
        """Uniform over ``env_id``'s action space (an env is made and closed to read it)."""
        env = make_env(env_id)
        try:
            return cls(env.action_space)
        finally:
            env.close()

    def check_env(self, env: gymnasium.Env) -> None:
        """EnvError unless ``env``'s action space is the one this policy draws from (same kind and
        shape, Discrete n and start, Box bounds)."""
        space = env.action_space
        same = _same_action_space(self.space, space)
        if same and self.n is None:
            same = bool(np.allclose(space.low, self.low) and np.allclose(space.high, self.high))
        if not same:
            raise EnvError(f"{_env_name(env)}: RandomPolicy draws from {describe_space(self.space)}, "
                           f"but the env's action space is {describe_space(space)}")

    def reset(self, rng: np.random.Generator) -> None:
        self._rng = rng

    def act(self, observation: np.ndarray) -> np.ndarray:
        if self._rng is None:
            raise RuntimeError("RandomPolicy.act called before reset(rng)")
        if self.n is not None:
            return np.int64(self.start + self._rng.integers(self.n))
        return self._rng.uniform(self.low, self.high).astype(np.float32)  # (act_dim,)


VECNORMALIZE_FILE = "vecnormalize.pkl"  # SB3's VecNormalize.save name in the RL Zoo's run folders


class SB3Policy:
    """A Stable-Baselines3 model zip (SAC/TD3/PPO/...) used through ``model.predict``.

    SB3 zips contain pickled Python objects: loading one can run arbitrary code. dtlab loads them
    only when the caller passes ``trust=True`` (``--trust-pickle`` on the command line). Prefer
    exported actor weights (``ActorPolicy``, safetensors) for files you did not write.

    Observation normalization: an agent trained under SB3's ``VecNormalize`` acts on normalized
    observations. Its statistics (``VecNormalize.save``, a pickle) are loaded with SB3's
    ``VecNormalize.load`` from ``vecnormalize`` or, when that is None, from ``vecnormalize.pkl``
    beside the zip when present; the model then acts on ``normalize_obs(observation)`` (clipped
    as saved), while the collection records the env's raw observations. ConfigError for an
    untrusted or unloadable file (the statistics included); EnvError when its spaces differ from
    ``env_id``'s.
    """

    def __init__(self, path: str, env_id: str, *, trust: bool, deterministic: bool = False,
                 vecnormalize: str | None = None) -> None:
        beside = Path(path).parent / VECNORMALIZE_FILE
        stats = vecnormalize if vecnormalize is not None else (
            str(beside) if beside.is_file() else None)
        if not trust:
            with_stats = f" and {stats}" if stats else ""
            raise ConfigError(f"{path}{with_stats}: Stable-Baselines3 files contain pickles that "
                              "can run code when loaded; pass --trust-pickle if you trust them")
        if vecnormalize is not None and not Path(vecnormalize).is_file():
            raise ConfigError(f"{vecnormalize}: VecNormalize statistics file not found; fix "
                              "--vecnormalize")
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
        self.path, self.model, self.deterministic = str(path), model, deterministic
        self.name = f"sb3:{type(model).__name__}({Path(path).name})"
        self.check_env(env)
        self.vecnormalize = None if stats is None else self._load_vecnormalize(stats, env_id)
        if self.vecnormalize is not None:
            self.name += f"+VecNormalize({Path(stats).name})"

    @staticmethod
    def _load_vecnormalize(stats: str, env_id: str):
        """SB3's ``VecNormalize.load`` on a one-env ``DummyVecEnv`` of ``env_id``, frozen
        (``training`` False: acting does not update the statistics)."""
        from stable_baselines3.common.vec_env import DummyVecEnv, VecNormalize

        venv = DummyVecEnv([lambda: make_env(env_id)])
        try:
            vecnorm = VecNormalize.load(stats, venv)
        except Exception as exc:  # unpickling or SB3's own space checks: many types
            venv.close()
            raise ConfigError(f"{stats}: not loadable VecNormalize statistics for {env_id} "
                              f"({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}); "
                              "fix --vecnormalize") from None
        vecnorm.training = False
        vecnorm.norm_reward = False
        venv.close()
        return vecnorm

    def check_env(self, env: gymnasium.Env) -> None:
        """EnvError unless the model's observation shape and action space match ``env``'s."""
        model = self.model
        if model.observation_space.shape != env.observation_space.shape or \
                not _same_action_space(model.action_space, env.action_space):
            raise EnvError(f"{self.path}: model spaces {model.observation_space.shape} -> "
                           f"{describe_space(model.action_space)} do not match {_env_name(env)}'s "
                           f"{env.observation_space.shape} -> {describe_space(env.action_space)}")

    def reset(self, rng: np.random.Generator) -> None:
        import torch

        # SB3 samples with torch's global generator: seed it from the collection's stream.
        torch.manual_seed(int(rng.integers(0, 2**31 - 1)))

    def act(self, observation: np.ndarray) -> np.ndarray:
        if self.vecnormalize is not None:  # the agent acts on the observations it was trained on
            observation = self.vecnormalize.normalize_obs(observation)
        action, _ = self.model.predict(observation, deterministic=self.deterministic)
        return np.asarray(action)  # float32 (Box) or an integer index (Discrete)


# ---- SAC actor files ---------------------------------------------------------------------------

# Stable-Baselines3's SAC actor clamps log-std to [-20, 2] (stable_baselines3/sac/policies.py,
# LOG_STD_MIN / LOG_STD_MAX) and squashes Gaussian samples with tanh.
_LOG_STD_MIN, _LOG_STD_MAX = -20.0, 2.0


@dataclass(frozen=True)
class SacActorWeights:
    """A SAC actor: MLP with ReLU, then a mean and a log-std head (SB3's ``Actor``).

    The file is safetensors: tensors ``latent_pi.{0,2,...}.{weight,bias}`` (SB3's names: Linear
    layers at even indices of its Sequential, ReLU between), ``mu.{weight,bias}``,
    ``log_std.{weight,bias}``; metadata strings ``env_id``, ``algorithm`` ("SAC"),
    ``action_low`` / ``action_high`` (JSON lists), ``source_snapshot`` and any extras (JSON).
    """

    hidden: tuple[tuple[np.ndarray, np.ndarray], ...]  # per layer: W (out, in), b (out,)
    mu: tuple[np.ndarray, np.ndarray]  # W (act_dim, hidden), b (act_dim,)
    log_std: tuple[np.ndarray, np.ndarray]  # W (act_dim, hidden), b (act_dim,)
    low: np.ndarray  # (act_dim,) action bounds the tanh output is mapped to
    high: np.ndarray  # (act_dim,)
    metadata: Mapping[str, str]  # the file's metadata, all of it (env_id, algorithm, ...)

    @property
    def obs_dim(self) -> int:
        return int(self.hidden[0][0].shape[1])

    @property
    def act_dim(self) -> int:
        return int(self.mu[0].shape[0])

    @property
    def env_id(self) -> str | None:
        return self.metadata.get("env_id") or None


def read_actor(path: str | Path) -> SacActorWeights:
    """Load a SAC actor file (float64 arrays), without unpickling anything.

    ConfigError naming ``path`` when it is unreadable, lacks a tensor or metadata entry, or its
    shapes do not fit together.
    """
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="numpy") as f:
            meta = dict(f.metadata() or {})
            weights = {k: f.get_tensor(k).astype(np.float64) for k in f.keys()}
    except (OSError, SafetensorError) as exc:
        raise ConfigError(f"{path}: cannot load actor weights: {exc}") from None
    layers = sorted({int(k.split(".")[1]) for k in weights if k.startswith("latent_pi.")})
    if not layers:
        raise ConfigError(f"{path}: not a dtlab SAC actor file (no latent_pi layers)")
    try:
        actor = SacActorWeights(
            hidden=tuple((weights[f"latent_pi.{i}.weight"], weights[f"latent_pi.{i}.bias"])
                         for i in layers),
            mu=(weights["mu.weight"], weights["mu.bias"]),
            log_std=(weights["log_std.weight"], weights["log_std.bias"]),
            low=np.asarray(json.loads(meta["action_low"]), dtype=np.float64),
            high=np.asarray(json.loads(meta["action_high"]), dtype=np.float64),
            metadata=meta)
    except KeyError as exc:
        raise ConfigError(f"{path}: not a dtlab SAC actor file (missing {exc})") from None
    except (ValueError, TypeError) as exc:
        raise ConfigError(f"{path}: unreadable action bounds in the metadata: {exc}") from None
    act_dim = actor.act_dim
    if actor.low.shape != (act_dim,) or actor.high.shape != (act_dim,):
        raise ConfigError(f"{path}: action bounds {actor.low.shape} do not match the actor's "
                          f"{act_dim} action dims")
    widths = [w.shape for w, _ in actor.hidden] + [actor.mu[0].shape, actor.log_std[0].shape]
    if any(nxt[1] != prev[0] for prev, nxt in zip(widths, widths[1:-1])) or \
            actor.log_std[0].shape != actor.mu[0].shape:
        raise ConfigError(f"{path}: layer shapes {widths} do not chain")
    return actor


def write_actor(path: str | Path, actor: SacActorWeights) -> Path:
    """Write ``actor`` as a SAC actor file, atomically (``dtlab.atomic.atomic_path``; ConfigError
    when it cannot be written).

    The metadata written is ``actor.metadata`` with ``action_low`` / ``action_high`` set from the
    bounds; its values must be strings (safetensors metadata). The hidden layers are named
    ``latent_pi.0``, ``latent_pi.2``, ... as in SB3's state dict.
    """
    path = check_writable(path)
    tensors = {}
    for i, (w, b) in enumerate(actor.hidden):
        tensors[f"latent_pi.{2 * i}.weight"], tensors[f"latent_pi.{2 * i}.bias"] = w, b
    tensors["mu.weight"], tensors["mu.bias"] = actor.mu
    tensors["log_std.weight"], tensors["log_std.bias"] = actor.log_std
    meta = {**actor.metadata, "action_low": json.dumps(np.asarray(actor.low).tolist()),
            "action_high": json.dumps(np.asarray(actor.high).tolist())}
    from safetensors.numpy import save_file

    with atomic_path(path) as tmp:
        save_file({k: np.ascontiguousarray(v) for k, v in tensors.items()}, str(tmp), metadata=meta)
    return path


class ActorPolicy:
    """A SAC actor file (``read_actor``) run in numpy: MLP, ReLU, squashed Gaussian.

    Stochastic by default (D4RL sampled actions from its behaviour policies); ``deterministic``
    acts with tanh(mean). All sampling uses the generator passed to ``reset``. Actions are mapped
    from tanh's [-1, 1] to the file's action bounds.
    """

    def __init__(self, path: str, *, deterministic: bool = False) -> None:
        self.weights = read_actor(path)
        self.meta = dict(self.weights.metadata)
        self.path = str(path)
        self.deterministic = deterministic
        self.obs_dim, self.act_dim = self.weights.obs_dim, self.weights.act_dim
        self.low, self.high = self.weights.low, self.weights.high
        self.name = f"sac_actor({Path(path).name}{', deterministic' if deterministic else ''})"
        self._rng: np.random.Generator | None = None

    def check_env(self, env: gymnasium.Env) -> None:
        """EnvError unless ``env`` is the env these weights were trained on: same env id (when the
        file records one), observation/action shapes and action bounds."""
        env_id = env.spec.id if env.spec is not None else None
        trained_on = self.weights.env_id
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
        if self._rng is None and not self.deterministic:
            raise RuntimeError("ActorPolicy.act called before reset(rng)")
        h = np.asarray(observation, dtype=np.float64)  # (obs_dim,)
        for w, b in self.weights.hidden:
            h = np.maximum(w @ h + b, 0.0)  # (hidden,)
        mean = self.weights.mu[0] @ h + self.weights.mu[1]  # (act_dim,)
        if not self.deterministic:
            log_std = np.clip(self.weights.log_std[0] @ h + self.weights.log_std[1],
                              _LOG_STD_MIN, _LOG_STD_MAX)
            mean = mean + np.exp(log_std) * self._rng.standard_normal(self.act_dim)
        squashed = np.tanh(mean)  # in [-1, 1]
        return from_unit_interval(squashed, self.low, self.high).astype(np.float32)
