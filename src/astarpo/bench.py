"""`astarpo bench`: A*-PO next to GRPO, RLOO, REBEL and PPO on one model, task and prompts-per-step budget.

Every method trains with the same Stage 2 loop, recipe (the quickstart's: model, task, response cap, learning
rate) and number of prompts per step; only the objective differs, and with it the number of responses sampled per
prompt, the models held in memory (reference, critic) and the work per step. A*-PO also pays for Stage 1 once,
timed and shown on its own.

Methods run in segments of ``eval_every`` steps, round-robin (a rotating order), each segment a fresh process
that resumes from the method's last checkpoint: machine noise hits every method alike, and each process's peak
resident memory (or peak CUDA memory) belongs to one method only. After every segment the checkpoint is scored
here, outside the timed processes: greedy accuracy on held-out prompts and KL to the reference on responses
sampled at temperature 1. The report is a Markdown table, a PNG (accuracy and KL against training seconds) and a
JSON file with every raw figure, the machine and the versions.
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
import yaml

from . import __version__, rewards
from .config import QUICKSTART, SECTIONS, BenchConfig, TrainConfig, ValuesConfig, build, load_yaml
from .data import load_prompts
from .evaluate import evaluate
from .models import load_model, load_tokenizer, resolve_model
from .objectives import OBJECTIVES
from .rundir import check_same_settings, write_json_atomic


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


class _Scorer:
    """Held-out greedy accuracy and KL to the reference of a checkpoint, in this (untimed) process."""

    def __init__(self, recipe: TrainConfig, limit: int) -> None:
        self.recipe = recipe
        self.model_dir = resolve_model(recipe.model)
        self.tokenizer = load_tokenizer(self.model_dir)
        self.records, self.prompt_ids = load_prompts(self.tokenizer, recipe, recipe.eval_data, recipe.eval_split,
                                                     limit)
        self.ref = load_model(self.model_dir).eval()
        self.reward_fn = rewards.resolve(recipe.reward)[1]

    def __call__(self, model_dir: Path | None) -> dict[str, float]:
        torch.manual_seed(self.recipe.seed)  # the same KL samples for the same weights
        model = self.ref if model_dir is None else load_model(model_dir).eval()
        res = evaluate(model, self.tokenizer, self.records, self.prompt_ids, self.reward_fn,
                       max_new_tokens=self.recipe.max_new_tokens, ref_model=self.ref)
        return {"accuracy": res["accuracy"], "kl_to_ref": res["kl_to_ref"]}


def bench(cfg: BenchConfig) -> dict[str, Any]:
    """Run the comparison (resuming whatever a previous run of the same settings finished) and write the report."""
    from tqdm.auto import tqdm

    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    # External rows can be added to a finished benchmark: they do not change the others.
    settings = {k: v for k, v in asdict(cfg).items()
                if k not in ("output_dir", "json", "target_accuracy", "external")}
    check_same_settings(out / "bench_settings.json", settings, "choose another --output-dir or delete it")
    write_json_atomic(out / "bench_settings.json", settings)
    shared, stage1, stage2 = recipe(cfg)

    stage1_seconds: dict[str, float] = {}
    if "astarpo" in cfg.algo_names:
        values = out / "values.parquet"
        if not values.is_file():
            (out / "values.yaml").write_text(yaml.safe_dump({**shared, "n": stage1.n, "output": str(values)}))
            t0 = time.perf_counter()
            _run(["values", "--config", str(out / "values.yaml")], out / "values.log")
            write_json_atomic(out / "stage1_seconds.json", time.perf_counter() - t0)
        stage1_seconds["astarpo"] = json.loads((out / "stage1_seconds.json").read_text())
    for algo in cfg.algo_names:
        # Each method with its own coefficients' defaults (objectives.py cites them); A*-PO with the recipe's.
        train = {"algo": algo, "output_dir": str(out / algo), "batch_size": cfg.batch_size,
                 "micro_batch_size": stage2.micro_batch_size, "learning_rate": stage2.learning_rate,
                 "save_every": cfg.eval_every, "keep_checkpoints": 1}
        if algo == "astarpo":
            train.update(values=str(out / "values.parquet"), beta2=stage2.beta2)
        (out / f"{algo}.yaml").write_text(yaml.safe_dump({**shared, "train": train}))

    scorer = _Scorer(stage2, cfg.eval_limit)
    scores_file = out / "scores.json"
    scores: dict[str, dict[str, dict[str, float]]] = json.loads(scores_file.read_text()) if scores_file.is_file() \
        else {}
    if "base" not in scores:
        scores["base"] = {"0": scorer(None)}
    bar = tqdm(total=len(cfg.segments) * len(cfg.algo_names) + len(cfg.external_names), desc="bench",
               dynamic_ncols=True)
    for k, end in enumerate(cfg.segments):
        order = cfg.algo_names[k % len(cfg.algo_names):] + cfg.algo_names[: k % len(cfg.algo_names)]
        for algo in order:
            bar.set_postfix(method=algo, step=end)
            if str(end) not in scores.get(algo, {}):
                _run(["train", "--config", str(out / f"{algo}.yaml"), "--steps", str(end)], out / f"{algo}.log")
                ckpt = out / algo / "checkpoints" / f"step-{end:06d}"
                scores.setdefault(algo, {})[str(end)] = scorer(ckpt)
                write_json_atomic(scores_file, scores)  # read back on resume
            bar.update()
    for name in cfg.external_names:  # TRL's trainers: one whole run each, after the interleaved rounds
        bar.set_postfix(method=name, step=cfg.steps)
        if str(cfg.steps) not in scores.get(name, {}):
            shutil.rmtree(out / name, ignore_errors=True)  # an interrupted TRL run starts over
            spec = {"trainer": name, "model_dir": str(resolve_model(cfg.model)), "output_dir": str(out / name),
                    "data": stage2.data, "reward": stage2.reward, "train_prompts": cfg.train_prompts,
                    "batch_size": cfg.batch_size, "group_size": OBJECTIVES["grpo"].group_size, "steps": cfg.steps,
                    "save_every": cfg.eval_every, "max_new_tokens": stage2.max_new_tokens,
                    "learning_rate": stage2.learning_rate, "beta1": stage2.beta1,
                    "beta": stage2.beta2 if name == "trl-a2po" else TrainConfig(algo="grpo").coefficient,
                    "n": stage1.n, "seed": stage2.seed}
            (out / f"{name}.json").write_text(json.dumps(spec, indent=1))
            _run([str(out / f"{name}.json")], out / f"{name}.log", module="astarpo.bench_trl")
            scores[name] = {str(end): scorer(out / name / "trl" / f"checkpoint-{end}") for end in cfg.segments}
            write_json_atomic(scores_file, scores)  # read back on resume
        if (out / name / "stage1_seconds.json").is_file():
            stage1_seconds[name] = json.loads((out / name / "stage1_seconds.json").read_text())
        bar.update()
    bar.close()
    report = summarize(cfg, scores, stage1_seconds)
    (out / "bench.json").write_text(json.dumps(report, indent=1))
    if cfg.json:
        Path(cfg.json).write_text(json.dumps(report, indent=1))
    (out / "bench.md").write_text(markdown(report))
    plot(report, out / "bench.png")
    return report


def recipe(cfg: BenchConfig) -> tuple[dict[str, Any], ValuesConfig, TrainConfig]:
    """The quickstart's recipe on the bench's model and number of training prompts: its shared settings and the
    Stage 1 and Stage 2 configs they give; each method's own settings are added in :func:`bench`."""
    shared = {k: v for k, v in load_yaml(QUICKSTART).items() if k not in SECTIONS.values()}
    shared.update(model=cfg.model, limit=cfg.train_prompts, engine=cfg.engine)
    return shared, build(ValuesConfig, QUICKSTART, **shared), build(TrainConfig, QUICKSTART, **shared)


def summarize(cfg: BenchConfig, scores: dict[str, dict[str, dict[str, float]]], stage1_seconds: dict[str, float]
              ) -> dict[str, Any]:
    """Per method: step time, throughput, memory, the accuracy/KL curve against training seconds, time to target."""
    out = Path(cfg.output_dir)
    base = scores["base"]["0"]
    methods: dict[str, dict[str, Any]] = {}
    for algo in cfg.algo_names + cfg.external_names:
        steps = [json.loads(line) for line in (out / algo / "metrics.jsonl").read_text().splitlines()]
        steps = [m for m in steps if "step_seconds" in m][: cfg.steps]
        elapsed, curve = 0.0, [{"step": 0, "train_seconds": 0.0, **base}]
        for m in steps:
            elapsed += m["step_seconds"]
            if str(m["step"]) in scores[algo]:
                curve.append({"step": m["step"], "train_seconds": round(elapsed, 1), **scores[algo][str(m["step"])]})
        step_seconds = statistics.median(m["step_seconds"] for m in steps)
        methods[algo] = {
            "samples_per_step": steps[0]["samples"], "step_seconds": round(step_seconds, 3),
            "prompt_seconds": round(step_seconds / cfg.batch_size, 3),
            "generation_seconds": _median(steps, "generation_seconds"),  # TRL's rows do not report these
            "tokens_per_second": _median(steps, "tokens_per_second"),
            "peak_memory_mb": max(m["peak_memory_mb"] for m in steps),
            "stage1_seconds": round(stage1_seconds.get(algo, 0.0), 1),
            "train_seconds": round(elapsed, 1), "accuracy": curve[-1]["accuracy"], "kl_to_ref": curve[-1]["kl_to_ref"],
            "best_accuracy": max(c["accuracy"] for c in curve), "curve": curve,
        }
    best = max(m["best_accuracy"] for m in methods.values())
    target = cfg.target_accuracy  # default: halfway to the best, when some method improved at all
    if target is None and best > base["accuracy"]:
        target = round((base["accuracy"] + best) / 2, 3)
    for m in methods.values():
        reached = [c for c in m["curve"] if target is not None and c["accuracy"] >= target and c["step"] > 0]
        m["seconds_to_target"] = round(reached[0]["train_seconds"] + m["stage1_seconds"], 1) if reached else None
    if "astarpo" in methods:
        a = methods["astarpo"]
        for m in methods.values():
            m["astarpo_step_time_ratio"] = round(a["step_seconds"] / m["step_seconds"], 3)
            m["astarpo_memory_ratio"] = round(a["peak_memory_mb"] / m["peak_memory_mb"], 3)
            both = a["seconds_to_target"] is not None and m["seconds_to_target"] is not None
            m["astarpo_time_to_target_ratio"] = round(a["seconds_to_target"] / m["seconds_to_target"], 3) \
                if both else None
    _, stage1, stage2 = recipe(cfg)
    used = {k: getattr(stage2, k) for k in ("model", "data", "reward", "max_new_tokens", "temperature", "top_p",
                                            "seed", "learning_rate", "beta1", "beta2")} | {"stage1_n": stage1.n}
    return {"settings": {**asdict(cfg), "recipe": used},
            "machine": machine(), "seed": stage2.seed, "target_accuracy": target, "untrained": base,
            "methods": methods}


def _median(steps: list[dict[str, Any]], key: str) -> float | None:
    values = [m[key] for m in steps if key in m]
    return round(statistics.median(values), 3) if values else None


def _fmt(x: float | None, spec: str, none: str = "n/a") -> str:
    return none if x is None else f"{x:{spec}}"


def markdown(report: dict[str, Any]) -> str:
    methods = report["methods"]
    lines = [
        f"Untrained: held-out accuracy {report['untrained']['accuracy']:.0%}. "
        + (f"Target accuracy {report['target_accuracy']:.0%}. " if report["target_accuracy"] is not None
           else "No method improved on the untrained model, so there is no time to target. ")
        + "Ratios are A*-PO's figure divided by the method's (below 1: A*-PO needs less).", "",
        "| method | samples/step | s/step | s/prompt | tokens/s | peak memory MB | held-out acc (final / best) "
        "| KL to ref | s to target (incl. Stage 1) | step time ratio | memory ratio | time-to-target ratio |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, m in methods.items():
        lines.append(
            f"| {name} | {m['samples_per_step']} | {m['step_seconds']:.2f} | {m['prompt_seconds']:.2f} | "
            f"{_fmt(m['tokens_per_second'], '.0f')} | {m['peak_memory_mb']:.0f} | {m['accuracy']:.0%} / "
            f"{m['best_accuracy']:.0%} | {m['kl_to_ref']:.2f} | {_fmt(m['seconds_to_target'], '.0f', 'not reached')} | "
            f"{_fmt(m.get('astarpo_step_time_ratio'), '.2f')} | {_fmt(m.get('astarpo_memory_ratio'), '.2f')} | "
            f"{_fmt(m.get('astarpo_time_to_target_ratio'), '.2f', 'not reached')} |")
    for name, m in methods.items():
        if m["stage1_seconds"]:
            lines += ["", f"{name}'s Stage 1 took {m['stage1_seconds']:.0f} s (in its time to target, not its step "
                          "time)."]
    external = [name for name in methods if name.startswith("trl-")]
    if external:
        lines += ["", f"{', '.join(external)}: TRL's trainers on the same prompts, reward and budget, each run as one "
                      "process after the interleaved rounds; TRL does not report tokens/s per step."]
    return "\n".join(lines) + "\n"


def plot(report: dict[str, Any], path: Path) -> None:
    """Held-out accuracy and KL to the reference against training seconds (A*-PO's curve starts after Stage 1)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (acc, kl) = plt.subplots(1, 2, figsize=(11, 4))
    for name, m in report["methods"].items():
        x = [c["train_seconds"] + m["stage1_seconds"] for c in m["curve"]]
        acc.plot(x, [c["accuracy"] for c in m["curve"]], "o-", label=name)
        kl.plot(x, [c["kl_to_ref"] for c in m["curve"]], "o-", label=name)
        if name == "astarpo" and m["stage1_seconds"]:
            acc.axvspan(0, m["stage1_seconds"], color="grey", alpha=0.15, label="A*-PO Stage 1")
    if report["target_accuracy"] is not None:
        acc.axhline(report["target_accuracy"], color="black", ls=":", lw=1, label="target")
    xlabel = "seconds (Stage 2 steps, plus Stage 1 where there is one)"
    acc.set(xlabel=xlabel, ylabel="held-out accuracy (greedy)", ylim=(0, 1))
    kl.set(xlabel=xlabel, ylabel="KL(pi || pi_ref), nats")
    for ax in (acc, kl):
        ax.grid(alpha=0.3)
    acc.legend(fontsize=8)
    fig.suptitle(f"A*-PO vs baselines, {report['settings']['batch_size']} prompts per step")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
