"""Two real CPU processes (torch.distributed.run, gloo) against one: Stage 1 rows and Stage 2 updates agree."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from launcher import rank_logs, rank_stderr
from safetensors.torch import load_file

from astarpo import launch
from astarpo.launch import Launch
from astarpo.values import read_values

SRC = str(Path(__file__).resolve().parents[1] / "src")


def _run(args: list[str], processes: int, cwd: Path) -> Path:
    """``astarpo ARGS`` in ``processes`` processes; on failure, the last lines of the launcher and of each rank.
    Returns the folder of each rank's own output (for a launch)."""
    logs = cwd / "launch-logs" / f"{len(list(cwd.glob('launch-logs/*')))}-{args[0]}"
    launcher = ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(processes),
                "--log-dir", str(logs), "--tee", "3", "-m", "astarpo", "--"]
    cmd = [sys.executable, *(launcher if processes > 1 else ["-m", "astarpo"]), *args]
    env = {**os.environ, "PYTHONPATH": SRC, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false",
           "PYTHONFAULTHANDLER": "1"}
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, f"{proc.stderr[-3000:]}\n{rank_logs(logs) if processes > 1 else ''}"
    return logs


def test_engines_split_work_into_contiguous_blocks():
    blocks = [list(Launch(e, 3, e, e, 3).engine_block(8)) for e in range(3)]
    assert blocks == [[0, 1, 2], [3, 4, 5], [6, 7]]
    assert list(Launch().engine_block(4)) == [0, 1, 2, 3] and list(Launch(2, 3, 2, 2, 3).engine_block(2)) == []


def test_training_rows_spread_every_mini_batch_and_an_engine_samples_its_processes_rows():
    """Process r takes rows r, r + W, ...; with engines of two processes, engine e samples the rows of processes
    2e and 2e + 1, and those processes speak once per engine."""
    four = [Launch(r, 4, r, r // 2, 2) for r in range(4)]
    assert [p.process_rows(8) for p in four] == [[0, 4], [1, 5], [2, 6], [3, 7]]
    assert [p.engine_rows(8) for p in four] == [[0, 1, 4, 5]] * 2 + [[2, 3, 6, 7]] * 2
    assert [p.speaks for p in four] == [True, False, True, False]
    assert [list(p.engine_processes) for p in four] == [[0, 1], [0, 1], [2, 3], [2, 3]]
    assert Launch().process_rows(3) == Launch().engine_rows(3) == [0, 1, 2]


def test_two_processes_match_one(tiny_model, tmp_path):
    common = ["--model", str(tiny_model), "--max-new-tokens", "6"]
    values = ["values", *common, "--limit", "14", "--n", "3", "--shard-size", "2"]
    _run([*values, "--output", "one.parquet"], 1, tmp_path)
    _run([*values, "--output", "two.parquet"], 2, tmp_path)
    one, two = pd.read_parquet(tmp_path / "one.parquet"), pd.read_parquet(tmp_path / "two.parquet")
    assert len(one) == 14 and one.equals(two)  # same ids, rewards and lengths, row for row
    p1, p2 = read_values(tmp_path / "one.parquet").provenance, read_values(tmp_path / "two.parquet").provenance
    timings = ("seconds", "sampling_seconds", "sampling_wall_seconds", "created_at")
    assert {k: v for k, v in p1.items() if k not in timings} == {k: v for k, v in p2.items() if k not in timings}
    assert not (tmp_path / "two.parquet.shards").exists()

    # Stage 2 with greedy sampling, so both runs see the same responses and must make the same updates. The
    # tiny model never earns a reward, so the stored rewards are replaced by varied ones to give a gradient.
    greedy = [*common, "--limit", "12", "--temperature", "0"]
    _run(["values", *greedy, "--n", "1", "--output", "g.parquet"], 1, tmp_path)
    table = pq.read_table(tmp_path / "g.parquet")
    fake = pa.array([[-(i % 5) / 4] for i in range(table.num_rows)], pa.list_(pa.float64()))
    pq.write_table(table.set_column(table.column_names.index("rewards"), "rewards", fake), tmp_path / "g.parquet")
    train = ["train", *greedy, "--values", "g.parquet", "--no-filter-unsolved", "--beta1", "inf", "--batch-size",
             "6", "--mini-batch-size", "4", "--micro-batch-size", "1", "--learning-rate", "1e-2", "--beta2", "0.1",
             "--steps", "3", "--save-every", "2"]
    _run([*train, "--output-dir", "r1"], 1, tmp_path)
    _run([*train, "--output-dir", "r2"], 2, tmp_path)
    m1, m2 = ([json.loads(x) for x in (tmp_path / r / "metrics.jsonl").read_text().splitlines()] for r in ("r1", "r2"))
    assert [m["step"] for m in m1] == [m["step"] for m in m2] == [1, 2, 3]  # written once, same number of steps
    for a, b in zip(m1, m2):
        for key in ("reward", "v_star", "loss", "log_ratio", "response_length"):
            assert abs(a[key] - b[key]) < 1e-4, (key, a[key], b[key])
    start = load_file(tiny_model / "model.safetensors")
    w1, w2 = (load_file(tmp_path / r / "final" / "model.safetensors") for r in ("r1", "r2"))
    moved = max(float((w1[k] - start[k]).abs().max()) for k in w1)
    assert moved > 1e-2  # training changed the weights ...
    assert all(torch.allclose(w1[k], w2[k], atol=1e-4) for k in w1)  # ... and identically in both runs
    assert {"random_states_0.pkl", "random_states_1.pkl"} <= \
           {p.name for p in (tmp_path / "r2" / "checkpoints" / "step-000002").iterdir()}


def test_each_process_samples_from_its_own_stream_and_resumes_it(tiny_model, tmp_path):
    """Sampled responses (temperature 1) in two processes: each process is seeded apart (run seed + its index, so
    the two never draw the same random numbers), and a run resumed from its checkpoint continues both streams
    exactly: the same responses, so the same rewards, losses and weights as the uninterrupted run."""
    common = ["--model", str(tiny_model), "--max-new-tokens", "6", "--limit", "12"]
    _run(["values", *common, "--n", "2", "--output", "v.parquet"], 1, tmp_path)
    table = pq.read_table(tmp_path / "v.parquet")  # varied rewards, for a gradient (the tiny model earns none)
    fake = pa.array([[-(i % 5) / 4, 0.0] for i in range(table.num_rows)], pa.list_(pa.float64()))
    pq.write_table(table.set_column(table.column_names.index("rewards"), "rewards", fake), tmp_path / "v.parquet")
    train = ["train", *common, "--values", "v.parquet", "--no-filter-unsolved", "--batch-size", "4",
             "--micro-batch-size", "2", "--learning-rate", "1e-2", "--beta2", "0.1", "--save-every", "1"]
    _run([*train, "--steps", "3", "--output-dir", "whole"], 2, tmp_path)
    _run([*train, "--steps", "2", "--output-dir", "resumed"], 2, tmp_path)
    _run([*train, "--steps", "3", "--output-dir", "resumed"], 2, tmp_path)
    states = [torch.load(tmp_path / "whole" / "checkpoints" / "step-000003" / f"random_states_{i}.pkl",
                         weights_only=False) for i in (0, 1)]  # accelerate's RNG states, written by torch.save
    assert states[0]["random_state"] != states[1]["random_state"]  # seeded apart (Python's stream: never drawn)
    assert not torch.equal(states[0]["torch_manual_seed"], states[1]["torch_manual_seed"])
    whole, resumed = ([json.loads(x) for x in (tmp_path / r / "metrics.jsonl").read_text().splitlines()]
                      for r in ("whole", "resumed"))
    keys = ("reward", "loss", "log_ratio", "response_length")
    assert [{k: m[k] for k in keys} for m in whole] == [{k: m[k] for k in keys} for m in resumed]
    w1, w2 = (load_file(tmp_path / r / "final" / "model.safetensors") for r in ("whole", "resumed"))
    assert all(torch.equal(w1[k], w2[k]) for k in w1)


def test_eval_is_data_parallel(tiny_model, tmp_path):
    """`astarpo eval` in two processes: each scores its block of every benchmark (HF generate, greedy and k = 2
    samples, the KL to the reference), rank 0 writes the result once: per-prompt greedy answers and the greedy
    figures equal one process's, the sampled figures come from each process's own stream.

    Every process scoring every prompt would give the same result, so each process's log says which prompts it
    scored: process 0 the first three of each benchmark, process 1 the other two."""
    args = ["eval", "--model", str(tiny_model), "--benchmarks", "gsm8k,amc23", "--limit", "5", "--k", "2",
            "--reference", str(tiny_model), "--max-new-tokens", "6", "--max-prompt-tokens", "512"]
    _run([*args, "--output", "one.json"], 1, tmp_path)
    logs = _run([*args, "--output", "two.json"], 2, tmp_path)
    scored = {rank: [line for line in lines if "scores prompts" in line] for rank, lines in rank_stderr(logs).items()}
    assert scored == {0: ["astarpo: eval: process 0, engine 0 of 2, scores prompts [0, 3) of 5"] * 2,
                      1: ["astarpo: eval: process 1, engine 1 of 2, scores prompts [3, 5) of 5"] * 2}, scored
    one, two = (json.loads((tmp_path / f).read_text()) for f in ("one.json", "two.json"))
    for name in ("gsm8k", "amc23"):
        a, b = one["benchmarks"][name], two["benchmarks"][name]
        assert a["prompts"] == b["prompts"] == 5
        assert a["samples"] == b["samples"]  # every prompt's greedy answer, in order: gathered from both blocks
        assert (a["accuracy"], a["mean_response_tokens"]) == (b["accuracy"], b["mean_response_tokens"])
        assert 0 <= b["avg_at_k"] <= b["pass_at_k"] <= 1
        assert abs(b["kl_to_ref"]) < 1e-6  # the reference is the model itself
    assert (tmp_path / "two.md").is_file() and not (tmp_path / "two.json.parts").exists()


def test_finish_runs_each_registered_clean_up_once_and_returns_in_a_single_process(monkeypatch):
    """An engine registers its clean-up when it starts (every start, one registration); a single process's command
    ends without leaving anything (its engine stays for reuse, the process goes on)."""
    monkeypatch.setattr(launch, "_AT_FINISH", [])
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    calls = []

    def clean_up():
        calls.append(1)

    launch.at_finish(clean_up)
    launch.at_finish(clean_up)
    launch.finish()
    assert calls == [1]
