"""`astarpo bench`: the report's arithmetic on known figures, then a real (tiny) run with resume; and
benchmarks/sampling.py end to end."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from astarpo.bench import bench, markdown, summarize
from astarpo.config import BenchConfig, ConfigError
from astarpo.rundir import OutputError


def _metrics(path, step_seconds, samples, memory):
    path.mkdir(parents=True)
    lines = [{"step": i + 1, "step_seconds": s, "generation_seconds": s / 2, "tokens_per_second": 100.0 / s,
              "samples": samples, "peak_memory_mb": memory + i} for i, s in enumerate(step_seconds)]
    (path / "metrics.jsonl").write_text("".join(json.dumps(m) + "\n" for m in lines))


def test_report_figures(tmp_path):
    cfg = BenchConfig(algos="astarpo,grpo", external="trl-a2po", steps=4, eval_every=2, batch_size=8,
                      output_dir=str(tmp_path))
    _metrics(tmp_path / "astarpo", [2.0, 2.0, 3.0, 2.0], 8, 1000)
    _metrics(tmp_path / "grpo", [10.0, 12.0, 10.0, 10.0], 64, 1600)
    (tmp_path / "trl-a2po").mkdir()  # TRL's rows carry no generation time or tokens/s
    (tmp_path / "trl-a2po" / "metrics.jsonl").write_text("".join(
        json.dumps({"step": i, "step_seconds": 5.0, "samples": 8, "peak_memory_mb": 2000.0}) + "\n"
        for i in range(1, 5)))
    base = {"accuracy": 0.2, "kl_to_ref": 0.0}
    scores = {"base": {"0": base},
              "astarpo": {"2": {"accuracy": 0.5, "kl_to_ref": 1.0}, "4": {"accuracy": 0.6, "kl_to_ref": 1.5}},
              "grpo": {"2": {"accuracy": 0.3, "kl_to_ref": 2.0}, "4": {"accuracy": 0.45, "kl_to_ref": 3.0}},
              "trl-a2po": {"2": {"accuracy": 0.4, "kl_to_ref": 0.5}, "4": {"accuracy": 0.3, "kl_to_ref": 0.6}}}
    report = summarize(cfg, scores, {"astarpo": 30.0, "trl-a2po": 100.0})
    a, g = report["methods"]["astarpo"], report["methods"]["grpo"]
    assert (a["step_seconds"], g["step_seconds"]) == (2.0, 10.0)  # medians
    assert (a["peak_memory_mb"], g["peak_memory_mb"]) == (1003, 1603) and a["prompt_seconds"] == 0.25
    assert report["target_accuracy"] == 0.4  # halfway from 0.2 to the best, 0.6
    # A*-PO reaches 0.5 after 4 s of steps, plus 30 s of Stage 1; GRPO reaches 0.45 after 42 s
    assert (a["seconds_to_target"], g["seconds_to_target"]) == (34.0, 42.0)
    assert g["astarpo_step_time_ratio"] == 0.2 and g["astarpo_memory_ratio"] == round(1003 / 1603, 3)
    assert g["astarpo_time_to_target_ratio"] == round(34 / 42, 3)
    assert [c["train_seconds"] for c in g["curve"]] == [0.0, 22.0, 42.0] and a["kl_to_ref"] == 1.5
    t = report["methods"]["trl-a2po"]  # reaches 0.4 after 10 s of steps and 100 s of its own Stage 1
    assert t["seconds_to_target"] == 110.0 and t["tokens_per_second"] is None and t["astarpo_step_time_ratio"] == 0.4
    table = markdown(report)
    assert "| grpo | 64 | 10.00 | 1.25 |" in table and "Target accuracy 40%" in table
    assert "| trl-a2po | 8 | 5.00 | 0.62 | n/a |" in table


def test_bench_config_errors():
    with pytest.raises(ConfigError, match="quick sets steps itself"):
        BenchConfig(quick=True, steps=10)
    with pytest.raises(ConfigError, match="algos must be one of"):
        BenchConfig(algos="astarpo,dpo")
    with pytest.raises(ConfigError, match="each method once"):
        BenchConfig(algos="grpo,grpo")


def test_bench_runs_interleaved_and_resumes(tiny_model, tmp_path):
    """Two baselines (the tiny model never solves a problem, so A*-PO's Stage 1 would keep no prompt)."""
    cfg = BenchConfig(model=str(tiny_model), algos="rebel,grpo", steps=2, eval_every=1, batch_size=2,
                      train_prompts=8, eval_limit=4, output_dir=str(tmp_path / "b"), json=str(tmp_path / "r.json"))
    report = bench(cfg)
    raw = json.loads((tmp_path / "r.json").read_text())
    assert raw == json.loads((tmp_path / "b" / "bench.json").read_text())
    assert set(raw["methods"]) == {"rebel", "grpo"} and raw["machine"]["torch"]
    for name, samples in (("rebel", 4), ("grpo", 16)):
        m = report["methods"][name]
        assert m["samples_per_step"] == samples and m["peak_memory_mb"] > 0 and m["step_seconds"] > 0
        assert [c["step"] for c in m["curve"]] == [0, 1, 2]
        assert all(0 <= c["accuracy"] <= 1 and c["kl_to_ref"] == c["kl_to_ref"] for c in m["curve"])
    assert (tmp_path / "b" / "bench.png").stat().st_size > 0 and "| rebel | 4 |" in (tmp_path / "b" / "bench.md"
                                                                                       ).read_text()
    logs = {p.name: p.stat().st_size for p in (tmp_path / "b").glob("*.log")}
    assert bench(cfg)["methods"].keys() == report["methods"].keys()  # a rerun finds everything done ...
    assert logs == {p.name: p.stat().st_size for p in (tmp_path / "b").glob("*.log")}  # ... and runs nothing
    with pytest.raises(OutputError, match="holds a run with other settings \\(steps: 2 -> 3"):
        bench(BenchConfig(**{**cfg.__dict__, "steps": 3}))


@pytest.mark.parametrize("trainer", ["trl-grpo", "trl-a2po"])
def test_trl_rows_train_and_leave_scoreable_checkpoints(tiny_model, tmp_path, monkeypatch, trainer):
    """TRL's trainers as the bench runs them (in this process here), on a reward the tiny model can earn."""
    from astarpo import rewards
    from astarpo.bench_trl import run
    from astarpo.models import load_model

    monkeypatch.setitem(rewards._REGISTRY, "has_digit", lambda prompts, completions, **_: [
        float(any(ch.isdigit() for ch in c)) for c in completions])
    spec = {"trainer": trainer, "model_dir": str(tiny_model), "output_dir": str(tmp_path / trainer),
            "data": "arithmetic", "reward": "has_digit", "train_prompts": 8, "batch_size": 2, "group_size": 2,
            "steps": 2, "save_every": 1, "max_new_tokens": 6, "learning_rate": 1e-3, "beta": 1e-3, "beta1": 0.5,
            "n": 4, "seed": 0}
    run(spec)
    lines = [json.loads(x) for x in (tmp_path / trainer / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in lines] == [1, 2]
    assert all(m["step_seconds"] > 0 and m["peak_memory_mb"] > 0 for m in lines)
    assert lines[0]["samples"] == (4 if trainer == "trl-grpo" else 2)
    start = load_model(tiny_model).state_dict()
    trained = load_model(tmp_path / trainer / "trl" / "checkpoint-2").state_dict()
    assert any(not torch.equal(start[k], trained[k]) for k in start)
    assert (tmp_path / trainer / "stage1_seconds.json").is_file() == (trainer == "trl-a2po")


@pytest.mark.parametrize("trainer", ["trl-grpo", "trl-a2po"])
def test_trl_rows_sample_the_whole_distribution_like_astarpo(tiny_model, tmp_path, trainer):
    """astarpo samples with top_k 0; A2POConfig's top_k None would make generate() keep only the 50 likeliest."""
    from astarpo.bench_trl import build

    spec = {"trainer": trainer, "model_dir": str(tiny_model), "output_dir": str(tmp_path), "data": "arithmetic",
            "reward": "arithmetic", "train_prompts": 4, "batch_size": 2, "group_size": 2, "steps": 1,
            "save_every": 1, "max_new_tokens": 4, "learning_rate": 1e-6, "beta": 1e-3, "beta1": 0.5, "n": 2,
            "seed": 0}
    trainer_obj, _ = build(spec, [])
    configs = [trainer_obj.generation_config, trainer_obj.value_generation_config] if trainer == "trl-a2po" \
        else [trainer_obj.generation_config]
    assert trainer_obj.args.top_k == 0 and all(c.top_k == 0 for c in configs)

def test_sampling_benchmark_runs_every_variant(tiny_model, tmp_path):
    """benchmarks/sampling.py end to end on the tiny model: every Stage 1 variant (TRL's too) draws N samples per
    prompt, shared prefill and plain generate draw the same tokens, and both trainers' Stage 2 steps are timed."""
    root = Path(__file__).resolve().parents[1]
    out = tmp_path / "sampling"
    done = subprocess.run([sys.executable, str(root / "benchmarks" / "sampling.py"), "--model", str(tiny_model),
                           "--prompts", "4", "--n", "2", "--max-new-tokens", "4", "--batch-size", "4", "--reps", "2",
                           "--steps", "2", "--out", str(out)],
                          env={**os.environ, "PYTHONPATH": str(root / "src")}, capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(out.with_suffix(".json").read_text())
    variants = result["variants"]
    assert list(variants) == ["shared_prefill", "plain_generate", "shared_prefill_bf16", "continuous_batching",
                              "trl_a2po_stage1"]
    assert all([r["samples"] for r in v["runs"]] == [8, 8] for v in variants.values())
    assert result["identical_responses_per_rep"] == [1.0, 1.0]
    assert {k: len(v) for k, v in result["stage2_step_seconds"].items()} == {"astarpo": 2, "trl_a2po": 2}
    assert "| trl_a2po_stage1 |" in out.with_suffix(".md").read_text()
