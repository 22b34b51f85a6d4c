"""The DT paper's behaviour-cloning baselines beside the Decision Transformer, and the one place
the network is chosen (``build_model``, from ``ModelConfig.architecture``).

- transformer-bc: ``DecisionTransformer`` without return-to-go tokens, (s_1, a_1, s_2, a_2, ...),
  the action for step t read from s_t (dtlab.model).
- mlp-bc: ``MLPBC`` below, the current state alone.

Both act through the same ``ActionHead`` as the DT (tanh for continuous actions, logits for
discrete ones), so the same sampler, ``train_step``, checkpoint and policy run all three.
"""

from __future__ import annotations

import torch
from torch import nn

from dtlab.config import ModelConfig
from dtlab.kernels import Dropout
from dtlab.model import DecisionTransformer, ImageEncoder, action_head
from dtlab.spaces import ActionSpec, ImageObservations, ObservationSpec


class MLPBC(nn.Module):
    """Behaviour cloning with an MLP on the current state alone: a_t from s_t.

    The DT code's BC baseline (github.com/kzl/decision-transformer, gym/decision_transformer/
    models/mlp_bc.py, MLPBCModel with its default max_length=1): ``cfg.n_layers`` hidden layers of
    ``cfg.embed_dim`` units, each followed by the activation and dropout, then the action head
    (tanh for continuous actions in [-1, 1], logits for discrete ones). Takes the same arguments
    as ``DecisionTransformer`` so that the same sampler, ``train_step`` and policy run it; actions,
    returns-to-go, timesteps and masks are ignored. CORL's BC actor (algorithms/offline/
    any_percent_bc.py: 2 x 256, ReLU, no dropout) is ``embed_dim=256, n_layers=2, dropout=0``.
    Frame stacks (``ImageObservations``) first go through an ``ImageEncoder`` to ``embed_dim``
    features. ConfigError for an action spec the head cannot predict.
    """

    def __init__(self, cfg: ModelConfig, observation_space: ObservationSpec,
                 action_space: ActionSpec) -> None:
        super().__init__()
        self.cfg, self.observation_space, self.action_space = cfg, observation_space, action_space
        image = isinstance(observation_space, ImageObservations)
        self.encoder = ImageEncoder(observation_space, cfg.embed_dim) if image else None
        layers: list[nn.Module] = []
        width = cfg.embed_dim if image else observation_space.dim
        for _ in range(cfg.n_layers):
            layers += [nn.Linear(width, cfg.embed_dim),
                       nn.ReLU() if cfg.activation == "relu" else nn.GELU(), Dropout(cfg.dropout)]
            width = cfg.embed_dim
        self.hidden = nn.Sequential(*layers)
        self.predict_action = action_head(cfg.policy, width, action_space)

    def encode_observations(self, frames: torch.Tensor) -> torch.Tensor:
        """Image models: frame stacks (..., stack, H, W) -> (..., embed_dim) features, which
        ``forward`` and ``predict_last`` also take in place of the frames."""
        return self.encoder(frames)

    def _features(self, observations: torch.Tensor) -> torch.Tensor:
        """(..., obs_dim) vectors as they are; frame stacks (..., stack, H, W) encoded."""
        image = self.encoder is not None and observations.dim() >= 4
        return self.encoder(observations) if image else observations

    def forward(self, observations: torch.Tensor, actions=None, returns_to_go=None, timesteps=None,
                masks=None) -> torch.Tensor:
        """Each step's action from its own state: (B, K, obs_dim) (or frame stacks
        (B, K, stack, H, W), or their encodings (B, K, D)) -> (B, K, A)."""
        return self.predict_action(self.hidden(self._features(observations)))

    def predict_last(self, observations: torch.Tensor, actions=None, returns_to_go=None,
                     timesteps=None, masks=None) -> torch.Tensor:
        """The last step's action, (B, K, obs_dim) (or (B, K, stack, H, W)) -> (B, A)."""
        return self.predict_action(self.hidden(self._features(observations[:, -1])))


def build_model(cfg: ModelConfig, observation_space: ObservationSpec,
                action_space: ActionSpec) -> DecisionTransformer | MLPBC:
    """The network ``cfg.architecture`` names: ``MLPBC`` for mlp-bc, else ``DecisionTransformer``
    (decision-transformer, transformer-bc). ConfigError for specs the network cannot take."""
    if cfg.architecture == "mlp-bc":
        return MLPBC(cfg, observation_space, action_space)
    return DecisionTransformer(cfg, observation_space, action_space)
