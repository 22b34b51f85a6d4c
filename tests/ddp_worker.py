"""Worker code for tests/test_distributed.py and tests/test_finetune.py, run in processes the
tests start.

- ``gradient_step(rank, ...)``: one ``train_step`` of a DistributedDataParallel model on this
  rank's half of a fixed batch (started by ``torch.multiprocessing.start_processes``).
- ``finetune_rank(rank, ...)``: rank ``rank`` of a 2-process ``dtlab finetune`` (started the
  same way), recording what the rank holds.
- As a script under torchrun: ``dtlab train`` whose rank 1 kills itself with SIGKILL right after
  step ``KILL_AT`` of the first attempt (``TORCHELASTIC_RESTART_COUNT`` 0):
  ``torchrun ... tests/ddp_worker.py KILL_AT train --dataset ...``.
"""

import gc
import os
import signal
import sys

import numpy as np
import torch

TINY_NO_DROPOUT = dict(embed_dim=16, n_layers=1, n_heads=2, context_len=5, max_ep_len=200,
                       dropout=0.0)
# Window ends over pendulum_like()'s 4 episodes of 200 steps: the first half holds windows cut by
# an episode start (1 + 2 + 3 + 5 = 11 real positions), the second 5 + 5 + 2 + 5 = 17.
ENDS = np.array([0, 1, 2, 50, 100, 199, 201, 450])


from tests.configs import pendulum_like  # noqa: E402  (the data tests/test_train.py uses)


def model_and_batches(ends_per_part: list[np.ndarray]):
    """The same freshly initialised model (seed 0), its AdamW, and one batch per part of the
    window ends, for a process of its own."""
    from dtlab.config import ModelConfig
    from dtlab.data.sampling import SequenceSampler
    from dtlab.baselines import build_model
    from dtlab.prepare import prepare
    from dtlab.trainer import make_optimizer, to_tensors
    from tests.configs import train_config

    cfg = train_config(dataset="<memory>", env="Pendulum-v1", lr=1e-3, grad_clip=0.0,
                       model=ModelConfig(**TINY_NO_DROPOUT))
    episodes, info = prepare(cfg, pendulum_like())
    torch.manual_seed(0)
    model = build_model(cfg.model, info.observation_space, info.action_space)
    optimizer = make_optimizer(model, cfg.optim, torch.device("cpu"))
    sampler = SequenceSampler(episodes, cfg.model.context_len, info.normalizer)
    batches = [to_tensors(sampler.gather(ends), torch.device("cpu")) for ends in ends_per_part]
    return model, optimizer, batches


def gradient_step(rank: int, store: str, out: str) -> None:
    """Rank ``rank`` of 2: one train_step of the DDP-wrapped model on its half of ENDS; rank 0
    saves the gradients, the gradient norm and the weights after the step to ``out``."""
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    from dtlab.trainer import train_step

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2)
    try:
        model, optimizer, (batch,) = model_and_batches([np.split(ENDS, 2)[rank]])
        ddp = DistributedDataParallel(model)
        _, grad_norm = train_step(ddp, optimizer, batch, grad_clip=0.0)
        if rank == 0:
            torch.save({"grads": {n: p.grad.clone() for n, p in model.named_parameters()},
                        "grad_norm": grad_norm, "weights": model.state_dict()}, out)
        del ddp  # its reducer holds the group: released before the group goes, as
        gc.collect()  # dtlab.distributed.finish does (one SIGABRT at teardown seen in CI)
    finally:
        dist.destroy_process_group()


def finetune_rank(rank: int, store: str, args: list[str], spy: str, stop_at_poll: int | None,
                  restart: int, cwds: list[str] | None = None) -> None:
    """Rank ``rank`` of 2 of ``dtlab finetune ARGS`` (torchrun's environment with restart count
    ``restart``; the process group joined through a file store), in working directory
    ``cwds[rank]`` when given. Rank 1 alone asks to stop at its ``stop_at_poll``-th poll of
    ``should_stop``. Saves to ``spy/rank{rank}.pt`` what this rank holds at its last checkpoint
    (weights, replay arrays), the trajectories it contributed to the exchange, and its result
    (the string "KeyboardInterrupt" when the finetuning raised it)."""
    import torch.distributed as dist

    from dtlab import distributed
    from dtlab.cli_errors import parse
    from dtlab.finetune import REPLAY_FILE, FinetuneConfig, finetune
    from dtlab.trainer import Trainer

    os.environ.update(RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE="2",
                      TORCHELASTIC_RESTART_COUNT=str(restart))
    torch.set_num_threads(1)
    if cwds is not None:
        os.chdir(cwds[rank])
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2)
    held, own = {}, []
    save, gather = Trainer.save, distributed.all_gather

    def save_and_record(self, out, info, keep, extra=None):
        held["weights"] = {k: v.clone() for k, v in self.model.state_dict().items()}
        held["replay"] = {k: v.clone() for k, v in extra[REPLAY_FILE].items()}
        return save(self, out, info, keep, extra)

    def gather_and_record(world, obj):
        own.append(obj)
        return gather(world, obj)

    Trainer.save, distributed.all_gather = save_and_record, gather_and_record
    polls = []

    def should_stop():
        polls.append(1)
        return rank == 1 and len(polls) == stop_at_poll

    try:
        cfg = parse(FinetuneConfig, args, prog="dtlab finetune", description="")
        try:
            result = finetune(cfg, should_stop=should_stop, echo=False)
        except KeyboardInterrupt:
            torch.save({"result": "KeyboardInterrupt"}, os.path.join(spy, f"rank{rank}.pt"))
            return
        torch.save({**held, "own": [{"observations": torch.from_numpy(t.observations),
                                     "rewards": torch.from_numpy(t.rewards)} for t in own],
                    "result": (result.checkpoint.name, result.env_steps, result.rollouts,
                               len(result.evaluations), result.interrupted)},
                   os.path.join(spy, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def _kill_rank_1_after(step: int) -> None:
    from dtlab import train as train_module

    original = train_module.Trainer.step

    def step_then_die(self, *args, **kwargs):
        result = original(self, *args, **kwargs)
        if self.state.step == step:
            os.kill(os.getpid(), signal.SIGKILL)
        return result

    train_module.Trainer.step = step_then_die


if __name__ == "__main__":
    from dtlab.cli import main

    if os.environ.get("RANK") == "1" and os.environ.get("TORCHELASTIC_RESTART_COUNT") == "0":
        _kill_rank_1_after(int(sys.argv[1]))
    sys.exit(main(sys.argv[2:]))
