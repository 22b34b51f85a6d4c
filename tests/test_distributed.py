"""Training in several processes (torchrun, DistributedDataParallel over gloo on the CPU): the
gradient equals one process's on the concatenated batch; a 2-process run's checkpoint loads and
evaluates; a rank killed mid-run and restarted by torchrun resumes to the same weights."""

import json
import sys
import warnings

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp

from dtlab import checkpoint
from dtlab.config import ModelConfig
from dtlab.evaluate import EvalConfig
from dtlab.data.formats import save_episodes
from dtlab.distributed import World, process_device, sampling_rng
from dtlab.errors import ConfigError, DtlabWarning
from dtlab.evaluate import evaluate_checkpoint
from dtlab.train import train, train_step
from tests.configs import train_config
from tests.ddp_worker import ENDS, model_and_batches, pendulum_like
from tests.torchrun_runs import ROOT, WORKER, torchrun_once_more_on_teardown_abort


def test_two_process_gradient_equals_one_process_on_the_concatenated_batch(tmp_path):
    out = tmp_path / "rank0.pt"
    mp.start_processes(_gradient_step, args=(str(tmp_path / "store"), str(out)), nprocs=2,
                       start_method="spawn")
    ddp = torch.load(out, weights_only=True)
    # One process, the whole batch (8 windows): the reference.
    model, optimizer, (whole,) = model_and_batches([ENDS])
    _, grad_norm = train_step(model, optimizer, whole, grad_clip=0.0)
    for name, p in model.named_parameters():
        torch.testing.assert_close(ddp["grads"][name], p.grad, rtol=1e-5, atol=1e-8, msg=name)
    torch.testing.assert_close(ddp["grad_norm"], grad_norm, rtol=1e-5, atol=0)
    for name, w in model.state_dict().items():
        torch.testing.assert_close(ddp["weights"][name], w, msg=name)
    # The halves hold 11 and 17 real positions: a plain average of the two halves' mean-loss
    # gradients (what DDP alone computes) is measurably different, so the test can tell.
    halves = []
    for part in np.split(ENDS, 2):
        m, opt, (batch,) = model_and_batches([part])
        train_step(m, opt, batch, grad_clip=0.0)
        halves.append({n: p.grad for n, p in m.named_parameters()})
    naive = {n: (halves[0][n] + halves[1][n]) / 2 for n in halves[0]}
    worst = max(float((naive[n] - p.grad).abs().max() / p.grad.abs().max())
                for n, p in model.named_parameters())
    assert worst > 1e-2


def _gradient_step(rank, store, out):  # spawn needs a function importable by name
    sys.path.insert(0, ROOT)
    from tests.ddp_worker import gradient_step

    gradient_step(rank, store, out)


def test_rank_streams_and_environment():
    one = World()
    assert np.array_equal(sampling_rng(3, one).integers(0, 1000, 5),
                          np.random.default_rng(3).integers(0, 1000, 5))  # as before torchrun
    r0, r1 = (sampling_rng(3, World(rank=r, size=2, local_size=2)).integers(0, 10**9, 5)
              for r in (0, 1))
    assert not np.array_equal(r0, r1)
    assert np.array_equal(r0, np.random.default_rng(np.random.SeedSequence([3, 0]))
                          .integers(0, 10**9, 5))
    env = {"RANK": "1", "WORLD_SIZE": "4", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2",
           "TORCHELASTIC_RESTART_COUNT": "2"}
    assert World.current(env) == World(rank=1, size=4, local_rank=1, local_size=2, restart=2)
    assert World.current({}) == World()
    with pytest.raises(ConfigError, match="RANK"):
        World.current({"WORLD_SIZE": "2", "RANK": "x"})
    with pytest.raises(ConfigError, match="inconsistent"):
        World.current({"WORLD_SIZE": "2", "RANK": "2"})
    # One GPU per process: cuda:LOCAL_RANK; a named GPU only for one process on the node.
    two = World(rank=1, size=2, local_rank=1, local_size=2)
    assert process_device(two, torch.device("cpu")) == torch.device("cpu")
    assert process_device(World(), torch.device("cuda", 3)) == torch.device("cuda", 3)
    with pytest.raises(ConfigError, match="device: cuda:0 names one GPU but torchrun starts 2"):
        process_device(two, torch.device("cuda", 0))
    if torch.cuda.device_count() < 2:
        with pytest.raises(ConfigError, match="2 processes on this node but it has"):
            process_device(two, torch.device("cuda"))
    else:
        assert process_device(two, torch.device("cuda")) == torch.device("cuda", 1)


def _train_args(dataset, out):
    return ["train", "--dataset", str(dataset), "--env", "Pendulum-v1", "--out", str(out),
            "--steps", "12", "--batch-size", "8", "--warmup-steps", "4", "--log-every", "3",
            "--checkpoint-every", "6", "--seed", "3", "--no-progress", "--no-tensorboard",
            "--precision", "fp32", "--model.embed-dim", "16", "--model.n-layers", "1",
            "--model.n-heads", "2", "--model.context-len", "5", "--model.max-ep-len", "200"]


@pytest.fixture(scope="module")
def two_process_run(tmp_path_factory):
    """An uninterrupted 2-process torchrun run of 12 steps (checkpoints at 6 and 12)."""
    tmp = tmp_path_factory.mktemp("ddp")
    dataset = tmp / "pendulum.hdf5"
    save_episodes(pendulum_like(), dataset)
    proc = torchrun_once_more_on_teardown_abort(_train_args(dataset, tmp / "full"), tmp,
                                                tmp / "full")
    assert proc.returncode == 0, proc.stderr[-3000:]
    return tmp, dataset, proc


def _weights(run):
    from safetensors.torch import load_file

    return load_file(str(checkpoint.resolve(run) / checkpoint.WEIGHTS_FILE))


def test_two_process_run_checkpoint_loads_and_evaluates(two_process_run):
    tmp, _, proc = two_process_run
    run = tmp / "full"
    assert proc.stdout.count("done: 12 steps") == 1  # rank 0 reports, once
    state = checkpoint.load_trainer_state(run)
    assert state["world_size"] == 2 and len(state["ranks"]) == 2
    assert state["ranks"][0]["numpy_rng"] != state["ranks"][1]["numpy_rng"]
    steps = [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert steps == [3, 6, 9, 12]
    data = evaluate_checkpoint(EvalConfig(checkpoint=str(run), targets=(-300.0,), episodes=2,
                                          max_steps=10, device="cpu", precision="fp32"))
    assert data["results"][0]["lengths"] == [10, 10]
    assert np.isfinite(data["results"][0]["mean"])


def test_killed_rank_restarted_by_torchrun_resumes_to_the_same_weights(two_process_run):
    tmp, dataset, _ = two_process_run
    # ddp_worker.py's first argument: rank 1 kills itself (SIGKILL) right after step 8, past the
    # checkpoint of step 6; torchrun restarts both workers, which resume from it.
    proc = torchrun_once_more_on_teardown_abort(["8", *_train_args(dataset, tmp / "killed")], tmp,
                                                tmp / "killed", restarts=1, script=WORKER,
                                                timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "torchrun restarted the workers" in proc.stderr
    full, resumed = _weights(tmp / "full"), _weights(tmp / "killed")
    for key in full:
        assert torch.equal(full[key], resumed[key]), key
    steps = [json.loads(line)["step"]
             for line in (tmp / "killed" / "metrics.jsonl").read_text().splitlines()]
    assert steps == [3, 6, 9, 12]


def test_resume_with_another_number_of_processes_notes_it(two_process_run, tmp_path):
    import shutil

    tmp, dataset, _ = two_process_run
    run = tmp_path / "run"
    shutil.copytree(tmp / "full", run)
    cfg = train_config(dataset=str(dataset), env="Pendulum-v1", out=str(run), steps=15,
                       batch_size=8, warmup_steps=4, log_every=3, checkpoint_every=6, seed=3,
                       progress=False, tensorboard=False, precision="fp32", resume=True,
                       model=ModelConfig(embed_dim=16, n_layers=1, n_heads=2, context_len=5,
                                         max_ep_len=200))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = train(cfg)
    notes = [str(w.message) for w in caught if issubclass(w.category, DtlabWarning)]
    assert any("resuming a run of 2 process(es) with 1" in n for n in notes), notes
    assert result.steps == 15


def test_finish_frees_a_ddp_wrapper_held_only_by_a_cycle_before_it_leaves_the_group(
        tmp_path, monkeypatch):
    """A DistributedDataParallel wrapper that only a reference cycle still holds (as a finished
    run's was, through its training frame) is freed before the group is destroyed, not when the
    interpreter tears down."""
    import gc
    import weakref

    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    from dtlab import distributed

    dist.init_process_group("gloo", store=dist.FileStore(str(tmp_path / "store"), 1), rank=0,
                            world_size=1)
    seen_at_destroy = []
    real_destroy = dist.destroy_process_group
    monkeypatch.setattr(dist, "destroy_process_group",
                        lambda: (seen_at_destroy.append(wrapper() is None), real_destroy()))
    gc.disable()  # no collection but finish's own
    try:
        cycle = {"ddp": DistributedDataParallel(torch.nn.Linear(2, 2))}
        cycle["self"] = cycle
        wrapper = weakref.ref(cycle["ddp"])
        del cycle
        assert wrapper() is not None  # kept by the cycle alone
        distributed.finish(True)
    finally:
        gc.enable()
        if dist.is_initialized():
            gc.collect()  # on failure too: the wrapper goes before its group
            real_destroy()
    assert seen_at_destroy == [True] and not dist.is_initialized()
