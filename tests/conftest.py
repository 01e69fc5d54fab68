"""Shared fixtures: a tiny Llama with a real BPE tokenizer, built in milliseconds, saved as a HF directory."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
torch.set_num_threads(2)


def build_tiny_model(path: Path, chat_template: bool = False, seed: int = 0, hidden_size: int = 32) -> Path:
    """Two layers, two attention heads of ``hidden_size / 2`` (vLLM's CPU attention needs 32: hidden_size 64)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from astarpo.models import arithmetic_tokenizer

    hf_tok = arithmetic_tokenizer(chat_template)
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=len(hf_tok), hidden_size=hidden_size, intermediate_size=2 * hidden_size,
                      num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=256,
                      bos_token_id=hf_tok.bos_token_id, eos_token_id=hf_tok.eos_token_id,
                      pad_token_id=hf_tok.pad_token_id, tie_word_embeddings=True)
    model = LlamaForCausalLM(cfg)
    model.save_pretrained(path)
    hf_tok.save_pretrained(path)
    return path



class InterruptibleReward:
    """A reward (TRL's signature) that can stand in for a kill: after ``fail_after`` calls it raises
    KeyboardInterrupt, so nothing after that point is written. Subclasses set ``reward_name`` and ``score``."""

    reward_name = ""

    def __init__(self, fail_after: int | None = None):
        self.calls, self.fail_after = 0, fail_after

    def __call__(self, prompts, completions, **_):
        self.calls += 1
        if self.fail_after is not None and self.calls > self.fail_after:
            raise KeyboardInterrupt
        return [self.score(c) for c in completions]

    def score(self, completion: str) -> float:
        raise NotImplementedError

@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("tiny") / "model")


@pytest.fixture(scope="session")
def tiny_chat_model(tmp_path_factory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("tiny_chat") / "model", chat_template=True)


@pytest.fixture(autouse=True)
def _fresh_accelerate_state():
    """accelerate keeps one process-wide state; each test's Trainer may ask for other settings (bf16, ...)."""
    yield
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(True)
    GradientState._reset_state()
