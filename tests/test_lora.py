"""LoRA and mixed precision on the tiny model: the reference is the base with adapters disabled."""

import torch
from safetensors.torch import load_file
from test_pipeline import DigitReward, _train_cfg, _values

from astarpo import Trainer
from astarpo.assembly import reference_logprobs
from astarpo.config import EvalConfig
from astarpo.evaluate import run_eval
from astarpo.logprobs import sequence_logprobs
from astarpo.models import load_model


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
