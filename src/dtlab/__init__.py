"""dtlab: Decision Transformers for offline reinforcement learning.

The Python API mirrors the CLI::

    from dtlab import TrainConfig, EvalConfig, ModelConfig, DTPolicy
    from dtlab.train import train                    # dtlab train
    from dtlab.evaluate import evaluate_checkpoint   # dtlab evaluate
    from dtlab.data.formats import load_episodes     # dtlab data info

Importing the package (or ``dtlab.data``) loads neither torch nor minari: the names below are
imported on first use.
"""

import os as _os

from dtlab._version import __version__

# OpenMP threads that spin while waiting collapse throughput 10-80x when another process holds a
# core (measured here: docs/benchmarks.md); passive waiting costs little when the cores are free.
# Takes effect only if torch has not been imported yet; the user's own setting wins.
_os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

_LAZY = {
    "TrainConfig": "dtlab.config", "EvalConfig": "dtlab.evaluate", "ModelConfig": "dtlab.config",
    "DataConfig": "dtlab.config", "OptimConfig": "dtlab.config", "RunConfig": "dtlab.config",
    "EvalDuringTraining": "dtlab.config",
    "EpisodeSet": "dtlab.data.episodes", "DTPolicy": "dtlab.policy",
}

__all__ = ["__version__", *_LAZY]


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'dtlab' has no attribute {name!r}")
