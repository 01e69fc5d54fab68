"""External rows for `astarpo bench`: TRL's GRPOTrainer and experimental A2POTrainer on the same model, prompts,
reward, prompts per step, response cap, learning rate and KL coefficient as astarpo's own runs.

Run by the bench as ``python -m astarpo.bench.trl SPEC.json`` (one process per trainer, so its peak memory is its
own). It writes ``metrics.jsonl`` in the format of astarpo's trainer (step seconds from TRL's step callbacks, peak
memory, samples per step) and Hugging Face checkpoints every ``save_every`` steps, which the bench scores like
its own. TRL's Stage 1 (A2PO estimates V* in memory at the start of every run) is timed separately.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any

import torch

from .. import rewards
from ..data import format_prompt, load_records
from ..models import load_tokenizer
from ..utils import peak_memory_mb


def build(spec: dict[str, Any], callbacks: list[Any]) -> tuple[Any, int]:
    """TRL's trainer as ``spec`` says (keys: trainer, model_dir, output_dir, data, reward, train_prompts,
    batch_size, group_size, steps, save_every, max_new_tokens, learning_rate, beta, beta1, n, seed) and the
    number of samples it draws per step. benchmarks/sampling.py builds A2PO's here too, to time its Stage 1."""
    import datasets

    out = Path(spec["output_dir"])
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = load_tokenizer(spec["model_dir"])
    records = load_records(spec["data"], "train", spec["train_prompts"])
    dataset = datasets.Dataset.from_list([{"prompt": format_prompt(tokenizer, r["prompt"]), "answer": r["answer"]}
                                          for r in records])
    reward_fn = rewards.resolve(spec["reward"])[1]

    def reward(prompts: list[str], completions: list[str], **columns: Any) -> list[float]:
        return [float(x) for x in reward_fn(prompts, completions, **columns)]

    common = dict(output_dir=str(out / "trl"), max_steps=spec["steps"], learning_rate=spec["learning_rate"],
                  lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0, max_grad_norm=1.0,
                  logging_steps=1, save_strategy="steps", save_steps=spec["save_every"], report_to="none",
                  seed=spec["seed"], use_cpu=not torch.cuda.is_available(), gradient_accumulation_steps=1,
                  max_completion_length=spec["max_new_tokens"], temperature=1.0, top_p=1.0, bf16=False,
                  remove_unused_columns=False,
                  top_k=0)  # the whole distribution, as astarpo samples; A2PO's None would mean generate()'s 50
    if spec["trainer"] == "trl-grpo":
        from trl import GRPOConfig, GRPOTrainer

        samples = spec["batch_size"] * spec["group_size"]
        args = GRPOConfig(**common, per_device_train_batch_size=samples, num_generations=spec["group_size"],
                          beta=spec["beta"])
        trainer_cls = GRPOTrainer
    else:
        from trl.experimental.a2po import A2POConfig, A2POTrainer

        samples = spec["batch_size"]
        args = A2POConfig(**common, per_device_train_batch_size=samples, beta2=spec["beta"], beta1=spec["beta1"],
                          num_value_samples=spec["n"])
        trainer_cls = A2POTrainer
    trainer = trainer_cls(model=spec["model_dir"], reward_funcs=reward, args=args, train_dataset=dataset,
                          processing_class=tokenizer, callbacks=callbacks)
    return trainer, samples


def run(spec: dict[str, Any]) -> None:
    """Train with TRL as ``spec`` says (see :func:`build`), logging astarpo's metrics format."""
    from transformers import TrainerCallback

    out = Path(spec["output_dir"])
    samples = 0  # set by build() below, read by Timer at every step

    class Timer(TrainerCallback):
        """Per-step wall time and peak memory, in astarpo's metrics format."""

        def __init__(self) -> None:
            self.t0 = self.train_start = time.perf_counter()
            self.stage1_seconds: float | None = None

        def on_step_begin(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
            self.t0 = time.perf_counter()
            if self.stage1_seconds is None:  # everything before the first step: A2PO's Stage 1
                self.stage1_seconds = self.t0 - self.train_start

        def on_step_end(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
            line = {"step": state.global_step, "step_seconds": round(time.perf_counter() - self.t0, 3),
                    "samples": samples, "peak_memory_mb": round(peak_memory_mb(), 1)}
            with (out / "metrics.jsonl").open("a") as f:
                f.write(json.dumps(line) + "\n")

    timer = Timer()
    trainer, samples = build(spec, [timer])
    timer.train_start = time.perf_counter()
    trainer.train()
    if spec["trainer"] == "trl-a2po":
        (out / "stage1_seconds.json").write_text(json.dumps(timer.stage1_seconds))


if __name__ == "__main__":
    run(json.loads(Path(sys.argv[1]).read_text()))
