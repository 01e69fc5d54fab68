"""Stage 1 samples/s and the Stage 2 step, Hugging Face generate against vLLM (float32, bfloat16) and TRL's A2PO.

vLLM needs its own environment on CPU (README), TRL lives in the main one, so every measurement is a fresh
process started by this driver with the right interpreter: the HF and TRL variants with this Python, the vLLM
ones with ``--vllm-python``. A process loads its model or starts its engine (timed: start-up), then draws the
same prompts' N samples once (timed: the draw; seeded alike). Repetitions are interleaved, the order turning
around every repetition, so load from other users of a shared machine hits every variant alike; the load
average is recorded before each process. End to end = start-up + draw.

Stage 2: a few A*-PO steps (the quickstart's settings, except the prompts per step and response cap below) with
each engine, float32 training; vLLM's log-prob gap to the training model per step (sampler_logp_diff) too.
Writes ``results/vllm_sampling.{md,json}``.

    PYTHONPATH=src python benchmarks/vllm_sampling.py --vllm-python /path/to/venv-vllm/bin/python --reps 2
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

STAGE1 = ("hf", "trl_a2po", "vllm_fp32", "vllm_bf16")
STAGE2 = ("hf", "vllm_fp32", "vllm_bf16")


def load_average() -> float:
    return os.getloadavg()[0]


# ----- worker side: one measurement in this process ---------------------------------------------------------------
def stage1_worker(variant: str, args: argparse.Namespace) -> dict[str, Any]:
    import torch

    from astarpo import rewards
    from astarpo.config import ValuesConfig
    from astarpo.data import load_prompts
    from astarpo.generation import SamplingParams, collect
    from astarpo.models import load_tokenizer, resolve_model

    model_dir = resolve_model(args.model)
    cfg = ValuesConfig(model=str(model_dir), limit=args.prompts, n=args.n, max_new_tokens=args.max_new_tokens,
                       engine="vllm" if variant.startswith("vllm") else "hf",
                       vllm_dtype="bfloat16" if variant == "vllm_bf16" else None)
    tok = load_tokenizer(model_dir)
    records, prompt_ids = load_prompts(tok, cfg)
    reward = rewards.get("arithmetic")
    t0 = time.perf_counter()
    if variant == "trl_a2po":
        from astarpo.bench.trl import build

        spec = {"trainer": "trl-a2po", "model_dir": str(model_dir), "output_dir": tempfile.mkdtemp(),
                "data": "arithmetic", "reward": "arithmetic", "train_prompts": args.prompts, "batch_size": 8,
                "group_size": 1, "steps": 1, "save_every": 10**6, "max_new_tokens": args.max_new_tokens,
                "learning_rate": 1e-6, "beta": 1e-3, "beta1": 0.5, "n": args.n, "seed": 0}
        trainer, _ = build(spec, [])
        got: list[float] = []
        inner = trainer.reward_funcs[0]

        def recording(prompts: list[str], completions: list[str], **columns: Any) -> list[float]:
            out = inner(prompts, completions, **columns)
            got.extend(out)
            return out

        trainer.reward_funcs[0] = recording
        startup = time.perf_counter() - t0
        torch.manual_seed(0)
        t1 = time.perf_counter()
        trainer._estimate_optimal_values()
        draw = time.perf_counter() - t1
        return {"startup_s": startup, "draw_s": draw, "samples": len(got), "tokens": None,
                "mean_reward": sum(got) / len(got)}
    from astarpo.models import load_model
    from astarpo.samplers import make_sampler

    model = None if cfg.engine == "vllm" else load_model(model_dir)
    sampler = make_sampler(cfg, model_dir, tok, model)
    startup = time.perf_counter() - t0
    torch.manual_seed(0)
    t1 = time.perf_counter()
    roll = collect(sampler, records, prompt_ids, args.n, SamplingParams(1.0, 1.0, args.max_new_tokens), reward)
    draw = time.perf_counter() - t1
    return {"startup_s": startup, "draw_s": draw, "samples": len(roll), "tokens": sum(roll.lengths),
            "mean_reward": sum(roll.rewards) / len(roll)}


def stage2_worker(variant: str, args: argparse.Namespace) -> dict[str, Any]:
    from astarpo import TrainConfig, Trainer, ValuesConfig, compute_values
    from astarpo.models import resolve_model

    work = Path(tempfile.mkdtemp(prefix="astarpo-vllm-bench-"))
    common = dict(model=str(resolve_model(args.model)), limit=args.stage2_prompts * args.steps,
                  max_new_tokens=args.max_new_tokens, engine="vllm" if variant.startswith("vllm") else "hf",
                  vllm_dtype="bfloat16" if variant == "vllm_bf16" else None)
    values = compute_values(ValuesConfig(**common, n=2, output=str(work / "values.parquet")))
    t0 = time.perf_counter()
    trainer = Trainer(TrainConfig(**common, values=str(values), batch_size=args.stage2_prompts, steps=args.steps,
                                  micro_batch_size=16, learning_rate=1e-5, filter_unsolved=False,
                                  save_every=10**6, output_dir=str(work / "run")))
    startup = time.perf_counter() - t0  # the engine is already up (Stage 1 above): model loads only
    trainer.train()
    metrics = [json.loads(x) for x in (work / "run" / "metrics.jsonl").read_text().splitlines()]
    keep = ("step_seconds", "generation_seconds", "reward", "sampler_logp_diff", "sampler_logp_diff_max",
            "response_length")
    return {"startup_s": startup, "steps": [{k: m[k] for k in keep if k in m} for m in metrics]}


# ----- driver side ---------------------------------------------------------------------------------------------------
def run_worker(python: str, stage: int, variant: str, args: argparse.Namespace) -> dict[str, Any]:
    out = Path(tempfile.mkstemp(suffix=".json")[1])
    cmd = [python, __file__, "--worker", f"{stage}:{variant}", "--worker-out", str(out), "--model", args.model,
           "--prompts", str(args.prompts), "--n", str(args.n), "--max-new-tokens", str(args.max_new_tokens),
           "--steps", str(args.steps), "--stage2-prompts", str(args.stage2_prompts)]
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1] / "src")}
    load = load_average()
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{stage}:{variant} failed:\n{proc.stderr[-3000:]}")
    res = json.loads(out.read_text())
    out.unlink()
    return {**res, "load_before": load, "process_s": time.perf_counter() - t0}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--prompts", type=int, default=32)
    ap.add_argument("--n", type=int, default=8)
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--steps", type=int, default=4, help="Stage 2 steps per engine")
    ap.add_argument("--stage2-prompts", type=int, default=32, help="Stage 2 prompts per step")
    ap.add_argument("--vllm-python", default=sys.executable, help="interpreter of the environment with vLLM")
    ap.add_argument("--stage1", default=",".join(STAGE1))
    ap.add_argument("--stage2", default=",".join(STAGE2))
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "vllm_sampling"))
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--worker-out", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        stage, variant = args.worker.split(":")
        res = (stage1_worker if stage == "1" else stage2_worker)(variant, args)
        Path(args.worker_out).write_text(json.dumps(res))
        return

    python = {v: args.vllm_python if v.startswith("vllm") else sys.executable for v in STAGE1 + STAGE2}
    stage1 = [v for v in args.stage1.split(",") if v]
    stage2 = [v for v in args.stage2.split(",") if v]
    runs: dict[str, list[dict]] = {v: [] for v in stage1}
    steps: dict[str, dict] = {}
    for rep in range(args.reps):
        for v in stage1 if rep % 2 == 0 else stage1[::-1]:
            r = run_worker(python[v], 1, v, args)
            runs[v].append(r)
            print(f"rep {rep} {v:10s} start-up {r['startup_s']:6.1f} s  draw {r['draw_s']:6.1f} s  "
                  f"{r['samples'] / r['draw_s']:6.2f} samples/s  load {r['load_before']:.1f}", flush=True)
            write(args, runs, steps)
    for v in stage2:
        steps[v] = run_worker(python[v], 2, v, args)
        print(v, json.dumps(steps[v]), flush=True)
        write(args, runs, steps)
    print(Path(args.out).with_suffix(".md").read_text())


def write(args: argparse.Namespace, runs: dict[str, list[dict]], steps: dict[str, dict]) -> None:
    summary = {}
    for v, rs in runs.items():
        if not rs:
            continue
        summary[v] = {"startup_s": statistics.median(r["startup_s"] for r in rs),
                      "draw_s": statistics.median(r["draw_s"] for r in rs),
                      "samples_per_s": statistics.median(r["samples"] / r["draw_s"] for r in rs),
                      "end_to_end_samples_per_s": statistics.median(r["samples"] / (r["startup_s"] + r["draw_s"])
                                                                    for r in rs),
                      "mean_reward": statistics.mean(r["mean_reward"] for r in rs),
                      "loads": [round(r["load_before"], 2) for r in rs], "runs": rs}
    trl = summary.get("trl_a2po")
    for s in summary.values():
        if trl:
            s["x_trl"] = s["samples_per_s"] / trl["samples_per_s"]
            s["x_trl_end_to_end"] = s["end_to_end_samples_per_s"] / trl["end_to_end_samples_per_s"]
    stage2 = {}
    for v, r in steps.items():
        later = r["steps"][1:] or r["steps"]
        stage2[v] = {"step_s": statistics.median(m["step_seconds"] for m in later),
                     "generation_s": statistics.median(m["generation_seconds"] for m in later),
                     "sampler_logp_diff": [m.get("sampler_logp_diff") for m in r["steps"]],
                     "sampler_logp_diff_max": [m.get("sampler_logp_diff_max") for m in r["steps"]],
                     "reward": [m["reward"] for m in r["steps"]], "load_before": r["load_before"]}
    result = {"machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
                         f"{platform.platform()}",
              "settings": {k: v for k, v in vars(args).items() if not k.startswith("worker") and k != "out"},
              "stage1": summary, "stage2": stage2}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(result, indent=1))
    lines = ["# Stage 1 and the Stage 2 step: HF generate, vLLM (CPU build), TRL's A2PO", "",
             f"Model {args.model}, {args.prompts} arithmetic prompts x N={args.n}, up to {args.max_new_tokens} new "
             f"tokens, temperature 1; {args.reps} interleaved repetitions, one fresh process each. "
             f"Machine: {result['machine']}.", "",
             "| Stage 1 | start-up s | draw s | samples/s | x TRL | end-to-end samples/s | x TRL end to end | "
             "mean reward | load avg before |", "|---|---|---|---|---|---|---|---|---|"]
    for v, s in summary.items():
        lines.append(f"| {v} | {s['startup_s']:.1f} | {s['draw_s']:.1f} | {s['samples_per_s']:.2f} | "
                     f"{s.get('x_trl', float('nan')):.2f} | {s['end_to_end_samples_per_s']:.2f} | "
                     f"{s.get('x_trl_end_to_end', float('nan')):.2f} | {s['mean_reward']:.3f} | "
                     f"{', '.join(map(str, s['loads']))} |")
    if stage2:
        lines += ["", f"Stage 2 (A*-PO, {args.stage2_prompts} prompts per step, float32 training), median of steps "
                  f"2-{args.steps}:", "", "| engine | s/step | of which generation s | sampler_logp_diff per step "
                  "(mean, nats/sequence) | max | load avg before |", "|---|---|---|---|---|---|"]
        for v, s in stage2.items():
            fmt = ", ".join("n/a" if x is None else f"{x:.2g}" for x in s["sampler_logp_diff"])
            fmx = ", ".join("n/a" if x is None else f"{x:.2g}" for x in s["sampler_logp_diff_max"])
            lines.append(f"| {v} | {s['step_s']:.2f} | {s['generation_s']:.2f} | {fmt} | {fmx} | "
                         f"{s['load_before']:.1f} |")
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
