"""`dtlab data info` shows the recorded env id and the metadata the file carries (issue 21)."""

import json

import h5py
import numpy as np

from dtlab.cli import main


def d4rl_with_metadata(path, **metadata):
    n = 20
    with h5py.File(path, "w") as f:
        f["observations"] = np.zeros((n, 3), np.float32)
        f["actions"] = np.zeros((n, 1), np.float32)
        f["rewards"] = np.ones(n, np.float32)
        f["terminals"] = np.zeros(n, bool)
        f["timeouts"] = (np.arange(n) % 10) == 9
        for key, value in metadata.items():
            f[f"metadata/{key}"] = value
    return path


def test_data_info_shows_env_id_and_metadata(tmp_path, capsys):
    path = d4rl_with_metadata(tmp_path / "d.hdf5", env_id="Pendulum-v1", algorithm="SAC",
                              **{"policy/nonlinearity": "relu", "iteration": np.int64(7),
                                 "score": np.float32(1.5)})
    assert main(["data", "info", str(path), "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["env_id"] == "Pendulum-v1"
    assert summary["metadata"] == {"algorithm": "SAC", "env_id": "Pendulum-v1", "iteration": 7,
                                   "policy/nonlinearity": "relu", "score": 1.5}
    assert main(["data", "info", str(path)]) == 0
    rows = [" ".join(line.replace("│", " ").split()) for line in capsys.readouterr().out.splitlines()]
    assert "env_id Pendulum-v1" in rows and "metadata/policy/nonlinearity relu" in rows
    bare = d4rl_with_metadata(tmp_path / "bare.hdf5")
    assert main(["data", "info", str(bare), "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["env_id"] is None and summary["metadata"] == {}
