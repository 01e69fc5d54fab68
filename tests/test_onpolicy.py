"""The sampler draws exactly from the policy: softmax(logits / T), whatever the model's generation_config.json says.

A tiny model with a 16-token vocabulary answers one prompt with 2-token responses, so every possible response
(241 of them) has a probability computed exactly from the model's logits. A chi-square test compares 20,000
sampled responses with those probabilities: at p < 1e-3 a correct sampler is rejected one time in a thousand, and
the seeds are fixed, so each test's verdict is deterministic. The second group of tests shows the test has power:
generate() with the model's own settings left in place (what a sampler that does not set them gets) is rejected.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, GenerationConfig

from astarpo.generation import _trim, sample
from astarpo.models import eos_ids, load_model, load_tokenizer

SAMPLES = 20_000
ALPHA = 1e-3  # false-alarm rate of each test
PROMPT = "<s> a b c d"  # tokens a-d are in the prompt: repetition penalties and n-gram bans act on them
# What Qwen2.5 (repetition_penalty) and other models ship in generation_config.json, all at once.
LEAKY = {"do_sample": True, "temperature": 0.7, "top_p": 0.8, "top_k": 4, "min_p": 0.05, "typical_p": 0.9,
         "repetition_penalty": 1.3, "no_repeat_ngram_size": 1, "epsilon_cutoff": 3e-4, "eta_cutoff": 3e-4}


def build_small_vocab_model(path: Path, generation_config: dict | None = None, seed: int = 0) -> Path:
    """A 1-layer Llama over 16 words (pad, EOS, BOS, a-m), its output layer scaled so that next-token
    probabilities spread over many tokens, saved with ``generation_config`` in its generation_config.json."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "</s>": 1, "<s>": 2, **{chr(ord("a") + i): 3 + i for i in range(13)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    hf_tok = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", bos_token="<s>")
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=len(vocab), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=1, tie_word_embeddings=False, bos_token_id=2,
                      eos_token_id=1, pad_token_id=0)
    model = LlamaForCausalLM(cfg)
    with torch.no_grad():
        model.lm_head.weight.mul_(12)
    model.save_pretrained(path)
    hf_tok.save_pretrained(path)
    if generation_config:  # written as a model on the hub ships it
        gc_path = path / "generation_config.json"
        gc_path.write_text(json.dumps({**json.loads(gc_path.read_text()), **generation_config}, indent=1))
    return path


def exact_probabilities(model, prompt: list[int], eos: list[int], temperature: float) -> dict[tuple, float]:
    """P(response) for every response of at most 2 tokens (EOS ends one early), from the model's logits / T."""
    vocab = model.config.vocab_size
    with torch.no_grad():
        first = (model(torch.tensor([prompt])).logits[0, -1].double() / temperature).softmax(-1)
        second = (model(torch.tensor([prompt + [t] for t in range(vocab)])).logits[:, -1].double()
                  / temperature).softmax(-1)
    probs = {}
    for t1 in range(vocab):
        if t1 in eos:
            probs[(t1,)] = float(first[t1])
        else:
            probs.update({(t1, t2): float(first[t1] * second[t1, t2]) for t2 in range(vocab)})
    return probs


def chi_square_p(responses: list[list[int]], probs: dict[tuple, float]) -> float:
    """p-value of Pearson's chi-square test of the responses against ``probs``; responses with expected count
    below 5 are pooled into one cell, and a response outside the support gives 0."""
    n, counts = len(responses), Counter(tuple(r) for r in responses)
    if set(counts) - set(probs):
        return 0.0
    big = [k for k, p in probs.items() if p * n >= 5]
    observed = [counts[k] for k in big] + [n - sum(counts[k] for k in big)]
    expected = [probs[k] * n for k in big] + [n * (1 - sum(probs[k] for k in big))]
    if expected[-1] < 1e-9:
        observed, expected = observed[:-1], expected[:-1]
    stat = sum((o - e) ** 2 / e for o, e in zip(observed, expected))
    df = len(expected) - 1
    return float(torch.special.gammaincc(torch.tensor(df / 2, dtype=torch.float64),
                                         torch.tensor(stat / 2, dtype=torch.float64)))


@pytest.fixture(scope="module")
def leaky_model_dir(tmp_path_factory) -> Path:
    return build_small_vocab_model(tmp_path_factory.mktemp("leaky") / "model", LEAKY)


def _prompt(tok) -> list[int]:
    return tok(PROMPT, add_special_tokens=False)["input_ids"]


@pytest.mark.parametrize("loader", ["load_model", "from_pretrained"])
@pytest.mark.parametrize("shared_prefill", [True, False])
def test_sample_is_the_policy_despite_the_models_generation_config(leaky_model_dir, loader, shared_prefill):
    """Through our loader, which drops the shipped settings, and with a model a user loaded with them in place."""
    tok = load_tokenizer(leaky_model_dir)
    model = (load_model(leaky_model_dir) if loader == "load_model"
             else AutoModelForCausalLM.from_pretrained(leaky_model_dir, dtype=torch.float32)).eval()
    assert loader == "load_model" or model.generation_config.repetition_penalty == 1.3  # the settings are there
    eos = eos_ids(model, tok)
    torch.manual_seed(0)
    roll = sample(model, tok, [_prompt(tok)], SAMPLES, temperature=1.0, top_p=1.0, max_new_tokens=2, eos=eos,
                  batch_size=SAMPLES, shared_prefill=shared_prefill)
    p = chi_square_p(roll.response_tokens, exact_probabilities(model, _prompt(tok), eos, 1.0))
    assert p > ALPHA, p


@pytest.mark.parametrize("shared_prefill", [True, False])
def test_sample_at_another_temperature_is_softmax_of_scaled_logits(leaky_model_dir, shared_prefill):
    """Evaluation may sample at any temperature: then the distribution is softmax(logits / T), nothing else."""
    tok = load_tokenizer(leaky_model_dir)
    model = AutoModelForCausalLM.from_pretrained(leaky_model_dir, dtype=torch.float32).eval()
    eos = eos_ids(model, tok)
    torch.manual_seed(1)
    roll = sample(model, tok, [_prompt(tok)], SAMPLES, temperature=0.7, top_p=1.0, max_new_tokens=2, eos=eos,
                  batch_size=SAMPLES, shared_prefill=shared_prefill)
    assert chi_square_p(roll.response_tokens, exact_probabilities(model, _prompt(tok), eos, 0.7)) > ALPHA
    assert chi_square_p(roll.response_tokens, exact_probabilities(model, _prompt(tok), eos, 1.0)) < ALPHA


@pytest.mark.parametrize("setting", [{"repetition_penalty": 1.3}, {"no_repeat_ngram_size": 1}, {"top_k": 4},
                                     {"min_p": 0.05}, {"typical_p": 0.9}, {"temperature": 0.7}])
def test_chi_square_rejects_a_leaked_setting(tmp_path, setting):
    """Power: generate() given a config that leaves one setting unset takes it from the model's
    generation_config.json, draws from another distribution than the policy, and the same test says so."""
    path = build_small_vocab_model(tmp_path / "model", {"do_sample": True, **setting})
    tok = load_tokenizer(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    assert all(getattr(model.generation_config, k) == v for k, v in setting.items())
    eos = eos_ids(model, tok)
    cfg = GenerationConfig(do_sample=True, max_new_tokens=2, num_return_sequences=SAMPLES, eos_token_id=eos,
                           pad_token_id=tok.pad_token_id)
    torch.manual_seed(0)
    with torch.no_grad():
        out = model.generate(input_ids=torch.tensor([_prompt(tok)]), generation_config=cfg)
    responses = [_trim(r, set(eos))[0] for r in out[:, len(_prompt(tok)):].tolist()]
    p = chi_square_p(responses, exact_probabilities(model, _prompt(tok), eos, 1.0))
    assert p < ALPHA, p


def test_sample_refuses_a_setting_it_cannot_override(tmp_path):
    """suppress_tokens has no neutral value but None, which generate() reads as 'take the model's': refuse."""
    path = build_small_vocab_model(tmp_path / "model", {"suppress_tokens": [5]})
    tok = load_tokenizer(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    with pytest.raises(ValueError, match="suppress_tokens"):
        sample(model, tok, [_prompt(tok)], 2, 1.0, 1.0, 2, eos_ids(model, tok))
    # Our loader keeps only the special tokens of the shipped generation_config, so the same model samples.
    model = load_model(path)
    assert model.generation_config.suppress_tokens is None and model.generation_config.eos_token_id == 1
    assert len(sample(model, tok, [_prompt(tok)], 2, 1.0, 1.0, 2, eos_ids(model, tok))) == 2
