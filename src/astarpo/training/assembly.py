"""Stage 2's models, assembled and prepared by accelerate: the policy (full or LoRA), the frozen reference, PPO's
critic, and their optimizers.

What is built follows from the objective: a reference only when it reads ``ref_logp`` (with LoRA none at all:
the reference is the policy with its adapters disabled, no second copy in memory), a critic only when it trains
one. Each piece is placed as the launch's strategy wants (``distributed.py``).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator

from ..config import TrainConfig
from ..distributed import Learner, Trained, prepare_reference
from ..logprobs import token_logprobs
from ..models import ValueModel, add_lora, eos_ids, load_model
from .objectives import Objective


@dataclass
class TrainingModels:
    """Prepared models; ``ref`` is None with LoRA or without a KL term, ``critic`` None unless PPO."""

    policy: Any
    optimizer: Any
    ref: Any
    critic: Any
    critic_optimizer: Any
    learner: Learner
    eos: list[int]


def build_training_models(cfg: TrainConfig, acc: Accelerator, model_dir: Path, objective: Objective,
                          tokenizer: Any) -> TrainingModels:
    """Load, wrap and prepare every model ``objective`` needs, each with its own AdamW and clipping."""
    policy = load_model(model_dir, cfg.dtype, cfg.trust_remote_code)
    eos = eos_ids(policy, tokenizer)
    if cfg.gradient_checkpointing:  # renamed to activation checkpointing in transformers 5.x
        if hasattr(policy, "activation_checkpointing_enable"):
            policy.activation_checkpointing_enable({"use_reentrant": False})
        else:
            policy.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    ref = None
    if cfg.lora_rank:
        policy = add_lora(policy, cfg.lora_rank, cfg.lora_alpha, cfg.lora_target_modules)
    elif "ref_logp" in objective.inputs:
        ref = prepare_reference(acc, load_model(model_dir, cfg.dtype, cfg.trust_remote_code).requires_grad_(False)
                                .eval())
    optimizer = torch.optim.AdamW([p for p in policy.parameters() if p.requires_grad], lr=cfg.learning_rate,
                                  weight_decay=cfg.weight_decay)
    policy, optimizer = acc.prepare(policy, optimizer)
    trained = [Trained(policy, optimizer, cfg.max_grad_norm)]
    critic = critic_optimizer = None
    if objective.trains_critic:  # its own optimizer, learning rate and clipping; prepared alone (FSDP2: one per call)
        critic = ValueModel(model_dir, cfg.dtype, cfg.trust_remote_code)
        if cfg.gradient_checkpointing:
            critic.backbone.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        critic_optimizer = torch.optim.AdamW(critic.parameters(), lr=cfg.critic_learning_rate,
                                             weight_decay=cfg.weight_decay)
        critic, critic_optimizer = acc.prepare(critic, critic_optimizer)
        trained.append(Trained(critic, critic_optimizer, cfg.critic_max_grad_norm))
    return TrainingModels(policy, optimizer, ref, critic, critic_optimizer, Learner(acc, trained), eos)


def reference_logprobs(acc: Accelerator, models: TrainingModels, rollout: Any, pad_id: int,
                       micro_batch_size: int) -> torch.Tensor:
    """Per-token log pi_ref [rows, longest response]: the frozen copy, or the policy with adapters disabled."""
    if models.ref is not None:
        return token_logprobs(models.ref, rollout, pad_id, micro_batch_size)
    policy = acc.unwrap_model(models.policy)
    with policy.disable_adapter():
        return token_logprobs(policy, rollout, pad_id, micro_batch_size)
