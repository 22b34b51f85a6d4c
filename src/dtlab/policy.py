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
atari/mingpt/trainer_atari.py, ``sample(..., temperature=1.0, sample=True)``).
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from dtlab import checkpoint, runtime
from dtlab.checkpoint import PolicyInfo
from dtlab.config import check_targets
from dtlab.errors import ConfigError, DtlabWarning, EnvError, TrainingError
from dtlab.kv_cache import KVCache, predict_cached
from dtlab.model import DecisionTransformer
from dtlab.spaces import (DictObservations, DiscreteActions, ImageObservations,
                          describe_observations, flatten_observation)


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
    observations; ``index`` selects the episodes that advance (see dtlab.evaluate.rollout).
    """

    def __init__(self, model: DecisionTransformer, info: PolicyInfo, device: str | torch.device = "cpu",
                 precision: str = "fp32", kv_cache: bool = False, temperature: float = 0.0,
                 seed: int = 0):
        """``kv_cache``: incremental inference with cached keys/values (opt-in, approximate once
        the K-step window slides; see dtlab.kv_cache); decision-transformer models only
        (ConfigError otherwise). ``temperature``: 0 acts greedily; above 0, discrete
        actions are sampled from softmax(logits / temperature) with a generator seeded with
        ``seed`` (ConfigError for a negative one, or one above 0 with continuous actions)."""
        if kv_cache and info.model.architecture != "decision-transformer":
            raise ConfigError(f"kv_cache: kv-cache rollouts are for decision-transformer models, "
                              f"not {info.model.architecture}; set kv_cache False")
        if not isinstance(temperature, (int, float)) or isinstance(temperature, bool) or \
                not 0 <= temperature < float("inf"):
            raise ConfigError(f"temperature must be a finite number >= 0, got {temperature!r}")
        if temperature > 0 and not isinstance(info.action_space, DiscreteActions):
            raise ConfigError(f"temperature {temperature:g}: sampling is for discrete actions; "
                              "this checkpoint's actions are continuous (use temperature 0)")
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
        self._generator = torch.Generator(device=self.device)
        self._generator.manual_seed(int(seed))
        spec = info.observation_space
        # Per step: frame stacks kept as uint8 until the forward pass, or normalized vectors.
        self._frames = spec.stacked_shape if isinstance(spec, ImageObservations) else None
        self.num_envs = 0
        self._single = True
        # Targets above this warn (set from the checkpoint's calibration.json by from_checkpoint).
        self.reliable_max_target: float | None = None

    @classmethod
    def from_checkpoint(cls, path: str | Path, device: str = "cpu", precision: str = "fp32",
                        kv_cache: bool = False, temperature: float = 0.0,
                        seed: int = 0) -> "DTPolicy":
        """Load a checkpoint (and its reliable maximum target, when ``dtlab calibrate`` stored
        one)."""
        model, info = checkpoint.load(path, device)
        policy = cls(model, info, device, precision, kv_cache, temperature, seed)
        calibration = checkpoint.load_calibration(path)
        if calibration is not None:
            policy.reliable_max_target = float(calibration["reliable_max_target"])
        return policy

    def _warn_above_reliable_max(self, targets: np.ndarray) -> None:
        """One line when a target exceeds the calibrated reliable maximum (the same text for every
        call, so Python's default filter shows it once)."""
        limit = self.reliable_max_target
        if limit is not None and targets.size and float(np.max(targets)) > limit:
            warnings.warn(f"target returns above {limit:g}, the reliable maximum target found by "
                          "calibration (calibration.json), were asked for: achieved returns "
                          "stopped rising there", DtlabWarning, stacklevel=3)

    # ---- episode state ------------------------------------------------------------------------
    def reset(self, target_return: float | Sequence[float] | np.ndarray) -> None:
        """Start new episodes: one per target (a scalar starts one episode and ``act`` then takes
        and returns unbatched arrays). Warns (DtlabWarning) for a target above the checkpoint's
        calibrated reliable maximum target; ConfigError for a non-finite or absurd target."""
        check_targets("target_return", np.ravel(np.asarray(target_return, dtype=np.float64)).tolist())
        self._warn_above_reliable_max(np.asarray(target_return, dtype=np.float64))
        targets = np.array(target_return, dtype=np.float32)  # a copy: the input may be read-only
        self._single = targets.ndim == 0
        targets = targets.reshape(-1)
        n, k, dev = targets.shape[0], self.context_len, self.device
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
        self._cache: KVCache | None = None  # kv_cache mode only: the cache, its episodes, its step
        self._cache_ids, self._cache_t = None, -1

    def steer(self, return_to_go: float | Sequence[float], index: np.ndarray | None = None) -> None:
        """Ask for a different return from the next step on (run-time steering).

        The next ``act`` conditions on exactly ``return_to_go`` (the reward passed to it is not
        subtracted), and the return-to-go tokens already in the context shift by the same amount,
        so the context reads as if this return had been asked for from the start. Warns
        (DtlabWarning) above the checkpoint's calibrated reliable maximum target.
        """
        idx = self._index(index)
        check_targets("return_to_go", np.ravel(np.asarray(return_to_go, dtype=np.float64)).tolist())
        self._warn_above_reliable_max(np.asarray(return_to_go, dtype=np.float64))
        new = torch.tensor(np.asarray(return_to_go, dtype=np.float32).reshape(-1), device=self.device)
        self._pending[idx] = self._norm.scale_returns(new)

    @property
    def returns_to_go(self) -> np.ndarray:
        """Return-to-go each episode conditioned its last action on (unscaled). (N,)"""
        return self._norm.unscale_returns(self._next_rtg).cpu().numpy()

    def _index(self, index) -> torch.Tensor:
        if not self.num_envs:
            raise ConfigError("the policy has no episodes: call reset(target_return) first")
        if index is None:
            return torch.arange(self.num_envs, device=self.device)
        return torch.tensor(np.asarray(index, dtype=np.int64).reshape(-1), device=self.device)

    def _predict_cached(self, idx, t, obs_w, act_w, rtg_w, ts_w, mask_w, invalidate: bool) -> torch.Tensor:
        """kv_cache mode: feed only the new step (and the previous step's now known action) when
        the cache holds these episodes at this step; otherwise (first step, steering, episodes at
        different steps) rebuild it from the window's real steps (an exact pass)."""
        k, t0 = self.context_len, int(t[0])
        same_t = bool((t == t0).all())
        cache = None
        if self._cache is not None and same_t and self._cache_t == t0 and not invalidate:
            ids = idx.tolist()
            if ids == self._cache_ids:
                cache = self._cache
            elif set(ids) <= set(self._cache_ids):  # some episodes ended: keep the others' rows
                pos = {e: i for i, e in enumerate(self._cache_ids)}
                cache = self._cache.select(torch.tensor([pos[e] for e in ids], device=self.device))
        self._cache = None  # updated in place below: never kept half-updated if a forward fails
        if cache is not None:  # the last two steps: (a_{t-1}) and (R_t, s_t) are new
            pred, new_cache = predict_cached(self.model, obs_w[:, -2:], act_w[:, -2:],
                                             rtg_w[:, -2:], ts_w[:, -2:], cache)
        elif same_t:
            real = min(t0 + 1, k)  # all selected episodes have exactly this many real steps
            pred, new_cache = predict_cached(self.model, obs_w[:, -real:], act_w[:, -real:],
                                             rtg_w[:, -real:], ts_w[:, -real:])
        else:  # episodes at different steps: no shared cache, exact recomputation
            pred = self.model.predict_last(obs_w, act_w, rtg_w, ts_w, mask_w)
            self._cache, self._cache_ids, self._cache_t = None, None, -1
            return pred
        self._cache, self._cache_ids, self._cache_t = new_cache, idx.tolist(), t0 + 1
        return pred

    def _observation_tensor(self, observation: Any, n: int) -> torch.Tensor:
        """The observations of ``n`` episodes on the device: (n, obs_dim) float32, or frame stacks
        (n, stack, H, W) uint8. Dict observations (one mapping of batched arrays, or a sequence of
        per-episode mappings) are flattened with the checkpoint's keys. EnvError when the shapes
        do not fit the checkpoint's observation space."""
        spec = self.info.observation_space
        if isinstance(spec, DictObservations):
            if isinstance(observation, Mapping):
                flat = flatten_observation(spec, observation)  # (n, dim)
            elif isinstance(observation, np.ndarray) and observation.dtype != object:
                flat = observation  # already flattened
            else:
                flat = np.concatenate([flatten_observation(spec, o) for o in observation])
            observation = flat
        if self._frames is not None:
            frames = np.asarray(observation)
            if frames.dtype != np.uint8 or frames.shape[-3:] != self._frames or \
                    frames.size != n * int(np.prod(self._frames)):
                raise EnvError(f"observations of shape {frames.shape} ({frames.dtype}) do not fit "
                               f"the checkpoint's {describe_observations(spec)} for {n} episodes")
            return torch.tensor(frames.reshape(n, *self._frames), device=self.device)
        obs = np.asarray(observation, dtype=np.float32)
        if obs.size != n * spec.dim:
            raise EnvError(f"observations of shape {obs.shape} do not fit the checkpoint's "
                           f"{describe_observations(spec)} for {n} episodes")
        return torch.tensor(obs, device=self.device).reshape(n, spec.dim)  # (n, obs_dim)

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

        Raises ConfigError when an episode reaches the model's ``max_ep_len`` (timesteps beyond
        it have no embedding: cap episodes with max_steps), and TrainingError when the model
        produces a non-finite action, naming the episode, its target and step.
        """
        idx = self._index(index)
        rows = np.arange(self.num_envs) if index is None else np.asarray(index, np.int64).reshape(-1)
        steps = self._t[rows]  # (n,) this step's timestep per episode
        limit = self.info.model.max_ep_len
        if steps.size and steps.max() >= limit:
            e = int(rows[np.argmax(steps)])
            raise ConfigError(f"episode {e} (target {float(self._targets[e]):g}) reached timestep "
                              f"{int(steps.max())}, but the model's max_ep_len is {limit} (it "
                              f"embeds timesteps 0 to {limit - 1}); cap episodes at {limit} steps "
                              f"with max_steps (dtlab evaluate --max-steps {limit})")
        obs = self._observation_tensor(observation, idx.shape[0])  # (n, obs_dim) or (n, S, H, W)
        t = torch.from_numpy(steps).to(self.device)  # (n,)
        if last_reward is not None:
            r = torch.tensor(np.asarray(last_reward, dtype=np.float32).reshape(-1), device=self.device)
            r = r.expand(idx.shape[0])
            self._next_rtg[idx] -= torch.where(t > 0, self._norm.scale_returns(r), 0.0)
        pending = self._pending[idx]  # (n,)
        steered = ~torch.isnan(pending)
        any_steered = bool(steered.any())
        if any_steered:
            delta = torch.where(steered, pending - self._next_rtg[idx], 0.0)  # (n,)
            self._next_rtg[idx] += delta
            self._rtg[idx] += delta[:, None, None] * self._masks[idx][..., None]
            self._pending[idx] = float("nan")
        # Slide every selected window one step left and write the new step at the end.
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
        all_real = bool(mask_w.all())
        with runtime.autocast(self.device, self.precision):
            if self.kv_cache:
                pred = self._predict_cached(idx, t, obs_w, act_w, rtg_w, ts_w, mask_w,
                                            invalidate=any_steered)
            else:
                pred = self.model.predict_last(obs_w, act_w, rtg_w, ts_w,
                                               None if all_real else mask_w)
        pred = pred.float()  # (n, A) in [-1, 1], or (n, n_actions) logits
        finite = torch.isfinite(pred).all(-1)  # (n,)
        if not bool(finite.all()):
            bad = int(torch.argmin(finite.int()))
            e = int(rows[bad])
            raise TrainingError(
                f"the model produced a non-finite action ({pred[bad].tolist()}) for episode {e} "
                f"(target {float(self._targets[e]):g}) at step {int(steps[bad])}; its weights or "
                "inputs are not finite or overflow")
        if self.temperature > 0:  # (n,) indices sampled from softmax(logits / temperature)
            probs = torch.softmax(pred / self.temperature, dim=-1)  # (n, n_actions)
            pred = torch.multinomial(probs, 1, generator=self._generator)[:, 0]
        else:
            pred = self.model.predict_action.greedy_action(pred)  # (n, A), or (n,) indices
        act_w[:, -1] = pred
        self._obs[idx], self._act[idx], self._rtg[idx] = obs_w, act_w, rtg_w
        self._timesteps[idx], self._masks[idx] = ts_w, mask_w
        self._t[rows] = steps + 1
        action = self._norm.actions_from_model(pred).cpu().numpy()  # (n, A) env units, or (n,)
        return action[0] if self._single and index is None else action
