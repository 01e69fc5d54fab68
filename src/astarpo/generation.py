"""Sampling and scoring: the one path from prompts to scored responses.

Stage 1, Stage 2 (every objective) and evaluation all call :func:`collect`: a :class:`Sampler` draws the
responses, the reward function scores them. A sampler is the seam for generation engines: :class:`HFSampler`
runs Hugging Face ``generate`` on a model in this process; another engine implements the same two methods.
:func:`sample` is HF generation itself, with every setting that decides the drawn tokens explicit
(:func:`sampling_settings`). Log-probs for losses always come from the training model, through
:mod:`astarpo.logprobs`, so the masks are defined once.

A response is the generated tokens up to and including the first EOS; anything generate() wrote after it
(padding) is not part of it. A response that hit ``max_new_tokens`` without EOS is kept as truncated.
"""

from __future__ import annotations

import copy
import functools
import inspect
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
    policy_version: int | None = None  # the policy version that drew them, where the engine counts them (a server)

    def __len__(self) -> int:
        return len(self.prompt_index)

    def select(self, rows: list[int]) -> Rollout:
        return Rollout([self.prompt_index[i] for i in rows], [self.prompt_tokens[i] for i in rows],
                       [self.response_tokens[i] for i in rows], [self.completions[i] for i in rows],
                       [self.truncated[i] for i in rows], [self.rewards[i] for i in rows] if self.rewards else [],
                       [self.sampler_logp[i] for i in rows] if self.sampler_logp else [], self.policy_version)

    @property
    def lengths(self) -> list[int]:
        return [len(r) for r in self.response_tokens]

    def sampler_logp_tokens(self, width: int) -> torch.Tensor:
        """The engine's per-token log-probs as [rows, width], zero past each response."""
        out = torch.zeros(len(self), width)
        for i, lp in enumerate(self.sampler_logp):
            out[i, : len(lp)] = torch.tensor(lp)
        return out


@dataclass(frozen=True)
class SamplingParams:
    """How responses are drawn. Temperature 0 is greedy decoding (then one response per prompt)."""

    temperature: float = 1.0
    top_p: float = 1.0
    max_new_tokens: int = 256


class Sampler(Protocol):
    """A generation engine. Stage 2 pushes the policy into one that owns its weights after every optimizer step, so
    that the next samples come from the updated policy.

    What the commands ask an engine, so that none of them tests the engine's name:

    - ``uses_policy``: it samples with a Hugging Face model this process holds (Stage 2's policy, Stage 1's
      reference), so that model must be loaded here, and in training it runs under the policy's autocast and,
      under FSDP2 or ZeRO-3, with its weights gathered; otherwise it must run as it is (its kernels under another
      autocast would compute in the wrong dtype), and is sized beside the models.
    - ``owns_weights``: it holds a copy of the weights of its own, which ``load_weights`` replaces with the
      policy's (after each update, and on resume).
    - ``starts_together``: under a launch its start is a collective, so every process starts one or none.
    - ``processes_per_engine(cfg)``: how many processes of a launch run one engine (:mod:`astarpo.launch`).
    - ``weights_dtype(cfg)``: the dtype it samples in, which a values file records, and ``provenance``: what else
      a values file records about it (what decides its random stream beyond the engine's name).
    - ``can_sleep`` (a built engine): ``sleep`` frees its memory until the next ``load_weights``.
    """

    uses_policy: bool
    owns_weights: bool
    starts_together: bool
    can_sleep: bool
    provenance: dict[str, Any]

    @staticmethod
    def processes_per_engine(cfg: Any) -> int: ...

    @staticmethod
    def weights_dtype(cfg: Any) -> str: ...

    def generate(self, prompt_tokens: list[list[int]], n: int, params: SamplingParams,
                 progress: Callable[[int], None] | None = None) -> Rollout:
        """``n`` responses per prompt, ``n`` consecutive rows per prompt, in prompt order."""
        ...

    def load_weights(self, model: Any, version: int | None = None) -> None:
        """Take the weights of ``model`` (the policy being trained, ``version`` updates old): engines that
        ``owns_weights``."""
        ...

    def sleep(self) -> None:
        """Free the engine's memory until the next ``load_weights`` (Stage 2 calls it before each update): engines
        that ``can_sleep``."""
        ...


class HFSampler:
    """Hugging Face ``generate`` on a model in this process, each prompt prefilled once for its ``n`` samples.

    In Stage 2 it holds the policy itself, so the weights it samples with are always the current ones: there is
    nothing to push, and nothing to free while the policy trains.
    """

    uses_policy = True
    owns_weights = False
    starts_together = False
    can_sleep = False
    provenance: dict[str, Any] = {}

    @staticmethod
    def processes_per_engine(cfg: Any) -> int:
        return 1

    @staticmethod
    def weights_dtype(cfg: Any) -> str:
        return cfg.dtype

    def __init__(self, model: Any, tokenizer: Any, eos: list[int], batch_size: int = 64) -> None:
        self.model, self.tokenizer, self.eos, self.batch_size = model, tokenizer, eos, batch_size

    def generate(self, prompt_tokens: list[list[int]], n: int, params: SamplingParams,
                 progress: Callable[[int], None] | None = None) -> Rollout:
        return sample(self.model, self.tokenizer, prompt_tokens, n, params.temperature, params.top_p,
                      params.max_new_tokens, self.eos, self.batch_size, progress)


def collect(sampler: Sampler, records: list[dict[str, Any]], prompt_tokens: list[list[int]], n: int,
            params: SamplingParams, reward_fn: rewards.RewardFn, on_reward_error: str = "raise",
            progress: Callable[[int], None] | None = None, keep: list[int] | None = None) -> Rollout:
    """Sample ``n`` responses per prompt and score each with ``reward_fn`` (TRL's signature; the records' other
    columns are passed through). ``records[i]`` belongs to ``prompt_tokens[i]``.

    ``keep``: the prompts (positions) whose responses are returned and scored, the Rollout's ``prompt_index`` then
    counting positions in ``keep``; an engine run by several processes samples every process's prompts in each."""
    roll = sampler.generate(prompt_tokens, n, params, progress)
    if keep is not None:
        position = {p: i for i, p in enumerate(keep)}
        roll = roll.select([row for row, p in enumerate(roll.prompt_index) if p in position])
        roll.prompt_index = [position[p] for p in roll.prompt_index]
        records = [records[p] for p in keep]
    roll.rewards = rewards.score_records(reward_fn, [records[i] for i in roll.prompt_index], roll.completions,
                                         on_reward_error)
    return roll


# Every GenerationConfig field that changes which tokens generate() draws, at the value that leaves the model's
# next-token distribution alone. transformers 5 fills each field a passed config leaves as None (only None counts as
# unset) from the model's own generation_config.json: GenerationMixin._prepare_generation_config calls
# generation_config.update(**self.generation_config.to_dict(), defaults_only=True). Qwen2.5 ships
# repetition_penalty 1.05-1.1, other models top_k, min_p, typical_p or no_repeat_ngram_size; any of them would make
# the samples come from something other than pi, the distribution whose log-probs A*-PO regresses.
_NEUTRAL = {"num_beams": 1, "repetition_penalty": 1.0, "encoder_repetition_penalty": 1.0, "no_repeat_ngram_size": 0,
            "encoder_no_repeat_ngram_size": 0, "min_new_tokens": 0, "length_penalty": 1.0,
            "guidance_scale": 1.0, "remove_invalid_values": False, "renormalize_logits": False}
_NEUTRAL_SAMPLING = {"top_k": 0, "min_p": 0.0, "typical_p": 1.0, "epsilon_cutoff": 0.0, "eta_cutoff": 0.0}
_SAMPLING_ONLY = ("temperature", "top_p", "top_k", "min_p", "top_h", "typical_p", "epsilon_cutoff", "eta_cutoff")
# Fields of a model's generation_config that leave the drawn tokens alone (ids, lengths that max_new_tokens and
# min_new_tokens override, caching, extra outputs, assistant-model knobs): anything else it sets that sample() cannot
# override (bad_words_ids, suppress_tokens, forced_eos_token_id, stop_strings, ...) makes sample() refuse the model.
_HARMLESS = {"_from_model_config", "transformers_version", "bos_token_id", "eos_token_id", "pad_token_id",
             "decoder_start_token_id", "max_length", "min_length", "early_stopping", "use_cache",
             "cache_implementation", "cache_config", "max_cache_len", "prefill_chunk_size", "compile_config",
             "disable_compile", "output_attentions", "output_hidden_states", "output_scores", "output_logits",
             "is_assistant", "num_assistant_tokens", "num_assistant_tokens_schedule", "assistant_confidence_threshold",
             "assistant_lookbehind", "target_lookbehind", "continuous_batching_config"}


def sampling_settings(temperature: float, top_p: float) -> dict[str, Any]:
    """Every generate() setting that decides which tokens are drawn: softmax(logits / temperature), cut to the
    top_p nucleus, and nothing else (``temperature == 0``: greedy, where the sampling-only settings do not apply).
    :func:`sample` passes all of them explicitly; Stage 1 records them in the values file's provenance."""
    if temperature == 0:
        return {"do_sample": False, **_NEUTRAL}
    return {"do_sample": True, "temperature": float(temperature), "top_p": float(top_p), **_NEUTRAL_SAMPLING,
            **_NEUTRAL}


def _check_nothing_inherited(model: Any, gen_config: Any) -> None:
    """Refuse a model whose generation_config sets a field that generate() would apply on top of ``gen_config``:
    one ``gen_config`` leaves as None because None is that field's only neutral value."""
    own = model.generation_config.to_dict()
    skip = _HARMLESS | (set() if gen_config.do_sample else set(_SAMPLING_ONLY))
    leaked = {k: v for k, v in own.items()
              if v is not None and k not in skip and hasattr(gen_config, k) and getattr(gen_config, k) is None}
    if leaked:
        raise ValueError(f"the model's generation_config sets {leaked}, which generate() would apply on top of the "
                         "sampler's settings, so the samples would not come from the policy; drop them from "
                         "model.generation_config (astarpo.models.load_model does)")


def _trim(tokens: list[int], eos: set[int]) -> tuple[list[int], bool]:
    for i, t in enumerate(tokens):
        if t in eos:
            return tokens[: i + 1], False
    return tokens, True


@functools.cache
def _cache_kwarg() -> str:
    """The name transformers gives the KV-cache argument of forward() and generate(): ``cache`` since 5.2x, where
    the old ``past_key_values`` still works but warns on every call; ``past_key_values`` before."""
    from transformers.generation.utils import GenerationMixin

    params = inspect.signature(GenerationMixin.prepare_inputs_for_generation).parameters
    return "cache" if "cache" in params else "past_key_values"


def _generate_shared_prefill(model: Any, input_ids: torch.Tensor, attention_mask: torch.Tensor, n: int,
                             gen_config: Any, synced: bool = False) -> torch.Tensor:
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
          use_cache=True, logits_to_keep=1, **{_cache_kwarg(): cache})
    cache.batch_repeat_interleave(n)
    gen_config = copy.copy(gen_config)
    gen_config.num_return_sequences = 1
    return model.generate(input_ids=input_ids.repeat_interleave(n, dim=0),
                          attention_mask=attention_mask.repeat_interleave(n, dim=0), generation_config=gen_config,
                          synced_gpus=synced, **{_cache_kwarg(): cache})


def _sharded(model: Any) -> bool:
    """Weights sharded over processes (FSDP2, DeepSpeed ZeRO-3) are gathered by collectives in every forward pass:
    a process whose responses have all ended keeps stepping (``synced_gpus``) until every process is done."""
    import torch.distributed as dist
    from torch.distributed.fsdp import FSDPModule

    if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
        return False
    return isinstance(model, FSDPModule) or any(hasattr(p, "ds_id") for p in model.parameters())


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
    """``n`` responses for each prompt (``temperature == 0`` means greedy, then ``n`` must be 1), drawn from
    softmax(logits / temperature) cut to the top_p nucleus, whatever the model's generation_config says (see
    :func:`sampling_settings`).

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
    gen_config = GenerationConfig(**sampling_settings(temperature, top_p), max_new_tokens=max_new_tokens,
                                  num_return_sequences=n, eos_token_id=eos, pad_token_id=pad_id, use_cache=True,
                                  return_dict_in_generate=False)
    _check_nothing_inherited(model, gen_config)
    synced = _sharded(model)
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
            out = _generate_shared_prefill(model, input_ids, attention_mask, n, gen_config, synced)
        else:
            out = model.generate(input_ids=input_ids, attention_mask=attention_mask, generation_config=gen_config,
                                 synced_gpus=synced)
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
