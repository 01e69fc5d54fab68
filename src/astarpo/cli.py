"""`astarpo values | train | eval | bench | quickstart`: every config field is a flag; --config FILE.yaml sets many."""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys
import typing

from .bench import BenchError
from .config import BenchConfig, ConfigError, EvalConfig, TrainConfig, ValuesConfig, build
from .data import DataError
from .rewards import RewardError
from .rundir import OutputError
from .trainer import TrainError
from .values import ValuesError

COMMANDS = {
    "values": (ValuesConfig, "Stage 1: sample N responses per prompt from the reference model, store the rewards"),
    "train": (TrainConfig, "Stage 2: train the policy by regressing onto the optimal advantage"),
    "eval": (EvalConfig, "accuracy (greedy pass@1, avg@k) and KL to the reference on a prompt set"),
    "bench": (BenchConfig, "A*-PO against GRPO, RLOO, REBEL and PPO on the default model and task: time, memory, "
                           "accuracy and KL side by side"),
}
# One-line errors for what the user can fix; anything else is a bug and keeps its traceback.
USER_ERRORS = (BenchError, ConfigError, DataError, OutputError, RewardError, TrainError, ValuesError,
               FileNotFoundError, KeyError)


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
    from .plan import add_arguments as plan_arguments

    plan_arguments(sub.add_parser("plan", help="per-GPU memory of Stage 2 by component: DDP, FSDP2, ZeRO-2/3, LoRA"))
    return p


def main(argv: list[str] | None = None) -> int:
    args = vars(parser().parse_args(argv))
    logging.basicConfig(level=logging.INFO, format="astarpo: %(message)s")
    for noisy in ("httpx", "urllib3", "huggingface_hub"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    command = args.pop("command")
    try:
        if command == "plan":
            from .plan import run

            print(run(argparse.Namespace(**args)), end="")
            return 0
        if command == "quickstart":
            from .quickstart import quickstart

            summary = quickstart(args["output_dir"])
            print(json.dumps(summary, indent=1))
            return 0
        cfg = build(COMMANDS[command][0], args.pop("config", None), **args)
        if command == "values":
            from accelerate import PartialState

            from .values import compute_values

            out = compute_values(cfg)
            if PartialState().is_main_process:  # one line under a multi-process launch, not one per process
                print(out)
        elif command == "train":
            from .trainer import Trainer

            trainer = Trainer(cfg)
            metrics = trainer.train()
            if trainer.accelerator.is_main_process:
                print(json.dumps(metrics))
        elif command == "bench":
            from .bench import bench, markdown

            print(markdown(bench(cfg)), end="")
        else:
            from .evaluate import markdown_table, run_eval

            result = run_eval(cfg)
            if cfg.benchmarks:
                print(markdown_table(result), end="")
            else:
                print(json.dumps({k: v for k, v in result.items() if k != "samples"}, indent=1))
    except USER_ERRORS as e:
        msg = e.args[0] if isinstance(e, KeyError) and e.args else e
        print(f"astarpo: error: {msg}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
