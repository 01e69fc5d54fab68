"""The hybrid engine on vLLM's CPU build: two processes under `accelerate launch`, each with its own vLLM engine
sampling its own prompts (vLLM's external_launcher executor over the launch's gloo group), or one engine over both
(``--vllm-tensor-parallel-size 2``), beside DDP, FSDP2 and ZeRO-3 (ZeRO-2 is not launched here: the main suite's
tests/test_sharded.py covers its update, and each launch here costs half a minute). After every optimizer step each
process's engine gets the policy's whole weights (gathered one tensor at a time from FSDP2's and ZeRO-3's shards).

Each launch starts two engines (eager mode, a 0.25 GiB KV cache each): about half a minute on two cores.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

pytest.importorskip("vllm")
pytest.importorskip("deepspeed")

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/: the launcher and the tiny model
from conftest import build_tiny_model  # noqa: E402
from launcher import launch, launch_and_kill, rank_stderr  # noqa: E402
from safetensors.torch import load_file  # noqa: E402

from astarpo import EvalConfig, ValuesConfig, compute_values  # noqa: E402
from astarpo.cli import main  # noqa: E402
from astarpo.evaluate import run_eval  # noqa: E402

ENGINE = ["--engine", "vllm", "--vllm-enforce-eager", "--vllm-kv-cache-gb", "0.25", "--max-prompt-tokens", "64",
          "--max-new-tokens", "8"]


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("hybrid")
    build_tiny_model(d / "model", hidden_size=64)  # heads of 32: vLLM's CPU attention refuses 16
    return d


@pytest.fixture(scope="module")
def stage1(work) -> Path:
    """Stage 1 in two processes with vLLM, then the same in one: row for row the same file. Its rewards are then
    replaced by varied ones (the tiny model earns none, so there would be no gradient) for the training tests."""
    args = ["--model", str(work / "model"), *ENGINE, "--limit", "12", "--n", "3", "--shard-size", "2",
            "--save-responses"]
    launch("ddp", ["values", *args, "--output", "two.parquet"], work)
    one = compute_values(ValuesConfig(model=str(work / "model"), engine="vllm", vllm_enforce_eager=True,
                                      vllm_kv_cache_gb=0.25, max_prompt_tokens=64, max_new_tokens=8, limit=12, n=3,
                                      shard_size=2, save_responses=True, output=str(work / "one.parquet")))
    two = pd.read_parquet(work / "two.parquet")
    assert len(two) == 12 and two.equals(pd.read_parquet(one))  # ids, rewards, lengths and response texts
    table = pq.read_table(work / "two.parquet")
    varied = pa.array([[-(i % 5) / 4, 0.0, -1.0] for i in range(table.num_rows)], pa.list_(pa.float64()))
    pq.write_table(table.set_column(table.column_names.index("rewards"), "rewards", varied), work / "v.parquet")
    return work / "v.parquet"


def _train(work: Path, out: str, *extra: str) -> list[str]:
    return ["train", "--model", str(work / "model"), *ENGINE, "--limit", "12", "--values", "v.parquet",
            "--no-filter-unsolved", "--batch-size", "8", "--mini-batch-size", "4", "--micro-batch-size", "2",
            "--learning-rate", "1e-2", "--beta2", "0.1", "--steps", "2", "--save-every", "1", "--output-dir", out,
            *extra]


def _metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def _logged(logs: Path, text: str) -> dict[int, list[str]]:
    """Each rank's log lines that contain ``text``."""
    return {rank: [line for line in lines if text in line] for rank, lines in rank_stderr(logs).items()}


TP_WORLD = "vLLM engine started: tensor-parallel world size"


def _cpushm() -> set[str]:
    """The CPU communicator's files that one engine over ranks 0 and 1 creates (engines._remove_cpu_shm's names)."""
    names = os.listdir("/dev/shm") if os.path.isdir("/dev/shm") else []
    return {n for n in names if n.endswith(("-[0-1]-cpushm_0", "-[0-1]-cpushm_1"))}


def test_stage1_with_one_engine_over_two_processes(work, stage1):
    """One tensor-parallel engine over both processes samples the same rows as one process's engine. The rows alone
    would not show it (two engines of one process each, sharing the shards, sample the same rows: a shard is seeded
    by its index), so each process's log says the engine it started spans both processes."""
    args = ["--model", str(work / "model"), *ENGINE, "--limit", "12", "--n", "3", "--shard-size", "2",
            "--save-responses", "--vllm-tensor-parallel-size", "2"]
    logs = work / "launch-logs" / "stage1-tp2"
    launch("ddp", ["values", *args, "--output", "tp2.parquet"], work, logs=logs)
    assert pd.read_parquet(work / "tp2.parquet").equals(pd.read_parquet(work / "one.parquet"))
    assert _logged(logs, TP_WORLD) == {0: [f"astarpo: {TP_WORLD} 2"], 1: [f"astarpo: {TP_WORLD} 2"]}
    assert not _cpushm()  # its communicator's files are gone: a next launch starts


@pytest.fixture(scope="module")
def uninterrupted(work, stage1) -> list[dict]:
    """The metrics of a DDP run with an engine in every process that nobody killed: what every resumed run with
    engines of one process each must log again."""
    launch("ddp", _train(work, "whole", "--vllm-tensor-parallel-size", "1"), work)
    return _metrics(work / "whole")


# How close a resumed run's steps must be to the uninterrupted run's: the same samples (the engines' random streams
# are restored) give the same rewards; losses differ by float32 summation order between strategies at most.
RESUME_TOLERANCE = 1e-4


@pytest.mark.parametrize("strategy,tensor_parallel", [("ddp", 1), ("fsdp2", 1), ("zero3", 1), ("fsdp2", 2)])
def test_astarpo_with_an_engine_in_every_process_trains_and_resumes(strategy, tensor_parallel, work, stage1,
                                                                    uninterrupted):
    """Killed once its first checkpoint exists, then run again: it resumes, and every step's responses were
    sampled by engines holding the policy (the engines' log-probs equal the training model's). With engines of
    one process each its steps are the uninterrupted DDP run's (rewards, V*, losses, log-ratios and lengths, to
    :data:`RESUME_TOLERANCE`), whatever the strategy. With ``tensor_parallel`` 2 both processes run one engine,
    which samples both processes' prompts from its one random stream: other samples, so not compared."""
    run = work / f"{strategy}-tp{tensor_parallel}"
    args = _train(work, run.name, "--vllm-tensor-parallel-size", str(tensor_parallel))
    launch_and_kill(strategy, args, work, until=run / "checkpoints" / "step-000001")
    assert "resumed from" in launch(strategy, args, work)
    metrics = _metrics(run)
    assert [m["step"] for m in metrics] == [1, 2]
    if tensor_parallel == 1:
        for got, want in zip(metrics, uninterrupted, strict=True):
            for key in ("reward", "v_star", "loss", "log_ratio", "response_length"):
                assert abs(got[key] - want[key]) <= RESUME_TOLERANCE, (got["step"], key, got[key], want[key])
    assert all(m["sampler_logp_diff_max"] < 1e-3 for m in metrics), [m["sampler_logp_diff_max"] for m in metrics]
    start, final = load_file(work / "model" / "model.safetensors"), load_file(run / "final" / "model.safetensors")
    assert max(float((final[k] - start[k]).abs().max()) for k in final) > 1e-3  # it trained


def test_lora_with_an_engine_in_every_process_under_fsdp2(work, stage1):
    """The engines get the merged weights (W + BA) after every step, merged layer by layer from FSDP2's shards."""
    run = work / "lora-fsdp2"
    launch("fsdp2", _train(work, run.name, "--lora-rank", "4", "--lora-alpha", "8"), work)
    metrics = _metrics(run)
    assert all(m["sampler_logp_diff_max"] < 1e-3 for m in metrics), [m["sampler_logp_diff_max"] for m in metrics]
    adapter = load_file(run / "final" / "adapter_model.safetensors")
    assert any(float(v.abs().max()) > 0 for k, v in adapter.items() if "lora_B" in k)  # the adapters trained
    assert torch.isfinite(torch.tensor([m["loss"] for m in metrics])).all()


@pytest.mark.parametrize("tensor_parallel", [1, 2])
def test_eval_is_data_parallel(tensor_parallel, work):
    """`astarpo eval` in two processes, with two engines (each scores half the prompts) or one engine over both:
    every prompt's greedy answer and the greedy figures equal one process's; rank 0 writes the result. Every
    process scoring every prompt would give the same result, so each process's log says which prompts it scored
    (with one engine over both, both processes do the engine's work: all the prompts)."""
    args = ["eval", "--model", str(work / "model"), *ENGINE, "--limit", "6", "--k", "2"]
    logs = work / "launch-logs" / f"eval-tp{tensor_parallel}"
    launch("ddp", [*args, "--vllm-tensor-parallel-size", str(tensor_parallel), "--output", f"e{tensor_parallel}.json"],
           work, logs=logs)
    scored = {0: ["astarpo: eval: process 0, engine 0 of 2, scores prompts [0, 3) of 6"],
              1: ["astarpo: eval: process 1, engine 1 of 2, scores prompts [3, 6) of 6"]} if tensor_parallel == 1 else \
             {0: ["astarpo: eval: process 0, engine 0 of 1, scores prompts [0, 6) of 6"],
              1: ["astarpo: eval: process 1, engine 0 of 1, scores prompts [0, 6) of 6"]}
    assert _logged(logs, "scores prompts") == scored
    assert _logged(logs, TP_WORLD) == {r: [f"astarpo: {TP_WORLD} {tensor_parallel}"] for r in (0, 1)}
    one = work / "e-one.json"
    if not one.exists():
        run_eval(EvalConfig(model=str(work / "model"), engine="vllm", vllm_enforce_eager=True, vllm_kv_cache_gb=0.25,
                            max_prompt_tokens=64, max_new_tokens=8, limit=6, k=2, output=str(one)))
    a, b = json.loads(one.read_text()), json.loads((work / f"e{tensor_parallel}.json").read_text())
    assert a["samples"] == b["samples"] and a["prompts"] == b["prompts"] == 6
    assert (a["accuracy"], a["mean_response_tokens"]) == (b["accuracy"], b["mean_response_tokens"])
    assert 0 <= b["avg_at_k"] <= b["pass_at_k"] <= 1


@pytest.mark.parametrize("command", ["train", "values", "eval"])
def test_one_engine_over_several_processes_needs_a_launch(command, work, stage1, monkeypatch, capsys):
    """Every command seeds each process's part of the engine (Stage 1 per shard, eval per engine) and training
    pushes the policy into it: a single process would get vLLM's own workers, which neither reaches, so it is
    refused before any model loads, with the launch line to use."""
    monkeypatch.chdir(work)
    args = {"train": _train(work, "alone"),
            "values": ["values", "--model", str(work / "model"), *ENGINE, "--limit", "4", "--output", "alone.parquet"],
            "eval": ["eval", "--model", str(work / "model"), *ENGINE, "--limit", "4", "--output", "alone.json"]}
    assert main([*args[command], "--vllm-tensor-parallel-size", "2"]) == 2
    assert "runs one engine over 2 processes of a launch" in capsys.readouterr().err
    assert not [p for p in work.glob("alone*") if p.is_file() or any(p.iterdir())]  # nothing written


def test_stage1_resumes_when_only_some_processes_have_shards_left(work, stage1):
    """Killed when process 0 had written all its shards: on the resume only process 1 has shards to sample, but
    every process starts its engine (the start is collective over the launch), and the file is the uninterrupted
    one."""
    args = ["values", "--model", str(work / "model"), *ENGINE, "--limit", "12", "--n", "3", "--shard-size", "2",
            "--save-responses", "--output", "resumed.parquet"]
    shards = work / "resumed.parquet.shards"
    launch_and_kill("ddp", args, work, until=shards / "shard-00004.parquet")  # process 0's last shard
    (shards / "shard-00001.parquet").unlink(missing_ok=True)  # process 1's first: it surely has work left
    launch("ddp", args, work)
    assert pd.read_parquet(work / "resumed.parquet").equals(pd.read_parquet(work / "one.parquet"))


def test_a_failed_push_on_one_process_ends_the_launch_with_its_cause(work, stage1):
    """After the first update process 1's engine refuses a tensor (a name it does not know) while process 0 goes
    on gathering FSDP2's shards for its own push: the launch ends (not a hang: launch() fails at its time limit)
    with a non-zero status, and process 1's whole traceback names the process and the tensor."""
    err = launch("fsdp2", _train(work, "fault"), work, ok=False, script=Path(__file__).with_name("push_fault.py"))
    assert "process 1: pushing the policy's weights into its vLLM engine failed at 'model.no_such_layer.weight'" in err
    assert "Traceback" in err and "no_such_layer" in err
    assert not (work / "fault" / "checkpoints" / "step-000001").exists()  # it stopped at the first push
