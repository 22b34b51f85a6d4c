"""dtlab: Decision Transformers for offline reinforcement learning.

The Python API mirrors the CLI::

    from dtlab import TrainConfig, EvalConfig, ModelConfig, DTPolicy
    from dtlab.train import train                    # dtlab train
    from dtlab.evaluate import evaluate_checkpoint   # dtlab evaluate
    from dtlab.data.formats import load_episodes     # dtlab data info
"""

__version__ = "0.1.0"

from dtlab.config import EvalConfig, ModelConfig, TrainConfig  # noqa: E402
from dtlab.data.episodes import EpisodeSet  # noqa: E402
from dtlab.policy import DTPolicy  # noqa: E402

__all__ = ["__version__", "TrainConfig", "EvalConfig", "ModelConfig", "EpisodeSet", "DTPolicy"]
