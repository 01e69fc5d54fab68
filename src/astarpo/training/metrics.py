"""A Stage 2 step's learning figures (reward, KL, advantage, the sampler/trainer gap) from every process's samples."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..generation import Rollout
from .objectives import Batch, seq_sum


@dataclass
class UpdateStats:
    """What one step's updates leave for the metrics: per-prompt losses [prompts], the mean gradient norm, and with
    an entropy bonus each prompt's mean token entropy [prompts] (as the bonus saw it)."""

    losses: torch.Tensor
    grad_norm: float
    entropies: torch.Tensor | None = None


def sample_columns(roll: Rollout, data: Batch) -> dict[str, torch.Tensor]:
    """One value per sample for the step's metrics, from the rollout and the objective's inputs (``old_logp``
    complete: the sampling policy's log-probs)."""
    sampled_logp = seq_sum(data.old_logp, data.mask)
    columns = {"reward": data.reward, "response_length": torch.tensor(roll.lengths).float(),
               "truncated": torch.tensor(roll.truncated).float()}
    if data.ref_logp is not None:
        columns["log_ratio"] = sampled_logp - seq_sum(data.ref_logp, data.mask)
    if data.v_star is not None:
        columns["v_star"] = data.v_star
    if roll.sampler_logp:  # the engine's log-probs (vLLM) against the training model's, per sequence
        columns["sampler_logp_diff"] = (torch.tensor([sum(x) for x in roll.sampler_logp]) - sampled_logp).abs()
    return columns


def step_metrics(per_sample: dict[str, torch.Tensor], losses: torch.Tensor) -> dict[str, float]:
    """A step's learning figures from every process's valid samples (``per_sample``: one value per sample) and
    per-prompt ``losses``: per-sample means, not a mean of per-process means. ``kl`` is the mean log-ratio of the
    sampling policy to the reference over its own samples; ``advantage`` is r - V*."""
    mean = {k: float(v.mean()) for k, v in per_sample.items()}
    metrics = {"reward": mean["reward"]}
    if "v_star" in mean:
        metrics.update(v_star=mean["v_star"], advantage=mean["reward"] - mean["v_star"])
    metrics["loss"] = float(losses.mean())
    if "log_ratio" in mean:
        metrics.update(log_ratio=mean["log_ratio"], kl=mean["log_ratio"])
    if "sampler_logp_diff" in mean:
        metrics.update(sampler_logp_diff=mean["sampler_logp_diff"],
                       sampler_logp_diff_max=float(per_sample["sampler_logp_diff"].max()))
    return {**metrics, "response_length": mean["response_length"], "truncated": mean["truncated"]}
