"""``dtlab export RUN --out DIR``: a trained policy as a deploy artifact that runs without torch.

The directory it writes (``ARTIFACT_FILES``):

- ``policy.onnx``: one step of ``DTPolicy.act`` as an ONNX graph (``StepGraph``), exported by
  ``torch.onnx.export``. Inputs: the new ``observation`` (N, obs_dim) float32 in env units (a
  Dict observation flattened with the checkpoint's keys; frame stacks (N, stack, H, W) uint8),
  ``last_reward`` (N,) float32 (ignored at an episode's first step), ``target`` (N,) float32 (NaN:
  keep the return asked for; a number: condition on exactly this return-to-go from this step on,
  which is how an episode starts and how ``steer`` works), and the window state of the last K
  steps: ``observations`` (N, K, F) normalized vectors, or the frame stacks' encodings (F = the
  model's embed_dim), ``actions`` (N, K, act_dim) float32 in [-1, 1] or (N, K) int64,
  ``returns_to_go`` (N, K) float32 divided by the return scale, ``timesteps`` (N, K) int64 and
  ``masks`` (N, K) bool (False at left padding). Outputs: ``action`` (N, act_dim) float32 in the
  env's units (a stochastic head's greedy action, tanh of its mean), or (N,) int64 (the most
  likely index), ``finite`` (N,) bool (whether the model's output was finite) and the next
  window state under the same names with a ``next_`` prefix.
  Observation normalization, return scaling and the action mapping are inside the graph; the
  batch dimension N is dynamic. A fresh episode's state is all zeros (all padding).
- ``policy.json``: spaces, env id, K, max_ep_len, return scale, the data's return statistics and
  the highest target they support (``supported_max_target``: the best return plus half of
  max(|best|, best - worst), no higher than the most the env can return; DTPolicy warns above
  it for an uncalibrated run), that most (``env_max_return``: ``EnvInfo.max_return``, null
  where the env does not bound it), the calibrated reliable target range (when ``dtlab
  calibrate`` ran), observation ranges with the out-of-range threshold, provenance (the dataset
  by its file name) and the dtlab version (``build_policy_record``).
- ``README.md``: a model card written from the run's records (``model_card``).

``dtlab.deploy.DeployedPolicy`` runs the artifact with numpy and onnxruntime alone.

The graph calls the model's ``predict_last`` (the last step's prediction alone), as
``DTPolicy.act`` does: the same arithmetic, in onnxruntime's kernels. It is exported with the
TorchScript-based exporter (``dynamo=False``): ``torch.export`` (the default) refuses the model's
host-side timestep check (``int(timesteps.max())`` is data-dependent); the deploy runtime makes
that check on the host instead, as ``DTPolicy`` does.
"""

from __future__ import annotations

import importlib.util
import json
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from dtlab import checkpoint
from dtlab._version import __version__
from dtlab.atomic import atomic_path, dumps_json
from dtlab.checkpoint import PolicyInfo
from dtlab.data.records import ReturnStats
from dtlab.envs import env_info, supported_max_target
from dtlab.errors import ConfigError, DatasetError, DtlabWarning
from dtlab.spaces import (DictObservations, DiscreteActions, ImageObservations,
                          describe_observations)

POLICY_ONNX, POLICY_JSON, MODEL_CARD = "policy.onnx", "policy.json", "README.md"
ARTIFACT_FILES = (POLICY_ONNX, POLICY_JSON, MODEL_CARD)
# policy.json's layout; dtlab.deploy refuses other versions.
ARTIFACT_FORMAT, ARTIFACT_VERSION = "dtlab-deploy", 1
# ONNX opset: 17 has LayerNormalization as one op (ONNX 1.12, 2022); onnxruntime >= 1.12 runs it.
OPSET = 17
# The window state, in the graph's input order after (observation, last_reward, target).
STATE_NAMES = ("observations", "actions", "returns_to_go", "timesteps", "masks")
INPUT_NAMES = ("observation", "last_reward", "target", *STATE_NAMES)
OUTPUT_NAMES = ("action", "finite", *(f"next_{name}" for name in STATE_NAMES))
# An observation dimension lies "far outside" the training data when it is more than this many of
# the data's standard deviations below the data's minimum or above its maximum. dtlab's choice
# (no reference): one std past the extremes the model ever saw.
OUT_OF_RANGE_STD = 1.0


class StepGraph(nn.Module):
    """One ``DTPolicy.act`` step for a batch of episodes (the module docstring lists the inputs
    and outputs), at temperature 0: a stochastic head (``--model.policy stochastic``) acts with
    its greedy action, tanh of the Gaussian's mean (continuous) or the most likely index. Built
    from a loaded checkpoint's model (eval mode) and ``PolicyInfo``."""

    def __init__(self, model: nn.Module, info: PolicyInfo) -> None:
        super().__init__()
        self.model = model.eval()
        norm = info.normalizer
        self.image = isinstance(info.observation_space, ImageObservations)
        self.discrete = isinstance(info.action_space, DiscreteActions)
        self.return_scale = float(norm.return_scale)
        # Buffers (float32, as DTPolicy converts them) so that they become graph constants.
        self.register_buffer("obs_mean", torch.tensor(norm.obs_mean, dtype=torch.float32))
        self.register_buffer("obs_std", torch.tensor(norm.obs_std, dtype=torch.float32))
        self.maps_actions = norm.maps_actions
        if self.maps_actions:
            self.register_buffer("action_low", torch.tensor(norm.action_low, dtype=torch.float32))
            self.register_buffer("action_high", torch.tensor(norm.action_high, dtype=torch.float32))

    def forward(self, observation, last_reward, target, observations, actions, returns_to_go,
                timesteps, masks):
        t = torch.where(masks[:, -1], timesteps[:, -1] + 1, 0)  # (N,) this step's timestep
        # The return-to-go the last step conditioned on, less the reward it earned (DTPolicy.act).
        rtg = returns_to_go[:, -1] - torch.where(t > 0, last_reward / self.return_scale, 0.0)
        # steer (or an episode's start: its state is zeros, so rtg becomes the target exactly):
        # condition on the target from now on and shift the context's real returns-to-go alike.
        steered = ~torch.isnan(target)  # (N,)
        delta = torch.where(steered, target / self.return_scale - rtg, 0.0)  # (N,)
        rtg = rtg + delta
        returns_to_go = returns_to_go + delta[:, None] * masks  # (N, K)
        if self.image:  # frame stacks (N, stack, H, W) uint8 -> [0, 1] -> encodings (N, D)
            new_obs = self.model.encode_observations(
                (observation.to(torch.float32) - self.obs_mean) / self.obs_std)
        else:
            new_obs = (observation - self.obs_mean) / self.obs_std  # (N, obs_dim)
        # Drop the oldest step, append this one (its action is unknown yet: 0, unseen by s_t).
        observations = torch.cat((observations[:, 1:], new_obs[:, None]), 1)  # (N, K, F)
        zero_action = torch.zeros_like(actions[:, :1])  # (N, 1, act_dim) or (N, 1)
        actions = torch.cat((actions[:, 1:], zero_action), 1)
        returns_to_go = torch.cat((returns_to_go[:, 1:], rtg[:, None]), 1)  # (N, K)
        timesteps = torch.cat((timesteps[:, 1:], t[:, None]), 1)  # (N, K)
        masks = torch.cat((masks[:, 1:], torch.ones_like(masks[:, :1])), 1)  # (N, K)
        pred = self.model.predict_last(observations, actions, returns_to_go[..., None],
                                       timesteps, masks)  # (N, A) in [-1, 1], or (N, n) logits
        finite = torch.isfinite(pred).all(-1)  # (N,)
        # The action DTPolicy takes at temperature 0: the most likely index ((N,) int64, the
        # first of equal maxima, as torch.argmax), the deterministic head's action, or the
        # stochastic head's tanh(mean) ((N, A) in [-1, 1]).
        chosen = self.model.predict_action.greedy_action(pred)
        if self.discrete:
            action = chosen
        else:
            action = (self.action_low + (chosen + 1.0) * 0.5 * (self.action_high - self.action_low)
                      if self.maps_actions else chosen)  # normalizer.from_unit_interval
        actions = torch.cat((actions[:, :-1], chosen[:, None]), 1)
        return action, finite, observations, actions, returns_to_go, timesteps, masks


def example_inputs(model: nn.Module, info: PolicyInfo, n: int) -> tuple[torch.Tensor, ...]:
    """Inputs of ``StepGraph`` for ``n`` fresh episodes (zero state, targets 0)."""
    k = info.model.context_len
    spec = info.observation_space
    if isinstance(spec, ImageObservations):
        observation = torch.zeros(n, *spec.stacked_shape, dtype=torch.uint8)
        width = info.model.embed_dim
    else:
        observation = torch.zeros(n, spec.dim)
        width = spec.dim
    return (observation, torch.zeros(n), torch.zeros(n), torch.zeros(n, k, width),
            model.predict_action.empty_actions(n, k, "cpu"), torch.zeros(n, k),
            torch.zeros(n, k, dtype=torch.long), torch.zeros(n, k, dtype=torch.bool))


def export_onnx(model: nn.Module, info: PolicyInfo, path: str | Path) -> None:
    """Write ``StepGraph(model, info)`` to ``path`` as ONNX (opset ``OPSET``, dynamic batch)."""
    import onnx

    graph = StepGraph(model.to("cpu").float(), info)
    dynamic = {name: {0: "batch"} for name in (*INPUT_NAMES, *OUTPUT_NAMES)}
    with warnings.catch_warnings():  # the TorchScript exporter's deprecation and tracer notes
        warnings.simplefilter("ignore")
        torch.onnx.export(graph, example_inputs(model, info, 2), str(path), dynamo=False,
                          input_names=list(INPUT_NAMES), output_names=list(OUTPUT_NAMES),
                          dynamic_axes=dynamic, opset_version=OPSET)
    proto = onnx.load(str(path))
    _boolean_eye_through_float(proto)
    onnx.checker.check_model(proto)
    onnx.save(proto, str(path))


def _boolean_eye_through_float(proto) -> None:
    """The attention mask's ``torch.eye(..., dtype=bool)`` exports as an ``EyeLike`` of a boolean
    tensor, which onnxruntime does not implement (float and integer kernels only): compute it from
    a float tensor in float and cast the result to bool, the same values."""
    import onnx
    from onnx import TensorProto, helper

    inferred = onnx.shape_inference.infer_shapes(proto).graph
    types = {v.name: v.type.tensor_type.elem_type
             for v in (*inferred.value_info, *inferred.input, *inferred.output)}
    nodes = []
    for node in proto.graph.node:
        if node.op_type == "EyeLike" and types.get(node.output[0]) == TensorProto.BOOL:
            nodes.append(helper.make_node("Cast", [node.input[0]], [node.input[0] + "_float"],
                                          to=TensorProto.FLOAT, name=node.name + "_from_bool"))
            node.input[0] += "_float"
        nodes.append(node)
        if node.op_type == "EyeLike" and types.get(node.output[0]) == TensorProto.BOOL:
            for attribute in [a for a in node.attribute if a.name == "dtype"]:
                node.attribute.remove(attribute)
            node.attribute.append(helper.make_attribute("dtype", TensorProto.FLOAT))
            boolean = node.output[0]
            node.output[0] = boolean + "_float"
            nodes.append(helper.make_node("Cast", [node.output[0]], [boolean],
                                          to=TensorProto.BOOL, name=node.name + "_to_bool"))
    del proto.graph.node[:]
    proto.graph.node.extend(nodes)


# ---- policy.json --------------------------------------------------------------------------------
def observation_ranges(info: PolicyInfo, dataset: str | None) -> dict[str, Any] | None:
    """Per-dimension minimum and maximum of the training observations (flattened with the
    checkpoint's keys for Dict data) from ``dataset`` (default: the path the checkpoint records),
    with the data's std and the threshold ``OUT_OF_RANGE_STD``. None for frame stacks, and (with
    a DtlabWarning) when no dataset is given and the recorded one is gone. DatasetError when
    ``dataset`` does not fit the checkpoint (--dataset)."""
    spec = info.observation_space
    if isinstance(spec, ImageObservations):
        return None
    path = dataset or info.dataset.get("path")
    if not path or (dataset is None and not Path(path).is_file()):
        warnings.warn(f"the checkpoint's dataset {path!r} is not there: policy.json records no "
                      "observation ranges, so the runtime cannot warn about observations outside "
                      "them; give the training data with --dataset", DtlabWarning, stacklevel=3)
        return None
    from dtlab.data.formats import load_episodes

    episodes = load_episodes(path)
    if isinstance(spec, DictObservations) and isinstance(episodes.observation_space, DictObservations):
        episodes = episodes.select_observation_keys(spec.keys)
    obs = np.asarray(episodes.observations, dtype=np.float64)
    if obs.ndim != 2 or obs.shape[1] != spec.dim:
        raise DatasetError(f"{path}: observations of shape {obs.shape[1:]} do not fit the "
                           f"checkpoint's {describe_observations(spec)} (--dataset)")
    return {"low": obs.min(0).tolist(), "high": obs.max(0).tolist(), "std": obs.std(0).tolist(),
            "threshold_std": OUT_OF_RANGE_STD, "source": Path(path).name}


def reliable_targets(path: Path) -> dict[str, Any] | None:
    """The calibrated reliable target range of checkpoint ``path`` (``calibration.json``), or None
    when it was not calibrated."""
    if (cal := checkpoint.load_calibration(path)) is None:
        return None
    rising = cal.get("rising_range")
    return {"max": float(cal["reliable_max_target"]),
            "rising_range": list(rising) if isinstance(rising, (list, tuple)) else None,
            "saturated": cal.get("saturated"), "source": checkpoint.CALIBRATION_FILE}


def acting_rule(info: PolicyInfo) -> str:
    """How the graph picks its action (``policy.json`` ``acts``): DTPolicy's at temperature 0."""
    if isinstance(info.action_space, DiscreteActions):
        return "greedy (the most likely index)"
    if info.model.policy == "stochastic":
        return "greedy (the mean): tanh of the Gaussian's mean, not sampled"
    return "the deterministic head's action"


def build_policy_record(path: Path, info: PolicyInfo, dataset: str | None) -> dict[str, Any]:
    """The content of ``policy.json`` for checkpoint ``path`` (see the module docstring)."""
    supported = ReturnStats.from_json(info.dataset.get("episode_return"))
    return {
        "format": ARTIFACT_FORMAT, "format_version": ARTIFACT_VERSION, "dtlab_version": __version__,
        "onnx": POLICY_ONNX, "opset": OPSET, "inputs": list(INPUT_NAMES),
        "outputs": list(OUTPUT_NAMES), "env_id": info.env_id,
        "observation_space": info.observation_space.to_json(),
        "action_space": info.action_space.to_json(),
        "architecture": info.model.architecture, "policy": info.model.policy,
        "acts": acting_rule(info), "context_len": info.model.context_len,
        "max_ep_len": info.model.max_ep_len, "return_scale": info.normalizer.return_scale,
        "dataset_return": info.dataset.get("episode_return"),
        "supported_max_target": (supported_max_target(info.env_id, supported.supported_max)
                                 if supported else None),
        "env_max_return": env_info(info.env_id).max_return if info.env_id else None,
        "reliable_targets": reliable_targets(path),
        "observation_range": observation_ranges(info, dataset),
        "reference_scores": {"min": info.ref_min_score, "max": info.ref_max_score},
        "provenance": {"checkpoint": f"{path.parent.name}/{path.name}", "step": info.step,
                       "trained_with_dtlab": info.dtlab_version,
                       "dataset": checkpoint.shareable_dataset(info.dataset)},
    }


# ---- the model card ------------------------------------------------------------------------------
def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def model_card(run: Path, record: dict[str, Any]) -> str:
    """README.md of the artifact, written from the run's records: data and provenance, training
    settings (``train_config.json``), the evaluation scores the run measured (``evaluations.jsonl``),
    the calibrated target range and how to run it."""
    lines = [f"# Decision Transformer for {record['env_id']}", "",
             f"Exported by dtlab {record['dtlab_version']} from `{record['provenance']['checkpoint']}`"
             f" (step {record['provenance']['step']}).", "", "## Data", ""]
    lines += _card_data(record)
    lines += _card_model(run, record)
    finetuning = _read_json(run / checkpoint.FINETUNE_CONFIG_FILE)
    if isinstance(finetuning, dict):
        lines += _card_finetuning(finetuning)
    lines += _card_evaluations(run, online=isinstance(finetuning, dict))
    lines += _card_targets(record)
    lines += _card_running(record)
    return "\n".join(lines)


def _card_data(record: dict[str, Any]) -> list[str]:
    """The card's data lines: the file, its size, its returns and its recorded metadata."""
    dataset, ret = record["provenance"]["dataset"], record["dataset_return"] or {}
    lines = [f"- dataset: `{dataset.get('path', 'unknown')}`"]
    for key in ("episodes", "transitions"):
        if key in dataset:
            lines.append(f"- {key}: {dataset[key]}")
    if ret:
        lines.append(f"- episode returns: mean {ret['mean']:.1f}, std {ret['std']:.1f}, min "
                     f"{ret['min']:.1f}, max {ret['max']:.1f}")
    meta = dataset.get("metadata") or {}
    if meta:
        lines.append("- recorded with the data: " + ", ".join(f"{k}={meta[k]}" for k in sorted(meta)))
    return lines


def _card_model(run: Path, record: dict[str, Any]) -> list[str]:
    """The card's model and training section: spaces, architecture, head, training settings."""
    lines: list[str] = []
    lines += ["", "## Model and training", "",
              f"- observations: {json.dumps(record['observation_space'])}",
              f"- actions: {json.dumps(record['action_space'])}",
              f"- {record['architecture']}, context_len (K) {record['context_len']}, max_ep_len "
              f"{record['max_ep_len']}, return scale {record['return_scale']:g}",
              f"- action head: {record['policy']}; the artifact acts {record['acts']}"
              + (" (the action `DTPolicy` takes at temperature 0, as evaluation does; the "
                 "exploration noise of online finetuning is not exported)"
                 if record["policy"] == "stochastic" else "")]
    config = _read_json(run / checkpoint.TRAIN_CONFIG_FILE)
    if isinstance(config, dict):
        lines.append("- training settings (train_config.json):")
        for group in ("model", "optim", "run"):
            values = config.get(group)
            if isinstance(values, dict):
                shown = ", ".join(f"{k}={v}" for k, v in values.items()
                                  if k not in ("out", "progress", "tensorboard"))
                lines.append(f"  - {group}: {shown}")
    return lines


def _card_finetuning(settings: dict[str, Any]) -> list[str]:
    """The card's section for a run finetuned online (``finetune_config.json``'s settings)."""
    resolved = settings.get("resolved") if isinstance(settings.get("resolved"), dict) else {}
    explore = resolved.get("exploration_target")
    return ["", "## Online finetuning", "",
            f"Finetuned online with `dtlab finetune` (the Online Decision Transformer) from the "
            f"offline run `{settings.get('run')}` in `{settings.get('env')}`: "
            f"{settings.get('online_steps')} online env steps (--online-steps), "
            f"{settings.get('updates_per_rollout')} updates after each exploration rollout"
            + (f" at target {explore:g}" if isinstance(explore, (int, float)) else "")
            + f", a replay of the {settings.get('replay_trajectories')} most recent "
            "trajectories. The training settings above are the offline run's, which the "
            "finetuning continued; the evaluations below are counted in online env steps."]


def _card_evaluations(run: Path, online: bool = False) -> list[str]:
    """The card's evaluation section: the run's last three evaluations (evaluations.jsonl),
    their steps online env steps for a finetuned run (``online``)."""
    lines: list[str] = []
    lines += ["", "## Evaluation", ""]
    from dtlab.rundir import RunDirectory

    evals = RunDirectory(run).evaluations()
    if evals:
        lines.append("Measured during training (evaluations.jsonl; the last three evaluations, "
                     "mean return per target in env units, D4RL normalized score where known):")
        lines.append("")
        for e in evals[-3:]:
            shown = "; ".join(
                f"target {r.target:g}: {r.mean:.1f}"
                + (f" ({r.normalized_mean:.1f} normalized)" if r.normalized_mean is not None
                   else "") + f" over {len(r.returns)} episodes" for r in e.results)
            lines.append(f"- {'online env step' if online else 'step'} {e.step}: {shown}")
    else:
        lines.append("The run recorded no evaluation (train with --eval-episodes, or run "
                     "`dtlab evaluate`).")
    return lines


def _card_targets(record: dict[str, Any]) -> list[str]:
    """The card's target section: the calibrated range, or the data's best where uncalibrated."""
    ret = record["dataset_return"] or {}
    lines: list[str] = []
    lines += ["", "## Target returns", ""]
    reliable = record["reliable_targets"]
    if reliable and reliable["rising_range"] is None:
        lines.append(f"Calibrated (`dtlab calibrate`): the achieved return does not rise with the "
                     f"target, so the target does not steer this model; the runtime warns for "
                     f"targets above {reliable['max']:g}, the lowest one calibrated.")
    elif reliable:
        rising = reliable["rising_range"]
        lines.append(f"Calibrated (`dtlab calibrate`): the achieved return rises with the target "
                     f"from {rising[0]:g} up to {reliable['max']:g}; the runtime warns for "
                     "targets above it.")
    elif record.get("supported_max_target") is not None:
        ceiling = record.get("env_max_return")
        why = (f"the most an episode of {record['env_id']} can return (the training data's best "
               f"episode return is {ret['max']:.1f})"
               if ceiling is not None and record["supported_max_target"] >= ceiling else
               f"the highest the training data supports: its best episode return, "
               f"{ret['max']:.1f}, plus half of max(|best|, best - worst) over its episode "
               "returns")
        lines.append("Not calibrated (run `dtlab calibrate` before exporting to record the range "
                     "of targets the model follows); the runtime warns, as DTPolicy does, for "
                     f"targets above {record['supported_max_target']:.1f}, {why}.")
    else:
        lines.append("Not calibrated, and the run recorded no return statistics of its data: "
                     "the runtime does not warn for any target.")
    return lines


def _card_running(record: dict[str, Any]) -> list[str]:
    """The card's last section: installing the runtime alone and acting with it."""
    ret, reliable = record["dataset_return"] or {}, record["reliable_targets"]
    lines: list[str] = []
    lines += ["", "## Running it", "",
              "Needs numpy and onnxruntime only (no torch): `pip install ./deploy` from the dtlab "
              "repository installs the runtime alone (docs/deploy.md).", "", "```python",
              "from dtlab_deploy import DeployedPolicy  # or: from dtlab.deploy import DeployedPolicy",
              "policy = DeployedPolicy('.')  # this directory",
              f"policy.reset(target_return={reliable['max'] if reliable else ret.get('max', 0.0):.0f})",
              "action = policy.act(observation)               # first step",
              "action = policy.act(observation, last_reward)  # later steps",
              "```", "",
              "Files: `policy.onnx` (one step: the window state in, the action and the next "
              "state out), `policy.json` (spaces, K, return scale, ranges, provenance).", ""]
    return lines


# ---- the command ---------------------------------------------------------------------------------
def export_run(run: str | Path, out: str | Path, dataset: str | None = None) -> Path:
    """Write the deploy artifact of run (or checkpoint) directory ``run`` into ``out`` (which
    must not exist, or be an empty directory), atomically: a failure leaves no ``out``.

    CheckpointError for a missing or corrupt checkpoint; ConfigError when ``out`` exists and is
    not empty (--out), or onnx (the ``export`` extra) is not installed;
    DatasetError when ``dataset`` does not fit (--dataset).
    """
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ConfigError(f"{out}: exists and is not an empty directory; choose another --out")
    if importlib.util.find_spec("onnx") is None:
        raise ConfigError("dtlab export needs onnx (and onnxruntime to run the artifact): pip "
                          "install 'dtlab[export]', from a checkout pip install -e '.[export]'")
    run = Path(run)
    ckpt = checkpoint.resolve(run)
    model, info = checkpoint.load(ckpt, "cpu")
    record = build_policy_record(ckpt, info, dataset)
    run_dir = run if not (run / checkpoint.CONFIG_FILE).is_file() else ckpt.parent
    with atomic_path(out, directory=True) as tmp:
        export_onnx(model, info, tmp / POLICY_ONNX)
        (tmp / POLICY_JSON).write_text(dumps_json(record))
        (tmp / MODEL_CARD).write_text(model_card(run_dir, record))
    return out
