"""`astarpo eval --benchmarks`: the per-benchmark table, resume after an interruption, and the one-line errors."""

import importlib
import json
import os
from pathlib import Path

import pytest

from astarpo.benchmarks import BENCHMARKS, load_benchmark
from astarpo.cli import main
from astarpo.config import EvalConfig, build

DATA = Path(os.environ.get("ASTARPO_DATA_DIR") or Path(__file__).resolve().parents[2] / "shared" / "data")
pytestmark = pytest.mark.skipif(not (DATA / "gsm8k" / "test.jsonl").is_file(), reason=f"no benchmark data in {DATA}")
NAMES = list(BENCHMARKS)  # all six, a couple of problems each
evaluate_module = importlib.import_module("astarpo.evaluate")  # `astarpo.evaluate` is the function


def _argv(model, out, *extra):
    return ["eval", "--model", str(model), "--benchmarks", ",".join(NAMES), "--data-dir", str(DATA), "--limit", "2",
            "--max-new-tokens", "4", "--output", str(out), *extra]


def _interrupt_after_first(monkeypatch):
    """Let the first benchmark finish, then stop the run as a kill would."""
    real, calls = evaluate_module.evaluate, []

    def evaluate(*args, **kwargs):
        if calls:
            raise KeyboardInterrupt
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(evaluate_module, "evaluate", evaluate)


def _without_timings(result):
    return {**result, "benchmarks": {n: {k: v for k, v in r.items() if k != "seconds"}
                                     for n, r in result["benchmarks"].items()}}


def test_benchmarks_table_json_and_markdown(tiny_chat_model, tmp_path, capsys):
    out = tmp_path / "eval" / "result.json"
    assert main(_argv(tiny_chat_model, out, "--k", "2", "--reference", str(tiny_chat_model))) == 0
    result = json.loads(out.read_text())
    assert {"model", "reference", "k", "benchmarks", "average"} <= set(result)
    assert list(result["benchmarks"]) == NAMES and result["k"] == 2
    for name, r in result["benchmarks"].items():
        assert {"accuracy", "avg_at_k", "pass_at_k", "kl_to_ref", "prompts", "mean_response_tokens", "seconds",
                "samples"} <= set(r)
        assert r["prompts"] == 2 and [s["id"] for s in r["samples"]] == [rec["id"] for rec in
                                                                        load_benchmark(name, DATA, limit=2)]
        assert r["kl_to_ref"] == pytest.approx(0.0, abs=1e-5)  # the model is its own reference
    assert result["benchmarks"]["gsm8k"]["reward"] == "gsm8k" and result["benchmarks"]["aime24"]["reward"] == "math"
    # every benchmark sampled: the reported figure is avg@k throughout
    assert result["average"] == pytest.approx(sum(r["avg_at_k"] for r in result["benchmarks"].values()) / len(NAMES))
    table = (tmp_path / "eval" / "result.md").read_text()
    lines = [line for line in table.splitlines() if line.startswith("|")]
    assert lines[0] == ("| benchmark | prompts | pass@1 (%) | avg@2 (%) | pass@2 (%) | KL to ref | response tokens |")
    assert [line.split(" | ")[0] for line in lines[2:]] == [f"| {n}" for n in NAMES] + ["| **Average**"]
    assert lines[-1].startswith(f"| **Average** | {2 * len(NAMES)} |")
    assert capsys.readouterr().out == table
    assert not (tmp_path / "eval" / "result.json.parts").exists()


def test_benchmarks_resume_after_interruption_equals_uninterrupted(tiny_model, tmp_path, monkeypatch):
    assert main(_argv(tiny_model, tmp_path / "full.json", "--k", "2")) == 0
    out = tmp_path / "resumed.json"
    with monkeypatch.context() as m:
        _interrupt_after_first(m)
        with pytest.raises(KeyboardInterrupt):
            main(_argv(tiny_model, out, "--k", "2"))
    parts = tmp_path / "resumed.json.parts"
    assert sorted(p.name for p in parts.iterdir()) == ["gsm8k.json"] and not out.exists()

    real, evaluated = evaluate_module.evaluate, []

    def evaluate(model, tokenizer, records, *args, **kwargs):
        evaluated.append(records[0]["source"])
        return real(model, tokenizer, records, *args, **kwargs)

    monkeypatch.setattr(evaluate_module, "evaluate", evaluate)
    assert main(_argv(tiny_model, out, "--k", "2")) == 0
    assert evaluated == NAMES[1:]  # gsm8k came from its saved part
    assert not parts.exists()
    full, resumed = json.loads((tmp_path / "full.json").read_text()), json.loads(out.read_text())
    assert _without_timings(resumed) == _without_timings(full)


def test_benchmarks_refuse_parts_made_with_other_settings(tiny_model, tmp_path, monkeypatch, capsys):
    out = tmp_path / "r.json"
    with monkeypatch.context() as m:
        _interrupt_after_first(m)
        with pytest.raises(KeyboardInterrupt):
            main(_argv(tiny_model, out))
    capsys.readouterr()
    assert main([*_argv(tiny_model, out), "--max-new-tokens", "5"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "r.json.parts/gsm8k.json was made with other settings" in err
    assert "max_new_tokens: 4 -> 5" in err and (tmp_path / "r.json.parts" / "gsm8k.json").is_file()


def test_benchmark_k_samples_one_benchmark_k_times(tiny_model, tmp_path):
    """The paper's protocol: AMC23 as avg@k (32 there) beside greedy pass@1 for the others."""
    out = tmp_path / "r.json"
    argv = ["eval", "--model", str(tiny_model), "--benchmarks", "gsm8k,amc23", "--benchmark-k", "amc23=3",
            "--data-dir", str(DATA), "--limit", "2", "--max-new-tokens", "4", "--output", str(out)]
    assert main(argv) == 0
    result = json.loads(out.read_text())
    amc, gsm = result["benchmarks"]["amc23"], result["benchmarks"]["gsm8k"]
    assert amc["k"] == 3 and {"avg_at_k", "pass_at_k"} <= set(amc)
    assert gsm["k"] == 1 and "avg_at_k" not in gsm and result["settings"]["benchmark_k"] == "amc23=3"
    lines = [line for line in (tmp_path / "r.md").read_text().splitlines() if line.startswith("|")]
    assert lines[0] == ("| benchmark | prompts | pass@1 (%) | avg@3 (%) | pass@3 (%) | reported (%) "
                        "| response tokens |")
    assert lines[2].startswith("| gsm8k | 2 | ") and lines[2].split(" | ")[3:5] == ["-", "-"]
    assert lines[3].split(" | ")[3] == f"{100 * amc['avg_at_k']:.1f}"
    assert lines[4].split(" | ")[3] == f"{100 * amc['avg_at_k']:.1f}"  # the Average over the rows that have it
    # the paper's Average: gsm8k's pass@1 beside amc23's avg@3, not amc23's greedy answer
    assert result["average"] == pytest.approx((gsm["accuracy"] + amc["avg_at_k"]) / 2)
    assert [line.split(" | ")[5] for line in lines[2:]] == [
        f"{100 * x:.1f}" for x in (gsm["accuracy"], amc["avg_at_k"], result["average"])]


def test_a_benchmark_prompt_template_asks_every_benchmark_with_the_training_instruction(tiny_model, tmp_path):
    """The paper's recipes evaluate with the instruction they train with: eval's own prompt_template replaces
    each benchmark's; the top-level one (the training prompt set's) does not reach eval with benchmarks."""
    template = "{prompt} Let's think step by step and output the final answer within \\boxed{}."
    problems = [r["prompt"] for r in load_benchmark("math500", DATA, limit=2, template="{prompt}")]
    asked = [r["prompt"] for r in load_benchmark("math500", DATA, limit=2, template=template)]
    own = [r["prompt"] for r in load_benchmark("math500", DATA, limit=2)]
    assert asked == [f"{p} Let's think step by step and output the final answer within \\boxed{{}}." for p in problems]
    assert own == [f"{p}\n\nPlease reason step by step, and put your final answer within \\boxed{{}}."
                   for p in problems]
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"model: {tiny_model}\nprompt_template: &ask \"{{prompt}} Solve it.\"\n"
                      f"eval:\n  benchmarks: math500\n  prompt_template: *ask\n")
    assert build(EvalConfig, str(recipe)).prompt_template == "{prompt} Solve it."
    recipe.write_text(f"model: {tiny_model}\nprompt_template: \"{{prompt}} Solve it.\"\neval:\n  benchmarks: math500\n")
    assert build(EvalConfig, str(recipe)).prompt_template == "{prompt}"  # each benchmark's own
    out = tmp_path / "e.json"
    assert main(["eval", "--model", str(tiny_model), "--benchmarks", "math500", "--prompt-template",
                 "{prompt} Solve it.", "--data-dir", str(DATA), "--limit", "2", "--max-new-tokens", "2",
                 "--output", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["settings"]["instruction"] == "{prompt} Solve it."
    assert "instruction: `{prompt} Solve it.`" in (tmp_path / "e.md").read_text()


@pytest.mark.parametrize("flags, message", [
    (["--benchmarks", "gsm8k", "--benchmark-k", "amc23=32"], "benchmark_k names amc23, which benchmarks does not "
                                                             "list"),
    (["--benchmarks", "amc23", "--benchmark-k", "amc23=many"], "benchmark_k must be a comma list of name=k"),
    (["--benchmark-k", "amc23=32"], "data_dir and benchmark_k apply only with benchmarks"),
    (["--benchmarks", "gsm8k,gsm9k"], "unknown benchmark(s) gsm9k; known: gsm8k, math500, minerva_math, "
                                      "olympiadbench, amc23, aime24"),
    (["--benchmarks", "gsm8k", "--reward", "math"], "reward do(es) not apply with benchmarks"),
])
def test_benchmarks_config_errors(flags, message, tmp_path, capsys):
    assert main(["eval", *flags, "--output", str(tmp_path / "r.json")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err
