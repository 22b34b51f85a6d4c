"""Transformers' ``DecisionTransformerModel`` layout in and out of dtlab checkpoints.

A Transformers DT directory holds ``config.json`` (``DecisionTransformerConfig``) and
``model.safetensors`` (or a pickled ``pytorch_model.bin``, read only through
``torch.load(weights_only=True)``). The two models compute the same function once these
differences are mapped (each one either exactly or refused in one line, ``model_config_from_hf``):

- GPT-2's position embedding: Transformers' DT passes ``position_ids`` of zeros, so ``wpe[0]`` is
  added to every token after ``embed_ln`` (transformers issue #17946; the original DT code
  does the same through GPT-2). dtlab has no position embedding; ``embed_ln(x) + wpe[0]`` is
  ``embed_ln`` with ``wpe[0]`` added to its bias, which is how it is mapped (exact up to float
  rounding in the order of two additions). The other rows of ``wpe`` are never read.
- GPT-2's ``Conv1D`` stores weights as (in, out): transposed into ``nn.Linear``'s (out, in).
  ``c_attn`` splits into query, key, value in that order, as dtlab's ``qkv``.
- Activation: ``relu`` and ``gelu`` (exact erf GELU in both) map; GPT-2's tanh approximation
  (``gelu_new`` and the like) is refused: dtlab has no such activation.
- MLP width ``n_inner`` (default 4 x hidden) must be a multiple of hidden_size (dtlab's
  ``mlp_ratio``); ``layer_norm_epsilon`` must be 1e-5 (``nn.LayerNorm``'s default, dtlab's);
  ``scale_attn_weights`` True and ``scale_attn_by_inverse_layer_idx`` False (dtlab scales by
  1/sqrt(head_dim) only); no cross-attention. ``reorder_and_upcast_attn`` changes only the order
  of the scaling (and fp16 upcasting), not the function: accepted.
- Dropout: dtlab has one rate at the same four places (embeddings, attention probabilities,
  attention output, MLP output); ``embd_pdrop``, ``attn_pdrop`` and ``resid_pdrop`` must be equal.
- Heads: ``predict_action`` with ``action_tanh`` (dtlab's tanh head; without tanh: refused).
  ``predict_state`` and ``predict_return``, which dtlab does not use, are dropped on the way in
  and written as zeros on the way out; ``wte`` (never read: the DT feeds embeddings) likewise.
- Continuous actions and vector (or flattened Dict) observations only: Transformers' DT embeds
  states and actions linearly.

What Transformers' layout lacks is the normalization: observation mean/std, the return scale and
the action bounds. ``from_hf`` takes them from a ``dtlab`` record in config.json (written by
``to_hf``), from flags, or computes them from a dataset; ``to_hf`` writes them there.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from dtlab import checkpoint
from dtlab.atomic import atomic_path, dumps_json
from dtlab.checkpoint import PolicyInfo
from dtlab.config import ModelConfig
from dtlab.errors import CheckpointError, ConfigError, EnvError
from dtlab.baselines import build_model
from dtlab.normalizer import Normalizer
from dtlab.spaces import (ContinuousActions, DictObservations, VectorObservations,
                          action_space_from_json, observation_space_from_json)

HF_CONFIG, HF_SAFETENSORS, HF_PICKLE = "config.json", "model.safetensors", "pytorch_model.bin"
HUB_PREFIX = "hub:"
# The DT paper's context length for the gym tasks (K = 20, gym/experiment.py); Transformers'
# config does not record K, so from_hf takes it from --context-len with this default.
DEFAULT_CONTEXT_LEN = 20
# nn.LayerNorm's default epsilon, used by every dtlab LayerNorm.
LAYER_NORM_EPS = 1e-5
# GPT-2's default n_positions (Transformers' GPT2Config); wpe rows beyond 0 are written as zeros.
N_POSITIONS = 1024
# Activations both sides compute identically (transformers.activations.ACT2FN: "gelu" is the
# exact erf GELU, as torch.nn.GELU()).
ACTIVATIONS = {"relu": "relu", "gelu": "gelu"}


# ---- configs --------------------------------------------------------------------------------------
def model_config_from_hf(config: dict[str, Any], context_len: int, source: str) -> ModelConfig:
    """dtlab's ModelConfig for a Transformers DT config; ConfigError naming the field and
    ``source`` for each difference dtlab cannot represent exactly (the module docstring)."""
    def need(ok: bool, what: str) -> None:
        if not ok:
            raise ConfigError(f"{source}: {what}; dtlab cannot represent this model exactly")

    need(config.get("model_type") == "decision_transformer",
         f"model_type is {config.get('model_type')!r}, not 'decision_transformer'")
    hidden, heads = config.get("hidden_size", 128), config.get("n_head", 1)
    activation = config.get("activation_function", "relu")
    need(activation in ACTIVATIONS, f"activation_function {activation!r} (only relu and gelu map)")
    n_inner = config.get("n_inner") or 4 * hidden
    need(n_inner % hidden == 0, f"n_inner {n_inner} is not a multiple of hidden_size {hidden}")
    need(math.isclose(config.get("layer_norm_epsilon", 1e-5), LAYER_NORM_EPS, rel_tol=1e-9),
         f"layer_norm_epsilon {config.get('layer_norm_epsilon')} (dtlab's is {LAYER_NORM_EPS})")
    need(config.get("scale_attn_weights", True), "scale_attn_weights is false")
    need(not config.get("scale_attn_by_inverse_layer_idx", False),
         "scale_attn_by_inverse_layer_idx is true")
    need(not config.get("add_cross_attention", False), "add_cross_attention is true")
    need(config.get("action_tanh", True), "action_tanh is false (dtlab's head is tanh)")
    rates = {config.get(k, 0.1) for k in ("embd_pdrop", "attn_pdrop", "resid_pdrop")}
    need(len(rates) == 1, f"embd_pdrop, attn_pdrop and resid_pdrop differ ({sorted(rates)})")
    return ModelConfig(embed_dim=hidden, n_layers=config.get("n_layer", 3), n_heads=heads,
                       mlp_ratio=n_inner // hidden, dropout=float(rates.pop()),
                       context_len=context_len, max_ep_len=config.get("max_ep_len", 4096),
                       activation=ACTIVATIONS[activation])


def hf_config(info: PolicyInfo) -> dict[str, Any]:
    """config.json of the Transformers layout for a dtlab checkpoint, with a ``dtlab`` record
    (spaces, normalizer, env id, K, dataset) that ``from_hf`` reads back."""
    m = info.model
    rate = m.dropout
    return {
        "model_type": "decision_transformer", "architectures": ["DecisionTransformerModel"],
        "state_dim": info.observation_space.dim, "act_dim": info.action_space.dim,
        "hidden_size": m.embed_dim, "max_ep_len": m.max_ep_len, "action_tanh": True,
        "vocab_size": 1, "n_positions": N_POSITIONS, "n_layer": m.n_layers, "n_head": m.n_heads,
        "n_inner": m.mlp_ratio * m.embed_dim, "activation_function": m.activation,
        "resid_pdrop": rate, "embd_pdrop": rate, "attn_pdrop": rate,
        "layer_norm_epsilon": LAYER_NORM_EPS, "scale_attn_weights": True,
        "scale_attn_by_inverse_layer_idx": False, "reorder_and_upcast_attn": False,
        "add_cross_attention": False, "bos_token_id": None, "eos_token_id": None,
        "dtlab": {"context_len": m.context_len, "env_id": info.env_id,
                  "observation_space": info.observation_space.to_json(),
                  "action_space": info.action_space.to_json(),
                  "normalizer": info.normalizer.to_json(), "ref_min_score": info.ref_min_score,
                  "ref_max_score": info.ref_max_score,
                  "dataset": checkpoint.shareable_dataset(info.dataset), "step": info.step},
    }


# ---- weights --------------------------------------------------------------------------------------
def state_dict_from_hf(weights: dict[str, torch.Tensor], cfg: ModelConfig,
                       source: str) -> dict[str, torch.Tensor]:
    """dtlab's state dict from Transformers DT weights (float32): Conv1D transposed, ``wpe[0]``
    folded into ``embed_ln``'s bias, unused heads dropped. CheckpointError naming a missing key."""
    def get(key: str) -> torch.Tensor:
        if key not in weights:
            raise CheckpointError(f"{source}: no weight {key!r} (not a DecisionTransformerModel)")
        return weights[key].to(torch.float32)

    out = {name: get(name) for name in (
        "embed_timestep.weight", "embed_return.weight", "embed_return.bias", "embed_state.weight",
        "embed_state.bias", "embed_action.weight", "embed_action.bias", "embed_ln.weight")}
    out["embed_ln.bias"] = get("embed_ln.bias") + get("encoder.wpe.weight")[0]
    for i in range(cfg.n_layers):
        h, b = f"encoder.h.{i}.", f"blocks.{i}."
        for ln in ("ln_1", "ln_2"):
            out[f"{b}{ln}.weight"], out[f"{b}{ln}.bias"] = get(f"{h}{ln}.weight"), get(f"{h}{ln}.bias")
        for conv, linear in (("attn.c_attn", "attn.qkv"), ("attn.c_proj", "attn.proj"),
                             ("mlp.c_fc", "mlp.0"), ("mlp.c_proj", "mlp.2")):
            out[f"{b}{linear}.weight"] = get(f"{h}{conv}.weight").t().contiguous()  # (in, out) -> (out, in)
            out[f"{b}{linear}.bias"] = get(f"{h}{conv}.bias")
    out["ln_f.weight"], out["ln_f.bias"] = get("encoder.ln_f.weight"), get("encoder.ln_f.bias")
    out["predict_action.weight"] = get("predict_action.0.weight")
    out["predict_action.bias"] = get("predict_action.0.bias")
    return out


def state_dict_to_hf(state: dict[str, torch.Tensor], cfg: ModelConfig, state_dim: int,
                     act_dim: int) -> dict[str, torch.Tensor]:
    """Transformers DT weights from dtlab's state dict: the inverse of ``state_dict_from_hf``
    with ``wpe`` all zeros (so ``embed_ln``'s bias is dtlab's as it is), and zeros for the
    weights dtlab does not have (``wte``, ``predict_state``, ``predict_return``)."""
    d = cfg.embed_dim
    out = {name: state[name].clone() for name in (
        "embed_timestep.weight", "embed_return.weight", "embed_return.bias", "embed_state.weight",
        "embed_state.bias", "embed_action.weight", "embed_action.bias", "embed_ln.weight",
        "embed_ln.bias")}
    out["encoder.wte.weight"] = torch.zeros(1, d)
    out["encoder.wpe.weight"] = torch.zeros(N_POSITIONS, d)
    for i in range(cfg.n_layers):
        h, b = f"encoder.h.{i}.", f"blocks.{i}."
        for ln in ("ln_1", "ln_2"):
            out[f"{h}{ln}.weight"], out[f"{h}{ln}.bias"] = state[f"{b}{ln}.weight"].clone(), \
                state[f"{b}{ln}.bias"].clone()
        for conv, linear in (("attn.c_attn", "attn.qkv"), ("attn.c_proj", "attn.proj"),
                             ("mlp.c_fc", "mlp.0"), ("mlp.c_proj", "mlp.2")):
            out[f"{h}{conv}.weight"] = state[f"{b}{linear}.weight"].t().contiguous()
            out[f"{h}{conv}.bias"] = state[f"{b}{linear}.bias"].clone()
    out["encoder.ln_f.weight"], out["encoder.ln_f.bias"] = state["ln_f.weight"].clone(), \
        state["ln_f.bias"].clone()
    out["predict_action.0.weight"] = state["predict_action.weight"].clone()
    out["predict_action.0.bias"] = state["predict_action.bias"].clone()
    out["predict_state.weight"], out["predict_state.bias"] = torch.zeros(state_dim, d), \
        torch.zeros(state_dim)
    out["predict_return.weight"], out["predict_return.bias"] = torch.zeros(1, d), torch.zeros(1)
    return out


def read_hf_dir(path: Path) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """config.json and the weights of a Transformers directory (safetensors preferred; a pickle
    only through ``torch.load(weights_only=True)``, which refuses code). CheckpointError naming
    the file when something is missing or unreadable."""
    if not path.is_dir():
        raise CheckpointError(f"{path}: Hugging Face model directory not found")
    try:
        config = json.loads((path / HF_CONFIG).read_text())
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"{path / HF_CONFIG}: missing or not JSON: {exc}") from None
    if not isinstance(config, dict):
        raise CheckpointError(f"{path / HF_CONFIG}: expected a JSON object")
    try:
        if (path / HF_SAFETENSORS).is_file():
            weights = load_file(path / HF_SAFETENSORS, device="cpu")
        elif (path / HF_PICKLE).is_file():
            weights = torch.load(path / HF_PICKLE, map_location="cpu", weights_only=True)
        else:
            raise CheckpointError(f"{path}: has neither {HF_SAFETENSORS} nor {HF_PICKLE}")
    except CheckpointError:
        raise
    except Exception as exc:  # safetensors and torch.load raise many types for bad files
        raise CheckpointError(f"{path}: cannot read the weights safely: {exc}") from None
    return config, weights


def pull(source: str) -> Path:
    """A local directory for ``source``: itself, or for ``hub:REPO_ID`` a snapshot of the Hub
    repository's config.json and weights (huggingface_hub.snapshot_download, cached)."""
    if not source.startswith(HUB_PREFIX):
        return Path(source)
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(source[len(HUB_PREFIX):],
                                      allow_patterns=[HF_CONFIG, HF_SAFETENSORS, HF_PICKLE]))
    except Exception as exc:  # network, authentication, unknown repository
        raise CheckpointError(f"{source}: cannot download from the Hugging Face Hub: {exc}") from None


# ---- from / to ----------------------------------------------------------------------------------
def _normalizer_from_flags(obs_dim: int, dataset: str | None, obs_mean, obs_std,
                           return_scale: float, actions: ContinuousActions, source: str):
    """(Normalizer, dataset record) from a dataset file or from explicit statistics."""
    if dataset is not None:
        from dtlab.data.formats import load_episodes

        episodes = load_episodes(dataset)
        if isinstance(episodes.observation_space, DictObservations):
            raise ConfigError(f"{dataset}: Dict observations; give --obs-mean and --obs-std of "
                              "the flattened observation the model was trained on")
        if episodes.observation_space.dim != obs_dim:
            raise ConfigError(f"{dataset}: observations have {episodes.observation_space.dim} "
                              f"values, {source} has state_dim {obs_dim} (--dataset)")
        norm = Normalizer.from_episodes(episodes, return_scale, actions)
        return norm, {"path": str(dataset), **episodes.summary()}
    if obs_mean is None or obs_std is None:
        raise ConfigError(f"{source}: the Hugging Face layout has no normalization statistics; "
                          "give --dataset FILE (computed from it) or --obs-mean and --obs-std")
    if len(obs_mean) != obs_dim or len(obs_std) != obs_dim:
        raise ConfigError(f"--obs-mean and --obs-std need {obs_dim} values each (state_dim), got "
                          f"{len(obs_mean)} and {len(obs_std)}")
    return Normalizer(list(obs_mean), list(obs_std), return_scale, actions.low, actions.high), {}


def from_hf(source: str, out: str | Path, *, dataset: str | None = None, env: str | None = None,
            obs_mean=None, obs_std=None, return_scale: float | None = None,
            context_len: int | None = None) -> Path:
    """Convert a Transformers DT directory (or ``hub:REPO_ID``) into a dtlab run directory
    ``out`` (one checkpoint, ``step_00000000``, and ``latest``). The spaces and statistics come
    from config.json's ``dtlab`` record when ``to_hf`` wrote one, else from ``env`` (action
    bounds, return scale default) with ``dataset`` or ``obs_mean``/``obs_std``. Returns ``out``.

    ConfigError for a model dtlab cannot represent exactly, for missing statistics (--dataset,
    --obs-mean/--obs-std) or env (--env), or a non-empty ``out``; CheckpointError for missing or
    unreadable files; EnvError when the env's spaces do not fit.
    """
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ConfigError(f"{out}: exists and is not an empty directory; choose another OUT")
    path = pull(source)
    config, weights = read_hf_dir(path)
    name = str(path / HF_CONFIG)
    record = config.get("dtlab") if isinstance(config.get("dtlab"), dict) else None
    cfg = model_config_from_hf(config, context_len or (record or {}).get("context_len")
                               or DEFAULT_CONTEXT_LEN, name)
    state_dim, act_dim = config.get("state_dim", 17), config.get("act_dim", 4)
    if record is not None and env is None and dataset is None and obs_mean is None:
        observations = observation_space_from_json(record["observation_space"])
        actions = action_space_from_json(record["action_space"])
        norm = Normalizer.from_json(record["normalizer"])
        env_id, data = record["env_id"], record.get("dataset") or {}
        ref = (record.get("ref_min_score"), record.get("ref_max_score"))
        step = int(record.get("step", 0))
    else:
        if env is None:
            raise ConfigError(f"{name}: the Hugging Face layout does not name its env; give --env "
                              "(its action bounds and return scale)")
        from dtlab.envs import env_info, reference_scores

        observations, actions = _spaces_from_env(env, state_dim, act_dim, name)
        scale = return_scale if return_scale is not None else env_info(env).return_scale
        if scale is None:
            raise ConfigError(f"{name}: dtlab knows no return scale for {env}; give the one the "
                              "model was trained with (--return-scale)")
        scale = float(scale)
        norm, data = _normalizer_from_flags(state_dim, dataset, obs_mean, obs_std, scale, actions,
                                            name)
        env_id, ref, step = env, reference_scores(env, None, None), 0
    if observations.dim != state_dim or actions.dim != act_dim:
        raise ConfigError(f"{name}: state_dim/act_dim ({state_dim}, {act_dim}) differ from its "
                          "dtlab record's spaces")
    info = PolicyInfo(model=cfg, observation_space=observations, action_space=actions,
                      normalizer=norm, env_id=env_id, ref_min_score=ref[0], ref_max_score=ref[1],
                      dataset={**data, "converted_from": source}, step=step)
    model = build_model(cfg, observations, actions)
    state = state_dict_from_hf(weights, cfg, name)
    expected = model.state_dict()
    for key, value in state.items():
        if value.shape != expected[key].shape:
            raise CheckpointError(f"{name}: weight {key!r} has shape {tuple(value.shape)}, the "
                                  f"config implies {tuple(expected[key].shape)}")
    model.load_state_dict(state)
    checkpoint.save(out, "step_00000000", model, info)
    return out


def _spaces_from_env(env: str, state_dim: int, act_dim: int, name: str
                     ) -> tuple[VectorObservations, ContinuousActions]:
    """The spaces of a converted model from its ``env`` (--env): vector observations of
    ``state_dim`` and the env's bounded continuous actions of ``act_dim``; EnvError naming the
    env and ``name`` (the model's config.json) when they do not fit."""
    from dtlab.envs import make_env
    from dtlab.spaces import action_space_from_gym

    gym_env = make_env(env)
    try:
        actions = action_space_from_gym(gym_env.action_space)
        env_obs = gym_env.observation_space
    finally:
        gym_env.close()
    if not isinstance(actions, ContinuousActions) or actions.low is None or \
            actions.dim != act_dim:
        raise EnvError(f"{env}: action space {gym_env.action_space} does not fit "
                       f"{name}'s act_dim {act_dim} (continuous, bounded) (--env)")
    if getattr(env_obs, "shape", None) != (state_dim,):
        raise EnvError(f"{env}: observations {env_obs} do not fit {name}'s state_dim "
                       f"{state_dim} (--env)")
    return VectorObservations(state_dim), actions


def to_hf(run: str | Path, out: str | Path, push: str | None = None) -> Path:
    """Write run (or checkpoint) ``run`` in the Transformers layout into ``out`` (config.json with
    the ``dtlab`` record, model.safetensors), atomically; with ``push``, also upload it to the
    Hub repository of that id (created if missing; huggingface_hub's login). ConfigError for
    checkpoints the layout cannot hold (discrete actions, frame stacks, the baselines) or a
    non-empty ``out``."""
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ConfigError(f"{out}: exists and is not an empty directory; choose another OUT")
    path = checkpoint.resolve(run)
    model, info = checkpoint.load(path, "cpu")
    if info.model.policy != "deterministic":
        raise ConfigError(f"{path}: the Hugging Face DecisionTransformerModel has a deterministic "
                          f"tanh head; this checkpoint's is {info.model.policy} "
                          "(--model.policy stochastic)")
    if info.model.architecture != "decision-transformer" or \
            not isinstance(info.action_space, ContinuousActions) or \
            not isinstance(info.observation_space, (VectorObservations, DictObservations)):
        raise ConfigError(f"{path}: the Hugging Face DecisionTransformerModel holds continuous "
                          "actions and vector observations with a decision-transformer; this "
                          f"checkpoint is a {info.model.architecture} with "
                          f"{info.action_space.to_json()['type']} actions and "
                          f"{info.observation_space.to_json()['type']} observations")
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    weights = state_dict_to_hf(state, info.model, info.observation_space.dim,
                               info.action_space.dim)
    with atomic_path(out, directory=True) as tmp:
        save_file(weights, tmp / HF_SAFETENSORS, metadata={"format": "pt"})
        (tmp / HF_CONFIG).write_text(dumps_json(hf_config(info)))
    if push:
        from huggingface_hub import HfApi

        try:
            api = HfApi()
            api.create_repo(push, exist_ok=True)
            api.upload_folder(repo_id=push, folder_path=str(out))
        except Exception as exc:  # network, authentication, permissions
            raise ConfigError(f"--push {push}: upload to the Hugging Face Hub failed: {exc}") from None
    return out


__all__ = ["from_hf", "to_hf", "model_config_from_hf", "hf_config", "state_dict_from_hf",
           "state_dict_to_hf", "read_hf_dir", "pull"]
