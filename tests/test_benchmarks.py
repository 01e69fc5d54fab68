"""Benchmark registry: data folder resolution, record format, and the published files graded by their rewards."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from astarpo.benchmarks import BENCHMARKS, DATA_DIR_ENV, get_benchmark, load_benchmark, resolve_data_dir
from astarpo.data import DataError
from astarpo.rewards.gsm8k import grade_gsm8k_batch
from astarpo.rewards.math import grade_math_batch
from astarpo.rewards.timeout import close_pools

SHARED_DATA = Path(os.environ.get(DATA_DIR_ENV) or Path(__file__).resolve().parents[2] / "shared" / "data")
needs_data = pytest.mark.skipif(not SHARED_DATA.is_dir(), reason=f"no benchmark data at {SHARED_DATA}")

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


def test_data_dir_resolution(tmp_path, monkeypatch):
    monkeypatch.delenv(DATA_DIR_ENV, raising=False)
    (tmp_path / "shared" / "data").mkdir(parents=True)
    (tmp_path / "repo").mkdir()
    monkeypatch.chdir(tmp_path / "repo")
    assert resolve_data_dir().resolve() == (tmp_path / "shared" / "data").resolve()  # ../shared/data by default
    assert resolve_data_dir(tmp_path) == tmp_path  # explicit argument first
    monkeypatch.setenv(DATA_DIR_ENV, str(tmp_path / "repo"))
    assert resolve_data_dir() == tmp_path / "repo"  # then the environment variable
    monkeypatch.setenv(DATA_DIR_ENV, str(tmp_path / "missing"))
    with pytest.raises(DataError, match=DATA_DIR_ENV):
        resolve_data_dir()
    monkeypatch.delenv(DATA_DIR_ENV)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(DataError, match="does not exist"):
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


@needs_data
@pytest.mark.parametrize("name", sorted(README_ROWS))
def test_published_files(name):
    records = load_benchmark(name, data_dir=SHARED_DATA)
    assert len(records) == README_ROWS[name]
    assert len({r["id"] for r in records}) == len(records)
    for r in records:
        assert isinstance(r["answer"], str) and r["answer"].strip()
        assert isinstance(r["prompt"], str) and r["prompt"].strip()
        assert r["source"] == name
        assert "solution" not in r and "solutions" not in r and "problem" not in r
    assert all(("####" if name == "gsm8k" else "\\boxed{}") in r["prompt"] for r in records)
    assert load_benchmark(name, data_dir=SHARED_DATA, limit=3) == records[:3]


def _raw_rows(name: str, n: int) -> list[dict]:
    with (SHARED_DATA / name / "test.jsonl").open(encoding="utf-8") as f:
        return [json.loads(line) for line, _ in zip(f, range(n))]


@needs_data
def test_reference_solutions_grade_correct():
    math_rows = _raw_rows("math500", 50)
    assert grade_math_batch([r["solution"] for r in math_rows], [r["answer"] for r in math_rows]) == [1.0] * 50
    gsm_rows = _raw_rows("gsm8k", 50)
    assert grade_gsm8k_batch([r["solution"] for r in gsm_rows], [r["answer"] for r in gsm_rows]) == [1.0] * 50
