"""A*-PO's fixed point is the KL-regularized optimal policy: check it on a response space small enough to enumerate.

Vocabulary {a, b, c} plus EOS, responses of at most L=2 tokens (EOS counted; length-2 responses without EOS are
truncated). With exact V* and beta1 = beta2 = beta, minimising the A*-PO loss on on-policy samples must drive
pi to pi* = pi_ref * exp(r / beta) / Z, so KL(pi || pi*) -> 0.
"""

import itertools
import math

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from astarpo.generation import Rollout
from astarpo.logprobs import collate, response_logprobs
from astarpo.training.objectives import astarpo_loss
from astarpo.values import v_star

EOS, A, B, C = 0, 1, 2, 3  # the whole vocabulary, so the enumerated responses carry all probability mass
PAD = EOS
# Every context must differ in its multiset of tokens: attention alone cannot tell [A, A] from [A, A, A].
PROMPTS = [[C, A], [C, B]]


def responses(max_len=2):
    out = [[EOS]]
    for n in range(1, max_len + 1):
        for seq in itertools.product([A, B, C], repeat=n):
            out.append(list(seq) + [EOS] if n < max_len else list(seq))
    return out


def reward(prompt, resp):
    # different targets per prompt, so the policy must condition on it
    target = [A, B] if prompt[1] == A else [B, EOS]
    return 1.0 if resp == target else (0.3 if resp[:1] == target[:1] else 0.0)


def enumerate_logprobs(model, prompt, ys):
    roll = Rollout([0] * len(ys), [prompt] * len(ys), ys, [""] * len(ys), [False] * len(ys))
    return response_logprobs(model, collate(roll, PAD)).sum(-1)


def test_astarpo_converges_to_optimal_policy():
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=4, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                      num_key_value_heads=1, max_position_embeddings=16, eos_token_id=EOS)
    ref = LlamaForCausalLM(cfg).eval()
    policy = LlamaForCausalLM(cfg)
    policy.load_state_dict(ref.state_dict())
    beta = 0.5
    ys = responses()
    with torch.no_grad():
        ref_lp = [enumerate_logprobs(ref, p, ys) for p in PROMPTS]
    assert all(torch.allclose(lp.exp().sum(), torch.tensor(1.0), atol=1e-5) for lp in ref_lp)  # a distribution
    r = [torch.tensor([reward(p, y) for y in ys]) for p in PROMPTS]
    # exact V*: beta * log E_{y ~ pi_ref} exp(r / beta)
    v = [beta * torch.logsumexp(lp + rr / beta, 0) for lp, rr in zip(ref_lp, r)]
    opt_lp = [lp + (rr - vv) / beta for lp, rr, vv in zip(ref_lp, r, v)]  # log pi*, normalised by construction
    assert all(torch.allclose(o.exp().sum(), torch.tensor(1.0), atol=1e-5) for o in opt_lp)

    def kl_to_optimal():
        with torch.no_grad():
            kls = []
            for p, o in zip(PROMPTS, opt_lp):
                lp = enumerate_logprobs(policy, p, ys)
                kls.append(float((lp.exp() * (lp - o)).sum()))
        return sum(kls) / len(kls)

    kl_start = kl_to_optimal()
    optimizer = torch.optim.Adam(policy.parameters(), lr=1e-2)
    gen = torch.Generator().manual_seed(0)
    for _ in range(150):
        # on-policy: draw 32 responses per prompt from the current policy's exact distribution
        rows = []
        for k, p in enumerate(PROMPTS):
            with torch.no_grad():
                probs = enumerate_logprobs(policy, p, ys).exp()
            rows += [(k, int(j)) for j in torch.multinomial(probs, 32, replacement=True, generator=gen)]
        roll = Rollout([k for k, _ in rows], [PROMPTS[k] for k, _ in rows], [ys[j] for _, j in rows],
                       [""] * len(rows), [False] * len(rows))
        logp = response_logprobs(policy, collate(roll, PAD)).sum(-1)
        loss = astarpo_loss(logp, torch.stack([ref_lp[k][j] for k, j in rows]),
                            torch.stack([r[k][j] for k, j in rows]), torch.stack([v[k] for k, _ in rows]), beta).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    kl_end = kl_to_optimal()
    assert kl_start > 0.1, kl_start  # the optimum is far from the start...
    assert kl_end < 0.01, kl_end  # ...and training gets there


def test_v_star_from_samples_approaches_exact_value():
    """The sample estimate that Stage 1 stores converges to beta * log E exp(r / beta)."""
    gen = torch.Generator().manual_seed(0)
    p = 0.3
    samples = (torch.rand(1, 200_000, generator=gen) < p).double()
    beta = 0.5
    exact = beta * math.log(1 - p + p * math.exp(1 / beta))
    assert abs(float(v_star(samples, beta)[0]) - exact) < 0.01
