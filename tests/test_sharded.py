"""FSDP2 and DeepSpeed ZeRO-2/3 on this CPU: two processes launched with the shipped accelerate configs
(`accelerate launch --config_file configs/accelerate/<strategy>_1node_8gpu.yaml --num_processes 2`), against DDP.

Stage 2 runs greedy (temperature 0), so every strategy sees the same responses and must make the same updates;
they differ only in the order of floating-point reductions. Measured on this machine over 6 steps of the tiny
model: losses within 1e-6 of DDP, final weights within 2e-6 (ZeRO-3 the widest). The tests allow 1e-5. A killed
run resumed from its checkpoint ends with exactly the weights of an uninterrupted run (AdamW state included).

Every launch has a time limit, and a failed or hung one shows each rank's last lines (``tests/launcher.py``).
DeepSpeed's first launch on a machine compiles a communication op (about 90 s).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from launcher import ENV, LIMIT_S, launch, launch_and_kill
from safetensors.torch import load_file

pytest.importorskip("deepspeed")

TOL = 1e-5


@pytest.fixture(scope="module")
def work(tmp_path_factory, tiny_model) -> Path:
    """A Stage 1 file of greedy responses with varied rewards (the tiny model earns none: no gradient without)."""
    d = tmp_path_factory.mktemp("sharded")
    subprocess.run([sys.executable, "-m", "astarpo", "values", "--model", str(tiny_model), "--max-new-tokens", "6",
                    "--limit", "12", "--temperature", "0", "--n", "1", "--output", "g.parquet"],
                   cwd=d, env=ENV, check=True, capture_output=True, timeout=LIMIT_S)
    table = pq.read_table(d / "g.parquet")
    varied = pa.array([[-(i % 5) / 4] for i in range(table.num_rows)], pa.list_(pa.float64()))
    pq.write_table(table.set_column(table.column_names.index("rewards"), "rewards", varied), d / "g.parquet")
    return d


def _train(tiny_model: Path, out: str, *extra: str) -> list[str]:
    return ["train", "--model", str(tiny_model), "--max-new-tokens", "6", "--limit", "12", "--temperature", "0",
            "--values", "g.parquet", "--no-filter-unsolved", "--beta1", "inf", "--batch-size", "8",
            "--mini-batch-size", "4", "--micro-batch-size", "1", "--learning-rate", "1e-2", "--beta2", "0.1",
            "--steps", "6", "--save-every", "2", "--output-dir", out, *extra]


def _metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def _assert_close_runs(a: Path, b: Path, weights: str, tol: float) -> None:
    ma, mb = _metrics(a), _metrics(b)
    assert [m["step"] for m in ma] == [m["step"] for m in mb]
    for x, y in zip(ma, mb):
        for key in ("reward", "loss", "log_ratio", "grad_norm"):
            if key in x:
                assert abs(x[key] - y[key]) <= tol * max(1.0, abs(x[key])), (key, x[key], y[key])
    wa, wb = load_file(a / "final" / weights), load_file(b / "final" / weights)
    assert sorted(wa) == sorted(wb)
    assert max(float((wa[k].float() - wb[k].float()).abs().max()) for k in wa) <= tol


@pytest.fixture(scope="module")
def ddp_run(work, tiny_model) -> Path:
    launch("ddp", _train(tiny_model, "ddp"), work)
    return work / "ddp"


@pytest.mark.parametrize("strategy", ["fsdp2", "zero2", "zero3"])
def test_strategy_matches_ddp_and_resumes_after_a_kill(strategy, work, tiny_model, ddp_run):
    launch(strategy, _train(tiny_model, strategy), work)
    run = work / strategy
    _assert_close_runs(ddp_run, run, "model.safetensors", TOL)
    start = load_file(tiny_model / "model.safetensors")
    final = load_file(run / "final" / "model.safetensors")
    assert max(float((final[k] - start[k]).abs().max()) for k in final) > 1e-2  # it trained
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(run / "final")  # a plain Hugging Face directory
    checkpoint = {p.name for p in (run / "checkpoints" / "step-000006").iterdir()}
    assert {"random_states_0.pkl", "random_states_1.pkl"} <= checkpoint
    assert ("pytorch_model" if strategy.startswith("zero") else "pytorch_model_fsdp.bin") in checkpoint  # resume
    step6 = load_file(run / "checkpoints" / "step-000006" / "model.safetensors")  # and a Hugging Face copy
    assert all(torch.equal(step6[k], final[k]) for k in final)

    # Kill every process once the step-2 checkpoint exists, then run the same command again.
    killed = work / f"{strategy}-killed"
    args = _train(tiny_model, killed.name)
    launch_and_kill(strategy, args, work, until=killed / "checkpoints" / "step-000002")
    assert not (killed / "final").exists()
    err = launch(strategy, args, work)
    assert "resumed from" in err
    _assert_close_runs(run, killed, "model.safetensors", 0.0)  # exactly the uninterrupted run


def test_zero2_bf16_reference_is_in_the_policys_precision(work, tiny_model):
    """DeepSpeed with bf16 holds the policy's weights in bf16 (its float32 master copy in the optimizer), so the
    reference must be bf16 too: at step 1 the policy is the reference and log pi - log pi_ref must be zero (measured
    4e-6: the order of bf16 sums). With a float32 reference the logged KL at step 1 was 1.1."""
    launch("zero2", _train(tiny_model, "zero2-bf16", "--mixed-precision", "bf16", "--steps", "1"), work)
    first = _metrics(work / "zero2-bf16")[0]
    assert abs(first["log_ratio"]) < 1e-4, first


@pytest.fixture(scope="module")
def ddp_lora(work, tiny_model) -> Path:
    launch("ddp", _train(tiny_model, "lora-ddp", "--lora-rank", "4", "--lora-alpha", "8"), work)
    return work / "lora-ddp"


@pytest.mark.parametrize("strategy", ["fsdp2", "zero2", "zero3"])
def test_lora_matches_ddp(strategy, work, tiny_model, ddp_lora):
    """Also the per-token gathering of FSDP2 and ZeRO-3 (the other tests gather once for sampling)."""
    launch(strategy, _train(tiny_model, f"lora-{strategy}", "--lora-rank", "4", "--lora-alpha", "8",
                            "--no-gather-for-generation"), work)
    _assert_close_runs(ddp_lora, work / f"lora-{strategy}", "adapter_model.safetensors", TOL)


def test_unsupported_combination_stops_with_a_reason(work, tiny_model):
    err = launch("zero3", _baseline(tiny_model, "ppo", "ppo-zero3"), work, ok=False)
    assert "PPO's critic under DeepSpeed" in err


def _baseline(tiny_model: Path, algo: str, out: str) -> list[str]:
    return ["train", "--model", str(tiny_model), "--algo", algo, "--max-new-tokens", "6", "--limit", "12",
            "--batch-size", "4", "--mini-batch-size", "2", "--micro-batch-size", "2", "--learning-rate", "1e-2",
            "--steps", "2", "--seed", "3", "--output-dir", out]


@pytest.mark.parametrize("algo,strategy", [("rloo", "fsdp2"), ("rloo", "zero3"), ("ppo", "fsdp2")])
def test_baselines_match_ddp(algo, strategy, work, tiny_model):
    """RLOO (reference, old log-probs, two updates per step) and PPO (critic) under sharding: sampled responses,
    so the same seeds on the same number of processes must give the same run."""
    if not (work / f"{algo}-ddp").exists():
        launch("ddp", _baseline(tiny_model, algo, f"{algo}-ddp"), work)
    launch(strategy, _baseline(tiny_model, algo, f"{algo}-{strategy}"), work)
    _assert_close_runs(work / f"{algo}-ddp", work / f"{algo}-{strategy}", "model.safetensors", TOL)


def test_stage1_under_sharded_configs_matches_ddp(work, tiny_model):
    args = ["values", "--model", str(tiny_model), "--max-new-tokens", "6", "--limit", "10", "--n", "3",
            "--shard-size", "2"]
    for strategy in ("ddp", "fsdp2", "zero3"):
        launch(strategy, [*args, "--output", f"v-{strategy}.parquet"], work)
    ddp = pd.read_parquet(work / "v-ddp.parquet")
    assert len(ddp) == 10
    for strategy in ("fsdp2", "zero3"):
        assert ddp.equals(pd.read_parquet(work / f"v-{strategy}.parquet"))
    assert torch.tensor([sum(r) for r in ddp["rewards"]]).isfinite().all()


@pytest.mark.parametrize("strategy", ["fsdp2", "zero3"])
def test_weights_reach_the_engine_in_buckets_in_its_dtype(strategy, tmp_path):
    """The push into a generation engine (``whole_weights``), on every process: the state dict's names in its
    order, each tensor exactly the model's whole weight (gathered another way, accelerate's state dict), or its
    bfloat16 cast, cast before the gather (the all-gathers move bfloat16), with fewer all-gathers than tensors
    (buckets of several). FSDP2's uneven split (51 + 50 rows) and empty shard (a one-row tensor) included."""
    launch(strategy, [str(tmp_path)], tmp_path, script=Path(__file__).parent / "push_weights.py")
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1)]
    full = ranks[0]["full"]
    assert "model.probe" in full and full["model.embed_tokens.weight"].shape[0] == 101
    for rank in ranks:
        for dtype, run in rank["runs"].items():
            assert run["names"] == rank["order"] == ranks[0]["order"]
            sent = run["tensors"]
            assert set(sent) - set(full) == {"lm_head.weight"}  # tied: kept once in the saved state dict
            assert torch.equal(sent["lm_head.weight"], sent["model.embed_tokens.weight"])
            cast = torch.bfloat16 if dtype == "torch.bfloat16" else torch.float32
            for name, whole in full.items():
                assert sent[name].dtype == cast and torch.equal(sent[name], whole.to(cast)), (dtype, name)
            assert 1 < len(run["gathers"]) < len(sent) // 2
            assert set(run["gathers"]) == {str(cast)}
        assert len(rank["runs"]["torch.bfloat16"]["gathers"]) < len(rank["runs"]["None"]["gathers"])
