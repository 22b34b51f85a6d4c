"""The swing between evaluations that the evaluation itself makes: one checkpoint, not trained
between evaluations, evaluated ``--repeats`` times at the same targets, each time on other env
seeds, and the mean absolute difference between consecutive evaluations of it measured.

    python benchmarks/eval_noise.py RUN/step_00015000 --episodes 10 --repeats 6 \
        --out docs/results/NAME-eval-noise.json

docs/results.md's "Stable scores" compares training's swing (benchmarks/stability.py: the mean
absolute difference of consecutive evaluations, 2,500 steps apart) with this floor. A policy
that does not change still scores differently on other episodes: with n episodes per
evaluation of per-episode standard deviation s (normalized points), two independent evaluations
differ by 2 s / sqrt(pi n) on average (the mean absolute value of a normal difference of
variance 2 s^2 / n), 0.357 s at n = 10. Training's swing cannot be pushed much below it by
anything but more episodes per evaluation. Likewise its best-minus-last gap: over m
evaluations of a policy that does not change, the best lies above the last by E[max of m
standard normals] s / sqrt(n) on average (1.267 s / sqrt(n) for training's 6). The script
reports the measured floor (and the repeats' own best minus last), and both predictions from
the pooled per-episode deviation.

Episode i of an evaluation starts from env seed ``seed + i`` (dtlab.rollout), so repeat r uses
seeds ``--seed + r n`` to ``--seed + r n + n - 1``: no episode is shared between repeats.
Training evaluates every checkpoint on the same seeds; for MuJoCo's chaotic dynamics the weights
of a later evaluation act as other episodes would (their initial states differ by at most the
env's reset noise), which is the assumption behind comparing the two.

The evaluations run at the precision the run trained at (its train_config.json), as training's
did; the targets default to those training evaluated at. Bad input (fewer than 2 repeats, no
targets known, an env without D4RL reference scores) is refused in one line, exit code 2.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import numpy as np

from dtlab import checkpoint
from dtlab.data.records import ReturnStats
from dtlab.data.returns import normalized_score
from dtlab.envs import reference_scores
from dtlab.errors import DtlabError
from dtlab.policy import DTPolicy
from dtlab.rollout import Evaluator, default_targets
from dtlab.rundir import RunDirectory


def predicted_floor(episode_std: float, episodes: int) -> float:
    """Mean absolute difference of two independent means of ``episodes`` draws with standard
    deviation ``episode_std``: 2 s / sqrt(pi n) (E|Z| = sqrt(2 / pi) for a standard normal Z,
    times the difference's standard deviation s sqrt(2 / n))."""
    return 2.0 * episode_std / math.sqrt(math.pi * episodes)


def expected_max_of_normals(m: int) -> float:
    """E[max of m independent standard normals]: the integral of x m phi(x) Phi(x)^(m-1) over x,
    by the trapezoid rule on [-12, 12] (0 for m = 1; 1 / sqrt(pi) for m = 2)."""
    x = np.linspace(-12.0, 12.0, 48_001)
    phi = np.exp(-0.5 * x * x) / math.sqrt(2.0 * math.pi)
    cdf = 0.5 * (1.0 + np.vectorize(math.erf)(x / math.sqrt(2.0)))
    return float(np.trapezoid(x * m * phi * cdf ** (m - 1), x))


def predicted_gap(episode_std: float, episodes: int, evaluations: int) -> float:
    """Mean best-minus-last gap of ``evaluations`` independent means of ``episodes`` draws with
    standard deviation ``episode_std``: E[max of m normals] s / sqrt(n) (E[last] is the mean)."""
    return expected_max_of_normals(evaluations) * episode_std / math.sqrt(episodes)


def floor_of(scores: list[list[float]], evaluations: int = 6) -> dict:
    """Per repeat the episodes' normalized scores (at least 2 repeats of at least 2 episodes) ->
    the repeats' means, the measured floor (mean absolute difference of consecutive means) and
    the predicted one from the pooled std (the root mean of the repeats' sample variances); the
    repeats' best minus last, and the gap predicted for ``evaluations`` evaluations."""
    means = [float(np.mean(s)) for s in scores]
    pooled = math.sqrt(float(np.mean([np.var(s, ddof=1) for s in scores])))
    return {"means": means, "episode_std": pooled,
            "measured": float(np.mean(np.abs(np.diff(means)))),
            "predicted": predicted_floor(pooled, len(scores[0])),
            "gap_measured": max(means) - means[-1],
            "gap_predicted": predicted_gap(pooled, len(scores[0]), evaluations)}


def measure(source: str, targets: list[float] | None, episodes: int, repeats: int,
            seed: int, evaluations: int = 6) -> dict:
    """The floor at each target (default: those training evaluated at, as it chose them).
    DtlabError for fewer than 2 repeats or episodes, no targets, or no reference scores."""
    if repeats < 2 or episodes < 2:
        raise DtlabError(f"--repeats {repeats} --episodes {episodes}: a floor needs at least 2 "
                         "of each")
    path = checkpoint.resolve(source)
    model, info = checkpoint.load(path)
    run = RunDirectory(path.parent)
    settings = run.saved_config_json() if run.is_run() else {}
    recorded = (settings.get("evaluation") or settings).get("eval_targets")  # flat: before issue 9
    targets = targets or recorded or list(
        default_targets(info.env_id, ReturnStats.from_json(
            info.dataset.get("episode_return")))[0])
    if not targets:
        raise DtlabError(f"{source}: no evaluation targets recorded or known for "
                         f"{info.env_id}; give --targets")
    references = reference_scores(info.env_id, info.ref_min_score, info.ref_max_score)
    if None in references:
        raise DtlabError(f"{source}: {info.env_id} has no D4RL reference scores; nothing to "
                         "normalize by")
    policy = DTPolicy(model, info, precision=run.saved_precision() or "fp32")
    per_target: dict[str, list[list[float]]] = {f"{t:g}": [] for t in targets}
    for r in range(repeats):
        report = Evaluator(info.env_id, tuple(targets), episodes, seed=seed + r * episodes)(policy)
        for result in report.results:
            per_target[f"{result.target:g}"].append(
                normalized_score(np.asarray(result.returns), *references).tolist())
    return {"checkpoint": str(path), "env": info.env_id, "episodes": episodes,
            "repeats": repeats, "seed": seed, "precision": policy.precision,
            "evaluations": evaluations,
            "targets": {t: floor_of(s, evaluations) for t, s in per_target.items()}}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("checkpoint", help="a checkpoint directory, or a run (its latest checkpoint)")
    p.add_argument("--targets", type=float, nargs="+", default=None)
    p.add_argument("--episodes", type=int, default=10)
    p.add_argument("--repeats", type=int, default=6)
    p.add_argument("--seed", type=int, default=1000)
    p.add_argument("--evaluations", type=int, default=6,
                   help="evaluations per run for the predicted gap (15,000 / 2,500 steps: 6)")
    p.add_argument("--out", default=None, help="write the report here (JSON)")
    args = p.parse_args(argv)
    try:
        report = measure(args.checkpoint, args.targets, args.episodes, args.repeats, args.seed,
                         args.evaluations)
    except DtlabError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    for target, row in report["targets"].items():
        print(f"target {target}: means {', '.join(f'{m:.1f}' for m in row['means'])}; episode std "
              f"{row['episode_std']:.1f}; floor measured {row['measured']:.2f}, predicted "
              f"{row['predicted']:.2f}; best minus last measured {row['gap_measured']:.2f}, "
              f"predicted for {args.evaluations} evaluations {row['gap_predicted']:.2f}")
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
