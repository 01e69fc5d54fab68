"""Stage 2 on one CUDA GPU under every strategy the trainer runs, and peak memory against ``astarpo plan``.

CI has no GPU, so this is where what the CPU tests cannot reach gets exercised: CUDA and NCCL, bf16 autocast,
accelerate's own FSDP2 path (on CPUs astarpo bridges it), DeepSpeed's CUDA engine. Each strategy runs one process
(one GPU), launched with the shipped accelerate config, a few A*-PO steps of SmolLM2-1.7B's shape (randomly
initialised: no model hub here; SmolLM2's tokenizer from ``--tokenizer``) in float32 weights with bf16 autocast
and gradient checkpointing. The Stage 1 file gets varied rewards (a random model earns none) so that updates are
not zero. Writes ``<out>.json`` and ``<out>.md``.

    PYTHONPATH=src python benchmarks/sharded_gpu.py --tokenizer DIR --out benchmarks/results/sharded_gpu
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import torch

from astarpo.bench.plan import plan, shape_of
from astarpo.config import TrainConfig
from astarpo.data import load_prompts
from astarpo.models import load_tokenizer

ROOT = Path(__file__).resolve().parents[1]
SHAPE = dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=24, num_attention_heads=32,
             num_key_value_heads=32, vocab_size=49152, tie_word_embeddings=True, max_position_embeddings=2048,
             rope_theta=130000.0, bos_token_id=1, eos_token_id=2, pad_token_id=2)  # SmolLM2-1.7B
STEPS, BATCH, MICRO, RESPONSE = 4, 16, 4, 128


def build_model(directory: Path, tokenizer: Path) -> None:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    with torch.device("cuda"):
        model = LlamaForCausalLM(LlamaConfig(**SHAPE)).to(torch.bfloat16)
    model.save_pretrained(directory)
    for f in tokenizer.iterdir():
        if f.name.startswith(("tokenizer", "special_tokens", "chat_template")):
            shutil.copy(f, directory / f.name)
    del model
    torch.cuda.empty_cache()


def run(cmd: list[str], cwd: Path, log: Path) -> float:
    t0 = time.perf_counter()
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")])}
    with log.open("w") as f:
        proc = subprocess.run(cmd, cwd=cwd, env=env, stdout=f, stderr=subprocess.STDOUT)
    if proc.returncode != 0:
        print(log.read_text()[-4000:], file=sys.stderr)
        raise SystemExit(f"failed: {' '.join(cmd)}")
    return time.perf_counter() - t0


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--tokenizer", type=Path, required=True)
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "sharded_gpu")
    p.add_argument("--work", type=Path, default=Path("/tmp/astarpo-sharded-gpu"))
    p.add_argument("--strategies", default="single,fsdp2,zero3,zero2")
    a = p.parse_args()
    work, model = a.work, a.work / "model"
    work.mkdir(parents=True, exist_ok=True)
    if not (model / "config.json").exists():
        build_model(model, a.tokenizer)
    common = ["--model", str(model), "--limit", "64", "--max-new-tokens", str(RESPONSE)]
    values = work / "values.parquet"
    if not values.exists():
        run([sys.executable, "-m", "astarpo", "values", *common, "--n", "2", "--dtype", "bfloat16",
             "--output", str(values)], work, work / "values.log")
        table = pq.read_table(values)
        varied = pa.array([[(i % 5) / 4, 0.0] for i in range(table.num_rows)], pa.list_(pa.float64()))
        pq.write_table(table.set_column(table.column_names.index("rewards"), "rewards", varied), values)
    train = ["train", *common, "--values", str(values), "--no-filter-unsolved", "--batch-size", str(BATCH),
             "--micro-batch-size", str(MICRO), "--mixed-precision", "bf16", "--gradient-checkpointing",
             "--learning-rate", "1e-5", "--steps", str(STEPS), "--save-every", str(STEPS)]
    _, prompt_ids = load_prompts(load_tokenizer(model), TrainConfig(model=str(model), limit=64))
    prompt_tokens = max(map(len, prompt_ids))
    rows = []
    for strategy in a.strategies.split(","):
        out = work / f"run-{strategy}"
        shutil.rmtree(out, ignore_errors=True)
        if strategy == "single":
            cmd = [sys.executable, "-m", "astarpo", *train, "--output-dir", str(out)]
        else:
            config = ROOT / "configs" / "accelerate" / f"{strategy}_1node_8gpu.yaml"
            cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(config),
                   "--num_processes", "1", "-m", "astarpo", *train, "--output-dir", str(out)]
        wall = run(cmd, work, work / f"{strategy}.log")
        metrics = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
        predicted = plan(shape_of(str(model)), 1, "ddp" if strategy == "single" else strategy, micro_batch=MICRO,
                         prompt_tokens=prompt_tokens, response_tokens=RESPONSE, batch=BATCH,
                         generation_batch=64)["peak"] / 2**30
        measured = max(m["peak_memory_mb"] for m in metrics) / 1024
        rows.append({"strategy": strategy, "steps": len(metrics), "wall_seconds": round(wall, 1),
                     "step_seconds_last": metrics[-1]["step_seconds"],
                     "generation_seconds_last": metrics[-1]["generation_seconds"],
                     "loss": [round(m["loss"], 5) for m in metrics], "kl_last": metrics[-1].get("kl"),
                     "peak_gib_measured": round(measured, 2), "peak_gib_plan": round(predicted, 2),
                     "plan_over_measured": round(predicted / measured, 3),
                     "final_files": sorted(f.name for f in (out / "final").iterdir())})
        print(json.dumps(rows[-1]), flush=True)
        shutil.rmtree(out)  # a 1.7B checkpoint with AdamW state is about 20 GB
    device = torch.cuda.get_device_name()
    result = {"device": device, "torch": torch.__version__, "shape": SHAPE, "steps": STEPS, "batch": BATCH,
              "micro_batch": MICRO, "response_tokens": RESPONSE, "prompt_tokens_max": prompt_tokens, "rows": rows}
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.with_suffix(".json").write_text(json.dumps(result, indent=1) + "\n")
    lines = [f"# Stage 2 on one GPU under each strategy ({device})", "",
             f"SmolLM2-1.7B shape (random weights), float32 weights + bf16 autocast, gradient checkpointing, batch "
             f"{BATCH}, micro-batch {MICRO}, {RESPONSE} response tokens, {STEPS} A*-PO steps, one process each.", "",
             "| strategy | step s (last) | generation s | peak GiB measured | `astarpo plan` GiB | plan / measured |",
             "|---|---|---|---|---|---|"]
    lines += [f"| {r['strategy']} | {r['step_seconds_last']} | {r['generation_seconds_last']} | "
              f"{r['peak_gib_measured']} | {r['peak_gib_plan']} | {r['plan_over_measured']} |" for r in rows]
    a.out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
