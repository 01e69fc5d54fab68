"""Sampling, scoring and response log-probabilities: the one path from prompts to scored responses.

Stage 1, Stage 2 (every objective) and evaluation all call :func:`collect`: a :class:`Sampler` draws the
responses, the reward function scores them. A sampler is the seam for generation engines: :class:`HFSampler`
runs Hugging Face ``generate`` on a model in this process; another engine implements the same two methods.
Log-probs for losses always come from the training model, through :func:`response_logprobs`, so the masks are
defined once.

A response is the generated tokens up to and including the first EOS; anything generate() wrote after it
(padding) is not part of it. A response that hit ``max_new_tokens`` without EOS is kept as truncated.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch

from . import rewards


@dataclass
class Rollout:
    """Sampled responses, one row per (prompt, sample)."""

    prompt_index: list[int]  # which prompt (position in the caller's list) each row answers
    prompt_tokens: list[list[int]]
    response_tokens: list[list[int]]  # up to and including the first EOS
    completions: list[str]  # decoded responses, special tokens removed
    truncated: list[bool] = field(default_factory=list)  # hit max_new_tokens before EOS
    rewards: list[float] = field(default_factory=list)  # set by collect(); NaN where on_reward_error skipped
    # per-token log-probs of the response tokens as the engine computed them (vLLM); empty when it gives none
    sampler_logp: list[list[float]] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.prompt_index)

    def select(self, rows: list[int]) -> Rollout:
        return Rollout([self.prompt_index[i] for i in rows], [self.prompt_tokens[i] for i in rows],
                       [self.response_tokens[i] for i in rows], [self.completions[i] for i in rows],
                       [self.truncated[i] for i in rows], [self.rewards[i] for i in rows] if self.rewards else [],
                       [self.sampler_logp[i] for i in rows] if self.sampler_logp else [])

    @property
    def lengths(self) -> list[int]:
        return [len(r) for r in self.response_tokens]


@dataclass(frozen=True)
class SamplingParams:
    """How responses are drawn. Temperature 0 is greedy decoding (then one response per prompt)."""

    temperature: float = 1.0
    top_p: float = 1.0
    max_new_tokens: int = 256


class Sampler(Protocol):
    """A generation engine. Stage 2 calls ``load_weights`` after every optimizer step, so that the next samples
    come from the updated policy."""

    def generate(self, prompt_tokens: list[list[int]], n: int, params: SamplingParams,
                 progress: Callable[[int], None] | None = None) -> Rollout:
        """``n`` responses per prompt, ``n`` consecutive rows per prompt, in prompt order."""
        ...

    def load_weights(self, model: Any) -> None:
        """Take the weights of ``model`` (the policy being trained)."""
        ...


class HFSampler:
    """Hugging Face ``generate`` on a model in this process, each prompt prefilled once for its ``n`` samples.

    In Stage 2 it holds the policy itself, so the weights it samples with are always the current ones and
    ``load_weights`` has nothing to copy.
    """

    def __init__(self, model: Any, tokenizer: Any, eos: list[int], batch_size: int = 64) -> None:
        self.model, self.tokenizer, self.eos, self.batch_size = model, tokenizer, eos, batch_size

    def generate(self, prompt_tokens: list[list[int]], n: int, params: SamplingParams,
                 progress: Callable[[int], None] | None = None) -> Rollout:
        return sample(self.model, self.tokenizer, prompt_tokens, n, params.temperature, params.top_p,
                      params.max_new_tokens, self.eos, self.batch_size, progress)

    def load_weights(self, model: Any) -> None:
        if model is not self.model:
            raise ValueError("HFSampler samples from the model it was built with; build it with the policy")


def collect(sampler: Sampler, records: list[dict[str, Any]], prompt_tokens: list[list[int]], n: int,
            params: SamplingParams, reward_fn: rewards.RewardFn, on_reward_error: str = "raise",
            progress: Callable[[int], None] | None = None) -> Rollout:
    """Sample ``n`` responses per prompt and score each with ``reward_fn`` (TRL's signature; the records' other
    columns are passed through). ``records[i]`` belongs to ``prompt_tokens[i]``."""
    roll = sampler.generate(prompt_tokens, n, params, progress)
    roll.rewards = rewards.score_records(reward_fn, [records[i] for i in roll.prompt_index], roll.completions,
                                         on_reward_error)
    return roll


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


def response_logprobs(model: Any, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Per-token log pi(y_t | x, y_<t) at temperature 1, zero outside the response mask; shape [B, R].

    Only the last R+1 positions' logits are materialised (``logits_to_keep``): with a 49k vocabulary the
    prompt positions would otherwise dominate memory.
    """
    R = batch["response_mask"].shape[1]
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                   position_ids=batch["position_ids"], logits_to_keep=R + 1, use_cache=False).logits
    logits = logits[:, :-1].float()
    targets = batch["input_ids"][:, -R:]
    token_logp = logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1) - torch.logsumexp(logits, dim=-1)
    return token_logp * batch["response_mask"]


def _trim(tokens: list[int], eos: set[int]) -> tuple[list[int], bool]:
    for i, t in enumerate(tokens):
        if t in eos:
            return tokens[: i + 1], False
    return tokens, True


def _generate_shared_prefill(model: Any, input_ids: torch.Tensor, attention_mask: torch.Tensor, n: int,
                             gen_config: Any) -> torch.Tensor:
    """generate() with ``num_return_sequences=n``, but each prompt is prefilled once, not ``n`` times.

    The first P-1 prompt tokens go through the model once; their KV cache is repeated ``n`` times along the
    batch and handed to generate() with the full, repeated prompt, so generate() only runs the last prompt
    token and then decodes as usual. Positions come from the attention mask in both calls (left padding), so
    the next-token distributions are those of the plain path. Returns [B * n, P + new] like generate().
    """
    from transformers import DynamicCache

    position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
    cache = DynamicCache(config=model.config)
    model(input_ids=input_ids[:, :-1], attention_mask=attention_mask[:, :-1], position_ids=position_ids[:, :-1],
          past_key_values=cache, use_cache=True, logits_to_keep=1)
    cache.batch_repeat_interleave(n)
    gen_config = copy.copy(gen_config)
    gen_config.num_return_sequences = 1
    return model.generate(input_ids=input_ids.repeat_interleave(n, dim=0),
                          attention_mask=attention_mask.repeat_interleave(n, dim=0), past_key_values=cache,
                          generation_config=gen_config)


@torch.no_grad()
def sample(
    model: Any,
    tokenizer: Any,
    prompt_tokens: list[list[int]],
    n: int,
    temperature: float,
    top_p: float,
    max_new_tokens: int,
    eos: list[int],
    batch_size: int = 64,
    progress: Callable[[int], None] | None = None,
    shared_prefill: bool = True,
) -> Rollout:
    """``n`` responses for each prompt (``temperature == 0`` means greedy, then ``n`` must be 1).

    ``batch_size`` counts sequences per generate() call. Prompts are grouped by length so that little of a
    batch is padding. ``progress`` is called with the number of sequences finished after each call.
    ``shared_prefill`` runs each prompt through the model once for its ``n`` samples (see
    :func:`_generate_shared_prefill`); ``False`` is plain ``generate(num_return_sequences=n)``.
    """
    from transformers import GenerationConfig

    if temperature == 0 and n != 1:
        raise ValueError("greedy decoding (temperature 0) gives one response per prompt; use n=1")
    device = next(model.parameters()).device
    pad_id = tokenizer.pad_token_id
    gen_config = GenerationConfig(
        do_sample=temperature > 0, temperature=temperature if temperature > 0 else None,
        top_p=top_p if temperature > 0 else None, top_k=0 if temperature > 0 else None,
        max_new_tokens=max_new_tokens, num_return_sequences=n, eos_token_id=eos, pad_token_id=pad_id)
    per_call = max(1, batch_size // n)
    order = sorted(range(len(prompt_tokens)), key=lambda i: len(prompt_tokens[i]))
    rows: dict[int, list[tuple[list[int], bool]]] = {}
    was_training = model.training
    model.eval()
    eos_set = set(eos)
    for start in range(0, len(order), per_call):
        idx = order[start : start + per_call]
        P = max(len(prompt_tokens[i]) for i in idx)
        input_ids = torch.full((len(idx), P), pad_id, dtype=torch.long)
        attention_mask = torch.zeros((len(idx), P), dtype=torch.long)
        for j, i in enumerate(idx):
            input_ids[j, P - len(prompt_tokens[i]) :] = torch.tensor(prompt_tokens[i])
            attention_mask[j, P - len(prompt_tokens[i]) :] = 1
        input_ids, attention_mask = input_ids.to(device), attention_mask.to(device)
        if shared_prefill and n > 1:
            out = _generate_shared_prefill(model, input_ids, attention_mask, n, gen_config)
        else:
            out = model.generate(input_ids=input_ids, attention_mask=attention_mask, generation_config=gen_config)
        gen = out[:, P:].tolist()
        for j, i in enumerate(idx):
            rows[i] = [_trim(g, eos_set) for g in gen[j * n : (j + 1) * n]]
        if progress is not None:
            progress(len(idx) * n)
    model.train(was_training)
    index = [i for i in range(len(prompt_tokens)) for _ in range(n)]
    responses = [r for i in range(len(prompt_tokens)) for r in rows[i]]
    tokens = [r for r, _ in responses]
    return Rollout(prompt_index=index, prompt_tokens=[prompt_tokens[i] for i in index], response_tokens=tokens,
                   completions=tokenizer.batch_decode(tokens, skip_special_tokens=True),
                   truncated=[t for _, t in responses])


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
