"""Evaluation: greedy pass@1, avg@k and pass@k over k samples, and the KL to the reference policy.

KL(pi || pi_ref) is estimated on responses sampled from pi: mean over prompts of
sum_t [log pi(y_t|.) - log pi_ref(y_t|.)], an unbiased estimate of the sequence-level KL when sampling at
temperature 1.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from pathlib import Path
from typing import Any

import torch
from accelerate.utils import set_seed
from tqdm.auto import tqdm

from . import rewards
from .benchmarks import get_benchmark, load_benchmark, reported
from .config import ConfigError, EvalConfig
from .data import encode_prompts, load_prompts
from .engines import ALONE_GPU_SHARE
from .generation import HFSampler, Rollout, Sampler, SamplingParams, collect
from .launch import Launch
from .logprobs import sequence_logprobs
from .models import content_hash, eos_ids, load_model, load_tokenizer, resolve_model
from .rundir import diff_settings, write_json_atomic, write_text_atomic
from .samplers import layout, make_sampler, sampler_class
from .training.checkpoint import read_run_file

log = logging.getLogger(__name__)


def evaluate(model: Any, tokenizer: Any, records: list[dict], prompt_ids: list[list[int]],
             reward_fn: rewards.RewardFn, *, k: int = 1, temperature: float = 1.0, top_p: float = 1.0,
             max_new_tokens: int = 256, batch_size: int = 64, ref_model: Any = None,
             on_reward_error: str = "raise", micro_batch_size: int = 8, progress: str | None = "eval",
             sampler: Sampler | None = None, launch: Launch | None = None) -> dict[str, Any]:
    """Score ``model`` on tokenized prompts. Returns accuracy figures and per-prompt samples.

    ``progress`` labels a progress bar over the sampled sequences (rate and time left), ``None`` for none; only
    rank 0 of a multi-process launch shows it. ``sampler`` draws the responses (default: HF ``generate`` on
    ``model``; a vLLM engine must hold ``model``'s weights). ``launch`` makes it data-parallel: each engine scores
    its block of the prompts and every process returns the figures over all of them (without: this process scores
    them all).
    """
    start = time.perf_counter()
    launch = launch or Launch()
    block = launch.engine_block(len(records))
    if launch.processes > 1:  # each process's part of the work, in its own log (the result does not show it)
        log.info("eval: process %d, engine %d of %d, scores prompts [%d, %d) of %d", launch.process_index,
                 launch.engine_index, launch.engines, block.start, block.stop, len(records))
    scores = _score(model, tokenizer, [records[i] for i in block], [prompt_ids[i] for i in block], reward_fn, k,
                    SamplingParams(temperature, top_p, max_new_tokens), batch_size, ref_model, on_reward_error,
                    micro_batch_size, progress, sampler) if block else {}
    if launch.engines > 1:  # every engine's scores, in prompt order (an engine's other processes scored the same)
        parts = [p for p in launch.gather_engines([scores]) if p]
        scores = {key: [x for p in parts for x in p[key]] for key in parts[0]}
    g = torch.tensor(scores["greedy"], dtype=torch.float64)
    result: dict[str, Any] = {"prompts": len(g), "accuracy": _nanmean(g), "k": k,
                              "mean_response_tokens": sum(scores["lengths"]) / len(g)}
    if k > 1:
        s = torch.tensor(scores["sampled"], dtype=torch.float64)
        result["avg_at_k"] = _nanmean(s)
        result["pass_at_k"] = float((s > 0).any(-1).double().mean())
    if ref_model is not None:
        result["kl_to_ref"] = float(torch.tensor(scores["log_ratio"], dtype=torch.float64).mean())
    result["seconds"] = round(time.perf_counter() - start, 2)
    result["samples"] = scores["samples"]
    return result


def _score(model: Any, tokenizer: Any, records: list[dict], prompt_ids: list[list[int]],
           reward_fn: rewards.RewardFn, k: int, params: SamplingParams, batch_size: int, ref_model: Any,
           on_reward_error: str, micro_batch_size: int, progress: str | None,
           sampler: Sampler | None) -> dict[str, list]:
    """Per prompt: the greedy reward and length, the k sampled rewards (k > 1), each sampled response's summed
    log-ratio to the reference (with ``ref_model``), and the greedy sample's record."""
    sampler = sampler or HFSampler(model, tokenizer, eos_ids(model, tokenizer), batch_size)
    draws = k if k > 1 else int(ref_model is not None)  # sampled sequences per prompt after the greedy one
    bar = tqdm(total=len(records) * (1 + draws), desc=progress, unit="seq", dynamic_ncols=True, leave=False,
               disable=progress is None or int(os.environ.get("RANK", "0")) != 0)
    greedy = collect(sampler, records, prompt_ids, 1, SamplingParams(0.0, 1.0, params.max_new_tokens), reward_fn,
                     on_reward_error, progress=bar.update)
    scores: dict[str, list] = {"greedy": greedy.rewards, "lengths": greedy.lengths, "samples": [
        {"id": rec["id"], "answer": rec["answer"], "greedy": c, "reward": float(r)}
        for rec, c, r in zip(records, greedy.completions, greedy.rewards)]}
    if k > 1:
        sampled = collect(sampler, records, prompt_ids, k, params, reward_fn, on_reward_error, progress=bar.update)
        scores["sampled"] = torch.tensor(sampled.rewards, dtype=torch.float64).view(len(records), k).tolist()
    elif ref_model is not None:
        sampled = sampler.generate(prompt_ids, 1, params, bar.update)  # the KL needs samples, not rewards
    bar.close()
    if ref_model is not None:
        scores["log_ratio"] = log_ratios(model, ref_model, sampled, tokenizer.pad_token_id, micro_batch_size).tolist()
    return scores


def kl_to_ref(model: Any, ref_model: Any, sampled: Rollout, pad_id: int, micro_batch_size: int = 8) -> float:
    """KL(pi || pi_ref) estimated on responses sampled from ``model``: the mean summed log-ratio."""
    return float(log_ratios(model, ref_model, sampled, pad_id, micro_batch_size).double().mean())


def log_ratios(model: Any, ref_model: Any, sampled: Rollout, pad_id: int, micro_batch_size: int = 8) -> torch.Tensor:
    """sum_t [log pi(y_t|.) - log pi_ref(y_t|.)] for each sampled response: [rows]."""
    return (sequence_logprobs(model, sampled, pad_id, micro_batch_size)
            - sequence_logprobs(ref_model, sampled, pad_id, micro_batch_size))


def _nanmean(x: torch.Tensor) -> float:
    x = x[~x.isnan()]
    return float(x.mean()) if x.numel() else float("nan")


def run_eval(cfg: EvalConfig, reward: str | rewards.RewardFn | None = None) -> dict[str, Any]:
    """The `astarpo eval` command: load, score, write ``cfg.output`` (JSON) and return the result."""
    if cfg.benchmarks:
        if reward is not None:
            raise ConfigError("each benchmark brings its own reward; pass no reward with benchmarks")
        return run_benchmarks(cfg)
    reward_name, reward_fn = rewards.resolve(reward or cfg.reward)
    model_dir = resolve_model(cfg.model)
    reference = _reference(cfg, model_dir)
    launch = layout(cfg)  # the layout checked before any model loads
    tokenizer = load_tokenizer(model_dir, cfg.trust_remote_code)
    records, prompt_ids = load_prompts(tokenizer, cfg)
    model, ref_model, sampler = _models_and_sampler(cfg, model_dir, reference, tokenizer, launch)
    result = _evaluate(cfg, model, tokenizer, records, prompt_ids, reward_fn, ref_model, sampler, launch)
    result = {"model": cfg.model, "reference": reference, "data": cfg.data, "split": cfg.split,
              "reward": reward_name, **result}
    if launch.is_main:
        write_json_atomic(Path(cfg.output), result)
    return result


def run_benchmarks(cfg: EvalConfig) -> dict[str, Any]:
    """`astarpo eval --benchmarks a,b`: one model load, one result per benchmark, the paper's table at the end.
    Under ``accelerate launch`` every engine (process) scores its block of each benchmark, rank 0 writes.

    Each finished benchmark is saved to ``<output>.parts/<name>.json`` with the settings it was made with, so a
    rerun of the same command only evaluates what is missing; the parts folder goes once the final JSON and
    Markdown files are written.
    """
    out = Path(cfg.output)
    parts = out.with_name(out.name + ".parts")
    launch = layout(cfg)
    main = launch.is_main  # the one process that writes
    model_dir = resolve_model(cfg.model)
    reference = _reference(cfg, model_dir)
    template = None if cfg.prompt_template == "{prompt}" else cfg.prompt_template
    instruction = "each benchmark's own" if template is None else template
    settings = {"model": cfg.model, "model_hash": content_hash(model_dir), "reference": reference, "k": cfg.k,
                "benchmark_k": cfg.benchmark_k, "limit": cfg.limit, "max_new_tokens": cfg.max_new_tokens,
                "temperature": cfg.temperature, "top_p": cfg.top_p, "seed": cfg.seed,
                "max_prompt_tokens": cfg.max_prompt_tokens, "use_chat_template": cfg.use_chat_template,
                "on_long_prompt": cfg.on_long_prompt, "dtype": cfg.dtype, "instruction": instruction}
    done: dict[str, dict[str, Any]] = {}
    for name in cfg.benchmark_names:  # check every saved part before the slow model load
        path = parts / f"{name}.json"
        if path.is_file():
            part = json.loads(path.read_text())
            diff = diff_settings(part["settings"], settings)
            if diff:
                raise ConfigError(f"{path} was made with other settings ({diff}); rerun with the same settings, "
                                  f"or delete {parts} to start over")
            done[name] = part["result"]
    todo = [name for name in cfg.benchmark_names if name not in done]
    if done:
        log.info("resuming: %s already done, %s to go", ", ".join(done), ", ".join(todo) or "nothing")
    if todo:
        tokenizer = load_tokenizer(model_dir, cfg.trust_remote_code)
        prompts = {}  # every prompt set is read and tokenized first, so a data problem shows before the model load
        for name in todo:
            records = load_benchmark(name, cfg.data_dir, cfg.limit, template)
            kept, prompt_ids = encode_prompts(tokenizer, records, cfg.max_prompt_tokens, cfg.use_chat_template,
                                              cfg.on_long_prompt)
            prompts[name] = (kept, prompt_ids, len(records) - len(kept))
        model, ref_model, sampler = _models_and_sampler(cfg, model_dir, reference, tokenizer, launch)
        if main:
            parts.mkdir(parents=True, exist_ok=True)
        for name in todo:
            bench = get_benchmark(name)
            records, prompt_ids, skipped = prompts[name]
            log.info("%s: %d prompts", name, len(records))
            result = _evaluate(cfg, model, tokenizer, records, prompt_ids, rewards.get(bench.reward), ref_model,
                               sampler, launch, progress=name, k=cfg.k_for(name))
            done[name] = {"reward": bench.reward, "skipped": skipped, **result}
            if main:
                write_json_atomic(parts / f"{name}.json", {"settings": settings, "result": done[name]})
            log.info("%s: pass@1 %.1f%% (%.0f s)", name, 100 * result["accuracy"], result["seconds"])
    benchmarks = {name: done[name] for name in cfg.benchmark_names}
    summary = {"model": cfg.model, "reference": reference, "k": cfg.k, "settings": settings, "benchmarks": benchmarks,
               "average": sum(reported(r) for r in benchmarks.values()) / len(benchmarks)}
    if main:
        write_json_atomic(out, summary)
        write_text_atomic(out.with_suffix(".md"), markdown_table(summary))
        shutil.rmtree(parts, ignore_errors=True)
    return summary


def markdown_table(summary: dict[str, Any]) -> str:
    """The paper's layout: one row per benchmark and an unweighted Average row; accuracies in percent.

    avg@k and pass@k appear for the benchmarks sampled k > 1 times (k may differ per benchmark, see
    ``EvalConfig.benchmark_k``); the others show "-" there, and each Average is over the rows that have it.
    Where some benchmarks were sampled and others not, a "reported" column gives each one's :func:`reported`
    figure and its Average is the paper's (where all were, that is the avg@k column).
    """
    s = summary["settings"]
    rows = {name: {**r, "reported": reported(r)} for name, r in summary["benchmarks"].items()}
    first = next(iter(rows.values()))
    sampled = {name: r.get("k", summary["k"]) for name, r in rows.items() if "avg_at_k" in r}
    ks = sorted(set(sampled.values()))
    label = ks[0] if len(ks) == 1 else "k"
    cols = [("prompts", "prompts", "{:d}"), ("pass@1 (%)", "accuracy", "{:.1f}")]  # (title, key, format)
    if sampled:
        cols += [(f"avg@{label} (%)", "avg_at_k", "{:.1f}"), (f"pass@{label} (%)", "pass_at_k", "{:.1f}")]
    if 0 < len(sampled) < len(rows):  # greedy rows beside sampled ones: the paper's figure for each
        cols.append(("reported (%)", "reported", "{:.1f}"))
    if "kl_to_ref" in first:
        cols.append(("KL to ref", "kl_to_ref", "{:.3f}"))
    cols.append(("response tokens", "mean_response_tokens", "{:.0f}"))
    percent = ("accuracy", "avg_at_k", "pass_at_k", "reported")

    def cells(values: dict[str, Any]) -> str:
        return " | ".join("-" if values.get(key) is None else fmt.format(values[key] * (100 if key in percent else 1))
                          for _, key, fmt in cols)

    average = {}
    for _, key, _ in cols:
        have = [r[key] for r in rows.values() if key in r]
        average[key] = sum(have) / len(have) if have else None
    average["prompts"] = sum(r["prompts"] for r in rows.values())
    if not sampled:
        how = ""
    elif len(sampled) == len(rows) and len(ks) == 1:
        how = f", {ks[0]} samples at temperature {s['temperature']}"
    else:
        how = f", samples at temperature {s['temperature']}: " + ", ".join(f"{n} {k}" for n, k in sampled.items())
    asked = s.get("instruction", "each benchmark's own")
    lines = [f"model `{summary['model']}`, greedy pass@1{how}, max_new_tokens {s['max_new_tokens']}, "
             f"limit {s['limit']}, instruction: " + (asked if asked.endswith("own") else f"`{asked}`"), "",
             "| benchmark | " + " | ".join(title for title, _, _ in cols) + " |",
             "| --- |" + " ---: |" * len(cols)]
    lines += [f"| {name} | {cells(r)} |" for name, r in rows.items()]
    lines.append(f"| **Average** | {cells(average)} |")
    return "\n".join(lines) + "\n"


def _reference(cfg: EvalConfig, model_dir: Path) -> str | None:
    """The model to measure KL against: ``cfg.reference``, else the one a trained checkpoint records."""
    run = read_run_file(model_dir)
    if cfg.reference is None and run is not None:
        return run["reference_model"]
    return cfg.reference


def _models_and_sampler(cfg: EvalConfig, model_dir: Path, reference: str | None, tokenizer: Any,
                        launch: Launch) -> tuple[Any, Any, Sampler]:
    """The model under evaluation, the reference model when there is one (for the KL), both on this process's
    device, and the sampler.

    A vLLM engine starts before the models reach the GPU, with the share of it they leave
    (:func:`engine_gpu_share`): vLLM's start-up check wants its whole share free, so models placed first would
    stop it from starting, and an engine started first with its default share would leave no room for them. The
    models are loaded first all the same (on the CPU): a LoRA checkpoint's engine takes the merged weights from
    the model.
    """
    models = [load_model(model_dir, cfg.dtype, cfg.trust_remote_code)]
    if reference is not None:
        models.append(load_model(resolve_model(reference), cfg.dtype, cfg.trust_remote_code))
    device = launch.device
    gpu_share = ALONE_GPU_SHARE
    if not sampler_class(cfg).uses_policy and device.type == "cuda":
        free, total = torch.cuda.mem_get_info(device)
        gpu_share = engine_gpu_share(free, total, sum(_bytes(m) for m in models))
    sampler = make_sampler(cfg, model_dir, tokenizer, models[0], gpu_share=gpu_share, launch=launch)
    models = [m.to(device) for m in models]
    return models[0], (models[1] if reference is not None else None), sampler


MODEL_HEADROOM = 1.25  # room for the models' KL passes (activations, log-prob chunks) per byte of their weights
GPU_MARGIN = 0.05  # of the GPU: what neither the engine nor the models may count on (CUDA context, fragmentation)


def engine_gpu_share(free: int, total: int, model_bytes: int) -> float:
    """The share of a GPU (``free`` of ``total`` bytes now) an engine may take while models of ``model_bytes``
    must still fit beside it: at most the engine's default alone, and an error when nothing is left."""
    share = (free - MODEL_HEADROOM * model_bytes) / total - GPU_MARGIN
    if share <= 0:
        raise ConfigError(f"the models take {model_bytes / 2**30:.1f} GiB of the {free / 2**30:.1f} GiB free on this "
                          "GPU, leaving none for the vLLM engine: use --engine hf, more GPUs, or set "
                          "--vllm-gpu-memory-utilization yourself")
    return min(ALONE_GPU_SHARE, share)


def _bytes(model: Any) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters())


def _evaluate(cfg: EvalConfig, model: Any, tokenizer: Any, records: list[dict], prompt_ids: list[list[int]],
              reward_fn: rewards.RewardFn, ref_model: Any, sampler: Sampler, launch: Launch, progress: str = "eval",
              k: int | None = None) -> dict[str, Any]:
    """``evaluate`` with the config's settings, data-parallel under a launch, seeded here (seed + engine index) so
    that a result does not depend on what ran before."""
    set_seed(cfg.seed + launch.engine_index)  # every stream: the engine draws from one of them
    return evaluate(model, tokenizer, records, prompt_ids, reward_fn, k=k or cfg.k, temperature=cfg.temperature,
                    top_p=cfg.top_p, max_new_tokens=cfg.max_new_tokens, batch_size=cfg.generation_batch_size,
                    ref_model=ref_model, on_reward_error=cfg.on_reward_error, progress=progress, sampler=sampler,
                    launch=launch)
