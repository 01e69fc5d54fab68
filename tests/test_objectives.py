import torch
from transformers import LlamaConfig, LlamaForCausalLM

from astarpo.generation import Rollout
from astarpo.logprobs import collate, response_logprobs, response_logprobs_entropy
from astarpo.training.objectives import astarpo_loss, entropy_bonus


def test_astarpo_loss_hand_computed():
    logp = torch.tensor([-3.0, -10.0])
    ref = torch.tensor([-4.0, -8.0])
    r = torch.tensor([1.0, 0.0])
    v = torch.tensor([0.25, 0.5])
    beta2 = 0.1
    # (0.1 * 1 - 0.75)^2 = 0.4225 ; (0.1 * -2 - (-0.5))^2 = 0.09
    assert torch.allclose(astarpo_loss(logp, ref, r, v, beta2), torch.tensor([0.4225, 0.09]))


def test_collate_masks_count_eos_and_ignore_padding():
    roll = Rollout(prompt_index=[0, 1], prompt_tokens=[[5, 6, 7], [8]], response_tokens=[[9, 2], [10, 11, 12, 2]],
                   completions=["", ""], truncated=[False, False])
    b = collate(roll, pad_id=0)
    assert b["input_ids"].tolist() == [[5, 6, 7, 9, 2, 0, 0], [0, 0, 8, 10, 11, 12, 2]]
    assert b["attention_mask"].tolist() == [[1, 1, 1, 1, 1, 0, 0], [0, 0, 1, 1, 1, 1, 1]]
    assert b["response_mask"].tolist() == [[1, 1, 0, 0], [1, 1, 1, 1]]
    assert b["position_ids"][1].tolist() == [0, 0, 0, 1, 2, 3, 4]


class _Table(torch.nn.Module):
    """A 'model' whose next-token logits depend only on the current token: easy to compute by hand."""

    def __init__(self, vocab=6):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.table = torch.nn.Parameter(torch.randn(vocab, vocab, generator=g))

    def forward(self, input_ids, attention_mask=None, position_ids=None, logits_to_keep=0, use_cache=False):
        logits = self.table[input_ids]
        if logits_to_keep:
            logits = logits[:, -logits_to_keep:]
        return type("Out", (), {"logits": logits})()


def test_response_logprobs_sum_over_response_tokens_only():
    model = _Table()
    # prompt [1, 3], response [4, 2(EOS)], then padding that must not count
    roll = Rollout([0, 1], [[1, 3], [3]], [[4, 2], [5]], ["", ""], [False, True])
    b = collate(roll, pad_id=0)
    lp = response_logprobs(model, b)
    logsm = torch.log_softmax(model.table, -1)
    expected0 = logsm[3, 4] + logsm[4, 2]  # EOS token counted
    expected1 = logsm[3, 5]
    assert torch.allclose(lp.sum(-1), torch.stack([expected0, expected1]), atol=1e-6)
    assert lp[1, 1] == 0  # padding after the (truncated) response contributes nothing


def test_entropy_bonus_is_each_prompts_mean_entropy_per_response_token():
    """Two prompts, two responses each: tokens of both responses pool, padding does not count."""
    entropy = torch.tensor([[1.0, 2.0, 9.0], [3.0, 9.0, 9.0], [0.5, 0.5, 0.5], [1.5, 9.0, 9.0]])
    mask = torch.tensor([[1.0, 1, 0], [1, 0, 0], [1, 1, 1], [1, 0, 0]])
    torch.testing.assert_close(entropy_bonus(entropy, mask, group_size=2), torch.tensor([2.0, 0.75]))


def test_entropy_bonus_raises_the_entropy_the_trainer_subtracts_it_for():
    """Sign: the trainer's loss term is -entropy_coef * bonus, so a gradient step on it must flatten the policy.
    Size: its value is the coefficient times the mean token entropy, which for a uniform policy is log V."""
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=16, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=32))
    roll = Rollout(prompt_index=[0, 1], prompt_tokens=[[3, 4], [5]], response_tokens=[[6, 7, 2], [8, 2]],
                   completions=["", ""], truncated=[False, False])
    batch, coef = collate(roll, 0), 1e-3

    def bonus() -> torch.Tensor:
        return entropy_bonus(response_logprobs_entropy(model, batch)[1], batch["response_mask"], group_size=1)

    before = bonus()
    (-coef * before).mean().backward()
    with torch.no_grad():
        for p in model.parameters():
            p -= 0.5 / coef * p.grad  # plain gradient descent on the term alone
    after = bonus().detach()
    assert (after > before.detach()).all() and (after <= torch.log(torch.tensor(16.0)) + 1e-5).all()
    with torch.no_grad():  # a policy that ignores its input: uniform over the vocabulary
        model.lm_head.weight.zero_()
    torch.testing.assert_close(-coef * bonus(), torch.full((2,), -coef * torch.log(torch.tensor(16.0)).item()))
