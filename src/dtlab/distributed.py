"""Many training processes with ``torchrun``: who this process is, the process group, and the
per-rank random streams.

``torchrun --nproc_per_node N -m dtlab train ...`` starts N copies of ``dtlab train`` with
``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK`` and ``TORCHELASTIC_RESTART_COUNT`` in their environment
(torch.distributed.run's documented worker environment). Training reads them (``World.current``),
joins the default process group (gloo on CPU, nccl on CUDA) and wraps its model in
DistributedDataParallel. Without those variables nothing here runs: one process, as always.
"""

from __future__ import annotations

import datetime
import gc
import os
import warnings
from dataclasses import dataclass
from typing import Any, Mapping

import numpy as np
import torch
import torch.distributed as dist

from dtlab.errors import ConfigError, DtlabWarning

# How long a collective waits for the other ranks. Rank 0 evaluates alone while the others wait at
# a barrier, and an evaluation of 2 x 100 long episodes can outlast torch's default (10 minutes
# for nccl); a worker that dies is noticed by torchrun, which stops the others, so a long timeout
# does not leave a failed job hanging.
TIMEOUT = datetime.timedelta(hours=2)


@dataclass(frozen=True)
class World:
    """This process's place among the training processes (one process: rank 0 of 1)."""

    rank: int = 0  # RANK: 0 .. size - 1, over all nodes
    size: int = 1  # WORLD_SIZE
    local_rank: int = 0  # LOCAL_RANK: the index on this node (its GPU: cuda:LOCAL_RANK)
    local_size: int = 1  # LOCAL_WORLD_SIZE: processes on this node (they share its cores)
    restart: int = 0  # TORCHELASTIC_RESTART_COUNT: times torchrun restarted the workers

    @property
    def is_main(self) -> bool:
        """Rank 0: the process that logs, writes checkpoints and evaluates."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.size > 1

    @classmethod
    def current(cls, environ: Mapping[str, str] | None = None) -> "World":
        """From the torchrun environment (``os.environ`` by default); one process when
        ``WORLD_SIZE`` is unset. ConfigError naming the variable when a value is malformed."""
        env = os.environ if environ is None else environ
        if "WORLD_SIZE" not in env:
            return cls()
        # A launcher other than torchrun may leave out the last three: one node, first attempt.
        defaults = {"RANK": None, "WORLD_SIZE": None, "LOCAL_RANK": "0",
                    "LOCAL_WORLD_SIZE": env["WORLD_SIZE"], "TORCHELASTIC_RESTART_COUNT": "0"}
        values = []
        for var, default in defaults.items():
            text = env.get(var, default)
            if text is None or not text.strip().isdigit():
                raise ConfigError(f"environment variable {var}: expected a number >= 0 with "
                                  f"WORLD_SIZE set (torchrun sets both), got {text!r}")
            values.append(int(text))
        world = cls(*values)
        if world.size < 1 or not world.rank < world.size or not world.local_rank < world.local_size:
            raise ConfigError(f"environment variables RANK={world.rank}, WORLD_SIZE={world.size}, "
                              f"LOCAL_RANK={world.local_rank}, LOCAL_WORLD_SIZE="
                              f"{world.local_size} are inconsistent")
        return world


def process_device(world: World, device: torch.device) -> torch.device:
    """The device this process trains on: ``device`` itself for the CPU or one process; for CUDA
    under torchrun, ``cuda:LOCAL_RANK`` (one GPU per process; a given ``cuda:N`` with one process
    on the node). ConfigError when ``cuda:N`` is given for several processes on a node, or the
    node has fewer GPUs than processes."""
    if device.type != "cuda" or not world.distributed:
        return device
    if device.index is not None:
        if world.local_size == 1:
            return device
        raise ConfigError(f"device: {device} names one GPU but torchrun starts {world.local_size} "
                          "processes on this node; give device cuda (or auto): each process takes "
                          "cuda:LOCAL_RANK")
    if world.local_size > torch.cuda.device_count():
        raise ConfigError(f"device: torchrun starts {world.local_size} processes on this node but "
                          f"it has {torch.cuda.device_count()} CUDA device(s); one each is needed")
    return torch.device("cuda", world.local_rank)


def start(world: World, device: torch.device) -> bool:
    """Join the default process group of ``world`` (nccl for CUDA, gloo otherwise; rendezvous
    through torchrun's MASTER_ADDR/MASTER_PORT). Returns True when this call created the group
    (``finish`` then destroys it), False for one process or a group that already exists."""
    if not world.distributed or dist.is_initialized():
        return False
    if (world.is_main and os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True"
            and os.environ.get("TORCHELASTIC_MAX_RESTARTS", "0") not in ("", "0")):
        warnings.warn("torchrun --max-restarts with its shared rendezvous store: restarted workers "
                      "can read the previous attempt's addresses and fail to connect (measured "
                      "with torch 2.13; pytorch/pytorch#135712); start torchrun with "
                      "TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1", DtlabWarning, stacklevel=2)
    if device.type == "cuda":
        torch.cuda.set_device(device)
        dist.init_process_group("nccl", timeout=TIMEOUT, device_id=device)
    else:
        dist.init_process_group("gloo", timeout=TIMEOUT)
    return True


def finish(created: bool) -> None:
    """Leave the process group that ``start`` created (nothing otherwise).

    A garbage collection first frees what only reference cycles still hold: measured on rank 0 of
    a 2-process CPU run, the finished run's DistributedDataParallel wrapper (whose reducer holds
    the group) stayed alive through ``_train``'s frame. The learning-curve plot's tight layout
    measures text, matplotlib parses font patterns with pyparsing, and pyparsing's parse
    exceptions keep tracebacks in reference cycles whose frames lead back to ``_train``. Left to
    a later collection, the wrapper and its gloo group could be freed only when the interpreter
    tears down, where gloo's own teardown can abort the process (pytorch/pytorch PR #179291)."""
    if created and dist.is_initialized():
        gc.collect()
        dist.destroy_process_group()


def sampling_rng(seed: int, world: World) -> np.random.Generator:
    """The window-sampling stream of this rank: ``default_rng(seed)`` for one process (as dtlab
    has always drawn), else ``default_rng(SeedSequence([seed, rank]))``: independent streams per
    rank, reproducible from (seed, rank) (numpy's recommended way to spawn parallel streams)."""
    if not world.distributed:
        return np.random.default_rng(seed)
    return np.random.default_rng(np.random.SeedSequence([seed, world.rank]))


def rank_torch_seed(seed: int, world: World, *extra: int) -> int:
    """A torch seed for rank ``world.rank`` derived from (seed, rank, *extra) by numpy's
    SeedSequence (dropout masks differ between ranks)."""
    return int(np.random.SeedSequence([seed, world.rank, *extra]).generate_state(1, np.uint64)[0]
               % (2**63))


def barrier(world: World) -> None:
    """Wait until every rank gets here (nothing for one process)."""
    if world.distributed:
        dist.barrier()


def all_sum(world: World, tensor: torch.Tensor) -> torch.Tensor:
    """``tensor`` summed over ranks, in place (asynchronous to the host on CUDA; the tensor
    itself for one process)."""
    if world.distributed:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def any_rank(world: World, flags: list[bool], device: torch.device) -> list[bool]:
    """Element-wise OR of ``flags`` over ranks (a collective every rank must call; reads the result
    on the host)."""
    if not world.distributed:
        return flags
    t = torch.tensor([int(f) for f in flags], dtype=torch.int32, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return [bool(v) for v in t.tolist()]


def gather_to_main(world: World, obj: Any) -> list[Any] | None:
    """Every rank's ``obj`` (picklable; tensors travel on the CPU) as a list on rank 0, None on
    the others (a collective every rank must call)."""
    if not world.distributed:
        return [obj]
    out = [None] * world.size if world.is_main else None
    dist.gather_object(obj, out, dst=0)
    return out


def all_gather(world: World, obj: Any) -> list[Any]:
    """Every rank's ``obj`` (picklable, e.g. a small numpy record), in rank order, on every rank
    (a collective every rank must call; ``[obj]`` for one process). torch.distributed's
    ``all_gather_object`` pickles it: for objects from the job's own ranks only."""
    if not world.distributed:
        return [obj]
    out: list[Any] = [None] * world.size
    dist.all_gather_object(out, obj)
    return out
