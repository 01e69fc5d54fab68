"""The paper's recipes (configs/paper/*.yaml) load for all three commands and run Stage 1 and Stage 2 as written,
with a tiny model, the built-in task and a few steps standing in for Qwen2.5, MATH/GSM8K and 725 steps."""

from __future__ import annotations

from pathlib import Path

import pytest

from astarpo import EvalConfig, TrainConfig, Trainer, ValuesConfig, compute_values
from astarpo.config import build
from astarpo.values import read_values

PAPER = sorted((Path(__file__).resolve().parents[1] / "configs" / "paper").glob("*.yaml"))
PROMPT = {"gsm8k": "{prompt} Let's think step by step and output the final answer after \"####\".",
          "math": "{prompt} Let's think step by step and output the final answer within \\boxed{}."}

def test_six_recipes():
    assert [p.name for p in PAPER] == [f"{t}_qwen2.5-{s}.yaml" for t in ("gsm8k", "math") for s in ("1.5b", "3b", "7b")]


@pytest.fixture
def vllm_installed(monkeypatch):
    """The recipes sample with vLLM, which a config checks is installed (this environment has none)."""
    import importlib.util

    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: True if name == "vllm" else find_spec(name, *a))


@pytest.mark.parametrize("path", PAPER, ids=lambda p: p.stem)
def test_paper_recipe_settings(path, vllm_installed):
    task, size = path.stem.split("_qwen2.5-")
    values, train = build(ValuesConfig, str(path)), build(TrainConfig, str(path))
    ev = build(EvalConfig, str(path))
    for cfg in (values, train, ev):  # every command samples with vLLM in bfloat16, sleeping during updates on GPU
        assert (cfg.engine, cfg.vllm_dtype, cfg.vllm_sleep_mode) == ("vllm", "bfloat16", True)
    for cfg in (values, train):
        assert cfg.model == f"Qwen/Qwen2.5-{size.upper()}" and not cfg.use_chat_template  # base model, raw prompt
        assert (cfg.data, cfg.split, cfg.reward, cfg.prompt_template) == (task, "train", task, PROMPT[task])
        assert (cfg.temperature, cfg.top_p, cfg.max_new_tokens, cfg.max_prompt_tokens) == (1.0, 1.0, 1024, 256)
    assert values.n == 8 and values.output == train.values
    assert (train.n, train.beta1, train.beta2, train.learning_rate) == (8, 0.5, 1e-3, 1e-6)
    assert (train.batch_size, train.mini_batch_size, train.steps, train.filter_unsolved) == (256, 128, 725, False)
    assert (train.weight_decay, train.entropy_coef) == (1e-2, 1e-3)  # the official code's AdamW and entropy bonus
    assert ev.model == f"{Path(train.output_dir)}/final" and not ev.use_chat_template
    assert ev.benchmark_names == (["gsm8k"] if task == "gsm8k" else
                                  ["math500", "minerva_math", "olympiadbench", "amc23", "aime24"])
    assert ev.max_prompt_tokens == 2048 and ev.on_long_prompt == "error"  # no benchmark problem dropped
    assert ev.prompt_template == PROMPT[task]  # asked as trained
    assert [ev.k_for(b) for b in ev.benchmark_names] == [32 if b == "amc23" else 1 for b in ev.benchmark_names]


@pytest.mark.parametrize("path", PAPER[::3], ids=lambda p: p.stem)  # one per task: the sizes differ in model only
def test_paper_recipe_runs_stage1_and_stage2(path, tiny_model, tmp_path):
    stand_in = {"model": str(tiny_model), "data": "arithmetic", "reward": "arithmetic", "limit": 6,
                "max_new_tokens": 4, "generation_batch_size": 16, "engine": "hf"}  # no vLLM here
    values = compute_values(build(ValuesConfig, str(path), **stand_in, output=str(tmp_path / "v.parquet")))
    prov = read_values(values).provenance
    assert (prov["n"], prov["use_chat_template"], prov["dtype"], prov["sampler"]["top_k"]) == (8, False, "bfloat16", 0)
    cfg = build(TrainConfig, str(path), **stand_in, values=str(values), output_dir=str(tmp_path / "run"),
                batch_size=4, mini_batch_size=2, micro_batch_size=2, steps=2, mixed_precision="no")
    assert not cfg.filter_unsolved and cfg.gradient_checkpointing
    Trainer(cfg).train()
    assert (tmp_path / "run" / "final" / "config.json").is_file()
    assert len((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()) >= 2
