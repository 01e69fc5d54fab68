"""The evaluation benchmarks: where each one's data lives, how to prompt for it, and which reward grades it.

Files are the normalised copies described in the data folder's README: ``<data_dir>/<name>/test.jsonl``, one JSON
object per line with ``id``, ``problem``, ``answer``, ``solution``, ``source`` and per-file metadata. The six test
sets ship inside the package (``PACKAGED_DATA``, about 4 MB), so evaluation works after ``pip install`` offline.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .data import PACKAGED_DATA, DataError, load_records

log = logging.getLogger(__name__)

DATA_DIR_ENV = "ASTARPO_DATA_DIR"
_SOLUTION_COLUMNS = ("solution", "solutions")  # reference solutions (olympiadbench keeps all in "solutions")

GSM8K_TEMPLATE = ("{problem}\n\nSolve the problem step by step. On the last line, write the final answer as "
                  "\"#### <number>\".")
BOXED_TEMPLATE = "{problem}\n\nPlease reason step by step, and put your final answer within \\boxed{}."


@dataclass(frozen=True)
class Benchmark:
    """One evaluation set: its file under the data folder, the reward that grades it, and its prompt template."""

    name: str
    reward: str  # a name in astarpo.rewards
    template: str  # "{problem}" is replaced by the problem text
    rows: int  # rows in the published file, to catch a truncated or stale copy

    @property
    def relpath(self) -> str:
        return f"{self.name}/test.jsonl"

    def prompt(self, problem: str) -> str:
        """The problem with the answer-format instruction applied."""
        return self.template.replace("{problem}", problem)


BENCHMARKS: dict[str, Benchmark] = {b.name: b for b in [
    Benchmark("gsm8k", "gsm8k", GSM8K_TEMPLATE, 1319),
    Benchmark("math500", "math", BOXED_TEMPLATE, 500),
    Benchmark("minerva_math", "math", BOXED_TEMPLATE, 272),
    Benchmark("olympiadbench", "math", BOXED_TEMPLATE, 675),
    Benchmark("amc23", "math", BOXED_TEMPLATE, 40),
    Benchmark("aime24", "math", BOXED_TEMPLATE, 30),
]}


def benchmark_names(spec: str) -> list[str]:
    """A comma list of benchmark names in the given order; ``all`` stands for the six, in the paper's order."""
    names = [x.strip() for x in spec.split(",") if x.strip()]
    return [b for name in names for b in (BENCHMARKS if name == "all" else [name])]


def get_benchmark(name: str) -> Benchmark:
    """The benchmark called ``name``; KeyError naming the known ones otherwise."""
    if name not in BENCHMARKS:
        raise KeyError(f"unknown benchmark {name!r}; choose one of {', '.join(BENCHMARKS)}")
    return BENCHMARKS[name]


def resolve_data_dir(data_dir: str | os.PathLike | None = None) -> Path:
    """The data folder: ``data_dir``, else ``$ASTARPO_DATA_DIR``, else the copy shipped with the package."""
    if data_dir is not None:
        path, origin = Path(data_dir), "data_dir argument"
    elif os.environ.get(DATA_DIR_ENV):
        path, origin = Path(os.environ[DATA_DIR_ENV]), f"${DATA_DIR_ENV}"
    else:
        path, origin = PACKAGED_DATA, "the copy shipped with astarpo; reinstall the package"
    if not path.is_dir():
        raise DataError(f"benchmark data folder {path} ({origin}) does not exist; pass data_dir or set "
                        f"{DATA_DIR_ENV} to the folder holding <benchmark>/test.jsonl")
    return path


def reported(result: dict[str, Any]) -> float:
    """A benchmark's figure as the paper reports it: avg@k where it was sampled k > 1 times (AMC23's avg@32),
    else greedy pass@1. The paper's Average is the mean of these."""
    return result.get("avg_at_k", result["accuracy"])


def load_benchmark(name: str, data_dir: str | os.PathLike | None = None, limit: int | None = None,
                   template: str | None = None) -> list[dict[str, Any]]:
    """Records ``{id, prompt, answer, **metadata}`` for benchmark ``name``, ready for evaluation.

    ``prompt`` is the problem with the benchmark's instruction applied, or inside ``template`` (``{prompt}`` marks
    the problem) when given: a model trained with another instruction is asked as it was trained. The reference
    solutions (``solution``, ``solutions``) are dropped, every other column is kept for the reward and the reports.
    """
    bench = get_benchmark(name)
    path = resolve_data_dir(data_dir) / bench.relpath
    if not path.is_file():
        raise DataError(f"{path}: no such file (benchmark {name!r} expects <data_dir>/{bench.relpath})")
    records = load_records(str(path), prompt_column="problem")
    if len(records) != bench.rows:
        log.warning("%s: %d rows, expected %d; the file may be truncated or a different version",
                    path, len(records), bench.rows)
    if limit is not None:
        records = records[:limit]
    out = []
    for rec in records:
        rec = {k: v for k, v in rec.items() if k not in _SOLUTION_COLUMNS}
        rec["prompt"] = bench.prompt(rec["prompt"]) if template is None else template.replace("{prompt}", rec["prompt"])
        out.append(rec)
    return out
