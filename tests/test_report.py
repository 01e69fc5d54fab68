"""`astarpo report` on fixture files (a killed run, eval results, the committed bench JSON) and on a tiny real run
made through the CLI, whose commands each end with a one-line summary and show progress bars."""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from astarpo.bench.report import report
from astarpo.cli import main
from astarpo.values import _SECONDS_KEY, _merge_shards, read_values

BENCH_JSON = Path(__file__).resolve().parents[1] / "benchmarks" / "results" / "bench" / "bench.json"


def _table(md: str) -> dict[str, list[str]]:
    """Markdown table rows by their first cell, and the header under 'run'."""
    rows = [line.strip("|").split(" | ") for line in md.splitlines() if line.startswith("| ")]
    return {r[0].strip(): [c.strip() for c in r[1:]] for r in rows}


def _check_png(path: Path) -> None:
    with Image.open(path) as im:
        im.verify()
    with Image.open(path) as im:
        assert im.format == "PNG" and im.size[0] > 600 and im.size[1] > 300


def _killed_run(run: Path) -> None:
    """A run stopped after step 3 of 6: no final/, checkpoint at step 2, half a line at the end of metrics.jsonl."""
    (run / "checkpoints" / "step-000002").mkdir(parents=True)
    (run / "train_config.json").write_text(json.dumps({"algo": "astarpo", "steps": 6, "values": None}))
    lines = [{"step": 0, "eval_accuracy": 0.25},
             {"step": 1, "reward": 0.1, "kl": 0.0, "step_seconds": 30.0, "peak_memory_mb": 2048.0},
             {"step": 2, "reward": 0.3, "kl": 0.05, "step_seconds": 10.0, "peak_memory_mb": 3072.0,
              "eval_accuracy": 0.5},
             {"step": 3, "reward": 0.4, "kl": 0.1, "step_seconds": 20.0, "peak_memory_mb": 2560.0}]
    (run / "metrics.jsonl").write_text("".join(json.dumps(m) + "\n" for m in lines) + '{"step": 4, "rew')


def test_report_from_files(tmp_path):
    run = tmp_path / "run"
    _killed_run(run)
    bench_eval = {"model": str(run / "checkpoints" / "step-000002"), "reference": "base", "k": 4, "settings": {},
                  "benchmarks": {"gsm8k": {"accuracy": 0.4, "avg_at_k": 0.35, "kl_to_ref": 0.2, "seconds": 1.0},
                                 "math500": {"accuracy": 0.1, "avg_at_k": 0.125, "kl_to_ref": 0.4, "seconds": 1.0}},
                  "average": 0.25}
    (tmp_path / "bench_eval.json").write_text(json.dumps(bench_eval))
    single = {"model": "other/model", "reference": None, "data": "arithmetic", "split": "test", "reward": "arithmetic",
              "prompts": 8, "accuracy": 0.625, "k": 1, "seconds": 2.0, "samples": []}
    (tmp_path / "single.json").write_text(json.dumps(single))
    md_path = report([str(run), str(tmp_path / "bench_eval.json"), str(tmp_path / "single.json"), str(BENCH_JSON)],
                     str(tmp_path / "out"))
    md = md_path.read_text()
    rows = _table(md)
    assert rows["run"][:3] == ["method", "gsm8k (pass@1 / avg@4)", "math500 (pass@1 / avg@4)"]
    # the run's row: its eval joined it (model under run/), KL from the eval (mean over benchmarks), 60 s of steps;
    # the Average over each benchmark's reported figure (avg@4 here, both sampled): (35 + 12.5) / 2
    assert rows[str(run)] == ["astarpo", "40.0 / 35.0", "10.0 / 12.5", "-", "23.8", "50.0", "0.300", "-",
                              "0.0167", "20.00", "3", "3.00"]
    assert rows["other/model"] == ["eval", "-", "-", "62.5 / -", "-", "-", "-", "-", "-", "-", "-", "-"]
    bench = json.loads(BENCH_JSON.read_text())["methods"]
    astarpo = bench["astarpo"]
    assert rows["astarpo"][5:] == [f"{100 * astarpo['accuracy']:.1f}", f"{astarpo['kl_to_ref']:.3f}",
                                   f"{astarpo['stage1_seconds'] / 3600:.3g}", f"{astarpo['train_seconds'] / 3600:.3g}",
                                   f"{astarpo['step_seconds']:.2f}", str(astarpo["curve"][-1]["step"]),
                                   f"{astarpo['peak_memory_mb'] / 1024:.2f}"]
    assert set(bench) <= set(rows)
    assert "no final/ model: still running or stopped at step 3 (last checkpoint step-000002)" in md
    assert "1 unreadable line(s) in metrics.jsonl skipped" in md
    for name in ("reward", "accuracy", "kl"):
        assert f"![{name}]({name}.png)" in md
        _check_png(tmp_path / "out" / f"{name}.png")


def test_stage1_hours_are_wall_clock_when_several_engines_sampled(tmp_path):
    """Four shards of known sampling seconds merged after two engines sampled them (each a contiguous block):
    the values file keeps the summed engine-seconds (`astarpo bench`'s figure, one process there) and records the
    busiest engine's seconds, the wall-clock time that the report puts beside Stage 2's summed step times."""
    shards = tmp_path / "v.parquet.shards"
    shards.mkdir()
    seconds = [100.0, 300.0, 200.0, 500.0]  # engine 0: 100 + 300, engine 1: 200 + 500
    for k, s in enumerate(seconds):
        table = pa.table({"id": [str(k)], "rewards": [[0.0, 1.0]], "lengths": [[3, 4]]})
        pq.write_table(table.replace_schema_metadata({_SECONDS_KEY: json.dumps(s).encode()}),
                       shards / f"shard-{k:05d}.parquet")
    _merge_shards(shards, len(seconds), len(seconds), {}, time.perf_counter(), tmp_path / "v.parquet", 2)
    provenance = read_values(tmp_path / "v.parquet").provenance
    assert (provenance["sampling_seconds"], provenance["sampling_wall_seconds"]) == (1100.0, 700.0)

    run = tmp_path / "run"
    _killed_run(run)
    (run / "train_config.json").write_text(json.dumps({"algo": "astarpo", "values": str(tmp_path / "v.parquet")}))
    row = _table(report([str(run)], str(tmp_path / "out")).read_text())[str(run)]
    assert row[3:5] == [f"{700 / 3600:.3g}", f"{60 / 3600:.3g}"]  # Stage 1 and Stage 2 hours, both wall-clock


def test_cli_summaries_progress_and_report_on_a_tiny_run(tiny_chat_model, tmp_path, capsys, caplog):
    flags = ["--model", str(tiny_chat_model), "--limit", "8", "--max-new-tokens", "4"]
    values, run, result = str(tmp_path / "v.parquet"), tmp_path / "run", str(tmp_path / "eval" / "r.json")
    with caplog.at_level(logging.INFO, logger="astarpo"):
        assert main(["values", *flags, "--n", "2", "--output", values]) == 0
        assert main(["train", *flags, "--values", values, "--output-dir", str(run), "--batch-size", "4",
                     "--steps", "4", "--no-filter-unsolved", "--eval-data", "arithmetic", "--eval-limit", "4",
                     "--eval-every", "2"]) == 0
        assert main(["eval", "--model", str(run / "final"), "--benchmarks", "gsm8k,aime24", "--limit", "2",
                     "--max-new-tokens", "4", "--output", result]) == 0
    summaries = [r.getMessage() for r in caplog.records if r.getMessage().startswith(("stage 1:", "stage 2:", "eval:"))]
    assert [s.split(":")[0] for s in summaries] == ["stage 1", "stage 2", "eval"]
    assert summaries[0].startswith("stage 1: 8 prompts, 16 samples")  # logged by compute_values itself
    assert summaries[1].startswith("stage 2: 4 steps in ") and summaries[1].endswith(str(run / "final"))
    assert summaries[2].startswith("eval: average pass@1 ") and "over 2 benchmark(s)" in summaries[2]
    err = capsys.readouterr().err
    assert "aime24:" in err and ("seq/s" in err or "s/seq" in err)  # the eval progress bar, with its rate

    assert main(["report", str(run), result, "--output-dir", str(tmp_path / "report")]) == 0
    md = (tmp_path / "report" / "report.md").read_text()
    assert capsys.readouterr().out.strip() == str(tmp_path / "report" / "report.md")
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    evals = json.loads(Path(result).read_text())["benchmarks"]
    row = _table(md)[str(run)]
    assert row[:4] == ["astarpo", f"{100 * evals['gsm8k']['accuracy']:.1f}", f"{100 * evals['aime24']['accuracy']:.1f}",
                       f"{50 * (evals['gsm8k']['accuracy'] + evals['aime24']['accuracy']):.1f}"]
    assert row[4] == f"{100 * metrics[-1]['eval_accuracy']:.1f}" and row[-2] == "4"
    assert "no final/" not in md
    for name in ("reward", "accuracy", "kl"):
        _check_png(tmp_path / "report" / f"{name}.png")


@pytest.mark.parametrize("kind, message", [
    ("missing", "missing: no such file or directory"),
    ("folder", "folder: a folder without metrics.jsonl, train_config.json or bench.json"),
    ("other.json", "other.json: JSON of an unknown kind"),
    ("text.json", "text.json: not a JSON file"),
])
def test_report_inputs_of_no_known_kind_are_one_line_errors(kind, message, tmp_path, capsys):
    (tmp_path / "folder").mkdir()
    (tmp_path / "other.json").write_text('{"a": 1}')
    (tmp_path / "text.json").write_text("not json")
    assert main(["report", str(tmp_path / kind), "--output-dir", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("astarpo: error: ") and message in err and err.count("\n") == 1
    assert not (tmp_path / "out").exists()
