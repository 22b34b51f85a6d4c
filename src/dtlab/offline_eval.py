"""Evaluation without an environment (``dtlab evaluate CKPT --offline``, whose command is
``dtlab.evaluate.evaluate_offline``): a checkpoint's action error and return sensitivity on a
dataset's windows, the training sampler's K-step windows scored at their last step, as a rollout
acts on it, and its table."""

from __future__ import annotations

import numpy as np

from dtlab import runtime
from dtlab.data.episodes import EpisodeSet
from dtlab.errors import DatasetError
from dtlab.spaces import ContinuousActions, DictObservations, DiscreteActions, describe_observations

__all__ = ["offline_evaluation", "print_offline"]


def offline_evaluation(model, info, episodes: EpisodeSet, *, buckets: int = 4, windows: int = 10_000,
                       seed: int = 0, swap_quantiles: tuple[float, float] = (0.1, 0.9),
                       batch_size: int = 256, device: str = "cpu") -> dict:
    """Action error and return sensitivity of ``model`` on ``episodes``' windows; no env is made.

    Windows are the training sampler's (K steps ending at a transition, left-padded), ending at
    ``windows`` transitions drawn without replacement with ``seed`` (0: every transition), on
    ``device`` (``dtlab.runtime.resolve_device``: ConfigError for one this machine lacks). Each is
    scored at its last step, the prediction a rollout acts on:

    - error: squared error of the predicted action in the model's [-1, 1] units, mean over action
      dimensions (continuous), or whether the most likely action is the dataset's (discrete:
      accuracy); overall and per return-to-go bucket (``buckets`` quantile bins of the windows'
      last returns-to-go, in the data's units);
    - swap: every window's returns-to-go shifted so that its last one equals the low, then the
      high ``swap_quantiles`` quantile of the windows' last returns-to-go (as
      ``DTPolicy.steer`` shifts a context); mean |action(high) - action(low)| in [-1, 1] units
      (continuous), or the fraction of windows whose most likely action changes (discrete).
      About 0: the policy ignores the return it is asked for.

    Raises DatasetError when the data does not fit the checkpoint (observation or action
    dimensions, kind of actions, episodes longer than the model's max_ep_len).
    """
    device = runtime.resolve_device(device)
    src = episodes.source
    episodes = _fitted(episodes, info)
    n_all = episodes.num_transitions
    if windows and windows < n_all:
        ends = np.sort(np.random.default_rng(seed).choice(n_all, size=windows, replace=False))
    else:
        ends = np.arange(n_all)
    rtg_last = episodes.returns_to_go[ends].astype(np.float64)  # (W,) in the data's units
    low, high = (float(q) for q in np.quantile(rtg_last, swap_quantiles))
    continuous = isinstance(info.action_space, ContinuousActions)
    error, delta = _score_windows(model, info, episodes, ends, (low, high), continuous=continuous,
                                  batch_size=batch_size, device=device)
    metric = "mse" if continuous else "accuracy"
    swap_metric = "mean_abs_delta" if continuous else "changed_fraction"
    return {"dataset": str(src), "windows": int(ends.size), "context_len": info.model.context_len,
            "architecture": info.model.architecture, "metric": metric,
            metric: float(error.mean()), "buckets": _by_bucket(rtg_last, error, buckets, metric),
            "swap": {"low_quantile": float(swap_quantiles[0]),
                     "high_quantile": float(swap_quantiles[1]), "low_rtg": low, "high_rtg": high,
                     swap_metric: float(delta.mean())}}


def _fitted(episodes: EpisodeSet, info) -> EpisodeSet:
    """``episodes`` reduced to the checkpoint's Dict keys; DatasetError unless its observations,
    kind and width of actions and episode lengths fit the checkpoint."""
    src = episodes.source
    if isinstance(episodes.observation_space, DictObservations) and \
            isinstance(info.observation_space, DictObservations):  # the checkpoint's keys
        episodes = episodes.select_observation_keys(info.observation_space.keys)
    data_actions, ckpt_actions = episodes.action_space, info.action_space
    fits = (episodes.observation_space == info.observation_space
            and type(data_actions) is type(ckpt_actions)
            and (data_actions.n <= ckpt_actions.n if isinstance(ckpt_actions, DiscreteActions)
                 else data_actions.dim == ckpt_actions.dim))
    if not fits:
        raise DatasetError(
            f"{src}: observations {describe_observations(episodes.observation_space)} and actions "
            f"{data_actions} do not fit the checkpoint's "
            f"{describe_observations(info.observation_space)} and {ckpt_actions}")
    longest = int(episodes.episode_lengths.max())
    if longest > info.model.max_ep_len:
        raise DatasetError(f"{src}: an episode has {longest} steps, more than the model's "
                           f"max_ep_len={info.model.max_ep_len}")
    return episodes


def _score_windows(model, info, episodes: EpisodeSet, ends: np.ndarray, swap: tuple[float, float],
                   *, continuous: bool, batch_size: int, device) -> tuple[np.ndarray, np.ndarray]:
    """Per window ending at ``ends`` (W,): the action error (squared error, or 1.0 for a correct
    discrete action) and the swap's change (|action(high) - action(low)|, or 1.0 if the most
    likely action changed), each (W,)."""
    import torch

    from dtlab.data.sampling import SequenceSampler

    sampler = SequenceSampler(episodes, info.model.context_len, info.normalizer)
    error = np.empty(ends.size)  # (W,)
    delta = np.empty(ends.size)  # (W,)
    model.eval()
    with torch.inference_mode():
        for first in range(0, ends.size, batch_size):
            batch = sampler.gather(ends[first:first + batch_size])
            t = {name: torch.from_numpy(getattr(batch, name)).to(device) for name in
                 ("observations", "actions", "returns_to_go", "timesteps", "masks")}
            if t["observations"].dtype == torch.uint8:  # frame stacks: scaled on the device
                t["observations"] = info.normalizer.converted(
                    lambda a: torch.tensor(a, device=device)).normalize_observations_(
                    t["observations"].to(torch.float32))
            args = (t["observations"], t["actions"])
            rest = (t["timesteps"], t["masks"])
            pred = model.predict_last(*args, t["returns_to_go"], *rest).float()  # (b, A)
            shifted = []
            for value in swap:  # the context's returns-to-go shifted to end at low, then high
                rtg = t["returns_to_go"] - t["returns_to_go"][:, -1:] + value / info.normalizer.return_scale
                rtg = torch.where(t["masks"][..., None], rtg, 0.0)  # padding stays 0
                shifted.append(model.predict_last(*args, rtg, *rest).float())  # (b, A)
            rows = slice(first, first + pred.shape[0])
            target = t["actions"][:, -1]  # (b, A) in [-1, 1], or (b,) indices
            if continuous:
                error[rows] = (pred - target).pow(2).mean(-1).cpu().numpy()
                delta[rows] = (shifted[1] - shifted[0]).abs().mean(-1).cpu().numpy()
            else:
                error[rows] = (pred.argmax(-1) == target).double().cpu().numpy()
                delta[rows] = (shifted[1].argmax(-1) != shifted[0].argmax(-1)).double().cpu().numpy()
    return error, delta


def _by_bucket(rtg_last: np.ndarray, error: np.ndarray, buckets: int, metric: str) -> list[dict]:
    """The mean error per quantile bin of the windows' last returns-to-go (``buckets`` bins)."""
    edges = np.quantile(rtg_last, np.linspace(0.0, 1.0, buckets + 1))  # (buckets + 1,)
    bucket = np.clip(np.searchsorted(edges[1:-1], rtg_last, side="right"), 0, buckets - 1)
    rows = []
    for b in range(buckets):
        inside = bucket == b
        rows.append({"rtg_low": float(edges[b]), "rtg_high": float(edges[b + 1]),
                     "windows": int(inside.sum()),
                     metric: float(error[inside].mean()) if inside.any() else None})
    return rows


def print_offline(data: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    metric = data["metric"]
    name = "action MSE ([-1, 1] units)" if metric == "mse" else "action accuracy"
    table = Table(title=f"{data['checkpoint']} on {data['dataset']}: {data['windows']} windows "
                        f"of {data['context_len']} steps, no env")
    table.add_column("return-to-go bucket", justify="right")
    table.add_column("windows", justify="right")
    table.add_column(name, justify="right")
    for row in data["buckets"]:
        value = "-" if row[metric] is None else f"{row[metric]:.4f}"
        table.add_row(f"{row['rtg_low']:.1f} .. {row['rtg_high']:.1f}", str(row["windows"]), value)
    table.add_row("all", str(data["windows"]), f"{data[metric]:.4f}")
    console = Console()
    console.print(table)
    swap = data["swap"]
    if metric == "mse":
        what = f"mean |delta action| {swap['mean_abs_delta']:.4f} ([-1, 1] units)"
    else:
        what = f"most likely action changes in {100 * swap['changed_fraction']:.1f}% of windows"
    console.print(f"return-to-go swapped from {swap['low_rtg']:.1f} (quantile "
                  f"{swap['low_quantile']:g}) to {swap['high_rtg']:.1f} (quantile "
                  f"{swap['high_quantile']:g}): {what}")
