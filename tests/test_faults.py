"""Faults: Stage 1 killed with SIGKILL at random moments, and output locations that cannot be written."""

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from astarpo.cli import main
from astarpo.values import read_values

SRC = str(Path(__file__).resolve().parents[1] / "src")
FLAGS = ["--limit", "60", "--n", "4", "--max-new-tokens", "16", "--shard-size", "2"]


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
            time.sleep(0.02)
        time.sleep(rng.uniform(0, 0.15))  # then land anywhere: mid-sampling, mid-write, between shards
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
            kills += 1
        proc.wait()
    assert kills >= 2 and not out.exists()
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
