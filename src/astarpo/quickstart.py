"""`astarpo quickstart`: the whole pipeline on SmolLM2-135M-Instruct and the arithmetic task, on a laptop CPU.

Stage 1 values -> Stage 2 training (held-out greedy accuracy measured along the way) -> final evaluation
with KL to the reference -> ``summary.json`` and ``progress.png`` in the run directory.

The recipe departs from the paper's GPU defaults where a 2-core CPU and a few minutes demand it: short
responses, small batches, and a learning rate suited to full fine-tuning of a 135M model with few steps.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from .config import TrainConfig, ValuesConfig
from .evaluate import evaluate
from .models import DEFAULT_MODEL
from .trainer import Trainer, peak_memory_mb
from .values import compute_values

RECIPE: dict[str, Any] = {
    "model": DEFAULT_MODEL, "data": "arithmetic", "reward": "arithmetic", "max_new_tokens": 16,
    "temperature": 1.0, "top_p": 1.0, "seed": 0,
}
STAGE1: dict[str, Any] = {"n": 8, "limit": 160}
STAGE2: dict[str, Any] = {"beta1": 0.5, "beta2": 1e-3, "learning_rate": 1e-5, "batch_size": 32, "steps": 12,
                          "micro_batch_size": 16, "eval_data": "arithmetic", "eval_limit": 100, "eval_every": 4,
                          "save_every": 6, "limit": 160}


def quickstart(output_dir: str = "runs/quickstart") -> dict[str, Any]:
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    values_path = compute_values(ValuesConfig(**RECIPE, **STAGE1, output=str(out / "values.parquet")))
    stage1_seconds = time.perf_counter() - t0

    t1 = time.perf_counter()
    trainer = Trainer(TrainConfig(**RECIPE, **STAGE2, values=str(values_path), output_dir=str(out / "train")))
    trainer.train()
    stage2_seconds = time.perf_counter() - t1

    final = evaluate(trainer.accelerator.unwrap_model(trainer.policy), trainer.tokenizer, trainer.eval_records,
                     trainer.eval_prompt_ids, trainer.reward_fn, temperature=RECIPE["temperature"],
                     max_new_tokens=RECIPE["max_new_tokens"], ref_model=trainer.ref)
    metrics = [json.loads(line) for line in (out / "train" / "metrics.jsonl").read_text().splitlines()]
    evals = [m for m in metrics if "eval_accuracy" in m]
    summary = {
        "model": RECIPE["model"], "task": RECIPE["data"], "train_prompts": len(trainer.records),
        "unsolved_dropped": trainer.unsolved_dropped, "eval_prompts": len(trainer.eval_records),
        "steps": trainer.steps, "accuracy_before": evals[0]["eval_accuracy"], "accuracy_after": final["accuracy"],
        "kl_to_ref": final["kl_to_ref"], "stage1_seconds": round(stage1_seconds, 1),
        "stage2_seconds": round(stage2_seconds, 1), "total_seconds": round(time.perf_counter() - t0, 1),
        "peak_memory_mb": round(peak_memory_mb(), 1), "final_model": str(out / "train" / "final"),
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    plot(metrics, out / "progress.png")
    return summary


def plot(metrics: list[dict[str, Any]], path: Path) -> None:
    """Training reward and held-out accuracy against step, one PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train = [m for m in metrics if "reward" in m]
    evals = [m for m in metrics if "eval_accuracy" in m]
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot([m["step"] for m in train], [m["reward"] for m in train], alpha=0.5, label="training reward (batch mean)")
    ax.plot([m["step"] for m in evals], [m["eval_accuracy"] for m in evals], "o-", label="held-out accuracy (greedy)")
    ax.set_xlabel("step")
    ax.set_ylim(0, 1)
    ax.grid(alpha=0.3)
    ax.legend()
    ax.set_title("A*-PO quickstart")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
