import math
from pathlib import Path

import pytest

from astarpo.cli import main
from astarpo.config import ConfigError, EvalConfig, TrainConfig, ValuesConfig, build


def test_yaml_then_overrides(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("beta1: inf\nlearning_rate: 1e-5\nbatch_size: 4\nfilter_unsolved: false\n")
    cfg = build(TrainConfig, str(f), batch_size="8")
    assert math.isinf(cfg.beta1) and cfg.learning_rate == 1e-5 and cfg.batch_size == 8
    assert cfg.filter_unsolved is False


@pytest.mark.parametrize("cls, settings, message", [
    (TrainConfig, {"beta1": 0}, "beta1 must be > 0"),
    (TrainConfig, {"beta1": -1}, "beta1 must be > 0"),
    (TrainConfig, {"beta2": 0}, "beta2 must be a positive number"),
    (TrainConfig, {"mini_batch_size": 300}, "mini_batch_size must be in"),
    (ValuesConfig, {"n": 0}, "n must be >= 1"),
    (ValuesConfig, {"temperature": 0}, "V\\* needs sampling"),
    (ValuesConfig, {"top_p": 1.5}, "top_p must be in"),
    (ValuesConfig, {"temperature": 0.7}, "temperature must be 1 for Stage 1 and training"),
    (TrainConfig, {"temperature": 1.2}, "temperature must be 1 for Stage 1 and training"),
    (TrainConfig, {"top_p": 0.9}, "top_p must be 1 for Stage 1 and training"),
    (ValuesConfig, {"on_reward_error": "ignore"}, "on_reward_error must be one of raise, skip"),
    (ValuesConfig, {"n": "eight"}, "n must be int, got 'eight'"),
    (ValuesConfig, {"nn": 3}, "unknown setting\\(s\\) nn for ValuesConfig"),
    (ValuesConfig, {"engine": "sglang"}, "engine must be one of hf, vllm"),
    (EvalConfig, {"vllm_gpu_memory_utilization": 1.5}, "vllm_gpu_memory_utilization must be in"),
    (EvalConfig, {"vllm_tensor_parallel_size": 0}, "vllm_tensor_parallel_size must be >= 1"),
    (EvalConfig, {"vllm_kv_cache_gb": 0}, "vllm_kv_cache_gb must be > 0"),
    (TrainConfig, {"vllm_dtype": "int8"}, "vllm_dtype must be one of"),
    (ValuesConfig, {"vllm_mode": "remote"}, "vllm_mode must be one of colocate, server"),
    (EvalConfig, {"vllm_mode": "server"}, "vllm_mode server samples with `astarpo serve`'s vLLM engine"),
    (TrainConfig, {"async_lag": -1}, "async_lag must be >= 0"),
    (TrainConfig, {"async_lag": 2}, "add --engine vllm --vllm-mode server"),
    (TrainConfig, {"algo": "grpo", "async_lag": 1}, "async_lag is A\\*-PO's: its regression target holds"),
])
def test_out_of_range_settings(cls, settings, message):
    with pytest.raises(ConfigError, match=message):
        build(cls, None, **settings)


def test_eval_takes_any_temperature_and_top_p():
    cfg = build(EvalConfig, None, temperature=0.6, top_p=0.95, k=4)
    assert (cfg.temperature, cfg.top_p) == (0.6, 0.95)


def test_cli_reports_one_line_errors(capsys, tmp_path):
    assert main(["train", "--beta1", "0"]) == 2
    err = capsys.readouterr().err
    assert err.strip() == "astarpo: error: beta1 must be > 0 (inf for the mean), got 0.0"
    assert main(["values", "--config", str(tmp_path / "none.yaml")]) == 2
    assert "no such config file" in capsys.readouterr().err
    assert main(["eval", "--reward", "nope", "--model", str(tmp_path)]) == 2
    assert "unknown reward 'nope'" in capsys.readouterr().err


def test_recipe_sections(tmp_path):
    f = tmp_path / "r.yaml"
    f.write_text("model: m\nmax_new_tokens: 64\nvalues:\n  n: 4\ntrain:\n  n: 2\n  beta1: 0.25\neval:\n  k: 3\n")
    v, t, e = build(ValuesConfig, str(f)), build(TrainConfig, str(f)), build(EvalConfig, str(f))
    assert (v.model, v.max_new_tokens, v.n) == ("m", 64, 4)
    assert (t.model, t.n, t.beta1) == ("m", 2, 0.25)
    assert (e.model, e.k) == ("m", 3)
    f.write_text("modle: m\n")
    with pytest.raises(ConfigError, match="unknown setting\\(s\\) modle"):
        build(ValuesConfig, str(f))


@pytest.mark.parametrize("recipe", sorted((Path(__file__).parents[1] / "configs").glob("*.yaml")),
                         ids=lambda p: p.stem)
def test_shipped_recipes_are_valid(recipe):
    v, t, e = build(ValuesConfig, str(recipe)), build(TrainConfig, str(recipe)), build(EvalConfig, str(recipe))
    assert v.n == 8 and v.temperature == 1.0 and v.max_new_tokens == 1024 and v.max_prompt_tokens == 256
    assert (t.beta1, t.beta2, t.learning_rate, t.batch_size, t.mini_batch_size) == (0.5, 1e-3, 1e-6, 256, 128)
    assert t.values == v.output and e.model == f"{t.output_dir}/final" and t.reward == v.reward
    assert t.prompt_template == v.prompt_template and "{prompt}" in v.prompt_template
    assert len(e.benchmark_names) == 6


def test_shared_settings_are_set_once_and_benchmarks_keep_their_own(tmp_path):
    f = tmp_path / "r.yaml"
    f.write_text("model: m\ndata: d.jsonl\nreward: gsm8k\nlimit: 5\nprompt_template: 'Q: {prompt}'\n"
                 "max_prompt_tokens: 128\nuse_chat_template: false\nmax_new_tokens: 64\n"
                 "eval:\n  benchmarks: gsm8k\n")
    v, t, e = build(ValuesConfig, str(f)), build(TrainConfig, str(f)), build(EvalConfig, str(f))
    for cfg in (v, t):
        assert (cfg.data, cfg.reward, cfg.limit, cfg.prompt_template, cfg.max_prompt_tokens) == \
               ("d.jsonl", "gsm8k", 5, "Q: {prompt}", 128)
    # the benchmark brings its prompts and reward; model and generation settings are still shared
    assert (e.data, e.reward, e.limit, e.prompt_template, e.max_prompt_tokens) == \
           ("arithmetic", "arithmetic", None, "{prompt}", 2048)
    assert (e.model, e.max_new_tokens, e.use_chat_template) == ("m", 64, False)
    f.write_text(f.read_text().split("eval:")[0])
    assert build(EvalConfig, str(f)).data == "d.jsonl"  # without benchmarks, eval takes the shared prompt set
    assert build(EvalConfig, str(f), limit=3).limit == 3  # a flag still applies


def test_quickstart_recipe_is_a_config_file_like_any_other():
    from astarpo.config import QUICKSTART

    v, t = build(ValuesConfig, QUICKSTART), build(TrainConfig, QUICKSTART)
    assert (v.model, v.data, v.reward, v.n, v.limit, v.max_new_tokens, v.temperature, v.seed) == \
           ("smollm2-135m-instruct", "arithmetic", "arithmetic", 8, 160, 16, 1.0, 0)
    assert (t.learning_rate, t.beta1, t.beta2, t.batch_size, t.steps, t.micro_batch_size, t.limit) == \
           (1e-5, 0.5, 1e-3, 32, 12, 16, 160)
    assert (t.eval_data, t.eval_limit, t.eval_every, t.save_every) == ("arithmetic", 100, 4, 6)


def test_engine_vllm_without_vllm_is_a_one_line_error(capsys):
    import importlib.util

    if importlib.util.find_spec("vllm") is not None:
        pytest.skip("vLLM is installed here")
    assert main(["values", "--engine", "vllm"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("astarpo: error: engine vllm needs vLLM: pip install 'astarpo[vllm]'") and "\n" not in err
