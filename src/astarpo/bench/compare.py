"""`astarpo bench`: A*-PO next to GRPO, RLOO, REBEL and PPO on one model, task and prompts-per-step budget.

Every method trains with the same Stage 2 loop and recipe (the quickstart's: model, task, response cap), on the
same training prompts, for the same number of steps of the same number of prompts: the same prompt-visits. A*-PO
trains on every prompt too (its Stage 1 filter is off here: the filter would give it fewer, easier prompts
visited more often). Only the objective differs, and with it the responses sampled per prompt, the models held in
memory (reference, critic) and the work per step. A*-PO also pays for Stage 1 once per seed, timed on its own.

Each method gets its own learning rate: a small sweep at the first seed, picked on validation problems that the
report does not use; then every other seed at that rate. Every seed reruns everything (Stage 1 included), so the
report gives each figure as mean and spread over seeds.

Runs go in segments of ``eval_every`` steps, round-robin (a rotating order), each segment a fresh process that
resumes from the run's last checkpoint: machine noise hits every method alike, and each process's peak resident
memory (or peak CUDA memory) belongs to one method only. After every segment the checkpoint is scored here,
outside the timed processes, on problems no method trains on: greedy accuracy, and KL to the reference on
responses sampled at temperature 1. The report is a Markdown table (with A*-PO's wins, ties and losses), a PNG
(accuracy against training seconds, and the accuracy/KL frontier) and a JSON file with every raw figure, the
machine and the versions.
"""
from __future__ import annotations

import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
import yaml

from .. import rewards
from .._version import __version__
from ..config import QUICKSTART, SECTIONS, BenchConfig, TrainConfig, ValuesConfig, build, load_yaml
from ..data import encode_prompts, load_records
from ..engines import COLOCATED_GPU_SHARE
from ..evaluate import evaluate, kl_to_ref
from ..generation import HFSampler, SamplingParams
from ..models import eos_ids, load_model, load_tokenizer, resolve_model
from ..rundir import check_same_settings, write_json_atomic
from ..samplers import make_sampler, sampler_class
from ..training.objectives import OBJECTIVES
from ..values import read_values


class BenchError(RuntimeError):
    """A method's run failed; the message points at its log."""


def _run(args: list[str], log_path: Path, module: str = "astarpo") -> None:
    """One astarpo command (or ``module``) in its own process, its output appended to ``log_path``."""
    with log_path.open("a") as log:
        proc = subprocess.run([sys.executable, "-m", module, *args], stdout=log, stderr=subprocess.STDOUT)
    if proc.returncode != 0:
        tail = log_path.read_text().splitlines()[-5:]
        raise BenchError(f"`astarpo {' '.join(args)}` failed (exit {proc.returncode}); see {log_path}: "
                         + " | ".join(tail))


def machine() -> dict[str, Any]:
    import transformers

    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else None
    return {"platform": platform.platform(), "processor": platform.processor(), "cpu_count": os.cpu_count(),
            "gpu": gpu, "python": platform.python_version(), "torch": torch.__version__,
            "transformers": transformers.__version__, "astarpo": __version__,
            "torch_threads": torch.get_num_threads()}


def heldout_records(recipe: TrainConfig, train_prompts: int) -> list[dict[str, Any]]:
    """Problems no method trains on: the training set's after the first ``train_prompts``, then the test split
    (the built-in arithmetic task's test split alone has 128, too few for a spread of a few points)."""
    rest = load_records(recipe.data, recipe.split, None, recipe.prompt_column, recipe.answer_column,
                        recipe.prompt_template)[train_prompts:]
    return rest + load_records(recipe.eval_data, recipe.eval_split, None, recipe.prompt_column, recipe.answer_column,
                               recipe.prompt_template)


class _Scorer:
    """A checkpoint's greedy accuracy on the validation and report problems, and its KL to the reference on
    responses sampled at temperature 1 for the first ``kl_prompts`` report problems; in this (untimed) process.
    The greedy responses come from the bench's engine (one vLLM engine here, the checkpoint's weights pushed into
    it), the KL samples from HF ``generate`` under a fixed seed (the same samples for the same weights)."""

    def __init__(self, recipe: TrainConfig, cfg: BenchConfig) -> None:
        self.recipe, self.validation, self.kl_prompts = recipe, cfg.validation_prompts, cfg.kl_prompts
        self.model_dir = resolve_model(recipe.model)
        self.tokenizer = load_tokenizer(self.model_dir)
        records = heldout_records(recipe, cfg.train_prompts)[: cfg.eval_limit]
        if len(records) <= self.validation:
            raise BenchError(f"{len(records)} held-out problems, but validation takes the first {self.validation}; "
                             "lower --validation-prompts or --train-prompts")
        self.records, self.prompt_ids = encode_prompts(self.tokenizer, records, recipe.max_prompt_tokens,
                                                       recipe.use_chat_template, recipe.on_long_prompt)
        self.ref = load_model(self.model_dir).eval()
        self.reward_fn = rewards.resolve(recipe.reward)[1]
        self.sampler = (make_sampler(recipe, self.model_dir, self.tokenizer, gpu_share=COLOCATED_GPU_SHARE)
                        if sampler_class(recipe).owns_weights else None)  # beside the runs it scores

    def __call__(self, model_dir: Path | None) -> dict[str, float]:
        model = self.ref if model_dir is None else load_model(model_dir).eval()
        if self.sampler is not None:
            self.sampler.load_weights(model)
        res = evaluate(model, self.tokenizer, self.records, self.prompt_ids, self.reward_fn,
                       max_new_tokens=self.recipe.max_new_tokens, progress=None, sampler=self.sampler)
        right = [s["reward"] for s in res["samples"]]
        report = slice(self.validation, self.validation + self.kl_prompts)
        torch.manual_seed(self.recipe.seed)  # the same KL samples for the same weights
        sampled = HFSampler(model, self.tokenizer, eos_ids(model, self.tokenizer)).generate(
            self.prompt_ids[report], 1, SamplingParams(1.0, 1.0, self.recipe.max_new_tokens))
        return {"accuracy": statistics.fmean(right[self.validation:]),
                "validation_accuracy": statistics.fmean(right[: self.validation]),
                "kl_to_ref": kl_to_ref(model, self.ref, sampled, self.tokenizer.pad_token_id)}


def _lr(x: float) -> str:
    return f"{x:g}"


def bench(cfg: BenchConfig) -> dict[str, Any]:
    """Run the comparison (resuming whatever a previous run of the same settings finished) and write the report.

    Each method trains at each of its learning rates at the first seed; the rate with the best validation accuracy
    after the last step is its rate for the other seeds. Every (seed, rate, method) run is a directory
    ``seed<S>/lr<LR>/<method>``; every seed has its own Stage 1 (``seed<S>/values.parquet``).
    """
    from tqdm.auto import tqdm

    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    # External rows can be added to a finished benchmark: they do not change the others.
    settings = {k: v for k, v in asdict(cfg).items()
                if k not in ("output_dir", "json", "target_accuracy", "external")}
    check_same_settings(out / "bench_settings.json", settings, "choose another --output-dir or delete it")
    write_json_atomic(out / "bench_settings.json", settings)
    seeds, rates = cfg.seed_values, cfg.rates
    scorer = _Scorer(recipe(cfg, seeds[0])[2], cfg)
    scores_file = out / "scores.json"
    scores: dict[str, dict[str, dict[str, float]]] = json.loads(scores_file.read_text()) if scores_file.is_file() \
        else {}
    if "base" not in scores:
        scores["base"] = {"0": scorer(None)}
        write_json_atomic(scores_file, scores)
    first = [(seeds[0], lr, algo) for algo in cfg.algo_names for lr in rates[algo]]
    bar = tqdm(total=len(cfg.segments) * (len(first) + (len(seeds) - 1) * len(cfg.algo_names))
               + len(seeds) * len(cfg.external_names), desc="bench", dynamic_ncols=True)
    _train(cfg, out, first, scores, scorer, bar)
    chosen = choose_rates(cfg, scores)
    _train(cfg, out, [(seed, chosen[algo], algo) for seed in seeds[1:] for algo in cfg.algo_names], scores, scorer,
           bar)
    for seed in seeds:  # TRL's trainers: one whole run each, after the interleaved rounds, at the first rate
        for name in cfg.external_names:
            bar.set_postfix(method=name, seed=seed)
            _external(cfg, out, seed, name, scores, scorer)
            bar.update()
    bar.close()
    report = summarize(cfg, scores)
    (out / "bench.json").write_text(json.dumps(report, indent=1))
    if cfg.json:
        Path(cfg.json).write_text(json.dumps(report, indent=1))
    (out / "bench.md").write_text(markdown(report))
    plot(report, out / "bench.png")
    return report


def _run_dir(out: Path, seed: int, lr: float, algo: str) -> Path:
    return out / f"seed{seed}" / f"lr{_lr(lr)}" / algo


def _key(seed: int, lr: float, algo: str) -> str:
    """A run's entry in scores.json."""
    return f"{seed}/{_lr(lr)}/{algo}"


def _stage1(cfg: BenchConfig, out: Path, seed: int) -> Path:
    """The seed's A*-PO values, computed once, on every training prompt. Its time is its sampling and scoring
    alone, as the values file records it: the rule the other methods' step times follow (process start-up, model
    loading and the engine's start are nobody's time)."""
    shared, stage1, _ = recipe(cfg, seed)
    values = out / f"seed{seed}" / "values.parquet"
    if not values.is_file():
        values.parent.mkdir(parents=True, exist_ok=True)
        (values.parent / "values.yaml").write_text(yaml.safe_dump({**shared, "n": stage1.n, "output": str(values)}))
        _run(["values", "--config", str(values.parent / "values.yaml")], values.parent / "values.log")
        write_json_atomic(values.parent / "stage1_seconds.json", read_values(values).provenance["sampling_seconds"])
    return values


def _train(cfg: BenchConfig, out: Path, runs: list[tuple[int, float, str]], scores: dict[str, Any],
           scorer: _Scorer, bar: Any) -> None:
    """Train ``runs`` (seed, rate, method) in segments, round-robin in a rotating order, scoring each checkpoint."""
    for seed, lr, algo in runs:
        shared, _, stage2 = recipe(cfg, seed)
        run = _run_dir(out, seed, lr, algo)
        # Each method with its own coefficients' defaults (objectives.py cites them); A*-PO with the recipe's.
        # A*-PO trains on every prompt, as the others do: the same prompts, visited as often.
        train = {"algo": algo, "output_dir": str(run), "batch_size": cfg.batch_size,
                 "micro_batch_size": stage2.micro_batch_size, "learning_rate": lr,
                 "save_every": cfg.eval_every, "keep_checkpoints": 1}
        if algo == "astarpo":
            train.update(values=str(_stage1(cfg, out, seed)), beta2=stage2.beta2, filter_unsolved=False)
        run.parent.mkdir(parents=True, exist_ok=True)
        (run.parent / f"{algo}.yaml").write_text(yaml.safe_dump({**shared, "train": train}))
    for k, end in enumerate(cfg.segments if runs else []):  # one seed: no runs after the first seed's
        for seed, lr, algo in runs[k % len(runs):] + runs[: k % len(runs)]:
            bar.set_postfix(method=algo, seed=seed, lr=_lr(lr), step=end)
            key, run = _key(seed, lr, algo), _run_dir(out, seed, lr, algo)
            if str(end) not in scores.get(key, {}):
                _run(["train", "--config", str(run.parent / f"{algo}.yaml"), "--steps", str(end)],
                     run.parent / f"{algo}.log")
                scores.setdefault(key, {})[str(end)] = scorer(run / "checkpoints" / f"step-{end:06d}")
                write_json_atomic(out / "scores.json", scores)  # read back on resume
                if end == cfg.steps:  # only resuming needs them (2 GB a run for a 135M model); final/ stays
                    shutil.rmtree(run / "checkpoints")
            bar.update()


def choose_rates(cfg: BenchConfig, scores: dict[str, Any]) -> dict[str, float]:
    """Each method's rate: the best validation accuracy after the last step at the first seed (ties: the first
    listed). Validation problems are not the reported ones, so the pick does not flatter the report."""
    last, seed = str(cfg.steps), cfg.seed_values[0]
    return {algo: max(rates, key=lambda lr: (scores[_key(seed, lr, algo)][last]["validation_accuracy"],
                                             -rates.index(lr)))
            for algo, rates in cfg.rates.items() if algo in cfg.algo_names}


def _external(cfg: BenchConfig, out: Path, seed: int, name: str, scores: dict[str, Any], scorer: _Scorer) -> None:
    """One TRL trainer's whole run at ``seed`` and its (first) learning rate, then its checkpoints scored."""
    lr = cfg.rates[name][0]
    key, run = _key(seed, lr, name), _run_dir(out, seed, lr, name)
    if str(cfg.steps) in scores.get(key, {}):
        return
    _, stage1, stage2 = recipe(cfg, seed)
    shutil.rmtree(run, ignore_errors=True)  # an interrupted TRL run starts over
    run.mkdir(parents=True)
    spec = {"trainer": name, "model_dir": str(resolve_model(cfg.model)), "output_dir": str(run),
            "data": stage2.data, "reward": stage2.reward, "train_prompts": cfg.train_prompts,
            "batch_size": cfg.batch_size, "group_size": OBJECTIVES["grpo"].group_size, "steps": cfg.steps,
            "save_every": cfg.eval_every, "max_new_tokens": stage2.max_new_tokens, "learning_rate": lr,
            "beta1": stage2.beta1, "beta": stage2.beta2 if name == "trl-a2po" else TrainConfig(algo="grpo").coefficient,
            "n": stage1.n, "seed": seed}
    (run.parent / f"{name}.json").write_text(json.dumps(spec, indent=1))
    _run([str(run.parent / f"{name}.json")], run.parent / f"{name}.log", module="astarpo.bench.trl")
    scores[key] = {str(end): scorer(run / "trl" / f"checkpoint-{end}") for end in cfg.segments}
    write_json_atomic(out / "scores.json", scores)  # read back on resume


def recipe(cfg: BenchConfig, seed: int) -> tuple[dict[str, Any], ValuesConfig, TrainConfig]:
    """The quickstart's recipe on the bench's model, number of training prompts and ``seed``: its shared settings
    and the Stage 1 and Stage 2 configs they give; each method's own settings are added in :func:`_train`."""
    shared = {k: v for k, v in load_yaml(QUICKSTART).items() if k not in SECTIONS.values()}
    shared.update(model=cfg.model, limit=cfg.train_prompts, engine=cfg.engine, seed=seed)
    if cfg.max_new_tokens is not None:
        shared["max_new_tokens"] = cfg.max_new_tokens
    if cfg.engine == "vllm":  # every segment starts an engine: compiling would cost each one minutes; a step's
        shared.update(vllm_enforce_eager=True, vllm_kv_cache_gb=1.0)  # sequences need far less than the default
    return shared, build(ValuesConfig, QUICKSTART, **shared), build(TrainConfig, QUICKSTART, **shared)


def summarize(cfg: BenchConfig, scores: dict[str, dict[str, dict[str, float]]]) -> dict[str, Any]:
    """Per method, at its chosen rate: each seed's run (step time, memory, its accuracy/KL curve against training
    seconds, time and KL at the target accuracy, time to GRPO's final accuracy) and their mean and spread; the
    sweep; A*-PO's verdict against each baseline."""
    out, base = Path(cfg.output_dir), scores["base"]["0"]
    chosen = choose_rates(cfg, scores)
    sweep = {algo: {_lr(lr): scores[_key(cfg.seed_values[0], lr, algo)][str(cfg.steps)] for lr in cfg.rates[algo]}
             for algo in cfg.algo_names}
    lrs = {**chosen, **{name: cfg.rates[name][0] for name in cfg.external_names}}
    runs = {name: {seed: _run_figures(out, seed, lr, name, scores, base, cfg.steps, cfg.batch_size)
                   for seed in cfg.seed_values} for name, lr in lrs.items()}
    target = cfg.target_accuracy  # default: halfway to the best mean final accuracy, when some method improved
    best = max(statistics.fmean(r["accuracy"] for r in by_seed.values()) for by_seed in runs.values())
    if target is None and best > base["accuracy"]:
        target = round((base["accuracy"] + best) / 2, 3)
    # GRPO's mean final accuracy: the paper's time comparison is the time each method takes to reach it
    grpo_final = round(statistics.fmean(r["accuracy"] for r in runs["grpo"].values()), 4) if "grpo" in runs else None
    methods: dict[str, dict[str, Any]] = {}
    for name, by_seed in runs.items():
        for r in by_seed.values():
            r["seconds_to_target"] = _at_target(r["curve"], target, "train_seconds", r["stage1_seconds"])
            r["kl_at_target"] = _at_target(r["curve"], target, "kl_to_ref")
            r["seconds_to_grpo_final"] = _at_target(r["curve"], grpo_final, "train_seconds", r["stage1_seconds"])
            r["total_seconds"] = round(r["stage1_seconds"] + r["train_seconds"], 1)
        seeds = list(by_seed.values())
        m: dict[str, Any] = {"learning_rate": lrs[name], "samples_per_step": seeds[0]["samples_per_step"],
                             "seeds": {str(s): r for s, r in by_seed.items()}}
        for key in ("step_seconds", "prompt_seconds", "generation_seconds", "tokens_per_second", "peak_memory_mb",
                    "stage1_seconds", "train_seconds", "train_generation_seconds", "total_seconds", "accuracy",
                    "validation_accuracy", "kl_to_ref", "seconds_to_target", "kl_at_target",
                    "seconds_to_grpo_final"):
            m[key], m[f"{key}_std"], m[f"{key}_n"] = _mean_std([r[key] for r in seeds])
        # the mean curve (every seed scores the same steps), for `astarpo report`
        m["curve"] = [{k: (c[0][k] if k == "step" else round(statistics.fmean(x[k] for x in c), 4))
                       for k in c[0]} for c in zip(*(r["curve"] for r in seeds))]
        methods[name] = m
    if "astarpo" in methods:
        for name, m in methods.items():
            m["astarpo_verdict"] = {key: _verdict(methods["astarpo"], m, key, higher)
                                    for key, higher in VERDICT_KEYS.items()} if name != "astarpo" else {}
    _, stage1, stage2 = recipe(cfg, cfg.seed_values[0])
    used = {k: getattr(stage2, k) for k in ("model", "data", "reward", "max_new_tokens", "temperature", "top_p",
                                            "beta1", "beta2")} | {"stage1_n": stage1.n}
    return {"settings": {**asdict(cfg), "recipe": used}, "machine": machine(), "target_accuracy": target,
            "grpo_final_accuracy": grpo_final, "untrained": base, "learning_rate_sweep": sweep, "methods": methods}


# What the verdict compares, and whether more is better.
VERDICT_KEYS = {"accuracy": True, "kl_at_target": False, "seconds_to_target": False,
                "seconds_to_grpo_final": False, "step_seconds": False, "peak_memory_mb": False}


def _run_figures(out: Path, seed: int, lr: float, name: str, scores: dict[str, Any], base: dict[str, float],
                 steps: int, batch_size: int) -> dict[str, Any]:
    """One run's step time, throughput, memory, Stage 1 time and accuracy/KL curve against training seconds."""
    run = _run_dir(out, seed, lr, name)
    lines = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    lines = [m for m in lines if "step_seconds" in m][:steps]
    points = scores[_key(seed, lr, name)]
    elapsed, curve = 0.0, [{"step": 0, "train_seconds": 0.0, **base}]
    for m in lines:
        elapsed += m["step_seconds"]
        if str(m["step"]) in points:
            curve.append({"step": m["step"], "train_seconds": round(elapsed, 1), **points[str(m["step"])]})
    stage1 = next((f for f in (run / "stage1_seconds.json", out / f"seed{seed}" / "stage1_seconds.json")
                   if name in ("astarpo", "trl-a2po") and f.is_file()), None)  # A2PO times its own Stage 1
    step_seconds = statistics.median(m["step_seconds"] for m in lines)
    return {"samples_per_step": lines[0]["samples"], "step_seconds": round(step_seconds, 3),
            "prompt_seconds": round(step_seconds / batch_size, 3),
            "generation_seconds": _median(lines, "generation_seconds"),  # TRL's rows do not report these
            "train_generation_seconds": round(sum(m["generation_seconds"] for m in lines), 1)
            if all("generation_seconds" in m for m in lines) else None,
            "tokens_per_second": _median(lines, "tokens_per_second"),
            "peak_memory_mb": max(m["peak_memory_mb"] for m in lines),
            "stage1_seconds": round(json.loads(stage1.read_text()), 1) if stage1 else 0.0,
            "train_seconds": round(elapsed, 1), "accuracy": curve[-1]["accuracy"],
            "validation_accuracy": curve[-1]["validation_accuracy"], "kl_to_ref": curve[-1]["kl_to_ref"],
            "curve": curve}


def _at_target(curve: list[dict[str, float]], target: float | None, key: str, offset: float = 0.0) -> float | None:
    """``key`` where the curve first reaches ``target`` accuracy, linear between the two checkpoints around it
    (plus ``offset``); None if it never does."""
    if target is None:
        return None
    for a, b in zip(curve, curve[1:]):
        if b["accuracy"] >= target:
            if a["accuracy"] >= target:
                return round(a[key] + offset, 3)
            f = (target - a["accuracy"]) / (b["accuracy"] - a["accuracy"])
            return round(a[key] + f * (b[key] - a[key]) + offset, 3)
    return None


def _mean_std(values: list[float | None]) -> tuple[float | None, float | None, int]:
    """Mean and sample standard deviation of the seeds that have the figure, and how many do."""
    have = [v for v in values if v is not None]
    if not have:
        return None, None, 0
    return (round(statistics.fmean(have), 4), round(statistics.stdev(have), 4) if len(have) > 1 else None,
            len(have))


def _verdict(a: dict[str, Any], b: dict[str, Any], key: str, higher_is_better: bool) -> str:
    """'wins', 'loses' or 'ties': A*-PO against ``b`` on ``key``, a difference counting only when it exceeds twice
    its standard error over seeds (one seed: no spread, so never more than 'ties'); 'n/a' when a figure is
    missing in some seed (a target not reached)."""
    n = len(a["seeds"])
    if a[f"{key}_n"] < n or b[f"{key}_n"] < len(b["seeds"]):
        return "n/a"
    if a[f"{key}_std"] is None or b[f"{key}_std"] is None:
        return "ties"
    diff = a[key] - b[key]
    se = (a[f"{key}_std"] ** 2 / a[f"{key}_n"] + b[f"{key}_std"] ** 2 / b[f"{key}_n"]) ** 0.5
    if abs(diff) <= 2 * se:
        return "ties"
    return "wins" if (diff > 0) == higher_is_better else "loses"


def _median(steps: list[dict[str, Any]], key: str) -> float | None:
    values = [m[key] for m in steps if key in m]
    return round(statistics.median(values), 3) if values else None


def _pm(m: dict[str, Any], key: str, spec: str, scale: float = 1.0) -> str:
    """mean +- std (and k/n seeds when only some have the figure)."""
    if m[key] is None:
        return "not reached"
    text = f"{m[key] * scale:{spec}}" + (f" ± {m[f'{key}_std'] * scale:{spec}}" if m[f"{key}_std"] is not None
                                          else "")
    return text + (f" ({m[f'{key}_n']}/{len(m['seeds'])} seeds)" if m[f"{key}_n"] < len(m["seeds"]) else "")


def markdown(report: dict[str, Any]) -> str:
    methods, s = report["methods"], report["settings"]
    seeds = len(next(iter(methods.values()))["seeds"])
    target = report["target_accuracy"]
    lines = [
        f"{len(methods)} methods x {seeds} seed(s), {s['steps']} steps of {s['batch_size']} prompts from the same "
        f"{s['train_prompts']} (every method, A*-PO included, trains on all of them). Untrained: report accuracy "
        f"{report['untrained']['accuracy']:.1%}, validation {report['untrained']['validation_accuracy']:.1%}. "
        + (f"Target accuracy {target:.1%}. " if target is not None
           else "No method improved on the untrained model, so there is no target. ")
        + (f"GRPO's final accuracy {report['grpo_final_accuracy']:.1%}. "
           if report.get("grpo_final_accuracy") is not None else "")
        + "Figures are mean ± standard deviation over seeds. Time is each method's step time (sampling, the "
          "engine's weight update and the training passes) plus, for A*-PO, its Stage 1 sampling and scoring; "
          "process start-up, model loading and engine start-up count for no method.", "",
        "| method | lr | samples/step | s/step | peak memory MB | report acc (final) | KL to ref (final) "
        "| KL at target acc | s to target | s to GRPO's final acc |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, m in methods.items():
        lines.append(
            f"| {name} | {m['learning_rate']:g} | {m['samples_per_step']} | {_pm(m, 'step_seconds', '.2f')} | "
            f"{_pm(m, 'peak_memory_mb', '.0f')} | {_pm(m, 'accuracy', '.1f', 100)} | {_pm(m, 'kl_to_ref', '.2f')} | "
            f"{_pm(m, 'kl_at_target', '.2f')} | {_pm(m, 'seconds_to_target', '.0f')} | "
            f"{_pm(m, 'seconds_to_grpo_final', '.0f')} |")
    lines += ["", "Where the time goes (seconds per seed, all steps):", "",
              "| method | Stage 1 | Stage 2 sampling | Stage 2 training passes and weight sync | total |",
              "|---|---|---|---|---|"]
    for name, m in methods.items():
        gen = m["train_generation_seconds"]
        rest = None if gen is None else m["train_seconds"] - gen
        lines.append(f"| {name} | {m['stage1_seconds']:.0f} | {'n/a' if gen is None else f'{gen:.0f}'} | "
                     f"{'n/a' if rest is None else f'{rest:.0f}'} | {_pm(m, 'total_seconds', '.0f')} |")
    if "astarpo" in methods and len(methods) > 1:
        lines += ["", "A*-PO against each method (a difference counts when it exceeds twice its standard error over "
                      "seeds; n/a: a target some seed did not reach):", "",
                  "| against | " + " | ".join(VERDICT_KEYS) + " |", "|---" * (len(VERDICT_KEYS) + 1) + "|"]
        for name, m in methods.items():
            if name != "astarpo":
                lines.append(f"| {name} | " + " | ".join(m["astarpo_verdict"][k] for k in VERDICT_KEYS) + " |")
    sweep = report["learning_rate_sweep"]
    rates = sorted({r for by_lr in sweep.values() for r in by_lr}, key=float)
    if any(len(by_lr) > 1 for by_lr in sweep.values()):
        lines += ["", f"Learning-rate sweep at seed {s['seeds'].split(',')[0]} (validation accuracy after the last "
                      "step, report accuracy and KL in brackets); each method's best is its rate above:", "",
                  "| method | " + " | ".join(rates) + " |", "|---" * (len(rates) + 1) + "|"]
        for name, by_lr in sweep.items():
            lines.append(f"| {name} | " + " | ".join(
                f"{by_lr[r]['validation_accuracy']:.0%} ({by_lr[r]['accuracy']:.0%}, {by_lr[r]['kl_to_ref']:.2f})"
                if r in by_lr else "" for r in rates) + " |")
    else:
        lines += ["", "Learning rates as given (no sweep)."]
    external = [name for name in methods if name.startswith("trl-")]
    if external:
        lines += ["", f"{', '.join(external)}: TRL's trainers on the same prompts, reward and budget at the first "
                      "learning rate (not swept), each run as one process after the interleaved rounds."]
    return "\n".join(lines) + "\n"


def plot(report: dict[str, Any], path: Path) -> None:
    """Held-out accuracy against training seconds, and the accuracy/KL frontier: one thin line per seed, the mean
    thick (A*-PO's seconds include its Stage 1)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (acc, front) = plt.subplots(1, 2, figsize=(12, 4.5))
    for i, (name, m) in enumerate(report["methods"].items()):
        color = f"C{i}"
        for r in m["seeds"].values():
            acc.plot([c["train_seconds"] + r["stage1_seconds"] for c in r["curve"]],
                     [c["accuracy"] for c in r["curve"]], "-", color=color, alpha=0.3, lw=1)
            front.plot([c["kl_to_ref"] for c in r["curve"]], [c["accuracy"] for c in r["curve"]], "-",
                       color=color, alpha=0.3, lw=1)
        curve = m["curve"]
        acc.plot([c["train_seconds"] + m["stage1_seconds"] for c in curve], [c["accuracy"] for c in curve], "o-",
                 color=color, lw=2, label=f"{name} (lr {m['learning_rate']:g})")
        front.plot([c["kl_to_ref"] for c in curve], [c["accuracy"] for c in curve], "o-", color=color, lw=2,
                   label=name)
    if report["target_accuracy"] is not None:
        for ax in (acc, front):
            ax.axhline(report["target_accuracy"], color="black", ls=":", lw=1, label="target")
    acc.set(xlabel="seconds (Stage 2 steps, plus Stage 1 where there is one)", ylabel="report accuracy (greedy)")
    front.set(xlabel="KL(pi || pi_ref), nats", ylabel="report accuracy (greedy)",
              title="frontier: up and to the left is better")
    for ax in (acc, front):
        ax.grid(alpha=0.3)
    acc.legend(fontsize=8)
    seeds = len(next(iter(report["methods"].values()))["seeds"])
    fig.suptitle(f"A*-PO vs baselines, {report['settings']['batch_size']} prompts per step, {seeds} seed(s): "
                 "thin lines are seeds, thick their mean")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
