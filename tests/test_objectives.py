import torch

from astarpo.generation import Rollout
from astarpo.logprobs import collate, response_logprobs
from astarpo.objectives import astarpo_loss


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
