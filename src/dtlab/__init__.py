"""dtlab: Decision Transformers for offline reinforcement learning."""

__version__ = "0.1.0"
