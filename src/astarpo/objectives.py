"""Per-sequence losses. Each takes summed response log-probs and returns one loss value per sequence."""

from __future__ import annotations

import torch


def astarpo_loss(logp: torch.Tensor, ref_logp: torch.Tensor, reward: torch.Tensor, v_star: torch.Tensor,
                 beta2: float) -> torch.Tensor:
    """A*-PO: least-squares regression of the scaled log-ratio onto the optimal advantage.

        loss(x, y) = ( beta2 * [log pi(y|x) - log pi_ref(y|x)]  -  (r(x, y) - V*(x)) )^2

    ``logp`` and ``ref_logp`` are sums over the response tokens (EOS included). At the optimum,
    pi(y|x) = pi_ref(y|x) * exp((r - V*) / beta2), which is the KL-regularized optimal policy when V* is exact
    and beta1 = beta2. The batch loss is the mean of these values.
    """
    return (beta2 * (logp - ref_logp) - (reward - v_star)) ** 2
