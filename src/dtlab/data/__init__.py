"""Data layer: episodes, returns-to-go, window sampling, file formats. No torch models here."""

from dtlab.data.episodes import EpisodeSet
from dtlab.data.returns import normalized_score, returns_to_go
from dtlab.data.sampling import Batch, SequenceSampler

__all__ = ["EpisodeSet", "returns_to_go", "normalized_score", "SequenceSampler", "Batch"]
