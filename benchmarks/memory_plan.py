"""The memory formula of ``astarpo plan`` against measured allocations, and the Qwen2.5 tables it gives.

Each case trains a randomly initialised Qwen2-layout model on this CPU the way Stage 2 does on one process
(``astarpo.bench.plan.measure``: float32 weights, bf16 autocast, frozen reference, foreach AdamW, two micro-batches
per step, chunked log-probs) and records every tensor storage that torch allocates in the last step. Peak RSS would
also count the Python/torch baseline, the allocator's cached free blocks and the model-building garbage, so the
measurement is of tensor bytes, which is what a GPU's ``max_memory_allocated`` reports. Writes
``results/memory_plan.{md,json}``.

    PYTHONPATH=src python benchmarks/memory_plan.py
"""

from __future__ import annotations

import json
import platform
import time
from pathlib import Path

import torch

from astarpo.bench.plan import QWEN25, Shape, measure, plan, table

CASES = [  # (name, shape, micro-batch, prompt tokens, response tokens)
    ("tiny (H 128, 2 layers, V 2048)", Shape(128, 2, 4, 2, 344, 2048, tied=True, qkv_bias=True), 4, 32, 96),
    ("small (H 512, 4 layers, V 16384)", Shape(512, 4, 8, 2, 1376, 16384, tied=True, qkv_bias=True), 4, 64, 192),
    ("SmolLM2-135M shape, untied (H 576, 30 layers, V 49152)", Shape(576, 30, 9, 3, 1536, 49152, tied=False,
                                                                 qkv_bias=True), 2,
     64, 192),
]
KEYS = ("weights", "gradients", "optimizer", "reference", "micro_batch", "optimizer_step", "peak")
MIB = 2**20


def main() -> None:
    torch.set_num_threads(2)
    rows, raw = [], []
    for name, s, micro, prompt, response in CASES:
        for ckpt in (False, True):
            t0 = time.perf_counter()
            got = measure(s, micro, prompt, response, ckpt)
            want = plan(s, 1, "ddp", micro, prompt, response, ckpt, generation_batch=0)
            raw.append({"case": name, "shape": s.__dict__, "micro_batch": micro, "prompt_tokens": prompt,
                        "response_tokens": response, "gradient_checkpointing": ckpt, "measured": got,
                        "formula": {k: want[k] for k in KEYS}, "seconds": time.perf_counter() - t0})
            rows.append(f"| {name} | {micro} x ({prompt}+{response}) | {'yes' if ckpt else 'no'} | " + " | ".join(
                f"{want[k] / MIB:.1f} / {got[k] / MIB:.1f}" for k in KEYS) + " | "
                + f"{100 * (want['peak'] / got['peak'] - 1):+.1f}% |")
            print(rows[-1], flush=True)
    md = ["# Memory formula against measurement", "",
          "`python benchmarks/memory_plan.py` on " + f"{platform.processor() or platform.machine()}, torch "
          f"{torch.__version__}: one process, float32 weights, bf16 autocast, frozen float32 reference, foreach "
          "AdamW, 2 micro-batches per step, chunked log-probs. MiB, formula / measured (all tensor storages "
          "allocated by torch ops in the last step, plus the states present before it).", "",
          "| model | micro-batch | checkpointing | " + " | ".join(KEYS) + " | peak: formula vs measured |",
          "|---" * (len(KEYS) + 4) + "|", *rows, "",
          "# Per-GPU plan for the paper's settings", "",
          "8 GPUs, 256 prompt + 1024 response tokens, micro-batch as in `configs/*.yaml`, batch 256 prompts "
          "(32 sequences generated per GPU), bf16, gradient checkpointing, chunked log-probs.", ""]
    for name, micro in (("qwen2.5-1.5b", 8), ("qwen2.5-3b", 4), ("qwen2.5-7b", 2)):
        md += [table(name, 8, micro_batch=micro), table(name, 8, micro_batch=micro, lora_rank=64)]
    out = Path(__file__).parent / "results"
    (out / "memory_plan.md").write_text("\n".join(md))
    (out / "memory_plan.json").write_text(json.dumps({"cases": raw, "qwen25": {k: v.__dict__ for k, v in
                                                                                QWEN25.items()}}, indent=1))


if __name__ == "__main__":
    main()
