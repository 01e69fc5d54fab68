"""Stage 2 objectives: A*-PO and the baselines it is measured against, each next to its formula.

The trainer's loop is the same for all of them: sample ``group_size`` responses per prompt from the current
policy, score them, compute what the objective asks for without gradients (reference log-probs, log-probs under
the sampling policy, critic values), call :meth:`Objective.prepare` once per step (advantages), then for every
micro-batch call :meth:`Objective.loss`, which returns one loss per prompt; the batch loss is their mean.
Adding an objective means writing one class here and listing it in ``OBJECTIVES``; the loop does not change.

Notation: per-token tensors are [B, T] with ``mask`` 1 on response tokens (EOS included); rows are samples,
``group_size`` consecutive rows per prompt. ``old_logp`` is log pi_old, the policy that drew the samples.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

Tensor = torch.Tensor
_EPS = 1e-4  # keeps group-normalised advantages finite when every sample of a group got the same reward


def seq_sum(x: Tensor, mask: Tensor) -> Tensor:
    return (x * mask).sum(-1)


def seq_mean(x: Tensor, mask: Tensor) -> Tensor:
    return (x * mask).sum(-1) / mask.sum(-1).clamp(min=1)


# ----- the losses, as pure functions -------------------------------------------------------------------------
def astarpo_loss(logp: Tensor, ref_logp: Tensor, reward: Tensor, v_star: Tensor, beta2: float) -> Tensor:
    """A*-PO: least-squares regression of the scaled log-ratio onto the optimal advantage.

        loss(x, y) = ( beta2 * [log pi(y|x) - log pi_ref(y|x)]  -  (r(x, y) - V*(x)) )^2

    ``logp`` and ``ref_logp`` are sums over the response tokens (EOS included). At the optimum,
    pi(y|x) = pi_ref(y|x) * exp((r - V*) / beta2), which is the KL-regularized optimal policy when V* is exact
    and beta1 = beta2. The batch loss is the mean of these values.
    """
    return (beta2 * (logp - ref_logp) - (reward - v_star)) ** 2


def clipped_pg(ratio: Tensor, advantage: Tensor, clip_eps: float) -> Tensor:
    """PPO's clipped surrogate, as a loss: -min(rho * A, clip(rho, 1 - eps, 1 + eps) * A)."""
    return -torch.min(ratio * advantage, ratio.clamp(1 - clip_eps, 1 + clip_eps) * advantage)


def k3_kl(logp: Tensor, ref_logp: Tensor) -> Tensor:
    """Per-token KL(pi || pi_ref) estimate exp(q) - q - 1 with q = log pi_ref - log pi: unbiased, never negative."""
    q = ref_logp - logp
    return torch.exp(q) - q - 1


def truncated_is_weight(log_ratio: Tensor, cap: float) -> Tensor:
    """Truncated importance sampling (TIS, as TRL and verl call it): exp(log pi_old - log pi_sampler) capped at
    ``cap``, without gradient. An engine in another dtype than the policy samples from a slightly different
    distribution than the pi_old a ratio-based loss assumes; the weight corrects for it, the cap bounds its
    variance."""
    return torch.exp(log_ratio.detach()).clamp(max=cap)


def grpo_advantages(reward: Tensor, group_size: int) -> Tensor:
    """GRPO: A_i = (r_i - mean(r_group)) / (std(r_group) + eps), per group of ``group_size`` samples."""
    r = reward.view(-1, group_size)
    return ((r - r.mean(-1, keepdim=True)) / (r.std(-1, keepdim=True) + _EPS)).flatten()


def grpo_loss(logp: Tensor, old_logp: Tensor, ref_logp: Tensor, mask: Tensor, advantage: Tensor, clip_eps: float,
              beta: float, weight: Tensor | float = 1.0) -> Tensor:
    """GRPO (DeepSeekMath): per sequence, (1/|y|) sum_t [ w_t * clipped_pg(rho_t, A) + beta * k3_kl_t ], rho_t =
    pi/pi_old at token t, A the sequence's group-normalised advantage and w_t the TIS weight (1 without).
    Returns one value per sequence."""
    per_token = clipped_pg(torch.exp(logp - old_logp), advantage[:, None], clip_eps) * weight
    if beta:
        per_token = per_token + beta * k3_kl(logp, ref_logp)
    return seq_mean(per_token, mask)


def rloo_advantages(reward: Tensor, group_size: int) -> Tensor:
    """RLOO: A_i = r_i - mean_{j != i} r_j, the leave-one-out baseline over the group (unbiased)."""
    r = reward.view(-1, group_size)
    return (r - (r.sum(-1, keepdim=True) - r) / (group_size - 1)).flatten()


def rloo_loss(logp: Tensor, old_logp: Tensor, mask: Tensor, advantage: Tensor, clip_eps: float,
              weight: Tensor | float = 1.0) -> Tensor:
    """RLOO (Ahmadian et al. 2024): REINFORCE with the leave-one-out baseline, on the whole sequence. The
    sequence ratio rho = pi(y)/pi_old(y) is 1 on-policy (the gradient is then -A * grad log pi(y)) and is
    clipped like PPO when several updates use one batch; ``weight`` is the sequence's TIS weight (1 without)."""
    return clipped_pg(torch.exp(seq_sum(logp - old_logp, mask)), advantage, clip_eps) * weight


def rebel_loss(logp: Tensor, old_logp: Tensor, reward: Tensor, eta: float) -> Tensor:
    """REBEL (Gao et al. 2024): for two responses y, y' to one prompt, regress the difference of their
    log-ratios to the sampling policy onto eta times the difference of their rewards:

        ( [log pi(y) - log pi_old(y)] - [log pi(y') - log pi_old(y')]  -  eta * (r(y) - r(y')) )^2

    (the form of the authors' code, src/*/rebel.py in ZhaolinGao/REBEL). Inputs are [P, 2] (summed log-probs,
    rewards); returns [P]."""
    ratio = logp - old_logp
    return ((ratio[:, 0] - ratio[:, 1]) - eta * (reward[:, 0] - reward[:, 1])) ** 2


def gae(token_reward: Tensor, values: Tensor, mask: Tensor, lam: float, gamma: float = 1.0) -> tuple[Tensor, Tensor]:
    """Generalised advantage estimation along each response (right-padded rows); returns (advantages, returns).

        delta_t = r_t + gamma * V_{t+1} - V_t,     A_t = delta_t + gamma * lam * A_{t+1},     V_T = 0
    """
    T = token_reward.shape[1]
    values = values * mask
    adv = torch.zeros_like(token_reward)
    last = torch.zeros(token_reward.shape[0], dtype=token_reward.dtype)
    for t in reversed(range(T)):
        next_value = values[:, t + 1] if t + 1 < T else torch.zeros_like(last)
        delta = token_reward[:, t] + gamma * next_value - values[:, t]
        last = (delta + gamma * lam * last) * mask[:, t]
        adv[:, t] = last
    return adv, adv + values


def ppo_loss(logp: Tensor, old_logp: Tensor, mask: Tensor, advantage: Tensor, values: Tensor, old_values: Tensor,
             returns: Tensor, clip_eps: float, value_coef: float, weight: Tensor | float = 1.0) -> Tensor:
    """PPO (Schulman et al. 2017) as used for RLHF: per-token clipped surrogate with GAE advantages (each token's
    term times its TIS weight, 1 without), plus a clipped value loss for the critic, each averaged over the
    response tokens. Returns one value per sequence."""
    policy = seq_mean(clipped_pg(torch.exp(logp - old_logp), advantage, clip_eps) * weight, mask)
    clipped_values = old_values + (values - old_values).clamp(-clip_eps, clip_eps)
    value = seq_mean(torch.max((values - returns) ** 2, (clipped_values - returns) ** 2), mask)
    return policy + value_coef * 0.5 * value


def entropy_bonus(entropy: Tensor, mask: Tensor, group_size: int) -> Tensor:
    """Per prompt, the mean entropy per response token of its ``group_size`` responses: [B, T] -> [B / group_size].

    The trainer subtracts ``entropy_coef`` times it from every method's per-prompt loss, as the official A*-PO
    code (verl's actor) subtracts its coefficient times the token-mean entropy: a positive coefficient pushes
    towards flatter next-token distributions.
    """
    per_prompt = (entropy * mask).reshape(-1, group_size * mask.shape[-1]).sum(-1)
    return per_prompt / mask.reshape(-1, group_size * mask.shape[-1]).sum(-1).clamp(min=1)


# ----- what the loop hands an objective ------------------------------------------------------------------------
@dataclass
class Batch:
    """Tensors for a set of rows: one step's samples in :meth:`Objective.prepare`, a micro-batch in :meth:`loss`.

    Per-token fields are [B, T] and zero outside ``mask``; ``logp`` carries gradients in :meth:`loss` only.
    Fields an objective does not ask for (:attr:`Objective.inputs`) are None.
    """

    mask: Tensor
    reward: Tensor  # [B]
    logp: Tensor | None = None  # current policy
    old_logp: Tensor | None = None  # the policy that sampled
    ref_logp: Tensor | None = None  # reference policy
    v_star: Tensor | None = None  # [B], from Stage 1
    values: Tensor | None = None  # critic, with gradients in loss() (trains_critic)
    old_values: Tensor | None = None  # critic at sampling time
    advantage: Tensor | None = None  # [B] or [B, T], set by prepare()
    returns: Tensor | None = None  # [B, T], set by prepare() (PPO)
    sampler_logp: Tensor | None = None  # the engine's own log-probs of its samples, for TIS (tis_cap set)

    def rows(self, rows: list[int], width: int, **fields: Tensor | None) -> Batch:
        """A micro-batch: these rows, per-token fields cut to ``width`` tokens, plus ``fields`` (e.g. ``logp``)."""
        def take(x: Tensor | None) -> Tensor | None:
            if x is None:
                return None
            return x[rows, :width] if x.dim() == 2 else x[rows]

        return Batch(**{f.name: take(getattr(self, f.name)) for f in dataclasses.fields(self)} | fields)


class Objective:
    """One Stage 2 algorithm. Subclasses set the class attributes and write ``loss`` (and ``prepare``).

    An objective declares what it reads and the loop computes exactly that, once per step and without gradients:
    ``inputs`` names the :class:`Batch` fields among ``v_star`` (from Stage 1), ``ref_logp`` (reference policy),
    ``old_logp`` (the sampling policy, read by ``prepare``), ``old_values`` (the critic) and ``sampler_logp`` (the
    engine's own log-probs, with TIS). ``loss`` always gets
    ``old_logp``: for the first mini-batch of a step the sampling policy is the current one, so the loop hands
    the detached log-probs of the forward pass; for later mini-batches (after an update) it computes them before
    the first update, unless ``inputs`` asked for all of them anyway.
    """

    name = ""
    group_size = 1  # responses sampled per prompt
    coefficient = ""  # the TrainConfig field that holds this method's own coefficient, handed in as ``beta``
    default = 0.0  # its default, from the implementation the class docstring cites
    inputs: frozenset[str] = frozenset()
    trains_critic = False  # a value model trains next to the policy
    kl_inputs: frozenset[str] = frozenset()  # added to ``inputs`` when beta > 0 (a KL term against pi_ref)
    # The method-specific TrainConfig fields this method reads (its coefficient included); setting one that it
    # does not read is refused by the config, since it would be silently ignored.
    settings: frozenset[str] = frozenset()

    def __init__(self, beta: float, clip_eps: float = 0.2, group_size: int | None = None, gae_lambda: float = 0.95,
                 all_sum: Callable[[Tensor], Tensor] = lambda t: t, tis_cap: float | None = None) -> None:
        # all_sum: a sum over the data-parallel processes, for statistics of the whole batch (the trainer passes
        # accelerate's reduce); the identity in one process. tis_cap: truncated importance sampling (None: off).
        self.beta, self.clip_eps, self.gae_lambda, self.all_sum = beta, clip_eps, gae_lambda, all_sum
        self.tis_cap = tis_cap
        if group_size is not None:  # the config allows it only where the method has a free group size
            self.group_size = group_size
        self.inputs = self.inputs | (self.kl_inputs if beta > 0 else frozenset())
        if tis_cap is not None:
            self.inputs = self.inputs | {"sampler_logp"}

    @classmethod
    def from_config(cls, cfg: Any, all_sum: Callable[[Tensor], Tensor] = lambda t: t) -> Objective:
        """This method built from a TrainConfig's settings: its own coefficient (``cfg.coefficient``: the field
        ``cls.coefficient`` names), and the clip range, group size, GAE lambda and TIS cap where the method reads
        them (the config refuses the others, see ``settings``), so that the trainer passes no method's knobs."""
        return cls(cfg.coefficient, clip_eps=cfg.clip_eps, group_size=cfg.group_size, gae_lambda=cfg.gae_lambda,
                   all_sum=all_sum, tis_cap=cfg.tis_cap)

    def tis(self, b: Batch, per_token: bool = True) -> Tensor | float:
        """The TIS weight of each token (or, ``per_token`` False, of each sequence); 1 without TIS."""
        if self.tis_cap is None:
            return 1.0
        log_ratio = (b.old_logp - b.sampler_logp) * b.mask
        return truncated_is_weight(log_ratio if per_token else log_ratio.sum(-1), self.tis_cap)

    def prepare(self, b: Batch) -> None:
        """Once per step, before any update, on all of this process's samples: fill in ``b.advantage``."""

    def loss(self, b: Batch) -> Tensor:
        """One loss per prompt in the micro-batch (whole groups), shape [B // group_size]."""
        raise NotImplementedError


class AStarPO(Objective):
    """A*-PO: one sample per prompt, V* from Stage 1, no critic, no clipping, no group. beta2 = 1e-3 is the
    paper's (arXiv 2505.20686, and its verl-based code)."""

    name, inputs, coefficient, default = "astarpo", frozenset({"v_star", "ref_logp"}), "beta2", 1e-3
    settings = frozenset({"beta2", "values", "beta1", "n", "filter_unsolved"})

    def loss(self, b: Batch) -> Tensor:
        return astarpo_loss(seq_sum(b.logp, b.mask), seq_sum(b.ref_logp, b.mask), b.reward, b.v_star, self.beta)


class GRPO(Objective):
    """GRPO with DeepSeekMath's k3 KL term weighted by ``beta`` (kl_coef). Its default, 0 (no KL term and no
    reference model), is TRL's (GRPOConfig.beta, trl 1.16; DeepSeekMath used 0.04)."""

    name, group_size, kl_inputs = "grpo", 8, frozenset({"ref_logp"})
    coefficient, default, settings = "kl_coef", 0.0, frozenset({"kl_coef", "group_size", "clip_eps", "tis_cap"})

    def prepare(self, b: Batch) -> None:
        b.advantage = grpo_advantages(b.reward, self.group_size)

    def loss(self, b: Batch) -> Tensor:
        per_seq = grpo_loss(b.logp, b.old_logp, b.ref_logp, b.mask, b.advantage, self.clip_eps, self.beta, self.tis(b))
        return per_seq.view(-1, self.group_size).mean(-1)


class RLOO(Objective):
    """RLOO with the sequence-level KL penalty in the reward, r - beta * log(pi_old / pi_ref); beta (kl_coef)
    defaults to TRL's 0.05 (RLOOConfig.beta, trl 1.16)."""

    name, group_size, kl_inputs = "rloo", 4, frozenset({"ref_logp", "old_logp"})
    coefficient, default, settings = "kl_coef", 0.05, frozenset({"kl_coef", "group_size", "clip_eps", "tis_cap"})

    def prepare(self, b: Batch) -> None:
        reward = b.reward
        if self.beta:
            reward = reward - self.beta * seq_sum(b.old_logp - b.ref_logp, b.mask)
        b.advantage = rloo_advantages(reward, self.group_size)

    def loss(self, b: Batch) -> Tensor:
        per_seq = rloo_loss(b.logp, b.old_logp, b.mask, b.advantage, self.clip_eps, self.tis(b, per_token=False))
        return per_seq.view(-1, self.group_size).mean(-1)


class REBEL(Objective):
    """REBEL on pairs of responses; ``beta`` is its eta (rebel_eta), 1.0 by default as in the authors' code
    (REBELHParams.eta in ZhaolinGao/REBEL). No KL term: the regression onto the previous policy is REBEL's
    own trust region."""

    name, group_size, coefficient, default = "rebel", 2, "rebel_eta", 1.0
    settings = frozenset({"rebel_eta"})

    def loss(self, b: Batch) -> Tensor:
        pair = lambda x: x.view(-1, 2)  # noqa: E731
        return rebel_loss(pair(seq_sum(b.logp, b.mask)), pair(seq_sum(b.old_logp, b.mask)), pair(b.reward),
                          self.beta)


class PPO(Objective):
    """PPO with a learned critic, GAE (gamma 1) and the per-token KL penalty -beta * log(pi_old/pi_ref) in the
    reward, the task reward landing on the last response token. Advantages are whitened over the batch.
    beta (kl_coef) defaults to OpenRLHF's init_kl_coef, 0.01; the critic has its own optimizer, learning rate
    (critic_learning_rate, OpenRLHF's 9e-6) and gradient clipping, as in OpenRLHF and verl."""

    name, trains_critic, coefficient, default = "ppo", True, "kl_coef", 0.01
    inputs, kl_inputs = frozenset({"old_values"}), frozenset({"ref_logp", "old_logp"})
    settings = frozenset({"kl_coef", "clip_eps", "gae_lambda", "critic_learning_rate", "critic_max_grad_norm",
                          "tis_cap"})
    value_coef = 0.1  # weight of the value loss next to the policy loss (TRL's PPO default)

    def prepare(self, b: Batch) -> None:
        token_reward = torch.zeros_like(b.mask)
        if self.beta:
            token_reward = -self.beta * (b.old_logp - b.ref_logp) * b.mask
        last = (b.mask.sum(-1).long() - 1).clamp(min=0)
        token_reward[torch.arange(len(last)), last] += b.reward
        adv, b.returns = gae(token_reward, b.old_values, b.mask, self.gae_lambda)
        # Whitened over the response tokens of the whole batch, all processes together (unbiased std, as
        # torch.std), so that N processes make the same update as one.
        a = adv[b.mask.bool()]
        total, squares, n = self.all_sum(torch.stack([a.sum(), (a * a).sum(), torch.tensor(float(a.numel()))]))
        mean = total / n
        std = ((squares - n * mean * mean) / (n - 1)).clamp(min=0).sqrt() if n > 1 else torch.tensor(1.0)
        b.advantage = (adv - mean) / (std + 1e-8) * b.mask

    def loss(self, b: Batch) -> Tensor:
        return ppo_loss(b.logp, b.old_logp, b.mask, b.advantage, b.values, b.old_values, b.returns, self.clip_eps,
                        self.value_coef, self.tis(b))


OBJECTIVES: dict[str, type[Objective]] = {o.name: o for o in (AStarPO, GRPO, RLOO, REBEL, PPO)}
