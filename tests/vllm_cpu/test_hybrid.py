"""The hybrid engine on vLLM's CPU build: two processes under `accelerate launch`, each with its own vLLM engine
sampling its own prompts (vLLM's external_launcher executor over the launch's gloo group), beside DDP, FSDP2,
ZeRO-2 and ZeRO-3. After every optimizer step each process's engine gets the policy's whole weights (gathered one
tensor at a time from FSDP2's and ZeRO-3's shards).

Each launch starts two engines (eager mode, a 0.25 GiB KV cache each): about half a minute on two cores.
"""

from __future__ import annotations

import json
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
from launcher import launch, launch_and_kill  # noqa: E402
from safetensors.torch import load_file  # noqa: E402

from astarpo import ValuesConfig, compute_values  # noqa: E402

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
    args = ["--model", str(work / "model"), *ENGINE, "--limit", "12", "--n", "3", "--shard-size", "2"]
    launch("ddp", ["values", *args, "--output", "two.parquet"], work)
    one = compute_values(ValuesConfig(model=str(work / "model"), engine="vllm", vllm_enforce_eager=True,
                                      vllm_kv_cache_gb=0.25, max_prompt_tokens=64, max_new_tokens=8, limit=12, n=3,
                                      shard_size=2, output=str(work / "one.parquet")))
    two = pd.read_parquet(work / "two.parquet")
    assert len(two) == 12 and two.equals(pd.read_parquet(one))
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


@pytest.mark.parametrize("strategy", ["ddp", "fsdp2", "zero3"])
def test_astarpo_with_an_engine_in_every_process_trains_and_resumes(strategy, work, stage1):
    """Killed once its first checkpoint exists, then run again: it resumes, and every step's responses were
    sampled by engines holding the policy (the engines' log-probs equal the training model's)."""
    run = work / strategy
    launch_and_kill(strategy, _train(work, run.name), work, until=run / "checkpoints" / "step-000001")
    assert "resumed from" in launch(strategy, _train(work, run.name), work)
    metrics = _metrics(run)
    assert [m["step"] for m in metrics] == [1, 2]
    assert all(m["sampler_logp_diff_max"] < 1e-3 for m in metrics), [m["sampler_logp_diff_max"] for m in metrics]
    start, final = load_file(work / "model" / "model.safetensors"), load_file(run / "final" / "model.safetensors")
    assert max(float((final[k] - start[k]).abs().max()) for k in final) > 1e-3  # it trained


def test_lora_with_an_engine_in_every_process_under_zero2(work, stage1):
    """The engines get the merged weights (W + BA) after every step; ZeRO-2 holds them whole on every process."""
    run = work / "lora-zero2"
    launch("zero2", _train(work, run.name, "--lora-rank", "4", "--lora-alpha", "8"), work)
    metrics = _metrics(run)
    assert all(m["sampler_logp_diff_max"] < 1e-3 for m in metrics), [m["sampler_logp_diff_max"] for m in metrics]
    adapter = load_file(run / "final" / "adapter_model.safetensors")
    assert any(float(v.abs().max()) > 0 for k, v in adapter.items() if "lora_B" in k)  # the adapters trained
    assert torch.isfinite(torch.tensor([m["loss"] for m in metrics])).all()
