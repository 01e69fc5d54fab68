"""`astarpo report`: one Markdown file and a few PNGs from what the other commands wrote.

Inputs, any mix: train run directories (``metrics.jsonl``, ``train_config.json``, checkpoints; a run that is still
going or was killed works too: a half-written last line is skipped), eval results (``astarpo eval``'s JSON, one
prompt set or ``--benchmarks``) and bench results (``bench.json``, or the folder holding it). The table follows the
paper's: one row per run or method, pass@1 (and avg@k) per benchmark, KL to the reference, wall-clock hours and
peak memory. An eval of a model inside a given run directory (``RUN/final``) joins that run's row. The plots show
training reward, held-out accuracy and KL against step and against wall-clock (the sum of step times).
"""

from __future__ import annotations

import json
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..benchmarks import BENCHMARKS, reported


class ReportError(ValueError):
    """An input is not a train run, an eval result or a bench result; the message names it."""


@dataclass
class Row:
    """One line of the table (a run, a bench method, or an evaluated model) and its curves."""

    label: str
    method: str = ""
    benchmarks: dict[str, dict[str, Any]] = field(default_factory=dict)  # name -> evaluate()'s figures
    k: int = 1
    held_out: float | None = None  # accuracy on the held-out prompts scored during training
    kl: float | None = None
    stage1_seconds: float | None = None
    stage2_seconds: float | None = None
    step_seconds: float | None = None  # median
    steps: int | None = None
    peak_memory_mb: float | None = None
    notes: list[str] = field(default_factory=list)
    curve: list[dict[str, float]] = field(default_factory=list)  # step, seconds, reward / accuracy / kl


def read_metrics(path: Path) -> tuple[list[dict[str, Any]], int]:
    """metrics.jsonl as one dict per step (a step logged twice keeps its last line), and the unreadable lines."""
    by_step: dict[int, dict[str, Any]] = {}
    bad = 0
    for line in path.read_text().splitlines() if path.is_file() else []:
        try:
            m = json.loads(line)
            by_step[int(m["step"])] = m
        except (json.JSONDecodeError, KeyError, TypeError, ValueError):
            bad += 1  # a kill mid-write leaves half a line
    return [by_step[s] for s in sorted(by_step)], bad


def run_row(run: Path) -> Row:
    """A train run directory: figures from its metrics, config, checkpoints and (when found) its Stage 1 file."""
    cfg = json.loads((run / "train_config.json").read_text()) if (run / "train_config.json").is_file() else {}
    steps, bad = read_metrics(run / "metrics.jsonl")
    row = Row(str(run), cfg.get("algo", ""))
    elapsed = 0.0
    for m in steps:
        elapsed += m.get("step_seconds", 0.0)
        point = {"step": m["step"], "seconds": elapsed, "reward": m.get("reward"), "kl": m.get("kl"),
                 "accuracy": m.get("eval_accuracy")}
        row.curve.append({k: v for k, v in point.items() if v is not None})
    timed = [m for m in steps if "step_seconds" in m]
    if timed:
        row.steps, row.stage2_seconds = timed[-1]["step"], elapsed
        row.step_seconds = statistics.median(m["step_seconds"] for m in timed)
        row.peak_memory_mb = max(m.get("peak_memory_mb", 0.0) for m in timed) or None
        row.kl = next((m["kl"] for m in reversed(timed) if "kl" in m), None)
    row.held_out = next((m["eval_accuracy"] for m in reversed(steps) if "eval_accuracy" in m), None)
    if cfg.get("values"):
        row.stage1_seconds = _stage1_seconds(Path(cfg["values"]), run)
    if bad:
        row.notes.append(f"{bad} unreadable line(s) in metrics.jsonl skipped (a kill mid-write)")
    if not (run / "final").is_dir():
        ckpts = sorted((run / "checkpoints").glob("step-*")) if (run / "checkpoints").is_dir() else []
        last = f"last checkpoint {ckpts[-1].name}" if ckpts else "no checkpoint yet"
        row.notes.append(f"no final/ model: still running or stopped at step {row.steps or 0} ({last})")
    return row


def summary(row: Row) -> str:
    """One line for the end of `astarpo train`: steps, time, last reward and KL, held-out accuracy, memory."""
    last = next((c for c in reversed(row.curve) if "reward" in c), {})
    parts = [f"{row.steps or 0} steps in {_duration(row.stage2_seconds or 0.0)}"
             + (f" ({row.step_seconds:.2f} s/step)" if row.step_seconds else "")]
    parts += [f"reward {last['reward']:.3f}"] if "reward" in last else []
    parts += [f"KL {row.kl:.3f}"] if row.kl is not None else []
    first = next((c["accuracy"] for c in row.curve if "accuracy" in c), None)
    if row.held_out is not None:
        parts.append(f"held-out accuracy {first:.1%} -> {row.held_out:.1%}")
    parts += [f"peak memory {row.peak_memory_mb / 1024:.2f} GB"] if row.peak_memory_mb else []
    return ", ".join(parts)


def _duration(seconds: float) -> str:
    return f"{seconds:.1f} s" if seconds < 120 else f"{seconds / 60:.1f} min" if seconds < 7200 \
        else f"{seconds / 3600:.2f} h"


def _stage1_seconds(values: Path, run: Path) -> float | None:
    """Stage 1's wall-clock sampling and scoring time from the values file's provenance (the rule Stage 2's summed
    step times follow: start-up and loading excluded), if the file is where the run's config says.

    That is ``sampling_wall_seconds``, the busiest engine's time: a step's time is wall-clock whatever the number of
    processes, while ``sampling_seconds`` adds up every engine's shards and would make a Stage 1 of W engines look
    W times longer. A file written before that key existed gives ``sampling_seconds`` (the same figure for one
    process)."""
    import pyarrow.parquet as pq

    for path in (values, run.parent / values.name):  # as given (relative to where training ran), or beside the run
        if path.is_file():
            provenance = json.loads((pq.read_schema(path).metadata or {}).get(b"astarpo", b"{}"))
            return provenance.get("sampling_wall_seconds", provenance.get("sampling_seconds"))
    return None


def eval_row(path: Path, result: dict[str, Any]) -> Row:
    """`astarpo eval`'s JSON: one row, a column per benchmark (or one for the prompt set)."""
    row = Row(str(result["model"]), "eval")
    if "benchmarks" in result:
        row.benchmarks, row.k = dict(result["benchmarks"]), result["k"]
    else:
        row.benchmarks, row.k = {f"{result['data']} ({result['split']})": result}, result["k"]
    kls = [r["kl_to_ref"] for r in row.benchmarks.values() if "kl_to_ref" in r]
    row.kl = sum(kls) / len(kls) if kls else None
    return row


def bench_rows(bench: dict[str, Any]) -> list[Row]:
    """`astarpo bench`'s JSON: one row per method, its figures and accuracy/KL curve against training seconds
    averaged over the bench's seeds."""
    rows = []
    for name, m in bench["methods"].items():
        row = Row(name, name, held_out=m["accuracy"], kl=m["kl_to_ref"],
                  stage1_seconds=m["stage1_seconds"] or None, stage2_seconds=m["train_seconds"],
                  step_seconds=m["step_seconds"], steps=m["curve"][-1]["step"], peak_memory_mb=m["peak_memory_mb"])
        row.curve = [{"step": c["step"], "seconds": c["train_seconds"], "accuracy": c["accuracy"],
                      "kl": c["kl_to_ref"]} for c in m["curve"]]
        rows.append(row)
    return rows


def load(paths: list[str]) -> tuple[list[Row], list[str]]:
    """Rows for every input, in the given order, and one line per input saying what it was read as; an eval of
    ``RUN/...`` is merged into RUN's row."""
    rows: list[Row] = []
    runs: dict[Path, Row] = {}
    sources: list[str] = []
    for spec in paths:
        path = Path(spec)
        if path.is_dir() and (path / "bench.json").is_file() and not (path / "metrics.jsonl").exists():
            path = path / "bench.json"
        if path.is_dir():
            if not ((path / "metrics.jsonl").is_file() or (path / "train_config.json").is_file()):
                raise ReportError(f"{spec}: a folder without metrics.jsonl, train_config.json or bench.json; "
                                  "give a train run directory, an eval result JSON or a bench JSON")
            runs[path.resolve()] = row = run_row(path)
            rows.append(row)
            sources.append(f"`{spec}`: train run ({row.method or 'algo unknown'}, {row.steps or 0} steps)")
            continue
        if not path.is_file():
            raise ReportError(f"{spec}: no such file or directory")
        try:
            data = json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ReportError(f"{spec}: not a JSON file ({e}); give a train run directory, an eval result JSON "
                              "or a bench JSON") from e
        if isinstance(data, dict) and "methods" in data:
            rows += bench_rows(data)
            recipe = data.get("settings", {}).get("recipe", {})
            sources.append(f"`{path}`: `astarpo bench`, {len(data['methods'])} methods, model "
                           f"`{recipe.get('model', '?')}`, task `{recipe.get('data', '?')}` (held-out acc: problems no "
                           f"method trains on; figures are means over seeds; Stage 2 hours exclude the scoring)")
        elif isinstance(data, dict) and "model" in data and ("benchmarks" in data or "accuracy" in data):
            row = eval_row(path, data)
            model = Path(str(data["model"])).resolve()
            owner = next((r for p, r in runs.items() if model.is_relative_to(p)), None)
            sources.append(f"`{spec}`: eval of `{data['model']}`" + ("" if owner is None else f" (in {owner.label})"))
            if owner is None:
                rows.append(row)
            else:  # the run's own model: its benchmarks and measured KL join the run's row
                owner.benchmarks.update(row.benchmarks)
                owner.k, owner.kl = row.k, row.kl if row.kl is not None else owner.kl
                owner.notes += row.notes
        else:
            raise ReportError(f"{spec}: JSON of an unknown kind (no 'methods', 'benchmarks' or 'accuracy' key); "
                              "give a train run directory, an eval result JSON or a bench JSON")
    return rows, sources


def _cell(x: float | None, spec: str, scale: float | None = None) -> str:
    return "-" if x is None else f"{x if scale is None else x * scale:{spec}}"


def markdown(rows: list[Row], sources: list[str], plots: list[str]) -> str:
    """The paper-style table (accuracies in percent), notes per row, and the plots."""
    names = list(dict.fromkeys(b for r in rows for b in r.benchmarks))
    k = max((r.k for r in rows), default=1)
    bench_title = f" (pass@1 / avg@{k})" if k > 1 else " (pass@1)"
    paper = [n for n in names if n in BENCHMARKS]  # the Average is over the named benchmarks only
    head = ["run", "method", *[n + bench_title for n in names]] + (["Average"] if len(paper) > 1 else [])
    head += ["held-out acc", "KL to ref", "Stage 1 (h)", "Stage 2 (h)", "s/step", "steps", "peak memory (GB)"]
    intro = ("Accuracies in percent (greedy pass@1; avg@k over k samples at the eval temperature; the Average is "
             "over each benchmark's reported figure, avg@k where sampled). KL to ref: "
             "measured on sampled responses by `astarpo eval` or `astarpo bench` where given, else the last training "
             "step's estimate. Hours are summed step times (Stage 2) and the values file's wall-clock sampling time "
             "(Stage 1: its busiest engine's, where several sampled side by side; a bench row's Stage 1 ran in one "
             "process).")
    lines = ["# astarpo report", "", intro, "",
             "Read from:", "", *[f"- {line}" for line in sources], "",
             "| " + " | ".join(head) + " |", "|---|---|" + "---:|" * (len(head) - 2)]
    for r in rows:
        cells = [r.label, r.method or "-"]
        for n in names:
            b = r.benchmarks.get(n)
            cells.append("-" if b is None else _cell(b["accuracy"], ".1f", 100)
                         + (f" / {_cell(b.get('avg_at_k'), '.1f', 100)}" if k > 1 else ""))
        if len(paper) > 1:  # like the paper's, only for a row that has every one of them
            acc = [reported(r.benchmarks[n]) for n in paper if n in r.benchmarks]
            cells.append(_cell(sum(acc) / len(acc), ".1f", 100) if len(acc) == len(paper) else "-")
        cells += [_cell(r.held_out, ".1f", 100), _cell(r.kl, ".3f"), _cell(r.stage1_seconds, ".3g", 1 / 3600),
                  _cell(r.stage2_seconds, ".3g", 1 / 3600), _cell(r.step_seconds, ".2f"), _cell(r.steps, "d"),
                  _cell(r.peak_memory_mb, ".2f", 1 / 1024)]
        lines.append("| " + " | ".join(cells) + " |")
    notes = [f"- {r.label}: {n}" for r in rows for n in r.notes]
    lines += ["", *notes, ""] if notes else [""]
    lines += [f"![{Path(p).stem}]({p})" for p in plots]
    return "\n".join(lines).rstrip() + "\n"


PLOTS = {"reward": "training reward (batch mean)", "accuracy": "held-out accuracy (%)", "kl": "KL to reference (nats)"}


def plot(rows: list[Row], key: str, path: Path) -> bool:
    """``key`` against step and against wall-clock, one line per row; False (no file) when no row has it."""
    series = [(r.label, [c for c in r.curve if key in c]) for r in rows]
    series = [(label, pts) for label, pts in series if pts]
    if not series:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    longest = max(p["seconds"] for _, pts in series for p in pts)
    unit, scale = ("s", 1) if longest < 300 else ("min", 60) if longest < 5 * 3600 else ("h", 3600)
    fig, (by_step, by_time) = plt.subplots(1, 2, figsize=(11, 4), sharey=True)
    for label, pts in series:
        style = {"marker": "o", "markersize": 3} if len(pts) < 40 else {}
        ys = [p[key] * (100 if key == "accuracy" else 1) for p in pts]
        by_step.plot([p["step"] for p in pts], ys, label=label, **style)
        by_time.plot([p["seconds"] / scale for p in pts], ys, label=label, **style)
    by_step.set(xlabel="step", ylabel=PLOTS[key], title=f"{PLOTS[key]} by step")
    by_time.set(xlabel=f"Stage 2 wall-clock ({unit}, sum of step times)", title=f"{PLOTS[key]} by time")
    for ax in (by_step, by_time):
        ax.grid(alpha=0.3)
    by_time.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def report(paths: list[str], output_dir: str = "runs/report") -> Path:
    """Write ``report.md`` and one PNG per metric found into ``output_dir``; returns the Markdown file."""
    from ..rundir import write_text_atomic

    rows, sources = load(paths)
    out = Path(output_dir)
    plots = [f"{key}.png" for key in PLOTS if plot(rows, key, out / f"{key}.png")]
    md = out / "report.md"
    write_text_atomic(md, markdown(rows, sources, plots))
    return md
