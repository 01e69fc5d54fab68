"""`astarpo bench`: the report's arithmetic on known figures, then a real (tiny) run with resume; and
benchmarks/sampling.py end to end."""

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from astarpo.bench.compare import bench, choose_rates, heldout_records, markdown, summarize
from astarpo.config import BenchConfig, ConfigError
from astarpo.rundir import OutputError


def _metrics(path, step_seconds, samples, memory):
    path.mkdir(parents=True)
    lines = [{"step": i + 1, "step_seconds": s, "generation_seconds": s / 2, "tokens_per_second": 100.0 / s,
              "samples": samples, "peak_memory_mb": memory + i} for i, s in enumerate(step_seconds)]
    (path / "metrics.jsonl").write_text("".join(json.dumps(m) + "\n" for m in lines))


def _score(acc, kl, val=None):
    return {"accuracy": acc, "validation_accuracy": acc if val is None else val, "kl_to_ref": kl}


def test_report_figures(tmp_path):
    """Two methods, two seeds, two rates: the sweep's pick, means and spreads, interpolated time and KL at the
    target, the verdicts and the table, on known figures."""
    cfg = BenchConfig(algos="astarpo,grpo", external="trl-a2po", seeds="0,1", learning_rates="1e-5,2e-5", steps=4,
                      eval_every=2, batch_size=8, output_dir=str(tmp_path))
    for seed, stage1 in ((0, 30.0), (1, 40.0)):
        (tmp_path / f"seed{seed}").mkdir()
        (tmp_path / f"seed{seed}" / "stage1_seconds.json").write_text(str(stage1))
    _metrics(tmp_path / "seed0" / "lr1e-05" / "astarpo", [2.0, 2.0, 3.0, 2.0], 8, 1000)
    _metrics(tmp_path / "seed1" / "lr1e-05" / "astarpo", [2.0, 2.0, 2.0, 2.0], 8, 1000)
    _metrics(tmp_path / "seed0" / "lr2e-05" / "grpo", [10.0, 12.0, 10.0, 10.0], 64, 1600)
    _metrics(tmp_path / "seed1" / "lr2e-05" / "grpo", [10.0, 10.0, 10.0, 10.0], 64, 1600)
    for seed in (0, 1):  # TRL's A2PO: the first rate, its own Stage 1, no generation time or tokens/s
        run = tmp_path / f"seed{seed}" / "lr1e-05" / "trl-a2po"
        run.mkdir()
        (run / "metrics.jsonl").write_text("".join(
            json.dumps({"step": i, "step_seconds": 5.0, "samples": 8, "peak_memory_mb": 2000.0}) + "\n"
            for i in range(1, 5)))
        (run / "stage1_seconds.json").write_text("100.0")
    scores = {"base": {"0": _score(0.2, 0.0)},
              "0/1e-05/astarpo": {"2": _score(0.4, 1.0), "4": _score(0.6, 1.5, val=0.5)},
              "0/2e-05/astarpo": {"2": _score(0.4, 1.0), "4": _score(0.7, 4.0, val=0.5)},  # a tie: the first rate
              "0/1e-05/grpo": {"2": _score(0.3, 1.0), "4": _score(0.5, 2.0, val=0.3)},
              "0/2e-05/grpo": {"2": _score(0.3, 2.0), "4": _score(0.45, 3.0, val=0.6)},
              "1/1e-05/astarpo": {"2": _score(0.3, 0.8), "4": _score(0.5, 1.2)},
              "1/2e-05/grpo": {"2": _score(0.25, 2.0), "4": _score(0.35, 3.0)},
              "0/1e-05/trl-a2po": {"2": _score(0.4, 0.5), "4": _score(0.3, 0.6)},
              "1/1e-05/trl-a2po": {"2": _score(0.4, 0.5), "4": _score(0.3, 0.6)}}
    assert choose_rates(cfg, scores) == {"astarpo": 1e-5, "grpo": 2e-5}
    report = summarize(cfg, scores)
    a, g = report["methods"]["astarpo"], report["methods"]["grpo"]
    assert (a["learning_rate"], g["learning_rate"]) == (1e-5, 2e-5)
    assert (a["step_seconds"], g["step_seconds"], a["step_seconds_std"]) == (2.0, 10.0, 0.0)  # medians, then means
    assert (a["accuracy"], g["accuracy"], a["accuracy_std"]) == (0.55, 0.4, round(0.1 / 2 ** 0.5, 4))
    assert report["target_accuracy"] == 0.375  # halfway from 0.2 to the best mean, 0.55
    # seed 0 crosses 0.375 7/8 of the way to step 2 (4 s of steps), plus 30 s of Stage 1; seed 1 3/8 of the way
    # from step 2 (4 s) to step 4 (8 s), plus 40 s
    seeds = a["seeds"]
    assert (seeds["0"]["seconds_to_target"], seeds["1"]["seconds_to_target"]) == (33.5, 45.5)
    assert (seeds["0"]["kl_at_target"], seeds["1"]["kl_at_target"]) == (0.875, 0.95)
    assert (a["seconds_to_target"], a["kl_at_target"]) == (39.5, 0.9125)
    assert g["seeds"]["0"]["seconds_to_target"] == 32.0 and g["seeds"]["1"]["seconds_to_target"] is None
    assert (g["seconds_to_target"], g["seconds_to_target_n"]) == (32.0, 1)
    assert [c["accuracy"] for c in a["curve"]] == [0.2, 0.35, 0.55]  # the mean curve, for `astarpo report`
    # GRPO's final accuracy, the mean of 0.45 and 0.35: A*-PO's seed 0 reaches it at step 2 (4 s of steps, plus 30 s
    # of Stage 1), seed 1 half way from step 2 to step 4 (6 s, plus 40 s); GRPO's seed 1 never does
    assert report["grpo_final_accuracy"] == 0.4
    assert (seeds["0"]["seconds_to_grpo_final"], seeds["1"]["seconds_to_grpo_final"]) == (34.0, 46.0)
    assert (seeds["0"]["total_seconds"], seeds["0"]["train_generation_seconds"]) == (39.0, 4.5)
    assert g["seeds"]["1"]["seconds_to_grpo_final"] is None
    assert g["astarpo_verdict"] == {"accuracy": "wins", "kl_at_target": "n/a", "seconds_to_target": "n/a",
                                    "seconds_to_grpo_final": "n/a", "step_seconds": "wins", "peak_memory_mb": "wins"}
    assert report["learning_rate_sweep"]["grpo"]["2e-05"]["validation_accuracy"] == 0.6
    t = report["methods"]["trl-a2po"]  # reaches 0.375 7/8 of the way to step 2 (10 s), after 100 s of Stage 1
    assert (t["learning_rate"], t["stage1_seconds"], t["seconds_to_target"], t["tokens_per_second"]) == \
        (1e-5, 100.0, 108.75, None)
    assert t["astarpo_verdict"]["step_seconds"] == "wins" and t["astarpo_verdict"]["accuracy"] == "wins"
    table = markdown(report)
    assert "| grpo | 2e-05 | 64 | 10.00 ± 0.00 | 1603 ± 0 | 40.0 ± 7.1 | 3.00 ± 0.00 | 2.50 (1/2 seeds) |" in table
    assert "Target accuracy 37.5%" in table and "| grpo | wins | n/a | n/a | n/a | wins | wins |" in table
    assert "| grpo | 30% (50%, 2.00) | 60% (45%, 3.00) |" in table
    # where the time goes: Stage 1, then half of every step sampling (the figures above), the other half training
    assert "| astarpo | 35 | 4 | 4 | 44 ± 6 |" in table
    assert "| trl-a2po | 100 | n/a | n/a | 120 ± 0 |" in table


def test_report_with_rates_given_per_method(tmp_path):
    """method=rate: each method trains at its own rate at every seed, nothing is swept, and the report says so."""
    cfg = BenchConfig(algos="astarpo,grpo", seeds="0", learning_rates="grpo=2e-5,astarpo=1e-5", steps=2,
                      eval_every=2, output_dir=str(tmp_path))
    assert cfg.rates == {"astarpo": [1e-5], "grpo": [2e-5]}
    (tmp_path / "seed0").mkdir()
    (tmp_path / "seed0" / "stage1_seconds.json").write_text("10.0")
    _metrics(tmp_path / "seed0" / "lr1e-05" / "astarpo", [2.0, 2.0], 8, 1000)
    _metrics(tmp_path / "seed0" / "lr2e-05" / "grpo", [10.0, 10.0], 64, 1600)
    scores = {"base": {"0": _score(0.2, 0.0)}, "0/1e-05/astarpo": {"2": _score(0.5, 1.0)},
              "0/2e-05/grpo": {"2": _score(0.4, 2.0)}}
    report = summarize(cfg, scores)
    assert {n: m["learning_rate"] for n, m in report["methods"].items()} == {"astarpo": 1e-5, "grpo": 2e-5}
    # 0.2 -> 0.5 over 4 s of steps: 0.4 two thirds of the way, plus 10 s of Stage 1
    assert report["methods"]["astarpo"]["seconds_to_grpo_final"] == 12.667
    table = markdown(report)
    assert "Learning rates as given (no sweep)." in table and "Learning-rate sweep" not in table


def test_bench_config_errors():
    with pytest.raises(ConfigError, match="quick sets steps itself"):
        BenchConfig(quick=True, steps=10)
    with pytest.raises(ConfigError, match="choose one of quick, paper_regime"):
        BenchConfig(quick=True, paper_regime=True)
    with pytest.raises(ConfigError, match="method=rate must name each method once"):
        BenchConfig(algos="astarpo,grpo", learning_rates="astarpo=1e-5")
    with pytest.raises(ConfigError, match="distinct positive rates"):
        BenchConfig(learning_rates="1e-5,abc")
    with pytest.raises(ConfigError, match="not positive"):
        BenchConfig(learning_rates="astarpo=0,grpo=1e-5,rloo=1e-5,rebel=1e-5,ppo=1e-5")
    if importlib.util.find_spec("vllm") is None:  # the main environment: the preset samples with vLLM
        with pytest.raises(ConfigError, match="engine vllm needs vLLM"):
            BenchConfig(paper_regime=True)
    with pytest.raises(ConfigError, match="max_new_tokens must be >= 1"):
        BenchConfig(max_new_tokens=0)
    with pytest.raises(ConfigError, match="algos must be one of"):
        BenchConfig(algos="astarpo,dpo")
    with pytest.raises(ConfigError, match="each method once"):
        BenchConfig(algos="grpo,grpo")
    with pytest.raises(ConfigError, match="each seed once"):
        BenchConfig(seeds="0,0")
    with pytest.raises(ConfigError, match="distinct positive rates"):
        BenchConfig(learning_rates="1e-5,0")
    with pytest.raises(ConfigError, match="integers"):
        BenchConfig(seeds="0,x")
    with pytest.raises(ConfigError, match="must exceed validation_prompts"):
        BenchConfig(eval_limit=100, validation_prompts=100)


def test_heldout_problems_are_never_trained_on():
    from astarpo.config import QUICKSTART, TrainConfig, build
    from astarpo.data import load_records

    recipe = build(TrainConfig, QUICKSTART)
    held = heldout_records(recipe, 160)
    trained = {r["prompt"] for r in load_records("arithmetic", "train", 160)}
    assert len(held) == 512 - 160 + 128 and not trained & {r["prompt"] for r in held}


def test_bench_sweeps_then_trains_every_seed_and_resumes(tiny_model, tmp_path):
    """Two baselines (the tiny model never solves a problem, so A*-PO's Stage 1 would teach nothing), two rates
    swept at seed 0, then seed 1 at each method's pick; a rerun resumes and runs nothing."""
    cfg = BenchConfig(model=str(tiny_model), algos="rebel,grpo", steps=2, eval_every=1, batch_size=2,
                      train_prompts=8, seeds="0,1", learning_rates="1e-5,1e-3", eval_limit=8, validation_prompts=4,
                      kl_prompts=2, output_dir=str(tmp_path / "b"), json=str(tmp_path / "r.json"))
    report = bench(cfg)
    raw = json.loads((tmp_path / "r.json").read_text())
    assert raw == json.loads((tmp_path / "b" / "bench.json").read_text())
    assert set(raw["methods"]) == {"rebel", "grpo"} and raw["machine"]["torch"]
    assert set(raw["learning_rate_sweep"]["grpo"]) == {"1e-05", "0.001"}
    runs = sorted(str(p.relative_to(tmp_path / "b")) for p in (tmp_path / "b").glob("seed*/lr*/*/metrics.jsonl"))
    picked = {name: f"lr{m['learning_rate']:g}" for name, m in report["methods"].items()}
    assert runs == sorted([f"seed0/lr{lr}/{a}/metrics.jsonl" for lr in ("1e-05", "0.001") for a in ("rebel", "grpo")]
                          + [f"seed1/{picked[a]}/{a}/metrics.jsonl" for a in ("rebel", "grpo")])
    for name, samples in (("rebel", 4), ("grpo", 16)):
        m = report["methods"][name]
        assert m["samples_per_step"] == samples and m["peak_memory_mb"] > 0 and m["step_seconds"] > 0
        assert set(m["seeds"]) == {"0", "1"} and [c["step"] for c in m["curve"]] == [0, 1, 2]
        assert all(0 <= c["accuracy"] <= 1 and c["kl_to_ref"] == c["kl_to_ref"] for c in m["curve"])
    assert not list((tmp_path / "b").rglob("checkpoints")) and len(list((tmp_path / "b").rglob("final"))) == 6
    assert (tmp_path / "b" / "bench.png").stat().st_size > 0 and "| rebel | " in (tmp_path / "b" / "bench.md"
                                                                                    ).read_text()
    logs = {p: p.stat().st_size for p in (tmp_path / "b").rglob("*.log")}
    assert bench(cfg)["methods"].keys() == report["methods"].keys()  # a rerun finds everything done ...
    assert logs == {p: p.stat().st_size for p in (tmp_path / "b").rglob("*.log")}  # ... and runs nothing
    with pytest.raises(OutputError, match="holds a run with other settings \\(steps: 2 -> 3"):
        bench(BenchConfig(**{**cfg.__dict__, "steps": 3}))


@pytest.mark.parametrize("trainer", ["trl-grpo", "trl-a2po"])
def test_trl_rows_train_and_leave_scoreable_checkpoints(tiny_model, tmp_path, monkeypatch, trainer):
    """TRL's trainers as the bench runs them (in this process here), on a reward the tiny model can earn."""
    from astarpo import rewards
    from astarpo.bench.trl import run
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


def test_trl_rows_old_module_path_still_runs(tiny_model, tmp_path):
    """`python -m astarpo.bench_trl SPEC.json`, the path before astarpo/bench/, runs astarpo.bench.trl's entry point."""
    root = Path(__file__).resolve().parents[1]
    spec = {"trainer": "trl-grpo", "model_dir": str(tiny_model), "output_dir": str(tmp_path / "run"),
            "data": "arithmetic", "reward": "arithmetic", "train_prompts": 4, "batch_size": 2, "group_size": 2,
            "steps": 1, "save_every": 1, "max_new_tokens": 4, "learning_rate": 1e-6, "beta": 1e-3, "beta1": 0.5,
            "n": 2, "seed": 0}
    (tmp_path / "spec.json").write_text(json.dumps(spec))
    done = subprocess.run([sys.executable, "-m", "astarpo.bench_trl", str(tmp_path / "spec.json")],
                          env={**os.environ, "PYTHONPATH": str(root / "src")}, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    lines = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in lines] == [1] and (tmp_path / "run" / "trl" / "checkpoint-1").is_dir()


@pytest.mark.parametrize("trainer", ["trl-grpo", "trl-a2po"])
def test_trl_rows_sample_the_whole_distribution_like_astarpo(tiny_model, tmp_path, trainer):
    """astarpo samples with top_k 0; A2POConfig's top_k None would make generate() keep only the 50 likeliest."""
    from astarpo.bench.trl import build

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
