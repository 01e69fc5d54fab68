"""Benchmark registry: data folder resolution, record format, the packaged files (checksums) graded by their
rewards."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import pytest

from astarpo.benchmarks import (
    BENCHMARKS,
    DATA_DIR_ENV,
    PACKAGED_DATA,
    get_benchmark,
    load_benchmark,
    resolve_data_dir,
)
from astarpo.config import ConfigError, EvalConfig
from astarpo.data import DataError
from astarpo.rewards.gsm8k import grade_gsm8k_batch
from astarpo.rewards.math import grade_math_batch
from astarpo.rewards.timeout import close_pools

SHARED_DATA = Path(os.environ.get(DATA_DIR_ENV) or Path(__file__).resolve().parents[2] / "shared" / "data")

README_ROWS = {"gsm8k": 1319, "math500": 500, "minerva_math": 272, "olympiadbench": 675, "amc23": 40, "aime24": 30}


@pytest.fixture(scope="module", autouse=True)
def _stop_workers():
    yield
    close_pools()


def _write(folder: Path, name: str, rows: list[dict]) -> None:
    (folder / name).mkdir(parents=True)
    with (folder / name / "test.jsonl").open("w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")


def test_registry():
    assert set(BENCHMARKS) == set(README_ROWS)
    for name, bench in BENCHMARKS.items():
        assert bench.reward == ("gsm8k" if name == "gsm8k" else "math")
        assert bench.rows == README_ROWS[name]
        assert bench.relpath == f"{name}/test.jsonl"
    assert "####" in get_benchmark("gsm8k").prompt("What is 1+1?")
    assert get_benchmark("math500").prompt("What is {x}?").startswith("What is {x}?")  # braces in problems survive
    assert "\\boxed{}" in get_benchmark("aime24").prompt("p")


def test_unknown_name_lists_the_known_ones():
    with pytest.raises(KeyError, match="math500.*aime24"):
        get_benchmark("math5000")
    with pytest.raises(KeyError, match="gsm8k"):
        load_benchmark("nope")


def test_all_means_the_six():
    assert EvalConfig(benchmarks="all").benchmark_names == list(BENCHMARKS)
    assert EvalConfig(benchmarks="aime24, gsm8k").benchmark_names == ["aime24", "gsm8k"]
    with pytest.raises(ConfigError, match="lists a name twice"):
        EvalConfig(benchmarks="all,gsm8k")


def test_data_dir_resolution(tmp_path, monkeypatch):
    monkeypatch.delenv(DATA_DIR_ENV, raising=False)
    (tmp_path / "shared" / "data").mkdir(parents=True)
    (tmp_path / "repo").mkdir()
    monkeypatch.chdir(tmp_path / "repo")
    assert resolve_data_dir() == PACKAGED_DATA  # the packaged copy by default, wherever the working directory is
    assert resolve_data_dir(tmp_path) == tmp_path  # explicit argument first
    monkeypatch.setenv(DATA_DIR_ENV, str(tmp_path / "repo"))
    assert resolve_data_dir() == tmp_path / "repo"  # then the environment variable
    monkeypatch.setenv(DATA_DIR_ENV, str(tmp_path / "missing"))
    with pytest.raises(DataError, match=DATA_DIR_ENV):
        resolve_data_dir()


def test_load_from_a_small_folder(tmp_path):
    _write(tmp_path, "amc23", [
        {"id": "amc23/0", "problem": "Compute $\\{1\\}$.", "answer": "27", "solution": None, "source": "amc23",
         "url": "u0", "answer_original": 27.0},
        {"id": "amc23/1", "problem": "Second.", "answer": 3, "solution": "secret", "source": "amc23",
         "url": "u1", "answer_original": 3.0},
    ])
    records = load_benchmark("amc23", data_dir=tmp_path)
    assert records[0] == {"id": "amc23/0", "prompt": get_benchmark("amc23").prompt("Compute $\\{1\\}$."),
                          "answer": "27", "source": "amc23", "url": "u0", "answer_original": 27.0}
    assert records[1]["answer"] == "3"  # answers are strings
    assert all("solution" not in r and "problem" not in r for r in records)
    assert len(load_benchmark("amc23", data_dir=tmp_path, limit=1)) == 1
    with pytest.raises(DataError, match="no such file"):
        load_benchmark("aime24", data_dir=tmp_path)


def test_packaged_files_match_their_checksums():
    sums = (PACKAGED_DATA / "SHA256SUMS").read_text().splitlines()
    listed = {}
    for line in sums:
        digest, relpath = line.split("  ")
        listed[relpath] = digest
    assert sorted(listed) == sorted(b.relpath for b in BENCHMARKS.values())
    for relpath, digest in listed.items():
        assert hashlib.sha256((PACKAGED_DATA / relpath).read_bytes()).hexdigest() == digest, relpath
    assert all(name in (PACKAGED_DATA / "README.md").read_text() for name in BENCHMARKS)
    if (SHARED_DATA / "SHA256SUMS").is_file():  # verbatim copies of the project's normalised data
        assert set(sums) <= set((SHARED_DATA / "SHA256SUMS").read_text().splitlines())


@pytest.mark.parametrize("name", sorted(README_ROWS))
def test_published_files(name):
    records = load_benchmark(name, data_dir=PACKAGED_DATA)
    assert len(records) == README_ROWS[name]
    assert len({r["id"] for r in records}) == len(records)
    for r in records:
        assert isinstance(r["answer"], str) and r["answer"].strip()
        assert isinstance(r["prompt"], str) and r["prompt"].strip()
        assert r["source"] == name
        assert "solution" not in r and "solutions" not in r and "problem" not in r
    assert all(("####" if name == "gsm8k" else "\\boxed{}") in r["prompt"] for r in records)
    assert load_benchmark(name, data_dir=PACKAGED_DATA, limit=3) == records[:3]


def _raw_rows(name: str, n: int) -> list[dict]:
    with (PACKAGED_DATA / name / "test.jsonl").open(encoding="utf-8") as f:
        return [json.loads(line) for line, _ in zip(f, range(n))]


def test_reference_solutions_grade_correct():
    math_rows = _raw_rows("math500", 50)
    assert grade_math_batch([r["solution"] for r in math_rows], [r["answer"] for r in math_rows]) == [1.0] * 50
    gsm_rows = _raw_rows("gsm8k", 50)
    assert grade_gsm8k_batch([r["solution"] for r in gsm_rows], [r["answer"] for r in gsm_rows]) == [1.0] * 50
