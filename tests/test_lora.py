"""LoRA and mixed precision on the tiny model: the reference is the base with adapters disabled."""

import torch
from safetensors.torch import load_file
from test_pipeline import DigitReward, _train_cfg, _values

from astarpo import Trainer
from astarpo.config import EvalConfig
from astarpo.evaluate import run_eval
from astarpo.logprobs import sequence_logprobs
from astarpo.models import load_model
from astarpo.training.assembly import reference_logprobs


def test_lora_reference_is_the_untouched_base(tiny_model, tmp_path):
    values = _values(tiny_model, tmp_path / "v.parquet")
    cfg = _train_cfg(tiny_model, values, tmp_path / "run", steps=2, lora_rank=4, lora_alpha=8)
    trainer = Trainer(cfg, reward=DigitReward())
    assert trainer.ref is None  # no second model in memory
    trainable = [n for n, p in trainer.policy.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    trainer.train()
    from astarpo.generation import sample

    policy = trainer.accelerator.unwrap_model(trainer.policy)
    roll = sample(policy, trainer.tokenizer, trainer.prompt_ids[:4], 2, 1.0, 1.0, 6, trainer.eos)
    untouched = load_model(tiny_model)
    pad = trainer.tokenizer.pad_token_id
    ref = reference_logprobs(trainer.accelerator, trainer.models, roll, pad, 8).sum(-1)  # per token -> response
    assert torch.allclose(ref, sequence_logprobs(untouched, roll, pad), atol=1e-5)
    assert not torch.allclose(sequence_logprobs(policy, roll, pad), ref, atol=1e-3)  # adapters did train
    # the final directory holds adapters; loading merges them, and eval finds the base as reference
    res = run_eval(EvalConfig(model=str(tmp_path / "run" / "final"), limit=3, max_new_tokens=4, k=2,
                              output=str(tmp_path / "r.json")))
    assert res["reference"] == str(tiny_model) and res["kl_to_ref"] == res["kl_to_ref"]  # a number, not NaN


def test_lora_resume_matches_uninterrupted(tiny_model, tmp_path):
    values = _values(tiny_model, tmp_path / "v.parquet")
    kw = {"lora_rank": 4, "lora_alpha": 8}
    Trainer(_train_cfg(tiny_model, values, tmp_path / "a", steps=4, **kw), reward=DigitReward()).train()
    Trainer(_train_cfg(tiny_model, values, tmp_path / "b", steps=2, **kw), reward=DigitReward()).train()
    Trainer(_train_cfg(tiny_model, values, tmp_path / "b", steps=4, **kw), reward=DigitReward()).train()
    a = load_file(tmp_path / "a" / "final" / "adapter_model.safetensors")
    b = load_file(tmp_path / "b" / "final" / "adapter_model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_bf16_autocast_and_gradient_checkpointing_keep_fp32_weights(tiny_model, tmp_path):
    values = _values(tiny_model, tmp_path / "v.parquet")
    cfg = _train_cfg(tiny_model, values, tmp_path / "run", steps=1, mixed_precision="bf16",
                     gradient_checkpointing=True)
    trainer = Trainer(cfg, reward=DigitReward())
    metrics = trainer.train()
    assert metrics["loss"] == metrics["loss"]
    assert all(p.dtype == torch.float32 for p in trainer.policy.parameters())


def test_the_engine_gets_the_merged_weights_and_the_model_stays_as_it_was(tiny_model):
    """What a vLLM engine is sent for a LoRA policy: every base weight with W + scaling * B A merged in (as peft's
    merge_and_unload computes it), under the base checkpoint's names, no adapter matrices, and the model's own
    tensors untouched (no merge and unmerge round trip)."""
    import copy

    from astarpo.engines import policy_weights
    from astarpo.models import add_lora

    model = add_lora(load_model(tiny_model), rank=4, alpha=8, target_modules="all-linear")
    torch.manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1)  # peft starts B at zero, which would make the merge a no-op
    before = {k: v.clone() for k, v in model.state_dict().items()}
    sent = dict(policy_weights(model))
    expected = copy.deepcopy(model).merge_and_unload().state_dict()
    assert sent.keys() == expected.keys()
    assert all(torch.allclose(sent[k], expected[k], atol=1e-6) for k in expected)
    assert any(not torch.allclose(sent[k], load_model(tiny_model).state_dict()[k]) for k in sent)  # B A merged
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())


def _untied_tiny(tiny_model):
    """The tiny Llama with its LM head apart from the input embedding, so that a LoRA on embed_tokens changes the
    input embedding only, as it does in the trained model (tied, one tensor serves both: see the refusal below)."""
    from transformers import AutoConfig, LlamaForCausalLM

    cfg = AutoConfig.from_pretrained(tiny_model)
    cfg.tie_word_embeddings = False
    torch.manual_seed(0)
    return LlamaForCausalLM(cfg)


def _lora(model, targets: list[str], **kw):
    """``model`` with a LoRA on ``targets`` whose every matrix is random: peft starts B (an embedding's A) at zero,
    which would make each merge a no-op."""
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=targets, **kw))
    torch.manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.normal_(0, 0.1)
    return model


def _assert_sends_peft_merge(model, layers: list[str]) -> None:
    """Every tensor policy_weights sends is peft's merge_and_unload state dict's (so no adapter matrix), the adapted
    ``layers`` did change, and the model itself did not."""
    import copy

    from astarpo.engines import policy_weights

    before = {k: v.clone() for k, v in model.state_dict().items()}
    base = {k.replace("base_model.model.", "").replace("base_layer.", ""): v for k, v in before.items()}
    sent = dict(policy_weights(model))
    expected = copy.deepcopy(model).merge_and_unload().state_dict()
    assert sent.keys() == expected.keys()
    assert all(torch.allclose(sent[k], expected[k], atol=1e-6) for k in expected)
    assert all(not torch.allclose(sent[k], base[k]) for k in layers)  # the delta was merged in
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    low = dict(policy_weights(model, torch.bfloat16))  # an engine in bfloat16: every tensor sent in it
    assert low.keys() == sent.keys() and all(v.dtype == torch.bfloat16 for v in low.values())
    assert all(torch.allclose(low[k].float(), sent[k], rtol=1e-2, atol=1e-2) for k in sent)


def test_the_engine_gets_an_embedding_lora_merged(tiny_model):
    """peft's Embedding keeps lora_embedding_A/B as parameters (no .weight) and its delta is (B A) transposed."""
    model = _lora(_untied_tiny(tiny_model), ["embed_tokens", "q_proj", "down_proj"])
    _assert_sends_peft_merge(model, ["model.embed_tokens.weight", "model.layers.0.self_attn.q_proj.weight"])


def test_the_engine_gets_a_conv1d_lora_merged():
    """GPT-2's Conv1D stores its weight input-major (peft's fan_in_fan_out): the delta is (B A) transposed."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    gpt2 = GPT2LMHeadModel(GPT2Config(vocab_size=64, n_positions=32, n_embd=16, n_layer=2, n_head=2,
                                      bos_token_id=0, eos_token_id=0))
    model = _lora(gpt2, ["c_attn", "c_fc", "c_proj"], fan_in_fan_out=True)
    # c_attn is 16 x 48 (not square), so a delta left untransposed would not even add
    _assert_sends_peft_merge(model, ["transformer.h.0.attn.c_attn.weight", "transformer.h.1.mlp.c_proj.weight"])


def test_the_engine_push_refuses_what_it_cannot_merge(tiny_model):
    """A base weight whose adapter matrices never come is named at the end, not silently kept back; a LoRA on a
    tied embedding, and DoRA, are refused before anything is gathered."""
    import pytest

    from astarpo.engines import policy_weights

    model = _lora(_untied_tiny(tiny_model), ["embed_tokens", "q_proj"])
    del model.base_model.model.model.embed_tokens.lora_embedding_B["default"]  # A arrives, B never does
    with pytest.raises(RuntimeError, match=r"never sent.*: base_model\.model\.model\.embed_tokens$"):
        list(policy_weights(model))
    with pytest.raises(ValueError, match="lm_head.weight"):
        next(policy_weights(_lora(load_model(tiny_model), ["embed_tokens"])))  # tie_word_embeddings
    with pytest.raises(NotImplementedError, match=r"q_proj \(Linear, DoRA\)"):
        next(policy_weights(_lora(_untied_tiny(tiny_model), ["q_proj"], use_dora=True)))
