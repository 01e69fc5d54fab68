"""Asynchronous A*-PO through `astarpo serve` against the colocated loop, side by side in one run (issue #29).

The recipe is `astarpo bench --paper-regime`'s A*-PO (the quickstart's SmolLM2-135M-Instruct on the arithmetic
task, 16 training prompts in batches of 8 for 16 steps, responses up to 24 tokens, learning rate 1e-5, vLLM in
float32, eager), after one Stage 1 that every run shares. Per seed:

- ``colocated``: one process with its vLLM engine inside it, both cores: sampling and training alternate;
- ``server K`` for K = 0, 1, 2: `astarpo serve` pinned to core 0 and the trainer pinned to core 1 (one thread each;
  vLLM's CPU build binds every core unless told otherwise: ``VLLM_CPU_OMP_THREADS_BIND``), with ``--async-lag K``.

Reported per variant: the mean seconds per step and the whole Stage 2 run's wall-clock (model loading and the
engine's start excluded: the trainer's own step times summed), the largest lag, and the final held-out greedy
accuracy (the first ``--eval-limit`` test problems, scored by the run's own engine) over the seeds. A run whose
``final/`` exists is not run again, so a killed benchmark resumes where it stopped.

    ~/.cache/astarpo/venv-vllm-cpu/bin/python benchmarks/async_server.py --out benchmarks/results/async_server
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
from astarpo.config import QUICKSTART  # noqa: E402

RECIPE = ["--config", str(QUICKSTART), "--limit", "16", "--max-new-tokens", "24"]
ENGINE = ["--engine", "vllm", "--vllm-enforce-eager", "--vllm-kv-cache-gb", "1"]
TRAIN = ["--batch-size", "8", "--micro-batch-size", "8", "--steps", "16", "--learning-rate", "1e-5",
         "--save-every", "16", "--eval-every", "0"]
LIMIT_S = 1800


def _env(cores: str, threads: int) -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(ROOT / "src"), "OMP_NUM_THREADS": str(threads),
            "VLLM_CPU_OMP_THREADS_BIND": cores, "TOKENIZERS_PARALLELISM": "false"}


def _pinned(cores: set[int]):
    return lambda: os.sched_setaffinity(0, cores)


def _run(args: list[str], work: Path, cores: str, threads: int, log: Path) -> None:
    first, _, last = cores.partition("-")
    cpus = set(range(int(first), int(last or first) + 1))
    with log.open("w") as f:
        proc = subprocess.run([sys.executable, "-m", "astarpo", *args], cwd=work, env=_env(cores, threads),
                              stdout=f, stderr=subprocess.STDOUT, preexec_fn=_pinned(cpus), timeout=LIMIT_S)
    if proc.returncode:
        sys.exit(f"`astarpo {' '.join(args[:1])}` failed; its log: {log}")


def _serve(work: Path, port: int) -> subprocess.Popen:
    log = (work / "server.log").open("w")
    proc = subprocess.Popen([sys.executable, "-m", "astarpo", "serve", "--model", "smollm2-135m-instruct",
                             "--port", str(port), "--max-model-len", "512", "--max-num-seqs", "64",
                             "--vllm-enforce-eager", "--vllm-kv-cache-gb", "1"], cwd=work, env=_env("0", 1),
                            stdout=log, stderr=subprocess.STDOUT, preexec_fn=_pinned({0}))
    deadline = time.monotonic() + 600
    while True:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5):
                return proc
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.kill()
                sys.exit(f"the server did not start; its log: {work / 'server.log'}")
            time.sleep(1)


def _figures(run: Path) -> dict[str, float]:
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    steps = [m for m in metrics if m["step"] > 0 and "step_seconds" in m]
    return {"seconds_per_step": statistics.mean(m["step_seconds"] for m in steps),
            "stage2_seconds": sum(m["step_seconds"] for m in steps),
            "generation_seconds_per_step": statistics.mean(m["generation_seconds"] for m in steps),
            "max_lag": max(m.get("policy_lag", 0) for m in steps),
            "initial_accuracy": metrics[0]["eval_accuracy"], "final_accuracy": metrics[-1]["eval_accuracy"]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="benchmarks/results/async_server", help="writes OUT.json and OUT.md")
    p.add_argument("--work", default="runs/async_server", help="run folders (kept: a rerun resumes)")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--lags", default="0,1,2")
    p.add_argument("--eval-limit", type=int, default=200)
    a = p.parse_args()
    work = Path(a.work).resolve()
    work.mkdir(parents=True, exist_ok=True)
    values = work / "values.parquet"
    if not values.exists():
        _run(["values", *RECIPE, *ENGINE, "--output", str(values)], work, "0-1", 2, work / "values.log")
    variants = ["colocated", *(f"server K={k}" for k in a.lags.split(","))]
    results: dict[str, list[dict[str, float]]] = {v: [] for v in variants}
    port = None
    server = None
    try:
        for seed in a.seeds.split(","):
            for variant in variants:
                run = work / f"{variant.replace(' ', '_').replace('=', '')}-seed{seed}"
                args = ["train", *RECIPE, *ENGINE, *TRAIN, "--values", str(values), "--seed", seed,
                        "--eval-limit", str(a.eval_limit), "--output-dir", str(run)]
                if not (run / "final").exists():
                    print(f"{variant}, seed {seed}", flush=True)
                    if variant == "colocated":
                        _run(args, work, "0-1", 2, run.with_suffix(".log"))
                    else:
                        if server is None:
                            with socket.socket() as s:
                                s.bind(("127.0.0.1", 0))
                                port = s.getsockname()[1]
                            server = _serve(work, port)
                        lag = variant.split("=")[1]
                        _run([*args, "--vllm-mode", "server", "--vllm-server", f"127.0.0.1:{port}",
                              "--async-lag", lag], work, "1", 1, run.with_suffix(".log"))
                results[variant].append({"seed": int(seed), **_figures(run)})
    finally:
        if server is not None:
            server.kill()
    summary = {v: {k: statistics.mean(r[k] for r in rows) for k in rows[0] if k != "seed"}
               for v, rows in results.items()}
    base = summary["colocated"]["seconds_per_step"]
    lines = ["| variant | s/step | x colocated | Stage 2 s | generation s/step | max lag | accuracy before -> "
             "after (mean over seeds) | per seed |", "|---|---|---|---|---|---|---|---|"]
    for v, s in summary.items():
        per_seed = ", ".join(f"{r['final_accuracy']:.3f}" for r in results[v])
        lines.append(f"| {v} | {s['seconds_per_step']:.2f} | {base / s['seconds_per_step']:.2f} | "
                     f"{s['stage2_seconds']:.0f} | {s['generation_seconds_per_step']:.2f} | {s['max_lag']:.0f} | "
                     f"{s['initial_accuracy']:.3f} -> {s['final_accuracy']:.3f} | {per_seed} |")
    out = Path(a.out)
    out.with_suffix(".json").write_text(json.dumps({"runs": results, "summary": summary}, indent=1))
    head = (f"A*-PO, the paper-regime bench recipe, seeds {a.seeds}: colocated (one process, both cores) against "
            f"`astarpo serve` on core 0 and the trainer on core 1 at async lag K; `generation s/step` is the time a "
            f"step spent sampling (colocated) or waiting for the server's samples; accuracy on the held-out "
            f"problems (at most {a.eval_limit}: the arithmetic task has 128). {time.strftime('%Y-%m-%d')}, "
            f"`python benchmarks/async_server.py --seeds {a.seeds} --lags {a.lags}`\n\n")
    out.with_suffix(".md").write_text(head + "\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
