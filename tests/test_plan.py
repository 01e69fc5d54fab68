"""`astarpo plan`: parameter counts are exact, and the memory formula is within 20% of measured allocations."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import Qwen2Config, Qwen2ForCausalLM

from astarpo.cli import main
from astarpo.models import add_lora, load_model
from astarpo.plan import QWEN25, Shape, measure, plan, shape_of

SMALL = Shape(128, 2, 4, 2, 344, 2048, tied=True, qkv_bias=True)


def test_qwen25_shapes_have_the_published_parameter_counts():
    # model cards: 1.54B (1.31B non-embedding), 3.09B (2.77B), 7.61B (6.53B)
    published = {"qwen2.5-1.5b": (1.54, 1.31), "qwen2.5-3b": (3.09, 2.77), "qwen2.5-7b": (7.62, 6.53)}
    for name, (total, body) in published.items():
        s = QWEN25[name]
        assert round(s.params() / 1e9, 2) == total and round((s.params() - s.embedding_params()) / 1e9, 2) == body
    assert shape_of("Qwen/Qwen2.5-7B-Instruct") == QWEN25["qwen2.5-7b"]


@pytest.mark.parametrize("tied", [True, False])
def test_params_and_lora_params_are_exact(tmp_path, tied):
    s = Shape(64, 2, 4, 2, 96, 300, tied=tied, qkv_bias=True)
    model = Qwen2ForCausalLM(Qwen2Config(vocab_size=300, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=tied))
    model.save_pretrained(tmp_path)
    assert shape_of(str(tmp_path)) == s
    assert s.params() == sum(p.numel() for p in model.parameters())
    lora = add_lora(load_model(tmp_path), 8, 16, "all-linear")
    assert s.lora_params(8) == sum(p.numel() for p in lora.parameters() if p.requires_grad)


@pytest.mark.parametrize("checkpointing", [False, True])
def test_formula_within_20_percent_of_measured(checkpointing):
    """Weights, gradients, optimizer state and reference are exact; what a micro-batch adds (autocast copies,
    activations, log-prob chunks) and the whole peak are within 20% of measured tensor allocations."""
    torch.set_num_threads(2)
    got = measure(SMALL, micro_batch=4, prompt_tokens=32, response_tokens=96, gradient_checkpointing=checkpointing)
    want = plan(SMALL, gpus=1, strategy="ddp", micro_batch=4, prompt_tokens=32, response_tokens=96,
                gradient_checkpointing=checkpointing, generation_batch=0)
    for key in ("weights", "gradients", "optimizer", "reference", "optimizer_step"):
        assert got[key] == want[key], key
    for key in ("micro_batch", "peak"):
        assert abs(want[key] / got[key] - 1) < 0.2, (key, want[key], got[key])


def test_cli_table_and_json(capsys):
    assert main(["plan", "--model", "qwen2.5-7b", "--gpus", "8", "--micro-batch", "2"]) == 0
    out = capsys.readouterr().out
    assert "| peak |" in out and "| ddp | fsdp2 | zero2 | zero3 |" in out
    assert main(["plan", "--model", "qwen2.5-1.5b", "--strategy", "zero3", "--lora-rank", "64", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert set(result) == {"shape", "zero3"} and result["zero3"]["reference"] == 0
    assert result["zero3"]["trainable"] == QWEN25["qwen2.5-1.5b"].lora_params(64)
    assert main(["plan", "--model", "no-such-model"]) == 2


def test_gathering_for_generation_costs_the_whole_bf16_weights_while_sampling():
    """FSDP2 and ZeRO-3 hold every layer, in bf16, while sampling (astarpo's default); per-token gathering holds
    two layers and the embeddings at a time."""
    s = QWEN25["qwen2.5-7b"]
    for strategy in ("fsdp2", "zero3"):
        once, per_token = (plan(s, 8, strategy, micro_batch=2, gather_for_generation=g) for g in (True, False))
        assert once["generation"] - per_token["generation"] == 2 * s.params() - per_token["compute_copies"]
        assert once["peak"] > per_token["peak"]
    ddp = [plan(s, 8, "ddp", gather_for_generation=g) for g in (True, False)]
    assert ddp[0] == ddp[1]  # nothing to gather


def test_the_hybrid_engine_is_counted_beside_the_trainer():
    """vLLM in every process: its whole bf16 weights and the KV cache of this GPU's sequences (hand-computed for
    Qwen2.5-1.5B on 4 GPUs: 64 sequences of 1280 tokens, 28 layers, keys and values of 2 heads x 128, bf16).
    With sleep mode it holds them only while generating; without, through the update as well."""
    s = QWEN25["qwen2.5-1.5b"]
    awake = plan(s, 4, "fsdp2", engine="vllm", sleep_mode=False)
    asleep = plan(s, 4, "fsdp2", engine="vllm")
    assert asleep["engine_weights"] == 2 * s.params()
    assert asleep["engine_kv_cache"] == 64 * 1280 * 28 * 2 * 256 * 2
    states = sum(asleep[k] for k in ("weights", "gradients", "optimizer", "reference"))
    engine = asleep["engine_weights"] + asleep["engine_kv_cache"]
    assert asleep["peak"] == states + max(asleep["micro_batch"], asleep["optimizer_step"], engine)
    assert awake["peak"] == states + engine + max(awake["micro_batch"], awake["optimizer_step"])
    assert "engine_weights" not in plan(s, 4, "fsdp2")  # HF generate: the policy samples itself
    out = json.loads(_cli_json(["plan", "--model", "qwen2.5-1.5b", "--gpus", "4", "--strategy", "fsdp2",
                                "--engine", "vllm", "--no-sleep-mode", "--json"]))
    assert out["fsdp2"]["peak"] == awake["peak"]


def _cli_json(argv: list[str]) -> str:
    import contextlib
    import io

    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        assert main(argv) == 0
    return buf.getvalue()
