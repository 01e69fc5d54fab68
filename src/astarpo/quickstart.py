"""`astarpo quickstart`: the whole pipeline on SmolLM2-135M-Instruct and the arithmetic task, on a laptop CPU.

Stage 1 values -> Stage 2 training (held-out greedy accuracy measured along the way) -> final evaluation
with KL to the reference -> ``summary.json`` and ``progress.png`` in the run directory. The recipe is the YAML
file ``astarpo/configs/quickstart.yaml``, read like any other ``--config`` file.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from .config import QUICKSTART, TrainConfig, ValuesConfig, build
from .evaluate import evaluate
from .training.trainer import Trainer
from .utils import peak_memory_mb
from .values import compute_values


def quickstart(output_dir: str = "runs/quickstart") -> dict[str, Any]:
    """Run the recipe in ``configs/quickstart.yaml`` (inside the package) end to end into ``output_dir``."""
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    stage1 = build(ValuesConfig, QUICKSTART, output=str(out / "values.parquet"))
    values_path = compute_values(stage1)
    stage1_seconds = time.perf_counter() - t0

    t1 = time.perf_counter()
    trainer = Trainer(build(TrainConfig, QUICKSTART, values=str(values_path), output_dir=str(out / "train")))
    trainer.train()
    stage2_seconds = time.perf_counter() - t1

    final = evaluate(trainer.accelerator.unwrap_model(trainer.policy), trainer.tokenizer, trainer.eval_records,
                     trainer.eval_prompt_ids, trainer.reward_fn, temperature=trainer.cfg.temperature,
                     max_new_tokens=trainer.cfg.max_new_tokens, ref_model=trainer.ref)
    metrics = [json.loads(line) for line in (out / "train" / "metrics.jsonl").read_text().splitlines()]
    evals = [m for m in metrics if "eval_accuracy" in m]
    summary = {
        "model": stage1.model, "task": stage1.data, "train_prompts": len(trainer.records),
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
