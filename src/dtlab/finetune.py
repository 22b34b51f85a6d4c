"""Online finetuning: the Online Decision Transformer (Zheng, Zhang and Grover 2022, "Online
Decision Transformer", ICML; arXiv 2202.05607), from a dtlab run trained offline with the
stochastic head (``--model.policy stochastic``).

One iteration (the paper's Algorithm 1): one exploration rollout, acting by sampling from the
policy at the exploration return-to-go (the paper's g_online, twice the evaluation target for
positive returns; ``exploration_target`` says what dtlab asks for otherwise), added
to a replay of the most recent trajectories (dtlab.data.replay: first in, first out, started with
the offline data's best episodes; its returns-to-go are the returns each trajectory achieved,
the paper's hindsight relabelling), then ``updates_per_rollout`` gradient steps on windows drawn
from the replay (trajectories in proportion to their length). Every ``eval_every`` online env
steps the policy is evaluated with its mean action at the evaluation targets.

The updates are ``dtlab.train``'s: the same ``Trainer`` (its optimizer, schedule and entropy
temperature continue from the offline checkpoint), the same ``train_step``; only the windows'
source changes each iteration. Checkpoints are written at iteration ends and hold the replay
(``replay.safetensors``) and the progress beside the weights and trainer state, so ``--resume``
continues bit for bit after Ctrl-C or kill -9 on the CPU.

Under ``torchrun`` (dtlab.distributed) with W processes, one iteration is W rollouts: every rank
takes its own (rank r's is rollout number ``rollouts + r``, its env seed and action sampling
drawn from (seed, that number)), the W trajectories are exchanged and added to every rank's
replay in rank order, so every rank holds the same replay; the updates are DistributedDataParallel
steps, each rank drawing windows from its own stream, exactly as ``dtlab train``'s; the online
env steps count all ranks' rollouts. Rank 0 evaluates (the others wait) and writes the run
directory; a checkpoint holds every rank's random streams, so ``--resume`` with the same number
of processes continues bit for bit.

Deviations from the paper, each a dtlab convention: windows end at the sampled position and are
left-padded (DESIGN.md, "Windows"; the paper samples a segment's start); several rollouts per
iteration under torchrun (one per process), the evaluation envs optionally in worker processes
(``--eval-workers``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated

import numpy as np
import torch
import tyro

from dtlab import checkpoint, distributed, runtime
from dtlab.atomic import dumps_json, write_text_atomic
from dtlab.checkpoint import PolicyInfo
from dtlab.config import (MAX_SEED, TrainConfig, check_number, check_targets,
                          setting_differences)
from dtlab.data.records import ReturnStats
from dtlab.data.replay import TrajectoryReplay
from dtlab.distributed import World
from dtlab.envs import env_advice, episode_limit, make_env
from dtlab.errors import CheckpointError, ConfigError, DtlabWarning, EnvError
from dtlab.rollout import Evaluator, default_targets
from dtlab.rundir import RunDirectory
from dtlab.spaces import VectorObservations, check_against_env
from dtlab.online import (FINETUNE_STREAM, REPLAY_FILE, FinetuneResult, OnlineLoop,
                          OnlineProgress, console_curve, draw_learning_curve)
from dtlab.trainer import Trainer, TrainerState

FINETUNE_CONFIG_FILE = checkpoint.FINETUNE_CONFIG_FILE


@dataclass(frozen=True)
class FinetuneConfig:
    """Finetune a run online (the Online Decision Transformer): exploration rollouts, a replay
    of the most recent trajectories with hindsight return-to-go relabelling, and the offline
    run's updates on it (online steps, replay size, updates per rollout and exploration scale as
    in the ODT paper, Zheng et al. 2022; its other training settings, such as learning rate and
    context length, are not applied: the offline run's continue). Under torchrun each
    process takes one rollout per iteration and the updates are DistributedDataParallel steps."""

    run: Annotated[str, tyro.conf.Positional, tyro.conf.arg(metavar="RUN")]
    """Run directory (its latest checkpoint) trained offline with --model.policy stochastic."""
    online_steps: int
    """Online env steps to take in exploration rollouts, all ranks' under torchrun (the paper:
    200,000)."""
    out: str
    """Run directory of the finetuned policy (checkpoints, replay, evaluations.jsonl, curve)."""
    env: str | None = None
    """Gymnasium env id to interact with (default: the env the run was trained in; another is
    refused)."""
    eval_every: int = 10_000
    """Evaluate every this many online env steps: after the rollout that crosses each multiple
    (and before the first rollout and at the end)."""
    eval_episodes: int = 10
    """Evaluation episodes per target."""
    eval_targets: tuple[float, ...] = ()
    """Evaluation target returns (default, as dtlab evaluate: the DT paper's for the env, or
    targets fitted to the data, or to the run's calibrated reliable maximum, when those lie
    beyond what the data supports)."""
    eval_workers: int = 0
    """Step the evaluation envs in this many worker processes (0: in this process; under
    torchrun rank 0's, which evaluates)."""
    exploration_target: float | None = None
    """The return-to-go exploration rollouts ask for (default: from --exploration-scale and the
    highest evaluation target)."""
    exploration_scale: float = 2.0
    """The exploration target from the highest evaluation target g: g + (scale - 1) x |g|, which
    is scale x g for a positive g (the paper's g_online = 2 x g_eval, e.g. 7,200 for Hopper's
    3,600) and asks for more than g for a negative one (2: 0 for Pendulum's -400)."""
    replay_trajectories: int = 1000
    """Replay capacity in trajectories (the paper: 1,000), started with the offline data's best."""
    updates_per_rollout: int = 300
    """Gradient steps after each exploration rollout (the paper: 300); under torchrun after
    each round of one rollout per rank, each step on every rank's windows together."""
    dataset: str | None = None
    """Offline data to start the replay from (default: the file the run was trained on)."""
    max_episode_steps: int | None = None
    """Cut exploration and evaluation episodes at this many steps (default: the env's limit)."""
    seed: int = 0
    """Seed of the exploration rollouts, the window sampling, dropout and the entropy's noise
    (under torchrun: windows and dropout from (seed, rank), rollouts from (seed, their number))."""
    resume: bool = False
    """Continue the finetuning in --out from its latest checkpoint (bit for bit on the CPU)."""
    checkpoint_every: int = 10
    """Write a checkpoint every this many rollouts, all ranks' under torchrun (and at each
    evaluation and the end)."""
    checkpoint_every_minutes: float = 10.0
    """Also write one when this many minutes have passed since the last (0 disables)."""
    keep_checkpoints: int = 3
    """How many checkpoints to keep in --out (the newest ones)."""
    device: str = "auto"
    """torch device: auto, cpu, cuda, cuda:1, ..."""
    threads: int | None = None
    """CPU threads for torch (default: OMP_NUM_THREADS if set, else the number of cores divided
    by the processes torchrun starts on the node)."""

    def __post_init__(self) -> None:
        check_number("online_steps", self.online_steps, minimum=1, integer=True)
        for name in ("eval_every", "eval_episodes", "eval_workers"):
            check_number(name, getattr(self, name), minimum=0, integer=True)
        for name in ("replay_trajectories", "updates_per_rollout", "checkpoint_every",
                     "keep_checkpoints"):
            check_number(name, getattr(self, name), minimum=1, integer=True)
        check_number("max_episode_steps", self.max_episode_steps, minimum=1, integer=True)
        check_number("exploration_scale", self.exploration_scale, above=0)
        check_number("checkpoint_every_minutes", self.checkpoint_every_minutes, minimum=0)
        check_number("seed", self.seed, minimum=0, maximum=MAX_SEED, integer=True)
        check_number("threads", self.threads, minimum=1, integer=True)
        check_targets("eval_targets", self.eval_targets)
        if self.exploration_target is not None:
            check_targets("exploration_target", (self.exploration_target,))

    # Fields a resumed finetuning may change (they do not change its sequence of updates); `out`
    # too: the directory resumed is the one given, wherever it was moved since.
    RESUME_MAY_CHANGE = frozenset({"resume", "out", "online_steps", "checkpoint_every_minutes",
                                   "keep_checkpoints", "device", "threads", "eval_workers"})


def finetune(cfg: FinetuneConfig, *, should_stop: Callable[[], bool] = lambda: False,
             echo: bool = True) -> FinetuneResult:
    """Finetune ``cfg.run`` online into ``cfg.out``; returns where the final checkpoint is.

    Raises ConfigError for a deterministic-head run (naming --model.policy stochastic), image or
    Dict observations, an --out that holds another run (or resume settings that differ);
    EnvError when --env is not the run's (it defaults to it); CheckpointError for a missing or
    corrupt checkpoint.
    ``should_stop`` is polled after each iteration; True ends the run with a checkpoint (the
    CLI wires SIGINT/SIGTERM to it). Nothing is written before every check has passed; a run
    that fails before its first checkpoint leaves nothing behind.

    Under torchrun (``WORLD_SIZE`` etc. in the environment, dtlab.distributed) this is one of W
    processes: each iteration every rank takes its own exploration rollout, the W trajectories
    join every rank's replay in rank order (so the replays stay equal), and the updates are
    DistributedDataParallel steps as in ``dtlab.train``; rank 0 alone evaluates, prints and
    writes (its result holds the evaluations, the others' none); the ranks agree on stopping
    after each iteration. A worker restarted by torchrun resumes from the latest checkpoint.
    """
    world = World.current()
    # Rank 0 owns the output: the other ranks' warnings would repeat its own.
    with warnings.catch_warnings() if not world.is_main else contextlib.nullcontext():
        if not world.is_main:
            warnings.simplefilter("ignore", DtlabWarning)
        source, info = _offline_run(cfg)
        cfg = dataclasses.replace(cfg, env=info.env_id)  # --env, checked, or the run's
        limit = _episode_limit(cfg, info)
        targets, targets_why = _eval_targets(cfg, info, source)
        explore, explore_why = _exploration(cfg, targets)
        starting = (f"exploration target {explore:g} ({explore_why}); evaluation targets "
                    f"{targets_why}")
        device = distributed.process_device(world, runtime.resolve_device(cfg.device))
        if device.type == "cpu":  # the node's cores are shared by its processes
            runtime.set_threads(cfg.threads, default=max(1, (os.cpu_count() or 1)
                                                         // world.local_size))
        cfg = _resumed_after_restart(cfg, world)
        created_group = distributed.start(world, device)
        try:
            return _finetune(cfg, source, info, device, world, targets, explore, limit,
                             should_stop, echo, starting)
        finally:
            distributed.finish(created_group)


def _offline_run(cfg: FinetuneConfig) -> tuple[Path, PolicyInfo]:
    """The checkpoint of ``cfg.run`` and its info, checked to be one dtlab finetune continues."""
    source, info = checkpoint.load_info(cfg.run)
    if info.model.policy != "stochastic":
        raise ConfigError(f"{source}: dtlab finetune continues a run with the stochastic head; "
                          "this one is deterministic: train it with --model.policy stochastic")
    if not isinstance(info.observation_space, VectorObservations):
        raise ConfigError(f"{source}: dtlab finetune takes vector observations; this run has "
                          f"{info.observation_space.to_json()['type']} observations")
    if cfg.env is not None and cfg.env != info.env_id:
        raise EnvError(f"{source}: the run was trained for {info.env_id}, not --env {cfg.env}; "
                       f"pass --env {info.env_id}")
    return source, info


def _episode_limit(cfg: FinetuneConfig, info: PolicyInfo) -> int:
    """The episodes' step limit (--max-episode-steps, else the env's), the env checked against
    the run's spaces."""
    env = make_env(cfg.env)
    try:
        check_against_env(env, info.observation_space, info.action_space, what="the checkpoint",
                          exact_n=True, advice=env_advice(info.env_id, cfg.env, "it was trained on"))
        limit, _ = episode_limit(env, cfg.env, cfg.max_episode_steps, info.model.max_ep_len)
    finally:
        env.close()
    return limit


def _eval_targets(cfg: FinetuneConfig, info: PolicyInfo,
                  source: Path) -> tuple[tuple[float, ...], str]:
    """--eval-targets, else ``default_targets`` (the DT paper's for the env, or fitted to the
    data: to the calibrated reliable maximum of checkpoint ``source`` when it has one, as
    ``dtlab evaluate`` does); and a line saying which ("3600, 1800: the DT paper's for
    Hopper-v5")."""
    targets = tuple(cfg.eval_targets)
    if targets:
        return targets, ", ".join(f"{t:g}" for t in targets) + " (--eval-targets)"
    targets, why = default_targets(cfg.env, ReturnStats.from_json(
        info.dataset.get("episode_return")), checkpoint.reliable_max_target(source))
    if not targets:
        raise ConfigError(f"{why}: give --eval-targets")
    return targets, why.removeprefix("targets ").replace("--targets", "--eval-targets")


def exploration_target(targets: tuple[float, ...], scale: float) -> float:
    """The return-to-go exploration rollouts ask for, from the evaluation targets (returns, sums
    of rewards) and --exploration-scale: ``g + (scale - 1) * |g|`` for the highest target g.

    For g > 0 this is the paper's rule, ``scale * g`` (its g_online = 2 x g_eval, Zheng et al.
    2022; Hopper: 2 x 3,600 = 7,200). That rule was written for positive returns: for
    a negative g, ``scale * g`` would ask for a worse return than the evaluation's (Pendulum:
    2 x -400 = -800); ``g + (scale - 1) * |g|`` asks for more than g there (scale 2: 0). g = 0
    gives 0 whatever the scale (give --exploration-target)."""
    best = max(targets)
    return best + (scale - 1) * abs(best)


def _exploration(cfg: FinetuneConfig, targets: tuple[float, ...]) -> tuple[float, str]:
    """The exploration target and where it came from (a phrase for the start line)."""
    if cfg.exploration_target is not None:
        return cfg.exploration_target, "--exploration-target"
    best = max(targets)
    rule = (f"{cfg.exploration_scale:g} x {best:g}" if best > 0 else
            f"{best:g} + ({cfg.exploration_scale:g} - 1) x |{best:g}|")
    return (exploration_target(targets, cfg.exploration_scale),
            f"{rule}: --exploration-scale and the highest evaluation target")


def _resumed_after_restart(cfg: FinetuneConfig, world: World) -> FinetuneConfig:
    """``cfg``, with ``resume`` set in a worker that torchrun restarted when --out already
    holds this finetuning (as ``dtlab train`` does)."""
    if world.restart == 0 or cfg.resume or not (Path(cfg.out) / FINETUNE_CONFIG_FILE).is_file():
        return cfg
    if world.is_main:
        warnings.warn(f"{cfg.out}: torchrun restarted the workers (restart {world.restart}); "
                      "resuming the finetuning from its latest checkpoint", DtlabWarning,
                      stacklevel=3)
    return dataclasses.replace(cfg, resume=True)


def _finetune(cfg: FinetuneConfig, source: Path, info: PolicyInfo, device: torch.device,
              world: World, targets: tuple[float, ...], explore: float, limit: int,
              should_stop: Callable[[], bool], echo: bool, starting: str) -> FinetuneResult:
    """The finetuning in the run directory: set up or resume, loop, draw the curve. ``starting``
    says what the exploration and evaluation targets are and why (the start line)."""
    train_cfg = RunDirectory(source.parent).saved_config()
    out_cfg = dataclasses.replace(train_cfg, run=dataclasses.replace(
        train_cfg.run, out=cfg.out, resume=cfg.resume, progress=False, device=cfg.device,
        threads=cfg.threads))
    run = RunDirectory(cfg.out, main=world.is_main)
    with run.hold(activity="finetuning"):
        start_from = run.resume_point(out_cfg)
        if start_from is not None:
            _check_resume_settings(run, cfg, source)
            replay, progress = _load_replay(start_from)
            if progress.env_steps >= cfg.online_steps:  # a finished run is not rewritten
                return FinetuneResult(start_from, checkpoint.load_info(start_from)[1].step,
                                      progress.env_steps, progress.rollouts, already_done=True)
        else:
            replay, progress = _initial_replay(cfg, info), OnlineProgress()
        trainer = _trainer(cfg, out_cfg, info, replay, device, world, start_from or source,
                           fresh=start_from is None)
        # The ranks decide together (a rank that stopped alone would leave the others waiting
        # at the next collective); this also waits until every rank has read the run directory
        # before rank 0 writes.
        if distributed.any_rank(world, [should_stop()], device)[0]:
            raise KeyboardInterrupt
        evaluator = Evaluator(cfg.env, targets, cfg.eval_episodes, seed=cfg.seed,
                              max_steps=cfg.max_episode_steps, workers=cfg.eval_workers)
        try:
            # Metrics count gradient steps, evaluations online env steps.
            run.start(out_cfg, resume_from=trainer.state.step if start_from is not None
                      else None, evaluations_until=progress.env_steps)
            if world.is_main:
                write_text_atomic(run.path / FINETUNE_CONFIG_FILE, dumps_json({
                    **dataclasses.asdict(cfg), "resolved": {
                        "run": str(Path(cfg.run).resolve()),
                        "run_weights": _weights_digest(source), "exploration_target": explore,
                        "eval_targets": list(targets)}}))
                if echo:
                    print(f"finetuning {source}: {starting}; replay of {len(replay)} "
                          f"trajectories ({sum(len(t) for t in replay)} transitions)", flush=True)
            loop = OnlineLoop(cfg, trainer, out_cfg.optim, info, run, replay, progress, evaluator,
                           explore, limit, echo, start_from)
            result = loop.execute(should_stop)
        except BaseException:
            run.discard_if_no_checkpoint()
            raise
        finally:
            evaluator.close()  # env worker processes kept across evaluations
        run.close()
        if world.is_main:
            draw_learning_curve(run, targets, title=f"{run.path.name}: online finetuning of "
                                f"{Path(cfg.run).name} on {cfg.env}")
            if echo:
                print(console_curve(run.evaluations()), flush=True)
    distributed.barrier(world)  # the run's files are complete when any rank returns
    return result


def _trainer(cfg: FinetuneConfig, out_cfg: TrainConfig, info: PolicyInfo,
             replay: TrajectoryReplay, device: torch.device, world: World, at: Path,
             fresh: bool) -> Trainer:
    """The trainer on the replay, from checkpoint ``at``: the finetuning's own (resume), or the
    offline run's (``fresh``: its weights, optimizer, schedule and temperature, with new
    random streams from --seed: ``SeedSequence([seed, FINETUNE_STREAM])`` for the windows and
    ``torch.manual_seed(seed)``; under torchrun rank r's windows from ``SeedSequence([seed,
    FINETUNE_STREAM], spawn_key=(r,))`` and its torch seed from (seed, r, FINETUNE_STREAM)).
    Resumed with another number of processes, every rank's streams restart from (s, rank,
    step) with s = ``SeedSequence([seed, FINETUNE_STREAM]).generate_state(1)[0]``."""
    trainer = Trainer.create(out_cfg, replay.episodes(info.observation_space, info.action_space),
                             info, device, world)
    # A resume with another number of processes redraws every rank's streams from (trainer.seed,
    # rank, step) (TrainerState.restore): a seed of the finetuning's own streams, not --seed
    # itself, whose (seed, rank, step) streams are the offline run's.
    trainer.seed = int(np.random.SeedSequence([cfg.seed, FINETUNE_STREAM]).generate_state(1)[0])
    if not fresh:
        trainer.resume(at)
        return trainer
    with warnings.catch_warnings():  # its streams are replaced below: no note that they restart
        warnings.filterwarnings("ignore", message="resuming a run of", category=DtlabWarning)
        trainer.resume(at)
    if world.distributed:
        rng = np.random.default_rng(np.random.SeedSequence([cfg.seed, FINETUNE_STREAM],
                                                           spawn_key=(world.rank,)))
        torch.manual_seed(distributed.rank_torch_seed(cfg.seed, world, FINETUNE_STREAM))
    else:
        rng = np.random.default_rng(np.random.SeedSequence([cfg.seed, FINETUNE_STREAM]))
        torch.manual_seed(cfg.seed)
    trainer.state = TrainerState(trainer.state.step, 0, rng)
    return trainer


def _initial_replay(cfg: FinetuneConfig, info: PolicyInfo) -> TrajectoryReplay:
    """The ``replay_trajectories`` best episodes of the offline data (--dataset, default the
    run's file, which must still be the data it was trained on)."""
    from dtlab.data.formats import load_episodes  # (imports h5py and minari)

    path = cfg.dataset or info.dataset.get("path")
    if not isinstance(path, str) or not path:
        raise ConfigError(f"{cfg.run}: the run records no dataset path; give --dataset")
    episodes = load_episodes(path)
    recorded = info.dataset.get("fingerprint")
    if cfg.dataset is None and recorded and recorded != episodes.fingerprint():
        raise ConfigError(f"{path}: not the data the run in {cfg.run} was trained on (its "
                          "content changed); restore it, or give the offline data with --dataset")
    if episodes.observation_space != info.observation_space or \
            type(episodes.action_space) is not type(info.action_space):
        raise ConfigError(f"{path}: its spaces differ from the run's; give the run's data with "
                          "--dataset")
    longest = int(episodes.episode_lengths.max())
    if longest > info.model.max_ep_len:
        episodes = episodes.truncate_episodes(info.model.max_ep_len)
    return TrajectoryReplay.from_best(episodes, cfg.replay_trajectories)


def _load_replay(path: Path) -> tuple[TrajectoryReplay, OnlineProgress]:
    tensors = checkpoint.load_extra(path, REPLAY_FILE)
    try:
        progress = OnlineProgress.from_tensor(tensors.pop("progress"))
        return TrajectoryReplay.from_arrays({k: v.numpy() for k, v in tensors.items()}), progress
    except (KeyError, ValueError, TypeError, ConfigError) as exc:
        raise CheckpointError(f"{path / REPLAY_FILE}: not a finetuning replay: {exc}") from None


def _weights_digest(source: Path) -> str:
    """SHA-256 of a checkpoint's weights file: the offline checkpoint a finetuning started from,
    recognized wherever its run directory was moved or copied since."""
    with open(source / checkpoint.WEIGHTS_FILE, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def _check_resume_settings(run: RunDirectory, cfg: FinetuneConfig, source: Path) -> None:
    """ConfigError unless the finetuning in ``run`` was started with ``cfg``'s settings (those
    of ``RESUME_MAY_CHANGE`` aside) from the same offline checkpoint: the same RUN path,
    however written, or one whose weights are the ones it started from (``source``, the
    checkpoint RUN resolves to now: the offline run moved or copied since)."""
    file = run.path / FINETUNE_CONFIG_FILE
    try:
        saved = json.loads(file.read_text())
    except (OSError, json.JSONDecodeError, UnicodeDecodeError):
        raise ConfigError(f"{run.path}: --resume: no readable {FINETUNE_CONFIG_FILE} (not a "
                          "dtlab finetune run); choose another --out") from None
    now = json.loads(json.dumps(dataclasses.asdict(cfg)))  # tuples -> lists, as saved
    resolved = saved.get("resolved") if isinstance(saved.get("resolved"), dict) else {}
    if isinstance(saved.get("run"), str) and (Path(cfg.run).resolve() == Path(
            resolved.get("run") or saved["run"]).resolve() or resolved.get("run_weights")
            == _weights_digest(source)):
        now["run"] = saved["run"]  # the same offline run, named or placed elsewhere
    differ = [d for d in setting_differences(saved, now)
              if d[0] not in FinetuneConfig.RESUME_MAY_CHANGE]
    if differ:
        shown = ", ".join(f"{k}: {a!r} -> {b!r}" for k, a, b in differ)
        own = " ".join(_as_flag(k, a) for k, a, _ in differ)
        raise ConfigError(f"{file}: --resume with different settings than the finetuning "
                          f"({shown}); repeat the finetuning's own flags: {own} (the command "
                          "that started it, plus --resume), or start a new one with another --out")


def _as_flag(name: str, value: object) -> str:
    """A saved setting as the command line gives it: ``--eval-targets -100 -50``, ``no
    --dataset`` for None, the run directory alone for the positional RUN."""
    flag = "--" + name.replace("_", "-")
    if name == "run":
        return f"RUN {value}"
    if value is None:
        return f"no {flag}"
    return " ".join([flag, *map(str, value if isinstance(value, list) else [value])])
