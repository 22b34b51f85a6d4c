"""The training losses: the masked action loss (mean squared error of continuous actions, cross
entropy of discrete ones, over the real positions of the windows) and the stochastic head's
(negative log-likelihood minus the learned entropy temperature times the entropy, the Online
Decision Transformer's; ``EntropyTemperature``). ``dtlab.trainer.train_step`` calls them; a
training loop (dtlab train, dtlab finetune) adds each step's loss to a ``Tally`` and reads it at
its log points."""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F

from dtlab import distributed
from dtlab.distributed import World
from dtlab.model import StochasticActionHead
from dtlab.spaces import ActionSpec, DiscreteActions


def action_loss(pred: torch.Tensor, target: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """Mean over every real (unpadded) position of every window of the squared error (continuous:
    pred, target (B, K, A)) or the cross entropy (discrete: logits (B, K, n), indices (B, K)).

    masks: (B, K) bool.
    """
    if target.dtype == torch.long:  # discrete
        per_step = F.cross_entropy(pred.transpose(1, 2), target, reduction="none")  # (B, K)
    else:
        per_step = (pred - target).pow(2).mean(-1)  # (B, K)
    m = masks.to(per_step.dtype)
    return (per_step * m).sum() / m.sum()


def stochastic_action_loss(head: StochasticActionHead, out: torch.Tensor, actions: torch.Tensor,
                           masks: torch.Tensor, alpha: torch.Tensor
                           ) -> tuple[torch.Tensor, torch.Tensor]:
    """The ODT's policy objective (Zheng et al. 2022, section 3.2, Eq. 5): the mean negative
    log-likelihood of the data's actions minus ``alpha`` times the mean entropy, both over every
    real position of every window (the paper's 1/K sum over a window's steps, averaged over the
    batch). ``out``: the stochastic head's output (B, K, 2A) or logits (B, K, n); ``actions``
    (B, K, A) in [-1, 1] or (B, K) indices; ``masks`` (B, K) bool; ``alpha`` a 0-d tensor, held
    constant here. The entropy's Monte-Carlo noise is drawn from torch's generator on the
    device (``StochasticActionHead.entropy``).

    Returns (objective, mean entropy), 0-d tensors; the entropy still carries its gradient."""
    nll = -head.log_likelihood(out, actions)  # (B, K)
    noise = None if head.logits else torch.randn_like(out[..., :head.width])  # (B, K, A)
    entropy = head.entropy(out, noise)  # (B, K)
    m = masks.to(nll.dtype)
    real = m.sum()
    nll_mean, entropy_mean = (nll * m).sum() / real, (entropy * m).sum() / real
    return nll_mean - alpha * entropy_mean, entropy_mean


# The ODT's temperature (Zheng et al. 2022, section 3.2; the values as its authors' code sets
# them, facebookresearch/online-dt main.py: init_temperature, log_temperature_optimizer,
# target_entropy): initial value 0.1,
# optimized in log space by Adam at learning rate 1e-4, betas (0.9, 0.999), toward the target
# entropy -act_dim (SAC's heuristic, Haarnoja et al. 2018, "Soft Actor-Critic Algorithms and
# Applications", section 5). Discrete actions (not in the paper): half the uniform policy's
# entropy, 0.5 log n, dtlab's choice (any fixed target below log n keeps exploring without
# pushing the policy to uniform; SAC-discrete's 0.98 log n does the latter).
INITIAL_TEMPERATURE = 0.1
TEMPERATURE_LR = 1e-4
TEMPERATURE_BETAS = (0.9, 0.999)


def target_entropy(action_space: ActionSpec) -> float:
    """-act_dim for continuous actions; 0.5 log n for ``DiscreteActions(n)`` (see above)."""
    if isinstance(action_space, DiscreteActions):
        return 0.5 * math.log(action_space.n)
    return -float(action_space.dim)


class EntropyTemperature:
    """The ODT's learned entropy temperature lambda (the policy loss weighs the entropy by it), as
    the dual variable of the constraint entropy >= target (Zheng et al. 2022, Eq. 4 and 6):
    log lambda is a (1,) tensor with its own Adam optimizer, stepped on
    lambda x (mean entropy - target) with the entropy held constant, so lambda grows while the
    entropy is below the target and shrinks while above."""

    def __init__(self, action_space: ActionSpec, device: torch.device,
                 initial: float = INITIAL_TEMPERATURE) -> None:
        self.target = target_entropy(action_space)
        self.log_alpha = torch.full((1,), math.log(initial), device=device, requires_grad=True)
        self.optimizer = torch.optim.Adam([self.log_alpha], lr=TEMPERATURE_LR,
                                          betas=TEMPERATURE_BETAS,
                                          fused=device.type in ("cpu", "cuda") or None)

    @property
    def alpha(self) -> torch.Tensor:
        """lambda, 0-d, without gradient."""
        return self.log_alpha.detach().exp()[0]

    def step(self, entropy: torch.Tensor, scaler: torch.amp.GradScaler) -> None:
        """One Adam step of log lambda on ``entropy`` (the batch's mean entropy, 0-d), skipped
        (by ``scaler``, without a host sync) when it is not finite."""
        self.optimizer.zero_grad(set_to_none=True)
        scaler.scale((self.log_alpha.exp() * (entropy.detach() - self.target)).sum()).backward()
        scaler.unscale_(self.optimizer)
        scaler.step(self.optimizer)

    def state_dict(self) -> dict[str, Any]:
        return {"log_alpha": self.log_alpha.detach().cpu().clone(),
                "optimizer": self.optimizer.state_dict(), "target": self.target}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        with torch.no_grad():
            self.log_alpha.copy_(state["log_alpha"])
        self.optimizer.load_state_dict(state["optimizer"])
        for group in self.optimizer.param_groups:  # this device's implementation (as AdamW's)
            group["fused"] = self.optimizer.defaults.get("fused")


class Tally:
    """Loss and non-finite steps since the last read, kept on the device: a training loop (dtlab
    train, dtlab finetune) adds each step's ``(loss, grad_norm)`` (``Trainer.step``) without a
    host sync and reads the tally at log, evaluation and checkpoint points (the same on the CPU,
    on CUDA and under torchrun)."""

    def __init__(self, device: torch.device, step: int) -> None:
        self.loss_sum = torch.zeros((), device=device)  # the applied steps' losses
        self.applied = torch.zeros((), dtype=torch.long, device=device)
        self.first_bad = torch.zeros((), dtype=torch.long, device=device)  # 1-based; 0: none
        self.taken, self.since = 0, step

    def add(self, loss: torch.Tensor, grad_norm: torch.Tensor) -> None:
        finite = torch.isfinite(grad_norm)
        self.taken += 1
        self.loss_sum += torch.where(finite, loss, 0.0)
        self.applied += finite
        self.first_bad = torch.where(~finite & (self.first_bad == 0), self.taken, self.first_bad)

    def read(self, world: World) -> tuple[float, int, int | None]:
        """(mean loss of the applied steps, or nan; steps skipped; the first bad step or None)
        since the last read, then starts afresh. Under torchrun the loss is averaged over the
        ranks (a collective: every rank reads at the same steps)."""
        both = distributed.all_sum(world, torch.stack([self.loss_sum,
                                                       self.applied.to(self.loss_sum.dtype)]))
        loss_sum, count = float(both[0]), float(both[1])
        applied, first = int(self.applied), int(self.first_bad)
        skipped = self.taken - applied
        bad = self.since + first if first else None
        self.loss_sum.zero_()
        self.applied.zero_()
        self.first_bad.zero_()
        self.since += self.taken
        self.taken = 0
        return (loss_sum / count if count else float("nan")), skipped, bad
