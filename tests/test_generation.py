"""Shared-prefill sampling draws from the same distribution as plain generate(num_return_sequences=n)."""

from __future__ import annotations

import logging

import torch
from transformers import GenerationConfig

from astarpo.generation import _generate_shared_prefill, sample
from astarpo.logprobs import collate, response_logprobs
from astarpo.models import eos_ids, load_model, load_tokenizer
from astarpo.tasks import ArithmeticTask


def _setup(tiny_model, k: int = 6):
    tok, model = load_tokenizer(tiny_model), load_model(tiny_model)
    prompts = [tok(r["prompt"])["input_ids"] for r in ArithmeticTask().splits()["train"][:k]]
    prompts = [p[j % 4:] for j, p in enumerate(prompts)]  # drop a few leading tokens: unequal lengths
    assert len({len(p) for p in prompts}) > 1, "want prompts of different lengths (left padding)"
    return tok, model.eval(), prompts


def _padded(prompts: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    P = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), P), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), P), dtype=torch.long)
    for j, p in enumerate(prompts):
        ids[j, P - len(p):], mask[j, P - len(p):] = torch.tensor(p), 1
    return ids, mask


def test_shared_prefill_same_logits_as_plain_generate(tiny_model):
    tok, model, prompts = _setup(tiny_model)
    ids, mask = _padded(prompts, tok.pad_token_id)
    n = 3
    cfg = GenerationConfig(do_sample=True, temperature=1.0, top_k=0, max_new_tokens=12, num_return_sequences=n,
                           eos_token_id=eos_ids(model, tok), pad_token_id=tok.pad_token_id,
                           output_logits=True, return_dict_in_generate=True)
    with torch.no_grad():
        torch.manual_seed(0)
        plain = model.generate(input_ids=ids, attention_mask=mask, generation_config=cfg)
        torch.manual_seed(0)
        shared = _generate_shared_prefill(model, ids, mask, n, cfg)
    # Same seed, same per-step distributions, same RNG use: the same tokens, and the same logits at every step.
    assert torch.equal(plain.sequences, shared.sequences)
    for a, b in zip(plain.logits, shared.logits):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)


def test_shared_prefill_sample_matches_plain_and_teacher_forcing(tiny_model):
    tok, model, prompts = _setup(tiny_model)
    eos = eos_ids(model, tok)
    runs = {}
    for shared in (True, False):
        torch.manual_seed(1)
        runs[shared] = sample(model, tok, prompts, n=4, temperature=1.0, top_p=1.0, max_new_tokens=10, eos=eos,
                              batch_size=8, shared_prefill=shared)
    a, b = runs[True], runs[False]
    assert a.prompt_index == b.prompt_index and a.response_tokens == b.response_tokens
    assert a.truncated == b.truncated and a.completions == b.completions
    for r, t in zip(a.response_tokens, a.truncated):  # EOS ends a response, nothing after it
        assert all(x not in eos for x in r[:-1]) and (t or r[-1] in eos)
    # The sampled tokens score the same under teacher forcing whichever path drew them.
    batch = collate(a, tok.pad_token_id)
    with torch.no_grad():
        logp = response_logprobs(model, batch)
    assert torch.isfinite(logp).all() and (logp <= 0).all()


def test_shared_prefill_greedy_equals_plain(tiny_model):
    tok, model, prompts = _setup(tiny_model, k=10)
    eos = eos_ids(model, tok)
    ids, mask = _padded(prompts, tok.pad_token_id)
    cfg = GenerationConfig(do_sample=False, max_new_tokens=16, eos_token_id=eos, pad_token_id=tok.pad_token_id)
    with torch.no_grad():
        plain = model.generate(input_ids=ids, attention_mask=mask, generation_config=cfg)
        shared = _generate_shared_prefill(model, ids, mask, 2, cfg)
    assert torch.equal(plain.repeat_interleave(2, dim=0), shared)


def test_collect_scores_each_sample_with_its_records_columns(tiny_model):
    from astarpo.generation import HFSampler, SamplingParams, collect

    tok, model, prompts = _setup(tiny_model, k=3)
    records = [{"id": str(i), "prompt": f"p{i}", "answer": str(i), "level": 10 * i} for i in range(3)]
    seen = {}

    def reward(prompts, completions, answer, level, **_):
        seen.update(prompts=prompts, answer=answer, level=level)
        return [float(len(c)) for c in completions]

    torch.manual_seed(0)
    roll = collect(HFSampler(model, tok, eos_ids(model, tok)), records, prompts, 2, SamplingParams(1.0, 1.0, 5),
                   reward)
    assert roll.prompt_index == [0, 0, 1, 1, 2, 2] and roll.rewards == [float(len(c)) for c in roll.completions]
    assert seen == {"prompts": ["p0", "p0", "p1", "p1", "p2", "p2"], "answer": ["0", "0", "1", "1", "2", "2"],
                    "level": [0, 0, 10, 10, 20, 20]}
    assert roll.select([1, 4]).rewards == [roll.rewards[1], roll.rewards[4]]


class PlainGenerateSampler:
    """A second engine behind the Sampler interface: generate(num_return_sequences=n), no shared prefill, and
    its own copy of the weights, refreshed by load_weights after every update (as an external engine would be),
    and nothing to free while the policy updates (sleep)."""

    uses_policy = False  # its own copy: it samples as it is, outside the policy's autocast and gathering
    owns_weights = True  # pushed after every update
    can_sleep = True

    def __init__(self, model, tokenizer, eos):
        import copy

        self.model, self.tokenizer, self.eos, self.loads, self.sleeps = copy.deepcopy(model), tokenizer, eos, 0, 0

    def generate(self, prompt_tokens, n, params, progress=None):
        return sample(self.model, self.tokenizer, prompt_tokens, n, params.temperature, params.top_p,
                      params.max_new_tokens, self.eos, shared_prefill=False)

    def load_weights(self, model, version=None):
        self.model.load_state_dict(model.state_dict())
        self.loads += 1

    def sleep(self):
        self.sleeps += 1


def test_a_second_engine_plugs_into_stage2(tiny_model, tmp_path):
    from test_baselines import _cfg
    from test_pipeline import DigitReward

    from astarpo import Trainer

    trainer = Trainer(_cfg(tiny_model, tmp_path / "run", "rloo", steps=2), reward=DigitReward())
    policy = trainer.accelerator.unwrap_model(trainer.policy)
    trainer.sampler = engine = PlainGenerateSampler(policy, trainer.tokenizer, trainer.eos)
    trainer.train()
    assert engine.loads == engine.sleeps == 2  # one weight push per step, after the update it slept through
    assert all(torch.equal(a, b) for a, b in zip(engine.model.state_dict().values(), policy.state_dict().values()))


def test_sampling_emits_no_library_warnings(tiny_model, recwarn, caplog):
    """transformers 5.2x warns on every call that passes the KV cache under its old name (`past_key_values`); a
    long sampling run must not repeat library warnings, through `warnings` or through transformers' logger."""
    tok, model, prompts = _setup(tiny_model)
    eos = eos_ids(model, tok)
    transformers_log = logging.getLogger("transformers")  # does not propagate to the root logger
    transformers_log.addHandler(caplog.handler)
    try:
        with caplog.at_level(logging.WARNING):
            for shared in (True, False):
                sample(model, tok, prompts, n=4, temperature=1.0, top_p=1.0, max_new_tokens=4, eos=eos, batch_size=8,
                       shared_prefill=shared)
            sample(model, tok, prompts, n=1, temperature=0.0, top_p=1.0, max_new_tokens=4, eos=eos, batch_size=8)
    finally:
        transformers_log.removeHandler(caplog.handler)
    assert [f"{w.category.__name__}: {w.message}" for w in recwarn] == []
    assert [r.getMessage() for r in caplog.records] == []
