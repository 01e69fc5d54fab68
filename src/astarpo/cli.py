"""`astarpo values | train | eval | bench | report | quickstart`: every config field is a flag; --config FILE.yaml
sets many. Each command ends with a one-line summary on stderr; stdout keeps its result (path, JSON or table)."""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys
import typing
from pathlib import Path

from .bench import BenchError
from .bench.report import ReportError
from .config import BenchConfig, ConfigError, EvalConfig, ServeConfig, TrainConfig, ValuesConfig, build
from .data import DataError
from .distributed import StrategyError
from .launch import LayoutError, end_failed_process, finish, is_main_process
from .rewards import RewardError
from .rundir import OutputError
from .serve import ServerError
from .training.trainer import TrainError
from .values import ValuesError

COMMANDS = {
    "values": (ValuesConfig, "Stage 1: sample N responses per prompt from the reference model, store the rewards"),
    "train": (TrainConfig, "Stage 2: train the policy by regressing onto the optimal advantage"),
    "eval": (EvalConfig, "accuracy (greedy pass@1, avg@k) and KL to the reference on a prompt set"),
    "serve": (ServeConfig, "one vLLM engine in its own process, for launches run with --engine vllm --vllm-mode server "
                           "(and A*-PO's --async-lag)"),
    "bench": (BenchConfig, "A*-PO against GRPO, RLOO, REBEL and PPO on the default model and task: time, memory, "
                           "accuracy and KL side by side"),
}
# One-line errors for what the user can fix; anything else is a bug and keeps its traceback.
USER_ERRORS = (BenchError, ConfigError, DataError, LayoutError, OutputError, ReportError, RewardError, ServerError,
               StrategyError, TrainError, ValuesError, FileNotFoundError, KeyError)
log = logging.getLogger("astarpo")


def _add_fields(parser: argparse.ArgumentParser, cls: type) -> None:
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        flag = "--" + f.name.replace("_", "-")
        help_text = f"{f.metadata.get('help', '')} (default: {f.default})".strip()
        if hints[f.name] is bool:
            parser.add_argument(flag, dest=f.name, action=argparse.BooleanOptionalAction,
                                default=argparse.SUPPRESS, help=help_text)
        else:
            parser.add_argument(flag, dest=f.name, default=argparse.SUPPRESS, metavar=f.name.upper(), help=help_text)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="astarpo", description="A*-PO: policy optimization via optimal advantage "
                                                            "regression (arXiv 2505.20686)")
    sub = p.add_subparsers(dest="command", required=True)
    for name, (cls, help_text) in COMMANDS.items():
        sp = sub.add_parser(name, help=help_text, description=help_text)
        sp.add_argument("--config", help="YAML file of settings (flags override it)")
        _add_fields(sp, cls)
    qs = sub.add_parser("quickstart", help="the whole pipeline on the built-in default model and task")
    qs.add_argument("--output-dir", default="runs/quickstart")
    help_text = ("Markdown table (pass@1 per benchmark, KL, hours, memory) and plots from train runs, eval results "
                 "and bench results")
    rp = sub.add_parser("report", help=help_text, description=help_text)
    rp.add_argument("paths", nargs="+", metavar="RUN_OR_RESULT", help="train run directory (finished, running or "
                    "stopped), eval result JSON, or bench.json (or its folder)")
    rp.add_argument("--output-dir", default="runs/report", help="where report.md and the PNGs go")
    from .bench.plan import add_arguments as plan_arguments

    plan_arguments(sub.add_parser("plan", help="per-GPU memory of Stage 2 by component (DDP, FSDP2, ZeRO-2/3, "
                                                "LoRA), or with --time hours per method"))
    return p


def _eval_summary(result: dict, output: str) -> str:
    if "benchmarks" in result:
        seconds = sum(r["seconds"] for r in result["benchmarks"].values())
        metric = "pass@1" if all("avg_at_k" not in r for r in result["benchmarks"].values()) else \
            "pass@1 (avg@k where sampled)"
        return (f"eval: average {metric} {100 * result['average']:.1f}% over {len(result['benchmarks'])} "
                f"benchmark(s), {seconds:.0f} s -> {output}")
    extra = "".join(f", {name} {fmt.format(result[key])}" for name, key, fmt in (
        (f"avg@{result['k']}", "avg_at_k", "{:.1%}"), ("KL to ref", "kl_to_ref", "{:.3f}")) if key in result)
    return (f"eval: pass@1 {100 * result['accuracy']:.1f}% on {result['prompts']} prompts{extra}, "
            f"{result['seconds']:.0f} s -> {output}")


def main(argv: list[str] | None = None) -> int:
    args = vars(parser().parse_args(argv))
    logging.basicConfig(level=logging.INFO, format="astarpo: %(message)s")
    for noisy in ("httpx", "urllib3", "huggingface_hub", "accelerate"):  # accelerate: a line per file saved
        logging.getLogger(noisy).setLevel(logging.WARNING)
    command = args.pop("command")
    try:
        if command == "report":
            from .bench.report import report

            print(report(args["paths"], args["output_dir"]))
            return 0
        if command == "plan":
            from .bench import cost, plan

            print((cost.run if args["time"] else plan.run)(argparse.Namespace(**args)), end="")
            return 0
        if command == "quickstart":
            from .quickstart import quickstart

            summary = quickstart(args["output_dir"])
            print(json.dumps(summary, indent=1))
            return 0
        cfg = build(COMMANDS[command][0], args.pop("config", None), **args)
        if command == "values":
            from .values import compute_values

            out = compute_values(cfg)
            if is_main_process():  # one line under a multi-process launch, not one per process
                print(out)  # compute_values has logged its one-line summary
        elif command == "train":
            from .training.trainer import Trainer

            trainer = Trainer(cfg)
            metrics = trainer.train()
            if trainer.launch.is_main:
                print(json.dumps(metrics))
                from .bench.report import run_row, summary

                log.info("stage 2: %s -> %s", summary(run_row(Path(cfg.output_dir))), Path(cfg.output_dir) / "final")
        elif command == "serve":
            from .serve import serve

            serve(cfg)
        elif command == "bench":
            from .bench import bench, markdown

            print(markdown(bench(cfg)), end="")
        else:
            from .evaluate import markdown_table, run_eval

            result = run_eval(cfg)
            if is_main_process():  # every process has the whole result
                if cfg.benchmarks:
                    print(markdown_table(result), end="")
                else:
                    print(json.dumps({k: v for k, v in result.items() if k != "samples"}, indent=1))
                log.info(_eval_summary(result, cfg.output))
    except USER_ERRORS as e:
        msg = e.args[0] if isinstance(e, KeyError) and e.args else e
        print(f"astarpo: error: {msg}", file=sys.stderr)
        end_failed_process(2, traceback=False)  # under a launch: at once, so the launcher stops the others
        return 2
    except Exception:
        end_failed_process()  # under a launch: at once, with the traceback, so the launcher stops the others
        raise
    finish()  # under a multi-process launch: ends the process here, in a fixed order (why: its docstring)
    return 0


if __name__ == "__main__":
    sys.exit(main())
