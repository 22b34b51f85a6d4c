"""dtlab: Decision Transformers for offline reinforcement learning.

The Python API mirrors the CLI::

    from dtlab import TrainConfig, EvalConfig, ModelConfig, DTPolicy
    from dtlab.train import train                    # dtlab train
    from dtlab.evaluate import evaluate_checkpoint   # dtlab evaluate
    from dtlab.data.formats import load_episodes     # dtlab data info
"""

import os as _os

__version__ = "0.1.0"

# OpenMP threads that spin while waiting collapse throughput 10-80x when another process holds a
# core (measured here: docs/benchmarks.md); passive waiting costs little when the cores are free.
# Takes effect only if torch has not been imported yet; the user's own setting wins.
_os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from dtlab.config import EvalConfig, ModelConfig, TrainConfig  # noqa: E402
from dtlab.data.episodes import EpisodeSet  # noqa: E402
from dtlab.policy import DTPolicy  # noqa: E402

__all__ = ["__version__", "TrainConfig", "EvalConfig", "ModelConfig", "EpisodeSet", "DTPolicy"]
