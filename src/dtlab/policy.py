"""DTPolicy: a stateful, return-conditioned policy over one or many parallel episodes.

``reset(target_return)`` starts episodes, ``act(observation, last_reward)`` returns the next action;
the return-to-go is decremented by each reward received. ``steer(new_return)`` changes the return
asked for in the middle of an episode (run-time steering).

Observations are what the env gives: vectors, frame stacks (stack, H, W) uint8 for
``ImageObservations`` (scaled on the device and encoded once, when they arrive: the context keeps
each step's encoding, ``DecisionTransformer.encode_observations``, so a step costs one encoder pass
per episode, not K), or Dict observations, flattened with the checkpoint's keys in its order
(``DictObservations``).
Discrete actions are the most likely index (``temperature`` 0, the default) or sampled from the
logits divided by ``temperature`` (the DT Atari code samples at temperature 1:
atari/mingpt/trainer_atari.py, ``sample(..., temperature=1.0, sample=True)``). A stochastic head
(``model.policy`` stochastic, the Online Decision Transformer's) acts with its mean action,
tanh(mean), at temperature 0, and samples tanh(mean + temperature x std x noise) above 0 (dtlab
finetune's exploration rollouts, at temperature 1).
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from dtlab import checkpoint, runtime
from dtlab.checkpoint import PolicyInfo
from dtlab.config import MAX_SEED, check_number, check_targets
from dtlab.data.records import ReturnStats
from dtlab.envs import env_info
from dtlab.errors import ConfigError, DtlabWarning, EnvError, TrainingError
from dtlab.deploy.inputs import (check_index, dict_rows, fit_batch, per_episode,
                                 target_above)
from dtlab.kv_cache import CachedSteps
from dtlab.model import DecisionTransformer
from dtlab.spaces import DictObservations, DiscreteActions, ImageObservations


class DTPolicy:
    """Run a trained Decision Transformer in an environment.

    Holds the last K steps of every episode as tensors on the model's device; each ``act`` is one
    batched forward pass over the full K-window (exact recomputation, no approximate cache).

    Steering a Pendulum-v1 agent: ask for a high return, then mid-episode for a low one.

    >>> import gymnasium as gym
    >>> policy = DTPolicy.from_checkpoint(getfixture("tiny_checkpoint"))  # any checkpoint dir
    >>> env = gym.make("Pendulum-v1")
    >>> obs, _ = env.reset(seed=0)
    >>> policy.reset(target_return=-150.0)
    >>> reward, rewards = None, []
    >>> for t in range(200):
    ...     if t == 100:
    ...         policy.steer(-900.0)  # from now on, ask for a much lower return
    ...     action = policy.act(obs, reward)
    ...     obs, reward, terminated, truncated, _ = env.step(action)
    ...     rewards.append(reward)
    >>> action.shape, bool(env.action_space.contains(action))
    ((1,), True)

    The last action was conditioned on -900 minus the rewards of steps 100 to 198:

    >>> abs(float(policy.returns_to_go[0] - (-900.0 - sum(rewards[100:199])))) < 1e-3
    True

    For many episodes at once, ``reset`` takes one target per episode and ``act`` a batch of
    observations; ``index`` selects the episodes that advance (see dtlab.rollout.rollout).
    """

    def __init__(self, model: DecisionTransformer, info: PolicyInfo, device: str | torch.device = "cpu",
                 precision: str = "fp32", kv_cache: bool = False, temperature: float = 0.0,
                 seed: int = 0):
        """``kv_cache``: incremental inference with cached keys/values (opt-in, approximate once
        the K-step window slides; see dtlab.kv_cache); decision-transformer
        models only (ConfigError otherwise). ``temperature``: 0 acts greedily; above 0, discrete
        actions are sampled from softmax(logits / temperature), each episode from its own stream
        derived from ``seed`` (see ``reset``; ConfigError for a negative temperature, or one above
        0 with continuous actions).
        ``device`` goes through ``dtlab.runtime.resolve_device`` and ``precision`` must be fp32 or
        bf16: ConfigError naming the argument otherwise (a device this machine lacks included)."""
        if kv_cache and info.model.architecture != "decision-transformer":
            raise ConfigError(f"kv_cache: kv-cache rollouts are for decision-transformer models, "
                              f"not {info.model.architecture}; set kv_cache False")
        if not isinstance(temperature, (int, float)) or isinstance(temperature, bool) or \
                not 0 <= temperature < float("inf"):
            raise ConfigError(f"temperature must be a finite number >= 0, got {temperature!r}")
        if temperature > 0 and not isinstance(info.action_space, DiscreteActions) and \
                info.model.policy != "stochastic":
            raise ConfigError(f"temperature {temperature:g}: sampling is for discrete actions or "
                              "a stochastic policy head; this checkpoint's actions are continuous "
                              "and deterministic (use temperature 0)")
        if precision not in ("fp32", "bf16"):
            raise ConfigError(f"precision must be fp32 or bf16, got {precision!r} (resolve auto "
                              "with dtlab.runtime.resolve_precision)")
        check_number("DTPolicy's seed", seed, minimum=0, maximum=MAX_SEED, integer=True)
        device = runtime.resolve_device(device)
        self.temperature = float(temperature)
        self.model = model.to(device).eval()
        self.precision = precision  # "fp32", or "bf16" autocast
        self.kv_cache = kv_cache
        self.info = info
        self.device = torch.device(device)
        self.context_len = info.model.context_len
        # The normalizer's arrays as float32 tensors on the device, converted once.
        self._norm = info.normalizer.converted(
            lambda a: torch.tensor(a, dtype=torch.float32, device=self.device))
        self.seed = int(seed)
        self._streams: list[np.random.Generator] = []  # (N,) sampling streams (temperature > 0)
        self._episodes_started = 0  # default stream keys continue from here
        spec = info.observation_space
        # Per step: frame stacks kept as uint8 until the forward pass, or normalized vectors.
        self._frames = spec.stacked_shape if isinstance(spec, ImageObservations) else None
        self.num_envs = 0
        self._single = True
        # Targets above this warn (set from the checkpoint's calibration.json by from_checkpoint).
        self.reliable_max_target: float | None = None
        # Uncalibrated: targets the training data does not support warn (ReturnStats.supports).
        self.data_return = ReturnStats.from_json(info.dataset.get("episode_return"))
        # (lowest, highest target, lowest, highest mean achieved) when that calibration measured
        # no rise of the achieved return with the target; None otherwise.
        self.flat_calibration: tuple[float, float, float, float] | None = None

    @classmethod
    def from_checkpoint(cls, path: str | Path, device: str = "cpu", precision: str = "fp32",
                        kv_cache: bool = False, temperature: float = 0.0,
                        seed: int = 0, info: PolicyInfo | None = None) -> "DTPolicy":
        """Load a checkpoint (and its reliable maximum target, when ``dtlab calibrate`` stored
        one); ``info``: its config.json as ``checkpoint.load_info`` already read it (then
        ``path`` must be the resolved checkpoint directory). ConfigError for a device this
        machine lacks (``dtlab.runtime.resolve_device``), CheckpointError for a missing or
        corrupt checkpoint."""
        if info is None:
            model, info = checkpoint.load(path, device)
        else:
            model = checkpoint.load_weights(Path(path), info, device)
        policy = cls(model, info, device, precision, kv_cache, temperature, seed)
        calibration = checkpoint.load_calibration(path)
        if calibration is not None:
            policy.reliable_max_target = float(calibration["reliable_max_target"])
            targets, means = calibration.get("targets"), calibration.get("means")
            if "rising_range" in calibration and calibration["rising_range"] is None:
                try:  # a flat curve: the target does not steer (older records lack the lists)
                    policy.flat_calibration = (float(min(targets)), float(max(targets)),
                                               float(min(means)), float(max(means)))
                except (TypeError, ValueError):
                    pass
        return policy

    def _warn_above_reliable_max(self, targets: np.ndarray) -> None:
        """One line naming the highest target asked for when it exceeds the most the env can
        return (``EnvInfo.max_return``) or what the checkpoint is known to follow: the
        calibrated reliable maximum target (calibration.json) or, for an uncalibrated
        checkpoint, what its training data supports (``ReturnStats.supports``) (the same text
        for the same targets, so Python's default filter shows it once)."""
        if not targets.size:
            return
        top, limit = float(np.max(targets)), self.reliable_max_target
        ceiling = env_info(self.info.env_id).max_return if self.info.env_id else None
        if ceiling is not None and target_above(top, ceiling):
            warnings.warn(f"target {top:g} asked for, above {ceiling:g}, the most an episode of "
                          f"{self.info.env_id} can return: no episode achieves it",
                          DtlabWarning, stacklevel=3)
        elif (limit is not None and target_above(top, limit)
              and self.flat_calibration is not None):
            t0, t1, m0, m1 = self.flat_calibration
            warnings.warn(f"target {top:g} asked for, above {limit:g}; calibration "
                          f"(calibration.json) measured no rise of the achieved return with the "
                          f"target: targets {t0:g} to {t1:g} all achieved {m0:.1f} to {m1:.1f}, "
                          "so the target does not steer this checkpoint", DtlabWarning,
                          stacklevel=3)
        elif limit is not None and target_above(top, limit):
            warnings.warn(f"target {top:g} asked for, above {limit:g}, the reliable maximum "
                          "target found by calibration (calibration.json): achieved returns "
                          "stopped rising there", DtlabWarning, stacklevel=3)
        elif limit is None and self.data_return is not None and \
                target_above(top, self.data_return.supported_max):
            warnings.warn(f"target {top:g} asked for, far above the best episode return in the "
                          f"training data ({self.data_return.max:g}), and the checkpoint is not "
                          "calibrated: the model has never seen such a return (dtlab calibrate "
                          "RUN measures the highest target it follows)", DtlabWarning,
                          stacklevel=3)

    # ---- episode state ------------------------------------------------------------------------
    def reset(self, target_return: float | Sequence[float] | np.ndarray,
              streams: Sequence[int] | np.ndarray | None = None) -> None:
        """Start new episodes: one per target (a scalar starts one episode and ``act`` then takes
        and returns unbatched arrays). Warns (DtlabWarning) for a target above the most the env can
        return or the checkpoint's calibrated reliable maximum target (uncalibrated: above what
        its data supports); ConfigError for a non-finite or absurd target.

        ``streams`` (sampling, temperature > 0): one non-negative integer key per episode; the
        episode samples its actions from ``SeedSequence(seed, spawn_key=(key, target))`` (the
        target as its float32 bits), so its actions depend on (seed, key, target) and its own
        observations only, not on the other episodes of the batch (``rollout`` passes each
        episode's env seed). Default: keys counting the episodes this policy has started (0, 1,
        ... over successive resets). ConfigError for keys that are not one non-negative integer
        per episode."""
        check_targets("reset's target_return", np.ravel(np.asarray(target_return, dtype=np.float64)).tolist())
        self._warn_above_reliable_max(np.asarray(target_return, dtype=np.float64))
        targets = np.array(target_return, dtype=np.float32)  # a copy: the input may be read-only
        self._single = targets.ndim == 0
        targets = targets.reshape(-1)
        n, k, dev = targets.shape[0], self.context_len, self.device
        if self.temperature > 0:
            self._streams = self._sampling_streams(targets, streams)
        self.num_envs = n
        self._targets = targets  # (N,) for error messages
        if self._frames is not None:  # (N, K, D) encoded frame stacks
            self._obs = torch.zeros(n, k, self.info.model.embed_dim, device=dev)
        else:
            self._obs = torch.zeros(n, k, self.info.observation_space.dim, device=dev)  # (N, K, obs_dim)
        # (N, K, act_dim) in [-1, 1], or (N, K) indices
        self._act = self.model.predict_action.empty_actions(n, k, dev)
        self._rtg = torch.zeros(n, k, 1, device=dev)  # (N, K, 1), scaled
        self._timesteps = torch.zeros(n, k, dtype=torch.long, device=dev)  # (N, K)
        self._masks = torch.zeros(n, k, dtype=torch.bool, device=dev)  # (N, K)
        self._t = np.zeros(n, dtype=np.int64)  # (N,) steps taken so far (host: no device sync)
        self._next_rtg = self._norm.scale_returns(torch.from_numpy(targets).to(dev))  # (N,)
        self._pending = torch.full((n,), float("nan"), device=dev)  # (N,) steer() requests
        self._steps = CachedSteps()  # kv_cache mode only

    def _sampling_streams(self, targets: np.ndarray, streams) -> list[np.random.Generator]:
        """One generator per episode: ``SeedSequence(seed, spawn_key=(key, float32 bits of its
        target))``, keys from ``streams`` or counted (see ``reset``)."""
        n = targets.shape[0]
        if streams is None:
            keys = np.arange(self._episodes_started, self._episodes_started + n)
        else:
            keys = np.asarray(streams)
            if keys.shape != (n,) or keys.dtype.kind not in "iu" or (keys < 0).any():
                raise ConfigError(f"streams must be {n} non-negative integers (one per target), "
                                  f"got {np.asarray(streams).tolist()!r}")
        self._episodes_started += n
        bits = targets.astype(np.float32).view(np.uint32)  # (N,) the targets, exactly
        return [np.random.default_rng(np.random.SeedSequence(self.seed, spawn_key=(int(k), int(b))))
                for k, b in zip(keys, bits)]

    def steer(self, return_to_go: float | Sequence[float], index: np.ndarray | None = None) -> None:
        """Ask for a different return from the next step on (run-time steering).

        The next ``act`` conditions on exactly ``return_to_go`` (the reward passed to it is not
        subtracted), and the return-to-go tokens already in the context shift by the same amount,
        so the context reads as if this return had been asked for from the start. Warns
        (DtlabWarning) above the checkpoint's calibrated reliable maximum target.

        ``return_to_go``: one value for every episode in ``index`` (default: all), or one per
        episode. ``index``: episode numbers, each in 0..N-1 and at most once (negative numbers
        are not counted from the end). ConfigError otherwise, naming the argument.
        """
        rows = self._rows(index)
        check_targets("steer's return_to_go", np.ravel(np.asarray(return_to_go, dtype=np.float64)).tolist())
        self._warn_above_reliable_max(np.asarray(return_to_go, dtype=np.float64))
        new = per_episode("steer's return_to_go", return_to_go, rows.shape[0], ConfigError)
        self._pending[torch.from_numpy(rows).to(self.device)] = self._norm.scale_returns(
            torch.tensor(new, device=self.device))

    @property
    def returns_to_go(self) -> np.ndarray:
        """Return-to-go each episode conditioned its last action on (unscaled). (N,)"""
        return self._norm.unscale_returns(self._next_rtg).cpu().numpy()

    def _rows(self, index) -> np.ndarray:
        """(n,) int64 episodes ``index`` names (default: all); ConfigError before a reset and for
        an index ``check_index`` refuses."""
        if not self.num_envs:
            raise ConfigError("the policy has no episodes: call reset(target_return) first")
        if index is None:
            return np.arange(self.num_envs)
        return check_index(index, self.num_envs)

    def _observation_tensor(self, observation: Any, rows: np.ndarray) -> torch.Tensor:
        """The observations of episodes ``rows`` ((n,) indices) on the device: (n, obs_dim) float32, or frame stacks
        (n, stack, H, W) uint8. Dict observations (one mapping of batched arrays, or a sequence of
        per-episode mappings) are flattened with the checkpoint's keys. EnvError when the shapes
        do not fit the checkpoint's observation space, or a vector observation holds NaN/inf
        (the one check of the observations ``act`` gets)."""
        spec, n = self.info.observation_space, len(rows)
        if isinstance(spec, DictObservations):
            observation = dict_rows(observation, spec.keys, spec.dims, n)  # (n, dim)
        if self._frames is not None:
            frames = fit_batch(np.asarray(observation), n, self._frames, "observations",
                                np.uint8)  # (n, S, H, W)
            return torch.tensor(np.ascontiguousarray(frames), device=self.device)
        obs = fit_batch(np.asarray(observation, dtype=np.float32), n, (spec.dim,),
                         "observations")  # (n, obs_dim)
        finite = np.isfinite(obs)
        if not finite.all():
            e, i = np.argwhere(~finite)[0]
            raise EnvError(f"observation contains NaN/inf (dimension {i}) for episode {rows[e]} "
                           f"at step {self._t[rows[e]]}: {obs[e, i]}")
        # (a copy: torch.tensor refuses numpy's negative strides, e.g. obs[::-1])
        return torch.tensor(np.ascontiguousarray(obs), device=self.device)

    # ---- acting -------------------------------------------------------------------------------
    @torch.inference_mode()
    def act(self, observation: np.ndarray, last_reward: float | np.ndarray | None = None,
            index: np.ndarray | None = None) -> np.ndarray:
        """Action for the current observation of each episode in ``index`` (default: all).

        ``last_reward`` is the reward received for the previous action (ignored at an episode's
        first step); it is subtracted from the return-to-go before acting. Inputs may be
        read-only arrays (they are copied). ``observation``: (n, obs_dim) vectors, (n, stack, H, W)
        uint8 frame stacks, or Dict observations (a mapping of batched arrays, or a sequence of
        per-episode mappings; unbatched after a scalar ``reset``). Returns (n, act_dim) float32 in the env's units, or
        (n,) int64 indices (unbatched after a scalar ``reset``).

        ``index``: episode numbers, each in 0..N-1 and at most once (ConfigError otherwise).
        ``last_reward``: a scalar (for every episode) or (n,).

        Raises ConfigError when an episode reaches the model's ``max_ep_len`` (timesteps beyond
        it have no embedding: cap episodes with max_steps), EnvError for observations of another
        shape than (n, obs_dim) (or (obs_dim,) for one episode; the same rule for frame stacks,
        (n, stack, H, W), and for each key of a Dict observation, (n, dim_k)) or holding NaN/inf,
        for a ``last_reward`` of another shape, and
        TrainingError when the model produces a non-finite action, naming the episode, its target
        and step.
        """
        rows = self._rows(index)  # (n,)
        idx = torch.from_numpy(rows).to(self.device)
        steps = self._t[rows]  # (n,) this step's timestep per episode
        self._check_limit(rows, steps)
        obs = self._observation_tensor(observation, rows)  # (n, obs_dim) or (n, S, H, W)
        t = torch.from_numpy(steps).to(self.device)  # (n,)
        self._subtract_reward(last_reward, rows, idx, steps, t)
        pending = self._pending[idx]  # (n,)
        steered = ~torch.isnan(pending)
        any_steered = bool(steered.any())
        if any_steered:
            delta = torch.where(steered, pending - self._next_rtg[idx], 0.0)  # (n,)
            self._next_rtg[idx] += delta
            self._rtg[idx] += delta[:, None, None] * self._masks[idx][..., None]
            self._pending[idx] = float("nan")
        obs_w, act_w, rtg_w, ts_w, mask_w = self._slid_windows(idx, obs, t)
        all_real = bool(mask_w.all())
        with runtime.autocast(self.device, self.precision):
            if self.kv_cache:
                pred = self._steps.predict(self.model, idx, t, obs_w, act_w, rtg_w, ts_w, mask_w,
                                           invalidate=any_steered)
            else:
                pred = self.model.predict_last(obs_w, act_w, rtg_w, ts_w,
                                               None if all_real else mask_w)
        pred = pred.float()  # (n, A) in [-1, 1], or (n, n_actions) logits
        self._check_finite(pred, rows, steps)
        pred = self._choose(pred, rows)  # (n, A) in [-1, 1], or (n,) indices
        act_w[:, -1] = pred
        self._obs[idx], self._act[idx], self._rtg[idx] = obs_w, act_w, rtg_w
        self._timesteps[idx], self._masks[idx] = ts_w, mask_w
        self._t[rows] = steps + 1
        action = self._norm.actions_from_model(pred).cpu().numpy()  # (n, A) env units, or (n,)
        return action[0] if self._single and index is None else action

    def _check_limit(self, rows: np.ndarray, steps: np.ndarray) -> None:
        """ConfigError when an episode's timestep ``steps`` (n,) reaches the model's max_ep_len
        (timesteps beyond it have no embedding), naming the episode and its target."""
        limit = self.info.model.max_ep_len
        if steps.size and steps.max() >= limit:
            e = int(rows[np.argmax(steps)])
            raise ConfigError(f"episode {e} (target {float(self._targets[e]):g}) reached timestep "
                              f"{int(steps.max())}, but the model's max_ep_len is {limit} (it "
                              f"embeds timesteps 0 to {limit - 1}); cap episodes at {limit} steps "
                              f"with max_steps (dtlab evaluate --max-steps {limit})")

    def _subtract_reward(self, last_reward, rows: np.ndarray, idx: torch.Tensor,
                         steps: np.ndarray, t: torch.Tensor) -> None:
        """Subtract each episode's ``last_reward`` (a scalar or (n,)) from its return-to-go,
        except at its first step; warn once when a Decision Transformer gets none after it."""
        if last_reward is not None:
            rewards = per_episode("last_reward", last_reward, rows.shape[0])  # (n,)
            if not np.isfinite(rewards).all():
                raise EnvError(f"last_reward contains NaN/inf ({rewards.tolist()[:8]}): the env "
                               "returned a non-finite reward")
            r = torch.tensor(rewards, device=self.device)
            self._next_rtg[idx] -= torch.where(t > 0, self._norm.scale_returns(r), 0.0)
        elif steps.size and steps.max() > 0 and \
                self.info.model.architecture == "decision-transformer":
            warnings.warn("act was given no last_reward after an episode's first step: the "
                          "return-to-go is not reduced by the reward received (pass the reward "
                          "of the previous action as last_reward)", DtlabWarning, stacklevel=3)

    def _slid_windows(self, idx: torch.Tensor, obs: torch.Tensor, t: torch.Tensor
                      ) -> tuple[torch.Tensor, ...]:
        """The selected episodes' windows slid one step left, this step written at the end
        (observation, unknown action 0, return-to-go, timestep ``t``, real): (obs_w (n, K,
        obs_dim or D), act_w (n, K, act_dim) or (n, K), rtg_w (n, K, 1), ts_w (n, K), mask_w
        (n, K))."""
        obs_w = self._obs[idx].roll(-1, dims=1)  # (n, K, obs_dim)
        act_w = self._act[idx].roll(-1, dims=1)  # (n, K, act_dim), or (n, K) indices
        rtg_w = self._rtg[idx].roll(-1, dims=1)  # (n, K, 1)
        ts_w = self._timesteps[idx].roll(-1, dims=1)  # (n, K)
        mask_w = self._masks[idx].roll(-1, dims=1)  # (n, K)
        if self._frames is None:
            obs_w[:, -1] = self._norm.normalize_observations(obs)
        else:  # this step's frame stacks, scaled to [0, 1] and encoded: (n, D)
            with torch.autocast(self.device.type, dtype=torch.bfloat16,
                                enabled=self.precision == "bf16"):
                frames = self._norm.normalize_observations_(obs.to(torch.float32))
                obs_w[:, -1] = self.model.encode_observations(frames).float()
        act_w[:, -1] = 0  # not yet known; s_t's prediction cannot see it (causal)
        rtg_w[:, -1, 0] = self._next_rtg[idx]
        ts_w[:, -1] = t
        mask_w[:, -1] = True
        return obs_w, act_w, rtg_w, ts_w, mask_w

    def _check_finite(self, pred: torch.Tensor, rows: np.ndarray, steps: np.ndarray) -> None:
        """TrainingError naming the first episode whose model output ``pred`` (n, .) is not
        finite, its target and step."""
        finite = torch.isfinite(pred).all(-1)  # (n,)
        if not bool(finite.all()):
            bad = int(torch.argmin(finite.int()))
            e = int(rows[bad])
            raise TrainingError(
                f"the model produced a non-finite action ({pred[bad].tolist()}) for episode {e} "
                f"(target {float(self._targets[e]):g}) at step {int(steps[bad])}; its weights or "
                "inputs are not finite or overflow")

    def _choose(self, pred: torch.Tensor, rows: np.ndarray) -> torch.Tensor:
        """The action from the model's output ``pred`` (n, A) or logits (n, n_actions): sampled
        at ``temperature`` > 0 (each episode from its own stream), else the greedy one."""
        head = self.model.predict_action
        if self.temperature > 0 and not isinstance(self.info.action_space, DiscreteActions):
            # The stochastic head's Gaussian, its std scaled by the temperature, squashed; one
            # row of standard normal draws per episode from its own stream.
            noise = torch.tensor(np.stack([self._streams[r].standard_normal(head.width)
                                           for r in rows]), dtype=pred.dtype,
                                 device=self.device)  # (n, A)
            return head.sample_action(pred, noise, self.temperature)  # (n, A) in [-1, 1]
        if self.temperature > 0:  # (n,) indices sampled from softmax(logits / temperature)
            probs = torch.softmax(pred / self.temperature, dim=-1)  # (n, n_actions)
            # One uniform per episode from its own stream, inverted through the CDF: an episode's
            # draws depend on its stream and its logits only, not on what else is in the batch.
            u = torch.tensor([self._streams[r].random() for r in rows], dtype=probs.dtype,
                             device=self.device)  # (n,)
            cdf = probs.cumsum(-1)  # (n, n_actions)
            return torch.searchsorted(cdf, u[:, None], right=True).clamp_(
                max=probs.shape[-1] - 1)[:, 0]
        return head.greedy_action(pred)  # (n, A), or (n,) indices
