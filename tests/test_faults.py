"""Faults: Stage 1, Stage 2 and evaluation killed with SIGKILL at random moments; unwritable output locations."""

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from astarpo import TrainConfig, Trainer, ValuesConfig, compute_values
from astarpo.cli import main
from astarpo.values import read_values

SRC = str(Path(__file__).resolve().parents[1] / "src")
FLAGS = ["--limit", "60", "--n", "4", "--max-new-tokens", "16", "--shard-size", "2"]
ENV = {**os.environ, "PYTHONPATH": SRC, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
TIMINGS = ("generation_seconds", "step_seconds", "tokens_per_second", "peak_memory_mb", "seconds",
           "sampling_seconds", "sampling_wall_seconds")


def _run_and_kill(cmd: list[str], ready, delay: float, timeout: float = 120) -> bool:
    """Start ``cmd``, wait until ``ready()`` (a file the run writes) or its exit, wait ``delay`` s, SIGKILL it.

    Waiting for files rather than fixed sleeps keeps the kill moments meaningful on a slow, shared machine; the
    runs are sized so that work is left after each ``ready`` moment even on a machine several times faster than
    this one (CI found a 6x faster one), and the delays stay well below that. Returns whether the run was still
    alive to be killed.
    """
    proc = subprocess.Popen(cmd, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + timeout
    while proc.poll() is None and time.monotonic() < deadline and not ready():
        time.sleep(0.002)
    time.sleep(delay)
    killed = proc.poll() is None
    if killed:
        proc.send_signal(signal.SIGKILL)
    proc.wait()
    return killed


def _finish(cmd: list[str]) -> None:
    done = subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]


def _drop_timings(obj):
    """Results without wall-clock figures, which differ between any two runs."""
    if isinstance(obj, dict):
        return {k: _drop_timings(v) for k, v in obj.items() if k not in TIMINGS}
    if isinstance(obj, list):
        return [_drop_timings(v) for v in obj]
    return obj


def test_values_survives_repeated_sigkill(tiny_model, tmp_path):
    out = tmp_path / "killed.parquet"
    shards = tmp_path / "killed.parquet.shards"
    cmd = [sys.executable, "-m", "astarpo", "values", "--model", str(tiny_model), *FLAGS, "--output", str(out)]
    env = {**os.environ, "PYTHONPATH": SRC, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    rng = random.Random(0)
    kills = 0
    for _ in range(3):
        before = len(list(shards.glob("shard-*.parquet"))) if shards.exists() else 0
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 60
        while proc.poll() is None and time.monotonic() < deadline:
            if shards.exists() and len(list(shards.glob("shard-*.parquet"))) > before:
                break  # this run has finished a shard of its own
            time.sleep(0.002)
        time.sleep(rng.uniform(0, 0.03))  # then land anywhere: mid-sampling, mid-write, between shards (a shard
        # takes 11-65 ms, and 30 shards leave plenty after three kills)
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
            kills += 1
        proc.wait()
    assert kills == 3 and not out.exists()
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]

    clean_cmd = [*cmd[:-1], str(tmp_path / "clean.parquet")]  # a subprocess too: same threads, same numbers
    assert subprocess.run(clean_cmd, env=env, capture_output=True, timeout=120).returncode == 0
    clean, resumed = read_values(tmp_path / "clean.parquet"), read_values(out)
    assert len(resumed.ids) == len(set(resumed.ids)) == 60  # no duplicate, no missing row
    assert resumed.ids == clean.ids and (resumed.rewards == clean.rewards).all()
    assert not shards.exists()


def test_unwritable_output_fails_fast(tiny_model, tmp_path, capsys):
    # We run as root, where chmod cannot make a folder read-only; a path below a regular file cannot be
    # created by anyone, which is the same failure for the check.
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    start = time.perf_counter()
    assert main(["values", "--model", str(tiny_model), "--limit", "4", "--output", str(blocker / "v.parquet")]) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"astarpo: error: cannot write to {blocker} (Not a directory); choose a writable output " \
                  "location with free space"
    assert time.perf_counter() - start < 5 and not (blocker.parent / "v.parquet.shards").exists()
    assert main(["train", "--model", str(tiny_model), "--values", str(tmp_path / "v.parquet"),
                 "--output-dir", str(blocker / "run")]) == 2
    assert capsys.readouterr().err.strip() == f"astarpo: error: cannot write to {blocker / 'run'} (Not a " \
                                              "directory); choose a writable output location with free space"


@pytest.mark.skipif(os.geteuid() == 0, reason="root ignores directory permissions")
def test_read_only_output_fails_fast(tiny_model, tmp_path, capsys):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    try:
        assert main(["values", "--model", str(tiny_model), "--limit", "4", "--output", str(ro / "v.parquet")]) == 2
        assert "cannot write to" in capsys.readouterr().err
    finally:
        ro.chmod(0o700)


# ----- Stage 2 ------------------------------------------------------------------------------------------------------
TRAIN = ["--data", "arithmetic", "--reward", "arithmetic", "--limit", "24", "--max-new-tokens", "6", "--batch-size",
         "6", "--learning-rate", "1e-2", "--beta2", "0.1", "--no-filter-unsolved", "--steps", "16", "--save-every", "2"]


def _arithmetic_values(model: Path, path: Path) -> Path:
    """Stage 1 with the built-in reward, which the `astarpo train` subprocess can name; a few prompts succeed,
    so V* > 0 there and training moves the weights."""
    return compute_values(ValuesConfig(model=str(model), data="arithmetic", reward="arithmetic", limit=24, n=4,
                                       max_new_tokens=6, output=str(path)))


def _metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_train_survives_repeated_sigkill(tiny_model, tmp_path):
    values = _arithmetic_values(tiny_model, tmp_path / "v.parquet")
    base = [sys.executable, "-m", "astarpo", "train", "--model", str(tiny_model), "--values", str(values), *TRAIN]
    clean_run, run = tmp_path / "clean", tmp_path / "killed"
    clean = subprocess.Popen([*base, "--output-dir", str(clean_run)], env=ENV, stdout=subprocess.DEVNULL,
                             stderr=subprocess.PIPE, text=True)  # alongside the killed runs: same threads, numbers
    cmd = [*base, "--output-dir", str(run)]
    ckpts = run / "checkpoints"

    def lines() -> int:
        path = run / "metrics.jsonl"
        return path.read_text().count("\n") if path.is_file() else 0

    def steps() -> list[str]:
        return sorted(p.name for p in ckpts.glob("step-*"))

    def saved_since(before: list[str]):
        return lambda: steps() not in (before, [])

    rng = random.Random(0)
    kills = [
        _run_and_kill(cmd, lambda: lines() >= 1, 0),  # step 1 logged, no checkpoint yet: resume from step 0
        # Mid-checkpoint write if caught in time (the window is ~10 ms; the half-written case is also built by hand
        # below), else just after the checkpoint.
        _run_and_kill(cmd, lambda: any(ckpts.glob(".step-*.tmp")) or bool(steps()), 0),
        _run_and_kill(cmd, saved_since(steps()), rng.uniform(0, 0.03)),  # anywhere after one more checkpoint
    ]
    # final/ appears complete or not at all
    assert not (run / "final").exists() or (run / "final" / "astarpo_run.json").is_file()
    assert all(kills)
    _finish(cmd)
    assert clean.wait(timeout=300) == 0, clean.stderr.read()[-3000:]

    a, b = load_file(clean_run / "final" / "model.safetensors"), load_file(run / "final" / "model.safetensors")
    start = load_file(tiny_model / "model.safetensors")
    assert any(not torch.equal(a[k], start[k]) for k in a)  # training moved the weights
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)  # and the resumed runs are exact
    assert [m["step"] for m in _metrics(run)] == list(range(1, 17))  # one line per step, none cut short
    assert _drop_timings(_metrics(run)) == _drop_timings(_metrics(clean_run))  # same rewards, losses, KL
    assert steps() == ["step-000014", "step-000016"] and not list(ckpts.glob(".*"))


def test_train_resume_ignores_half_written_checkpoint_and_metrics_line(tiny_model, tmp_path):
    values = _arithmetic_values(tiny_model, tmp_path / "v.parquet")
    cfg = {"model": str(tiny_model), "values": str(values), "data": "arithmetic", "reward": "arithmetic",
           "limit": 24, "max_new_tokens": 6, "batch_size": 6, "filter_unsolved": False, "save_every": 2,
           "output_dir": str(tmp_path / "run")}
    Trainer(TrainConfig(**cfg, steps=2)).train()
    run = tmp_path / "run"
    # What a kill leaves while step 4's checkpoint is being written, after step 3 and half of step 4 were logged;
    # the temporary folder even looks complete, down to its trainer_state.json.
    tmp = run / "checkpoints" / ".step-000004.tmp"
    shutil.copytree(run / "checkpoints" / "step-000002", tmp)
    (tmp / "trainer_state.json").write_text(json.dumps({"step": 4}))
    with (run / "metrics.jsonl").open("a") as f:
        f.write(json.dumps({"step": 3, "stale": True}) + "\n" + '{"step": 4, "rew')
    shutil.rmtree(run / "final")
    Trainer(TrainConfig(**cfg, steps=4)).train()
    metrics = _metrics(run)
    assert [m["step"] for m in metrics] == [1, 2, 3, 4] and not any("stale" in m for m in metrics)
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step-000002", "step-000004"]
    assert (run / "final" / "model.safetensors").is_file() and not (run / ".final.tmp").exists()


# ----- evaluation ---------------------------------------------------------------------------------------------------
def _valid_json_or_absent(path: Path) -> dict | None:
    """A kill must leave an output file complete or absent: never half-written."""
    return json.loads(path.read_text()) if path.exists() else None


def test_eval_survives_repeated_sigkill(tiny_model, tmp_path):
    """Plain eval keeps nothing between runs (it starts over) and writes its one output file atomically."""
    base = [sys.executable, "-m", "astarpo", "eval", "--model", str(tiny_model), "--data", "arithmetic", "--limit",
            "16", "--k", "4", "--max-new-tokens", "12", "--reference", str(tiny_model)]
    out = tmp_path / "result.json"
    start = time.monotonic()
    _finish([*base, "--output", str(tmp_path / "clean.json")])
    duration = time.monotonic() - start
    cmd = [*base, "--output", str(out)]
    rng = random.Random(1)
    kills = []
    for ready, delay in [(lambda: True, rng.uniform(0.5, 1.0) * duration),  # mid-run, most likely
                         (lambda: out.exists() or (tmp_path / ".result.json.tmp").exists(), 0)]:  # at the write
        kills.append(_run_and_kill(cmd, ready, delay))
        result = _valid_json_or_absent(out)
        assert result is None or len(result["samples"]) == 16
    assert sum(kills) >= 1
    _finish(cmd)
    clean, resumed = json.loads((tmp_path / "clean.json").read_text()), json.loads(out.read_text())
    assert _drop_timings(resumed) == _drop_timings(clean) and len(resumed["samples"]) == 16
    assert sorted(p.name for p in tmp_path.iterdir()) == ["clean.json", "result.json"]


def test_eval_benchmarks_survive_repeated_sigkill(tiny_model, tmp_path):
    """Each finished benchmark is kept as a part; a killed run redoes only the benchmark it was in."""
    from astarpo.benchmarks import BENCHMARKS

    data = tmp_path / "data"
    for name in BENCHMARKS:  # six small sets, so that a run takes long enough to be killed in the middle
        (data / name).mkdir(parents=True)
        rows = [{"id": f"{name}/{i}", "problem": f"What is {i} + {i + 3}?", "answer": str(2 * i + 3),
                 "solution": "", "source": name} for i in range(16)]
        (data / name / "test.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    base = [sys.executable, "-m", "astarpo", "eval", "--model", str(tiny_model), "--benchmarks", ",".join(BENCHMARKS),
            "--data-dir", str(data), "--k", "2", "--max-new-tokens", "12", "--reference", str(tiny_model)]
    clean = subprocess.Popen([*base, "--output", str(tmp_path / "clean" / "r.json")], env=ENV,
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    out = tmp_path / "killed" / "r.json"
    parts = out.with_name("r.json.parts")
    cmd = [*base, "--output", str(out)]

    def saved() -> list[str]:
        return sorted(p.name for p in parts.glob("*.json"))

    def saved_since(before: list[str]):
        return lambda: saved() not in (before, [])

    rng = random.Random(2)
    kills = []
    for _ in range(2):  # after a benchmark of its own has been saved, anywhere in the next ones
        kills.append(_run_and_kill(cmd, saved_since(saved()), rng.uniform(0, 0.03)))
        for part in parts.glob("*.json"):
            assert set(json.loads(part.read_text())) == {"settings", "result"}
        assert _valid_json_or_absent(out) is None or not parts.exists()
    # In the last benchmark, or while the final files are written and the parts folder goes.
    kills.append(_run_and_kill(cmd, lambda: len(saved()) >= len(BENCHMARKS) - 1, rng.uniform(0, 0.03)))
    result = _valid_json_or_absent(out)
    assert result is None or list(result["benchmarks"]) == list(BENCHMARKS)
    assert all(kills[:2])
    _finish(cmd)
    assert clean.wait(timeout=300) == 0, clean.stderr.read()[-3000:]
    full, resumed = json.loads((tmp_path / "clean" / "r.json").read_text()), json.loads(out.read_text())
    assert _drop_timings(resumed) == _drop_timings(full)  # same accuracies, KL and per-sample answers
    assert out.with_suffix(".md").read_text() == (tmp_path / "clean" / "r.md").read_text()
    assert sorted(p.name for p in out.parent.iterdir()) == ["r.json", "r.md"]
