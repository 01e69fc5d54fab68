"""Response log-probabilities from the training model: :func:`collate` turns a rollout into a padded batch,
:func:`response_logprobs` gives the per-token log pi of its responses (chunked over the vocabulary, with or without
gradients), :func:`token_logprobs` and :func:`sequence_logprobs` the same over a whole rollout without gradients.

Every loss, the reference model's log-probs and evaluation's KL estimates come from here, never from a generation
engine, so the masks and the numerics are defined once. :mod:`astarpo.generation` draws the responses.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.utils.checkpoint

from .generation import Rollout

# Config attributes of models whose logits are not just lm_head(hidden) (Gemma 2/3 soft-capping, Cohere and
# Granite scaling): for these the chunked path would be wrong, so response_logprobs computes the plain way.
_LOGIT_TRANSFORMS = ("final_logit_softcapping", "logit_scale", "logits_scaling")
# Logits per lm_head chunk of response_logprobs (256 MiB in float32): a chunk holds LOGITS_CHUNK // vocabulary
# response tokens, so its memory is the same whatever the vocabulary. astarpo.bench.plan counts chunks with it.
LOGITS_CHUNK = 2**26


def collate(rollout: Rollout, pad_id: int, device: torch.device | str = "cpu") -> dict[str, torch.Tensor]:
    """Left-padded prompts followed by right-padded responses, with the masks the loss needs."""
    P = max(len(p) for p in rollout.prompt_tokens)
    R = max(1, max(len(r) for r in rollout.response_tokens))
    B = len(rollout)
    input_ids = torch.full((B, P + R), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((B, P + R), dtype=torch.long)
    response_mask = torch.zeros((B, R), dtype=torch.float32)
    for i, (p, r) in enumerate(zip(rollout.prompt_tokens, rollout.response_tokens)):
        input_ids[i, P - len(p) : P] = torch.tensor(p)
        attention_mask[i, P - len(p) : P + len(r)] = 1
        if r:
            input_ids[i, P : P + len(r)] = torch.tensor(r)
            response_mask[i, : len(r)] = 1.0
    position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
    out = {"input_ids": input_ids, "attention_mask": attention_mask, "position_ids": position_ids,
           "response_mask": response_mask}
    return {k: v.to(device) for k, v in out.items()}


def response_logprobs(model: Any, batch: dict[str, torch.Tensor], chunk_tokens: int | None = None) -> torch.Tensor:
    """Per-token log pi(y_t | x, y_<t) at temperature 1, zero outside the response mask; shape [B, R]."""
    return _response_tokens(model, batch, chunk_tokens, entropy=False)


def response_logprobs_entropy(model: Any, batch: dict[str, torch.Tensor], chunk_tokens: int | None = None
                              ) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token log pi(y_t | x, y_<t) and the entropy of pi( . | x, y_<t), both [B, R] and zero outside the
    response mask, from the same forward pass and the same logits chunks (the entropy bonus's input)."""
    out = _response_tokens(model, batch, chunk_tokens, entropy=True)
    return out[..., 0], out[..., 1]


def _response_tokens(model: Any, batch: dict[str, torch.Tensor], chunk_tokens: int | None, entropy: bool
                     ) -> torch.Tensor:
    """Per response token, the log-prob as [B, R]; with ``entropy``, the log-prob and the entropy as [B, R, 2].

    Full float32 logits are never materialised. The model (DDP-, FSDP2-, DeepSpeed- or peft-wrapped alike) runs
    its own forward pass, in which its output embedding (the lm_head, tied or not, LoRA-wrapped or not) gets, for
    this call only, a forward that turns the hidden states of the response tokens (``logits_to_keep`` keeps the
    R+1 positions that predict them; padding is skipped) into their log-probs, ``chunk_tokens`` tokens at a
    time, each chunk upcast to float32 for log-softmax. The head is still called as a module, so FSDP2 and
    DeepSpeed gather its sharded weight around it (in backward too), and its result is the model's output. With
    gradients, each chunk is recomputed in backward (activation checkpointing), so the autograd graph holds one
    float or two per token, not a row of V logits.

    Peak memory beyond the backbone's: the plain way keeps [B, R, V] logits in the compute dtype plus a float32
    copy and the log-softmax's temporaries (for Qwen2.5, V = 151,936, micro-batch 8 x 1024 response tokens:
    about 5 GB for the float32 copy alone, and all of it saved for backward); here it is the [B, R, H] hidden
    slice (saved by the backbone anyway) and one chunk of ``chunk_tokens`` x V (default ``LOGITS_CHUNK`` logits)
    and its gradient, at a time.
    """
    head = _output_head(model)
    if head is None:
        return _plain_tokens(model, batch, entropy)
    R = batch["response_mask"].shape[1]
    mask = batch["response_mask"].bool()
    targets = batch["input_ids"][:, -R:][mask]  # response tokens only: [N]
    step = chunk_tokens or max(1, LOGITS_CHUNK // max(1, _vocab_size(model, head)))
    logits_of = head.forward  # the head's own computation, e.g. F.linear(h, W) or LoRA's
    called = []

    def token_logprobs(hidden: torch.Tensor, *_args: Any, **_kwargs: Any) -> torch.Tensor:
        called.append(True)
        h = hidden[:, :-1][mask]  # [N, H]: position t predicts response token t
        grad = torch.is_grad_enabled() and h.requires_grad
        parts = [torch.utils.checkpoint.checkpoint(_chunk_logprobs, logits_of, h[i : i + step], targets[i : i + step],
                                                   entropy, use_reentrant=False) if grad
                 else _chunk_logprobs(logits_of, h[i : i + step], targets[i : i + step], entropy)
                 for i in range(0, len(targets), step)]
        return torch.cat(parts) if parts else h.new_zeros((0, 2) if entropy else (0,), dtype=torch.float32)

    own = head.__dict__.get("forward")  # an instance-level forward set by someone else, restored below
    head.forward = token_logprobs
    try:
        out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                    position_ids=batch["position_ids"], logits_to_keep=R + 1, use_cache=False)
    finally:
        if own is None:
            del head.forward
        else:
            head.forward = own
    token_logp = out.logits
    if not called:
        raise RuntimeError(f"{type(head).__name__}, the output embedding, was not called by the model's forward")
    if token_logp.shape != (*targets.shape, *((2,) if entropy else ())):
        raise RuntimeError(f"{type(model).__name__} changes its logits after the output embedding; add its config "
                           "attribute to astarpo.logprobs._LOGIT_TRANSFORMS")
    if not entropy:
        return torch.zeros(mask.shape, dtype=torch.float32, device=mask.device).masked_scatter(mask, token_logp.float())
    out = torch.zeros((*mask.shape, 2), dtype=torch.float32, device=mask.device)
    out[mask] = token_logp.float()
    return out


def _chunk_logprobs(logits_of: Callable[[torch.Tensor], torch.Tensor], hidden: torch.Tensor,
                    targets: torch.Tensor, entropy: bool) -> torch.Tensor:
    """[n]: each target's log-prob; [n, 2] with its distribution's entropy, -sum_v p_v log p_v."""
    return _token_figures(logits_of(hidden).float(), targets, entropy)


def _token_figures(logits: torch.Tensor, targets: torch.Tensor, entropy: bool) -> torch.Tensor:
    logp = logits.gather(-1, targets[..., None]).squeeze(-1) - torch.logsumexp(logits, dim=-1)
    if not entropy:
        return logp
    p = logits.softmax(-1)
    return torch.stack([logp, -(p * logits.log_softmax(-1)).sum(-1)], -1)


def _output_head(model: Any) -> Any:
    """The module that turns hidden states into logits, or None when logits are more than that (or unknown)."""
    inner = model
    while hasattr(inner, "module"):  # DistributedDataParallel, DeepSpeedEngine
        inner = inner.module
    config = getattr(inner, "config", None)
    if not hasattr(inner, "get_output_embeddings") or any(getattr(config, a, None) not in (None, 1, 1.0)
                                                          for a in _LOGIT_TRANSFORMS):
        return None
    return inner.get_output_embeddings()


def _vocab_size(model: Any, head: Any) -> int:
    """From the layer's declared size, not its weight: under ZeRO-3 the local weight is an empty shard."""
    return getattr(head, "out_features", None) or getattr(getattr(model, "config", None), "vocab_size", None) or 2**17


def _plain_logprobs(model: Any, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """The plain way's log-probs, [B, R] (the tests' reference for the chunked path)."""
    return _plain_tokens(model, batch, entropy=False)


def _plain_tokens(model: Any, batch: dict[str, torch.Tensor], entropy: bool) -> torch.Tensor:
    """The reference computation: [B, R, V] logits from the model, upcast whole (models without a plain head)."""
    R = batch["response_mask"].shape[1]
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                   position_ids=batch["position_ids"], logits_to_keep=R + 1, use_cache=False).logits
    mask = batch["response_mask"]
    return _token_figures(logits[:, :-1].float(), batch["input_ids"][:, -R:], entropy) * (mask[..., None] if entropy
                                                                                          else mask)



@torch.no_grad()
def token_logprobs(model: Any, rollout: Rollout, pad_id: int, micro_batch_size: int = 8,
                   fn: Callable[[Any, dict[str, torch.Tensor]], torch.Tensor] = response_logprobs) -> torch.Tensor:
    """Per-token values of ``fn(model, batch)`` (default: response log-probs) without gradients, as one
    [rows, longest response] tensor on the CPU, zero past each response."""
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    out = torch.zeros(len(rollout), max(1, max(rollout.lengths, default=1)))
    for start in range(0, len(rollout), micro_batch_size):
        rows = list(range(start, min(start + micro_batch_size, len(rollout))))
        values = fn(model, collate(rollout.select(rows), pad_id, device)).float().cpu()
        out[start : start + len(rows), : values.shape[1]] = values
    model.train(was_training)
    return out


def sequence_logprobs(model: Any, rollout: Rollout, pad_id: int, micro_batch_size: int = 8) -> torch.Tensor:
    """Summed response log-probs per row, without gradients (reference scoring, KL estimates); shape [B]."""
    return token_logprobs(model, rollout, pad_id, micro_batch_size).sum(-1)
