"""Chunked response log-probs equal the plain full-logits computation, values and gradients, without ever holding
[batch, length, vocab] logits."""

from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from transformers import LlamaConfig, LlamaForCausalLM

from astarpo.generation import Rollout
from astarpo.logprobs import _plain_logprobs, collate, response_logprobs, response_logprobs_entropy
from astarpo.models import add_lora, load_model

VOCAB = 400  # the tiny model's vocabulary may be a little smaller (BPE merges); batches use ids < 300


def _untied_model() -> LlamaForCausalLM:
    torch.manual_seed(1)
    return LlamaForCausalLM(LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                        num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64,
                                        tie_word_embeddings=False))


def _batch() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(4, 300, (n,), generator=g).tolist() for n in (5, 3, 7, 4)]
    responses = [torch.randint(4, 300, (n,), generator=g).tolist() for n in (9, 2, 12, 1)]  # padded to 12
    roll = Rollout(list(range(4)), prompts, responses, [""] * 4, [False] * 4)
    return collate(roll, pad_id=3)


def _grads(model, fn) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    model.zero_grad(set_to_none=True)
    batch = _batch()
    logp = fn(model, batch)
    weights = torch.linspace(-1, 2, logp.numel()).view_as(logp)  # a loss that weighs every token differently
    (logp * weights).sum().backward()
    return logp.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("tied", [True, False])
@pytest.mark.parametrize("chunk", [1, 5, None])
def test_chunked_equals_plain_values_and_gradients(tiny_model, tied, chunk):
    model = load_model(tiny_model) if tied else _untied_model()
    assert (model.get_output_embeddings().weight is model.get_input_embeddings().weight) == tied
    plain, g_plain = _grads(model, _plain_logprobs)
    ours, g_ours = _grads(model, lambda m, b: response_logprobs(m, b, chunk_tokens=chunk))
    mask = _batch()["response_mask"]
    assert torch.allclose(ours, plain, atol=1e-5) and bool((ours[mask == 0] == 0).all())
    assert g_ours.keys() == g_plain.keys() and (tied or "lm_head.weight" in g_ours)
    for name in g_plain:
        assert torch.allclose(g_ours[name], g_plain[name], atol=1e-5), name


def test_lora_head_and_disabled_adapters(tiny_model):
    """peft-wrapped policy with LoRA on the head itself: the adapted head is used, and disable_adapter() is the
    base model (the reference under LoRA)."""
    base = load_model(tiny_model)
    with torch.no_grad():
        want_ref = _plain_logprobs(base, _batch())
    model = add_lora(load_model(tiny_model), 4, 8, "q_proj,v_proj,lm_head")
    for name, p in model.named_parameters():  # LoRA's B starts at zero; move it so the adapters matter
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.5)
    plain, g_plain = _grads(model, _plain_logprobs)
    ours, g_ours = _grads(model, lambda m, b: response_logprobs(m, b, chunk_tokens=3))
    assert any("lm_head" in n for n in g_ours) and g_ours.keys() == g_plain.keys()
    assert torch.allclose(ours, plain, atol=1e-5) and not torch.allclose(ours, want_ref, atol=1e-3)
    assert all(torch.allclose(g_ours[n], g_plain[n], atol=1e-5) for n in g_plain)
    with torch.no_grad(), model.disable_adapter():
        assert torch.allclose(response_logprobs(model, _batch(), chunk_tokens=3), want_ref, atol=1e-5)


def test_bf16_autocast_matches_plain(tiny_model):
    model = load_model(tiny_model)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        plain, ours = _plain_logprobs(model, _batch()), response_logprobs(model, _batch(), chunk_tokens=4)
    assert ours.dtype == torch.float32 and torch.allclose(ours, plain, atol=1e-5)


class _LargestLogits(TorchDispatchMode):
    """Records the largest tensor with a last dimension of the vocabulary size created by any op (forward and
    backward): the logits and their gradients (the head's weight, [hidden, vocab] transposed, is left out)."""

    def __init__(self, vocab: int, hidden: int):
        super().__init__()
        self.vocab, self.hidden, self.largest = vocab, hidden, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(t, torch.Tensor) and t.ndim >= 2 and t.shape[-1] == self.vocab and t.shape[-2] != self.hidden:
                self.largest = max(self.largest, t.numel())
        return out


def test_never_materialises_full_logits(tiny_model):
    model, batch = load_model(tiny_model), _batch()
    B, R = batch["response_mask"].shape
    V = model.config.vocab_size
    with _LargestLogits(V, model.config.hidden_size) as plain:
        _plain_logprobs(model, batch).sum().backward()
    with _LargestLogits(V, model.config.hidden_size) as ours:
        response_logprobs(model, batch, chunk_tokens=4).sum().backward()
    assert plain.largest >= B * R * V  # the measurement sees the full logits when they exist ...
    assert ours.largest == 4 * V  # ... and here only one chunk of 4 tokens at a time, in backward too


def test_head_runs_in_the_precision_of_accelerates_autocast(tiny_model):
    """accelerate wraps the model's forward in autocast; the chunks run outside that forward and must use the
    same precision (bf16 logits, upcast), not float32."""
    from accelerate import Accelerator

    model = Accelerator(mixed_precision="bf16", cpu=True).prepare(load_model(tiny_model))
    with torch.no_grad():
        plain, ours = _plain_logprobs(model, _batch()), response_logprobs(model, _batch(), chunk_tokens=4)
        full = response_logprobs(load_model(tiny_model), _batch(), chunk_tokens=4)  # no autocast: float32
    assert torch.allclose(ours, plain, atol=1e-5) and not torch.allclose(ours, full, atol=1e-4)


@pytest.mark.parametrize("chunk", [1, 5, None])
def test_entropy_from_the_chunked_pass_equals_the_full_softmax_one(chunk):
    """The entropy bonus's input: per response token, H(pi(. | x, y_<t)) from the same chunks as the log-probs,
    values and gradients equal to the full logits' (torch's Categorical entropy)."""
    model, batch = _untied_model(), _batch()
    mask = batch["response_mask"]
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                   position_ids=batch["position_ids"]).logits[:, -mask.shape[1] - 1 : -1].float()
    want = torch.distributions.Categorical(logits=logits).entropy() * mask
    (want * torch.linspace(-1, 2, want.numel()).view_as(want)).sum().backward()
    want_grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    logp, entropy = response_logprobs_entropy(model, batch, chunk_tokens=chunk)
    (entropy * torch.linspace(-1, 2, entropy.numel()).view_as(entropy)).sum().backward()
    torch.testing.assert_close(entropy, want.detach(), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(logp.detach(), response_logprobs(model, batch, chunk_tokens=chunk).detach())
    assert (entropy[mask == 0] == 0).all() and (entropy[mask == 1] > 0).all()
    for name, grad in want_grads.items():
        torch.testing.assert_close(model.get_parameter(name).grad, grad, atol=1e-5, rtol=1e-4)
