"""Evaluation: greedy pass@1, avg@k and pass@k over k samples, and the KL to the reference policy.

KL(pi || pi_ref) is estimated on responses sampled from pi: mean over prompts of
sum_t [log pi(y_t|.) - log pi_ref(y_t|.)], an unbiased estimate of the sequence-level KL when sampling at
temperature 1.
"""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path
from typing import Any

import torch

from . import rewards
from .config import EvalConfig
from .data import encode_prompts, load_records
from .generation import sample, sequence_logprobs
from .models import eos_ids, load_model, load_tokenizer, resolve_model

log = logging.getLogger(__name__)
RUN_FILE = "astarpo_run.json"  # written into every checkpoint: which reference model it was trained against


def evaluate(model: Any, tokenizer: Any, records: list[dict], prompt_ids: list[list[int]],
             reward_fn: rewards.RewardFn, *, k: int = 1, temperature: float = 1.0, top_p: float = 1.0,
             max_new_tokens: int = 256, batch_size: int = 64, ref_model: Any = None,
             on_reward_error: str = "raise", micro_batch_size: int = 8) -> dict[str, Any]:
    """Score ``model`` on tokenized prompts. Returns accuracy figures and per-prompt samples."""
    eos = eos_ids(model, tokenizer)
    extra = [c for c in records[0] if c not in ("id", "prompt")]

    def score(roll):
        cols = {c: [records[i][c] for i in roll.prompt_index] for c in extra}
        return torch.tensor(rewards.score(reward_fn, [records[i]["prompt"] for i in roll.prompt_index],
                                          roll.completions, cols, on_reward_error), dtype=torch.float64)

    start = time.perf_counter()
    greedy = sample(model, tokenizer, prompt_ids, 1, 0.0, 1.0, max_new_tokens, eos, batch_size)
    g = score(greedy)
    result: dict[str, Any] = {"prompts": len(records), "accuracy": _nanmean(g), "k": k,
                              "mean_response_tokens": sum(greedy.lengths) / len(greedy)}
    sampled = None
    if k > 1 or ref_model is not None:
        sampled = sample(model, tokenizer, prompt_ids, k, temperature, top_p, max_new_tokens, eos, batch_size)
    if k > 1:
        s = score(sampled).view(len(records), k)
        result["avg_at_k"] = _nanmean(s)
        result["pass_at_k"] = float((s > 0).any(-1).double().mean())
    if ref_model is not None:
        pad = tokenizer.pad_token_id
        log_ratio = (sequence_logprobs(model, sampled, pad, micro_batch_size)
                     - sequence_logprobs(ref_model, sampled, pad, micro_batch_size))
        result["kl_to_ref"] = float(log_ratio.double().mean())
    result["seconds"] = round(time.perf_counter() - start, 2)
    result["samples"] = [{"id": rec["id"], "answer": rec["answer"], "greedy": c, "reward": float(r)}
                         for rec, c, r in zip(records, greedy.completions, g.tolist())]
    return result


def _nanmean(x: torch.Tensor) -> float:
    x = x[~x.isnan()]
    return float(x.mean()) if x.numel() else float("nan")


def run_eval(cfg: EvalConfig, reward: str | rewards.RewardFn | None = None) -> dict[str, Any]:
    """The `astarpo eval` command: load, score, write ``cfg.output`` (JSON) and return the result."""
    reward_name, reward_fn = rewards.resolve(reward or cfg.reward)
    model_dir = resolve_model(cfg.model)
    reference = cfg.reference
    run_file = Path(model_dir) / RUN_FILE
    if reference is None and run_file.is_file():
        reference = json.loads(run_file.read_text())["reference_model"]
    tokenizer = load_tokenizer(model_dir, cfg.trust_remote_code)
    records = load_records(cfg.data, cfg.split, cfg.limit, cfg.prompt_column, cfg.answer_column)
    records, prompt_ids = encode_prompts(tokenizer, records, cfg.max_prompt_tokens, cfg.use_chat_template,
                                         cfg.on_long_prompt)
    model = load_model(model_dir, cfg.dtype, cfg.trust_remote_code)
    ref_model = None
    if reference is not None:
        ref_model = load_model(resolve_model(reference), cfg.dtype, cfg.trust_remote_code)
    torch.manual_seed(cfg.seed)
    result = evaluate(model, tokenizer, records, prompt_ids, reward_fn, k=cfg.k, temperature=cfg.temperature,
                      top_p=cfg.top_p, max_new_tokens=cfg.max_new_tokens, batch_size=cfg.generation_batch_size,
                      ref_model=ref_model, on_reward_error=cfg.on_reward_error)
    result = {"model": cfg.model, "reference": reference, "data": cfg.data, "split": cfg.split,
              "reward": reward_name, **result}
    out = Path(cfg.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp")
    tmp.write_text(json.dumps(result, indent=1))
    os.replace(tmp, out)
    return result
