"""DeployedPolicy: a deploy artifact's step graph run with onnxruntime, with DTPolicy's interface.

The window state of every episode (the last K steps: observations, actions, returns-to-go,
timesteps, masks) lives here as numpy arrays; each ``act`` feeds it to ``policy.onnx`` with the new
observation, the last reward and the pending target, and keeps the next state the graph returns
(the graph's inputs and outputs: dtlab.export's module docstring). ``reset`` and ``steer`` only
record the target: the graph conditions on it at the next ``act``.

Guardrails (DtlabWarning, one line, the same text for the same problem so that Python's default
filter shows it once): a target above the calibrated reliable maximum (``policy.json``
``reliable_targets``), or where the run was not calibrated above the highest target its data
supports (``supported_max_target``, where DTPolicy warns; artifacts written before it: the data's
best episode return), any of these capped at the most an episode of the env can return
(``env_max_return``, where the env bounds it);
an observation more than ``observation_range.threshold_std`` of the data's standard deviations
outside the range of the training observations, naming the dimensions.
"""

from __future__ import annotations

import json
import math
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

from .errors import ConfigError, DtlabWarning, EnvError, TrainingError
from .inputs import check_index, dict_rows, fit_batch, per_episode, target_above

# The artifact layout this runtime reads (dtlab.export.ARTIFACT_FORMAT / ARTIFACT_VERSION).
ARTIFACT_FORMAT, ARTIFACT_VERSION = "dtlab-deploy", 1
STATE_NAMES = ("observations", "actions", "returns_to_go", "timesteps", "masks")
_NUMPY_TYPES = {"tensor(float)": np.float32, "tensor(int64)": np.int64, "tensor(bool)": np.bool_}


def _finite_targets(name: str, value: Any) -> np.ndarray:
    """(n,) float32 targets; ConfigError unless every one is a finite number."""
    try:
        values = np.asarray(value, dtype=np.float64).reshape(-1)
    except (TypeError, ValueError):
        raise ConfigError(f"{name} must be a number or a sequence of numbers, got {value!r}") from None
    if not values.size or not np.isfinite(values).all():
        raise ConfigError(f"{name} must be finite numbers, got {values.tolist()}")
    return values.astype(np.float32)


def _target_limit(record: dict[str, Any]) -> tuple[float | None, str]:
    """Targets above the returned value warn, and the words naming it: the calibrated reliable
    maximum, else the highest target the data supports, else (artifacts written before
    ``supported_max_target``) the data's best episode return; None: no statistics, no warning.
    Any of them above ``env_max_return`` (the most an episode of the env can return; absent in
    artifacts written before it) gives way to it."""
    limit, words = _recorded_limit(record)
    ceiling = record.get("env_max_return")
    if ceiling is not None and (limit is None or limit >= float(ceiling)):
        return float(ceiling), f"the most an episode of {record.get('env_id')} can return"
    return limit, words


def _recorded_limit(record: dict[str, Any]) -> tuple[float | None, str]:
    reliable = record.get("reliable_targets")
    if reliable:
        return float(reliable["max"]), "the reliable maximum target found by calibration"
    supported = record.get("supported_max_target")
    if supported is not None:
        return float(supported), ("the highest target the training data supports (its best "
                                  "episode return plus half of max(|best|, best - worst))")
    best = (record.get("dataset_return") or {}).get("max")
    return (None if best is None else float(best)), "the best episode return in the training data"


class DeployedPolicy:
    """The policy of a ``dtlab export`` directory, without torch.

    ``threads``: onnxruntime's intra-op threads (1: a step is a few small matrix products, and a
    deployed policy usually shares the machine). ConfigError when the directory is not an artifact
    this runtime reads.
    """

    def __init__(self, path: str | Path, threads: int = 1) -> None:
        path = Path(path)
        record_file = path / "policy.json"
        try:
            record = json.loads(record_file.read_text())
        except (OSError, ValueError) as exc:
            raise ConfigError(f"{record_file}: not a readable deploy artifact record ({exc}); "
                              "write one with dtlab export RUN --out DIR") from None
        if not isinstance(record, dict) or record.get("format") != ARTIFACT_FORMAT or \
                record.get("format_version") != ARTIFACT_VERSION:
            raise ConfigError(f"{record_file}: not a {ARTIFACT_FORMAT} version {ARTIFACT_VERSION} "
                              "record; export the run again with this dtlab version")
        self.record = record
        self._graph_file, self._threads = path / record["onnx"], int(threads)
        self.session = self._load_session(None)
        # The graph with its batch axis fixed to the number of episodes (onnxruntime's
        # free-dimension override: it then folds the shape arithmetic and fuses each MatMul with
        # its bias into a Gemm; docs/deploy.md#speed has what that saves), loaded at the first
        # act() on all episodes after a reset() to a new size; act() on a subset of the
        # episodes uses the dynamic ``session``.
        self._fixed: tuple[int, ort.InferenceSession] | None = None
        inputs = {i.name: i for i in self.session.get_inputs()}
        self._batch_dim = inputs["observation"].shape[0]  # the graph's name of its batch axis
        # Per episode: the shape and dtype of each state array, (K, ...) without the batch axis.
        self._state_spec = {name: (tuple(inputs[name].shape[1:]), _NUMPY_TYPES[inputs[name].type])
                            for name in STATE_NAMES}
        self._outputs = [o.name for o in self.session.get_outputs()]
        self.observation_space: dict[str, Any] = record["observation_space"]
        self.action_space: dict[str, Any] = record["action_space"]
        self.context_len = int(record["context_len"])
        self.max_ep_len = int(record["max_ep_len"])
        self.return_scale = float(record["return_scale"])
        self.reliable_max_target, self._limit_source = _target_limit(record)
        obs_range = record.get("observation_range")
        self._obs_low = self._obs_high = None
        if obs_range:
            std = np.asarray(obs_range["std"], np.float64)
            margin = float(obs_range["threshold_std"]) * std
            self._obs_low = np.asarray(obs_range["low"], np.float64) - margin
            self._obs_high = np.asarray(obs_range["high"], np.float64) + margin
            self._threshold = float(obs_range["threshold_std"])
        self.num_envs = 0
        self._single = True

    def _load_session(self, batch: int | None) -> ort.InferenceSession:
        """The step graph on onnxruntime's CPU provider; with ``batch``, for that batch size only."""
        options = ort.SessionOptions()
        options.intra_op_num_threads = self._threads
        options.inter_op_num_threads = 1
        if batch is not None:
            options.add_free_dimension_override_by_name(self._batch_dim, batch)
        try:
            return ort.InferenceSession(str(self._graph_file), options,
                                        providers=["CPUExecutionProvider"])
        except Exception as exc:  # onnxruntime raises its own types for missing/corrupt files
            raise ConfigError(f"{self._graph_file}: cannot load the step graph: {exc}") from None

    def _session(self, n: int) -> ort.InferenceSession:
        """The session for ``n`` episodes: fixed to ``n`` when it is all the episodes (loaded
        once per size, about as long as loading the artifact), else the dynamic one."""
        if n != self.num_envs:
            return self.session
        if self._fixed is None or self._fixed[0] != n:
            self._fixed = (n, self._load_session(n))
        return self._fixed[1]

    # ---- episode state --------------------------------------------------------------------------
    def reset(self, target_return: float | Sequence[float] | np.ndarray) -> None:
        """Start new episodes, one per target (a scalar starts one and ``act`` then takes and
        returns unbatched arrays). Warns above the reliable maximum target; ConfigError for a
        non-finite target."""
        targets = _finite_targets("target_return", target_return)
        self._warn_above_reliable_max(targets)
        self._single = np.ndim(target_return) == 0
        n = targets.shape[0]
        self.num_envs = n
        self._state = {name: np.zeros((n, *shape), dtype) for name, (shape, dtype)
                       in self._state_spec.items()}
        self._t = np.zeros(n, np.int64)  # (N,) steps taken so far
        self._pending = targets.copy()  # (N,) the target the next act conditions on (NaN: none)

    def steer(self, return_to_go: float | Sequence[float], index: np.ndarray | None = None) -> None:
        """Ask for a different return from the next step on: the next ``act`` conditions on exactly
        ``return_to_go`` (the reward passed to it is not subtracted) and the context's
        returns-to-go shift by the same amount (``DTPolicy.steer``). Warns above the reliable
        maximum target. ``return_to_go``: one value for every episode in ``index`` (default: all)
        or one per episode; ``index``: episode numbers in 0..N-1, each at most once. ConfigError
        otherwise, naming the argument."""
        rows = self._rows(index)
        _finite_targets("return_to_go", return_to_go)  # numbers, finite: else ConfigError
        values = per_episode("steer's return_to_go", np.asarray(return_to_go, np.float32),
                             rows.shape[0], ConfigError)  # (n,)
        self._warn_above_reliable_max(values)
        self._pending[rows] = values

    @property
    def returns_to_go(self) -> np.ndarray:
        """Return-to-go each episode conditioned its last action on (env units). (N,)"""
        return self._state["returns_to_go"][:, -1] * np.float32(self.return_scale)

    def _rows(self, index) -> np.ndarray:
        if not self.num_envs:
            raise ConfigError("the policy has no episodes: call reset(target_return) first")
        if index is None:
            return np.arange(self.num_envs)
        return check_index(index, self.num_envs)

    def _warn_above_reliable_max(self, targets: np.ndarray) -> None:
        """One line naming the highest target asked for when it exceeds ``reliable_max_target``
        (the same text for the same target, so Python's default filter shows it once)."""
        limit = self.reliable_max_target
        top = float(np.max(targets)) if targets.size else -math.inf
        if limit is not None and target_above(top, limit):
            warnings.warn(f"target {top:g} asked for, above {limit:g}, {self._limit_source} "
                          "(policy.json): the model is not known to follow it",
                          DtlabWarning, stacklevel=3)

    # ---- observations ---------------------------------------------------------------------------
    def _observation_array(self, observation: Any, n: int) -> np.ndarray:
        """(n, obs_dim) float32, or (n, stack, H, W) uint8 frame stacks ((obs_dim,) or (stack,
        H, W) accepted for one episode); Dict observations (a mapping whose keys hold (n, dim_k)
        arrays, or a sequence of n per-episode mappings) flattened with the artifact's keys in
        order. EnvError when the shapes do not fit (``fit_batch``)."""
        space = self.observation_space
        if space["type"] == "dict":
            observation = dict_rows(observation, space["keys"], space["dims"], n)
        if space["type"] == "image":
            shape = (space["stack"], *space["shape"])
            frames = fit_batch(np.asarray(observation), n, shape, "observations", np.uint8)
            return np.ascontiguousarray(frames)  # (n, stack, H, W)
        dim = int(space["dim"]) if space["type"] == "vector" else sum(space["dims"])
        return fit_batch(np.asarray(observation, dtype=np.float32), n, (dim,), "observations")

    def _warn_out_of_range(self, obs: np.ndarray) -> None:
        if self._obs_low is None:
            return
        outside = ((obs < self._obs_low) | (obs > self._obs_high)).any(0)  # (obs_dim,)
        if outside.any():
            dims = np.flatnonzero(outside).tolist()
            deviations = f"standard deviation{'s' * (self._threshold != 1)}"
            warnings.warn(f"observation dimensions {dims} lie more than {self._threshold:g} "
                          f"{deviations} outside the training data's range (policy.json "
                          "observation_range): the actions there are extrapolation",
                          DtlabWarning, stacklevel=3)

    # ---- acting ---------------------------------------------------------------------------------
    def act(self, observation: Any, last_reward: float | np.ndarray | None = None,
            index: np.ndarray | None = None) -> np.ndarray:
        """Action for the current observation of each episode in ``index`` (default: all), as
        ``DTPolicy.act``: ``last_reward`` (ignored at an episode's first step) is subtracted from
        the return-to-go before acting. Returns (n, act_dim) float32 in the env's units, or (n,)
        int64 indices (unbatched after a scalar ``reset``).

        The first call on all episodes after a ``reset`` to a new number of episodes loads the
        graph for that batch size (tens of milliseconds; ConfigError if the file is gone).

        ``observation``: (n, obs_dim), (n, stack, H, W) uint8 or a Dict of (n, dim_k) arrays,
        unbatched ((obs_dim,), ...) for one episode; ``last_reward``: a scalar or (n,); ``index``:
        episode numbers in 0..N-1, each at most once.

        ConfigError when an episode reaches ``max_ep_len`` or for a bad ``index``; EnvError when
        the observations or ``last_reward`` do not fit (naming the shapes); TrainingError when
        the model's output is not finite, naming the episode and step.
        """
        rows = self._rows(index)
        n = rows.shape[0]
        steps = self._t[rows]
        if steps.size and steps.max() >= self.max_ep_len:
            e = int(rows[np.argmax(steps)])
            raise ConfigError(f"episode {e} reached timestep {int(steps.max())}, but the model's "
                              f"max_ep_len is {self.max_ep_len} (it embeds timesteps 0 to "
                              f"{self.max_ep_len - 1}); cap episodes at {self.max_ep_len} steps")
        obs = self._observation_array(observation, n)
        if obs.dtype == np.float32:
            bad = ~np.isfinite(obs)  # (n, obs_dim): refused here, as DTPolicy does
            if bad.any():
                row, dim = (int(i) for i in np.argwhere(bad)[0])
                raise EnvError(f"observation contains NaN/inf (dimension {dim}) for episode "
                               f"{int(rows[row])}: {obs[row, dim]}")
            self._warn_out_of_range(obs)
        reward = np.zeros(n, np.float32) if last_reward is None else per_episode(
            "last_reward", last_reward, n)  # (n,)
        if not np.isfinite(reward).all():
            raise EnvError(f"last_reward contains NaN/inf ({reward.tolist()[:8]})")
        whole = index is None
        feed = {"observation": obs, "last_reward": np.ascontiguousarray(reward),
                "target": self._pending[rows]}
        for name in STATE_NAMES:
            feed[name] = self._state[name] if whole else self._state[name][rows]
        action, finite, *state = self._session(n).run(self._outputs, feed)
        if not finite.all():
            bad = int(np.argmin(finite))
            raise TrainingError(f"the model produced a non-finite action for episode "
                                f"{int(rows[bad])} at step {int(steps[bad])}; its inputs are not "
                                "finite or overflow")
        for name, value in zip(STATE_NAMES, state):
            if whole:
                self._state[name] = value
            else:
                self._state[name][rows] = value
        self._t[rows] = steps + 1
        self._pending[rows] = math.nan
        return action[0] if self._single and whole else action
