"""--wandb: the training metrics and evaluations reach a Weights & Biases run (offline mode)."""

import json
import struct

import pytest

from dtlab.config import ModelConfig
from dtlab.metrics import read_metrics
from dtlab.rundir import RunDirectory
from dtlab.train import train
from tests.configs import pendulum_like, train_config

pb = pytest.importorskip("wandb.proto.wandb_internal_pb2")


def history(path):
    """The history rows of a .wandb file: a LevelDB-format log (32 KiB blocks, records of a 7-byte
    header: crc32, length, type 1 full / 2 first / 3 middle / 4 last) after W&B's 7-byte file
    header, each record one wandb_internal_pb2.Record."""
    data = path.read_bytes()
    assert data[:4] == b":W&B"
    pos, block, chunk, rows = 7, 32768, b"", []
    while pos + 7 <= len(data):
        left = block - pos % block
        _crc, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if left < 7 or (kind == 0 and length == 0):  # block trailer or padding
            pos += left
            continue
        chunk += data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):
            record = pb.Record()
            record.ParseFromString(chunk)
            chunk = b""
            if record.WhichOneof("record_type") == "history":
                rows.append({i.key or "/".join(i.nested_key): json.loads(i.value_json)
                             for i in record.history.item})
    return rows


def test_wandb_mirrors_losses_and_evaluations(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path / "wandb-dir"))
    out = tmp_path / "run"
    cfg = train_config(dataset="<memory>", env="Pendulum-v1", out=str(out), steps=4, batch_size=4,
                       warmup_steps=2, progress=False, tensorboard=False, log_every=2,
                       eval_every=4, eval_episodes=1, eval_targets=(-100.0,), wandb=True,
                       wandb_project="dtlab-test",
                       model=ModelConfig(embed_dim=16, n_layers=1, context_len=4, max_ep_len=200))
    train(cfg, pendulum_like(n_episodes=2))
    [log] = list((out / "wandb").glob("offline-run-*/run-*.wandb"))
    rows = history(log)
    losses = {r["step"]: r["loss"] for r in read_metrics(out / "metrics.jsonl") if "loss" in r}
    assert len(losses) == 2
    assert {r["_step"]: r["train/loss"] for r in rows if "train/loss" in r} == losses
    [evaluation] = RunDirectory(out).evaluations()
    logged = [r for r in rows if "eval/return_-100" in r]
    assert [(r["_step"], r["eval/return_-100"]) for r in logged] == \
        [(evaluation.step, evaluation.results[0].mean)]


def test_without_wandb_no_wandb_files(tmp_path):
    out = tmp_path / "run"
    cfg = train_config(dataset="<memory>", env="Pendulum-v1", out=str(out), steps=2, batch_size=4,
                       warmup_steps=1, progress=False, tensorboard=False, log_every=1,
                       model=ModelConfig(embed_dim=16, n_layers=1, context_len=4, max_ep_len=200))
    train(cfg, pendulum_like(n_episodes=2))
    assert not (out / "wandb").exists()
