"""``benchmarks/gpu_check.py``, the one prepared GPU check, run on this CPU with vLLM's CPU build and its tiny model
shape: the same commands, worker and checks a GPU call runs, so the script cannot rot before a GPU is lent. Here
every check passes, the GPU-only one (sleep mode) is null, and the two-process one runs (two CPU processes)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("vllm")

ROOT = Path(__file__).resolve().parents[2]


def test_gpu_check_runs_on_cpu(tmp_path):
    out = tmp_path / "gpu_check.json"
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_check.py"), "--tiny", "--out", str(out),
                           "--work", str(tmp_path / "work")], env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    r = json.loads(out.read_text())
    assert r["ok"] and r["failures"] == []
    assert r["stage1_reproducible"] is True and r["engines_differ"] is True and r["eval_ok"] is True
    assert r["greedy_same_after_wake"] is None  # vLLM's CPU build has no sleep mode
    assert r["greedy_same_after_push"] is True
    for key in ("step_seconds", "peak_memory_gb", "update_memory_gb"):
        assert set(r[key]) == {"sleep_mode", "no_sleep_mode", "two_processes"}, r[key]
        assert all(v > 0 for v in r[key].values()), r[key]
    gap = r["logprob_gap_nats"]
    assert 0 <= gap["mean"] <= gap["max"] < 1e-3  # a float32 engine beside a float32 policy
    assert r["runs"]["two_processes"]["strategy"] == "DistributedType.FSDP"
    assert all(len(run["step_seconds"]) == r["steps"] == 3 for run in r["runs"].values())
    assert r["eval"]["prompts"] == 8 and r["eval"]["kl_to_ref"] is not None  # the trained model against its ref
    assert all(v > 0 for v in r["phase_seconds"].values())
