"""values -> train -> eval on a tiny model: resume, provenance checks, checkpoints, CLI."""

import json

import pandas as pd
import pyarrow.parquet as pq
import pytest
import torch
from conftest import InterruptibleReward, build_tiny_model
from safetensors.torch import load_file

from astarpo import EvalConfig, TrainConfig, Trainer, ValuesConfig, compute_values
from astarpo.cli import main
from astarpo.config import ConfigError
from astarpo.generation import sampling_settings
from astarpo.values import ValuesError, read_values

COMMON = {"data": "arithmetic", "reward": "arithmetic", "max_new_tokens": 6, "limit": 24}


class DigitReward(InterruptibleReward):
    """Fraction of digit characters: varied, non-zero rewards even from an untrained model."""

    reward_name = "digits"

    def score(self, completion: str) -> float:
        return sum(ch.isdigit() for ch in completion) / max(1, len(completion))


def _values(model, path, reward_fn=None, **kw):
    cfg = ValuesConfig(**{**COMMON, "model": str(model), "n": 4, "output": str(path), "shard_size": 5, **kw})
    return compute_values(cfg, reward=reward_fn or DigitReward())


def test_values_file_contents(tiny_model, tmp_path):
    path = _values(tiny_model, tmp_path / "v.parquet", save_responses=True)
    df = pd.read_parquet(path)
    assert list(df.columns) == ["id", "rewards", "lengths", "responses"]
    assert len(df) == 24 and all(len(r) == 4 for r in df.rewards)
    assert all(1 <= n <= 6 for lens in df.lengths for n in lens)
    prov = read_values(path).provenance
    assert prov["reference_model"] == str(tiny_model) and len(prov["reference_model_hash"]) == 64
    assert (prov["reward"], prov["n"], prov["seed"], prov["temperature"]) == ("digits", 4, 0, 1.0)
    # every setting that decides the sampled tokens, explicit (nothing from the model's generation_config), and dtype
    assert prov["sampler"] == sampling_settings(1.0, 1.0) and prov["dtype"] == "float32"
    assert (prov["sampler"]["top_k"], prov["sampler"]["repetition_penalty"], prov["sampler"]["min_p"]) == (0, 1.0, 0.0)
    import datasets

    assert datasets.load_dataset("parquet", data_files=str(path), split="train").num_rows == 24
    assert not (tmp_path / "v.parquet.shards").exists()


class NoisyJudge(InterruptibleReward):
    """A stochastic reward drawing from numpy's and Python's global generators (as a sampled judge would; vLLM's
    CUDA model runner seeds each request from numpy's): a shard's rows are reproducible only if its seed reaches
    every stream, not torch's alone."""

    reward_name = "noisy"

    def score(self, completion: str) -> float:
        import random

        import numpy as np

        return float(np.random.rand() < 0.5) + random.random()


def test_values_shards_seed_every_stream(tiny_model, tmp_path):
    """Whatever state the caller's numpy and random are in, the same shards give the same rows."""
    import random

    import numpy as np

    np.random.seed(1), random.seed(1)
    first = pd.read_parquet(_values(tiny_model, tmp_path / "a.parquet", reward_fn=NoisyJudge(), limit=10))
    np.random.seed(2), random.seed(2)
    second = pd.read_parquet(_values(tiny_model, tmp_path / "b.parquet", reward_fn=NoisyJudge(), limit=10))
    assert first.equals(second) and first.rewards.map(len).eq(4).all()


def test_values_resume_after_interruption_equals_uninterrupted(tiny_model, tmp_path):
    full = read_values(_values(tiny_model, tmp_path / "full.parquet"))
    out = tmp_path / "resumed.parquet"
    with pytest.raises(KeyboardInterrupt):
        _values(tiny_model, out, reward_fn=DigitReward(fail_after=2))
    shards = sorted((tmp_path / "resumed.parquet.shards").glob("shard-*.parquet"))
    assert len(shards) == 2 and not out.exists()
    before = sum(json.loads(pq.read_schema(p).metadata[b"astarpo_sampling_seconds"]) for p in shards)
    resumed = read_values(_values(tiny_model, out))
    assert resumed.ids == full.ids
    assert (resumed.rewards == full.rewards).all()
    # Stage 1's sampling time counts the shards of both processes: the interrupted one's, and the rest, sampled
    # within the resumed process's time
    sampling = resumed.provenance["sampling_seconds"]
    assert before > 0 and before - 0.01 <= sampling <= before + resumed.provenance["seconds"] + 0.01


def test_values_refuses_to_overwrite_other_settings(tiny_model, tmp_path):
    path = _values(tiny_model, tmp_path / "v.parquet")
    with pytest.raises(ValuesError, match="exists and was made with other settings \\(n: 4 -> 2"):
        _values(tiny_model, path, n=2)


def _train_cfg(model, values, out, **kw):
    return TrainConfig(**{**COMMON, "model": str(model), "values": str(values), "output_dir": str(out),
                          "batch_size": 6, "micro_batch_size": 4, "mini_batch_size": 3, "learning_rate": 1e-2,
                          "save_every": 2, "beta2": 0.1, **kw})


def test_train_resume_matches_uninterrupted_run(tiny_model, tmp_path):
    values = _values(tiny_model, tmp_path / "v.parquet")
    Trainer(_train_cfg(tiny_model, values, tmp_path / "a", steps=4), reward=DigitReward()).train()
    Trainer(_train_cfg(tiny_model, values, tmp_path / "b", steps=2), reward=DigitReward()).train()
    Trainer(_train_cfg(tiny_model, values, tmp_path / "b", steps=4), reward=DigitReward()).train()
    a = load_file(tmp_path / "a" / "final" / "model.safetensors")
    b = load_file(tmp_path / "b" / "final" / "model.safetensors")
    start = load_file(tiny_model / "model.safetensors")
    assert any(not torch.equal(a[k], start[k]) for k in a)  # training moved the weights
    assert all(torch.equal(a[k], b[k]) for k in a)  # and the resumed run is bit-identical
    steps = [json.loads(line)["step"] for line in (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4]
    assert [p.name for p in sorted((tmp_path / "b" / "checkpoints").iterdir())] == ["step-000002", "step-000004"]


def test_train_refuses_mismatched_values_and_run_dirs(tiny_model, tmp_path):
    values = _values(tiny_model, tmp_path / "v.parquet")
    other = build_tiny_model(tmp_path / "other", seed=1)
    with pytest.raises(ValuesError, match="made with reference model .* but this run uses"):
        Trainer(_train_cfg(other, values, tmp_path / "r1"), reward=DigitReward())
    with pytest.raises(ValuesError, match="made with reward 'digits' but this run uses 'arithmetic'"):
        Trainer(_train_cfg(tiny_model, values, tmp_path / "r2"))
    with pytest.raises(ValuesError, match="made with max_new_tokens 6 but this run uses 8"):
        Trainer(_train_cfg(tiny_model, values, tmp_path / "r3", max_new_tokens=8), reward=DigitReward())
    Trainer(_train_cfg(tiny_model, values, tmp_path / "r4"), reward=DigitReward())
    from astarpo.rundir import OutputError

    with pytest.raises(OutputError, match="holds a run with other settings \\(beta1: 0.5 -> 1.0\\)"):
        Trainer(_train_cfg(tiny_model, values, tmp_path / "r4", beta1=1.0), reward=DigitReward())


def test_resume_refuses_another_engine_layout(tiny_model, tmp_path):
    """The engine and its tensor-parallel size decide which random stream each process carries in a checkpoint (the
    processes of one engine must draw alike): a resume cannot change them."""
    from astarpo.rundir import OutputError

    values = _values(tiny_model, tmp_path / "v.parquet")
    Trainer(_train_cfg(tiny_model, values, tmp_path / "run"), reward=DigitReward())
    with pytest.raises(OutputError, match="other settings \\(vllm_tensor_parallel_size: 1 -> 2\\)"):
        Trainer(_train_cfg(tiny_model, values, tmp_path / "run", vllm_tensor_parallel_size=2), reward=DigitReward())


def test_resume_refuses_other_prompt_settings_and_allows_free_ones(tiny_model, tmp_path):
    """Settings that change the prompt set (or the update) must match the run a resume continues; where outputs go
    and how often to save may change."""
    from astarpo.rundir import OutputError

    values = _values(tiny_model, tmp_path / "v.parquet")
    Trainer(_train_cfg(tiny_model, values, tmp_path / "r", steps=2), reward=DigitReward()).train()
    for changed, shown in [({"max_prompt_tokens": 128}, "max_prompt_tokens: 256 -> 128"),
                           ({"on_long_prompt": "skip"}, "on_long_prompt: 'error' -> 'skip'"),
                           ({"prompt_column": "question"}, "prompt_column: 'prompt' -> 'question'"),
                           ({"answer_column": "solution"}, "answer_column: 'answer' -> 'solution'"),
                           ({"max_grad_norm": 0.5}, "max_grad_norm: 1.0 -> 0.5")]:
        with pytest.raises(OutputError, match=f"other settings \\({shown}\\)"):
            Trainer(_train_cfg(tiny_model, values, tmp_path / "r", steps=3, **changed), reward=DigitReward())
    Trainer(_train_cfg(tiny_model, values, tmp_path / "r", steps=3, save_every=3, keep_checkpoints=1,
                       generation_batch_size=8), reward=DigitReward()).train()
    assert [p.name for p in (tmp_path / "r" / "checkpoints").iterdir()] == ["step-000003"]


def test_every_mini_batch_measures_log_ratio_against_the_sampling_policy(tiny_model, tmp_path):
    """Two updates per step (mini-batches of 3 of 6 prompts): the second mini-batch's log pi_old must be the
    policy that sampled, not the one already updated on the first. At step 1 that policy is the reference, so the
    logged log-ratio (the KL estimate) is zero up to float32 noise; before the fix it was the first update's move."""
    values = _values(tiny_model, tmp_path / "v.parquet")
    metrics = Trainer(_train_cfg(tiny_model, values, tmp_path / "r", steps=1), reward=DigitReward()).train()
    assert metrics["loss"] > 0 and metrics["grad_norm"] > 0  # the first update did move the policy
    assert abs(metrics["log_ratio"]) < 1e-5


def test_entropy_coef_lowers_each_prompts_loss_and_its_update_raises_the_entropy(tiny_model, tmp_path, monkeypatch):
    """The official code's entropy bonus, through the trainer: one update per step (mini-batch = batch), so both runs
    score the same samples under the same (reference) policy and differ by exactly the bonus in the logged loss.

    The logged loss alone would not notice a bonus cut off from the gradient (its value is the same), so the update
    is checked too: on the step's own samples, the policy updated with the bonus (a coefficient large enough to
    outweigh A*-PO's own gradient) has a higher mean token entropy than before the update and than the policy
    updated without it. A bonus without gradient makes the two updates, and so the two policies, identical."""
    import astarpo.training.trainer as trainer_module
    from astarpo.models import load_model

    values, seen, batches = _values(tiny_model, tmp_path / "v.parquet"), [], []
    real = trainer_module.response_logprobs_entropy

    def recording(model, batch):  # the trainer's own call, recorded on the way through
        logp, entropy = real(model, batch)
        seen.append(((entropy * batch["response_mask"]).sum(-1) / batch["response_mask"].sum(-1)).detach())
        batches.append({k: v.detach().clone() for k, v in batch.items()})
        return logp, entropy

    monkeypatch.setattr(trainer_module, "response_logprobs_entropy", recording)
    runs = {coef: Trainer(_train_cfg(tiny_model, values, tmp_path / f"c{coef}", steps=1, mini_batch_size=6,
                                     entropy_coef=coef), reward=DigitReward()).train() for coef in (0.0, 5.0)}
    per_prompt = torch.cat(seen).detach()  # A*-PO: one response per prompt
    assert len(per_prompt) == 6 and (per_prompt > 0).all()
    assert runs[5.0]["loss"] == pytest.approx(runs[0.0]["loss"] - 5.0 * float(per_prompt.mean()), rel=1e-5)
    assert runs[0.0]["reward"] == runs[5.0]["reward"]  # the same samples
    assert runs[5.0]["entropy"] == pytest.approx(float(per_prompt.mean()), rel=1e-6)  # logged as its own metric
    assert "entropy" not in runs[0.0]

    def mean_entropy(model_dir) -> float:  # mean token entropy on the step's samples, as the bonus measures it
        model = load_model(model_dir)
        with torch.no_grad():
            per_token = [(real(model, b)[1] * b["response_mask"]).sum() for b in batches]
        return float(sum(per_token) / sum(b["response_mask"].sum() for b in batches))

    before, without, with_bonus = (mean_entropy(d) for d in (tiny_model, tmp_path / "c0.0" / "final",
                                                             tmp_path / "c5.0" / "final"))
    assert with_bonus > max(before, without), (before, without, with_bonus)


def test_cli_end_to_end(tiny_chat_model, tmp_path, capsys):
    m = str(tiny_chat_model)
    flags = ["--model", m, "--limit", "12", "--max-new-tokens", "5"]
    values = str(tmp_path / "v.parquet")
    assert main(["values", *flags, "--n", "3", "--output", values]) == 0
    run = str(tmp_path / "run")
    train = ["train", *flags, "--values", values, "--output-dir", run, "--batch-size", "4", "--no-filter-unsolved",
             "--eval-data", "arithmetic", "--eval-limit", "4", "--learning-rate", "1e-3"]
    assert main([*train, "--steps", "1"]) == 0
    assert main([*train, "--steps", "2"]) == 0  # resumes from step 1
    metrics = [json.loads(line) for line in open(f"{run}/metrics.jsonl")]
    assert [m["step"] for m in metrics] == [0, 1, 2]
    for key in ("reward", "v_star", "advantage", "loss", "log_ratio", "kl", "response_length", "step_seconds",
                "tokens_per_second", "peak_memory_mb"):
        assert key in metrics[-1]
    out = str(tmp_path / "result.json")
    assert main(["eval", "--model", f"{run}/final", "--limit", "4", "--max-new-tokens", "5", "--k", "2",
                 "--output", out]) == 0
    result = json.load(open(out))
    assert result["reference"] == m  # found from the checkpoint's run file
    assert {"accuracy", "avg_at_k", "pass_at_k", "kl_to_ref"} <= set(result) and len(result["samples"]) == 4
    capsys.readouterr()
    assert main(["eval", "--model", f"{run}/final", "--data", str(tmp_path / "none.jsonl")]) == 2
    assert "none.jsonl: no such file" in capsys.readouterr().err


def test_eval_config_from_python(tiny_model, tmp_path):
    from astarpo.evaluate import run_eval

    res = run_eval(EvalConfig(model=str(tiny_model), limit=3, max_new_tokens=4, output=str(tmp_path / "r.json")))
    assert res["prompts"] == 3 and "kl_to_ref" not in res and (tmp_path / "r.json").is_file()


def test_report_to_sends_the_metrics_to_accelerate_trackers(tiny_model, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    values = _values(tiny_model, tmp_path / "v.parquet")
    Trainer(_train_cfg(tiny_model, values, tmp_path / "r", steps=2, report_to="tensorboard"),
            reward=DigitReward()).train()
    events = EventAccumulator(str(next((tmp_path / "r").rglob("events.out.tfevents.*")).parent))
    events.Reload()
    logged = [json.loads(line) for line in (tmp_path / "r" / "metrics.jsonl").read_text().splitlines()]
    assert [e.value for e in events.Scalars("loss")] == pytest.approx([m["loss"] for m in logged])
    with pytest.raises(ConfigError, match="report_to names not_a_tracker, which is not installed"):
        TrainConfig(report_to="tensorboard,not_a_tracker")
