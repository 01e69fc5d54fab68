"""The baselines (GRPO, RLOO, REBEL, PPO): each loss against a hand-computed example, then each objective
trained for real in the shared Stage 2 loop on a tiny model, with checkpoints and resume."""

import math

import pytest
import torch
from safetensors.torch import load_file
from test_pipeline import COMMON, DigitReward

from astarpo import TrainConfig, Trainer
from astarpo.config import ConfigError
from astarpo.training.objectives import (
    OBJECTIVES,
    Batch,
    Objective,
    gae,
    grpo_advantages,
    grpo_loss,
    ppo_loss,
    rebel_loss,
    rloo_advantages,
    rloo_loss,
    seq_sum,
    truncated_is_weight,
)


def test_grpo_advantages_hand_computed():
    # group [1, 0, 0, 0]: mean 0.25, unbiased std sqrt((0.75^2 + 3 * 0.25^2) / 3) = 0.5
    adv = grpo_advantages(torch.tensor([1.0, 0, 0, 0, 1, 1, 1, 1]), 4)
    assert torch.allclose(adv[:4], torch.tensor([0.75, -0.25, -0.25, -0.25]) / (0.5 + 1e-4))
    assert torch.equal(adv[4:], torch.zeros(4))  # all equal: no signal, and no division by zero


def test_grpo_loss_hand_computed():
    logp = torch.tensor([[-1.0, -2.0, 0.0]])
    old = torch.tensor([[-1.1, -2.0, 0.0]])
    ref = torch.tensor([[-1.5, -1.5, 0.0]])
    mask = torch.tensor([[1.0, 1.0, 0.0]])  # third position is padding
    # token 0: ratio e^0.1 = 1.10517 (inside the clip range), k3 with q = -0.5: e^-0.5 + 0.5 - 1 = 0.10653
    # token 1: ratio 1, k3 with q = 0.5: e^0.5 - 0.5 - 1 = 0.14872
    expected = ((-math.exp(0.1) + 0.1 * 0.10653066) + (-1 + 0.1 * 0.14872127)) / 2
    got = grpo_loss(logp, old, ref, mask, torch.tensor([1.0]), 0.2, 0.1)
    assert torch.allclose(got, torch.tensor([expected]), atol=1e-6)
    # clipping: ratio 1.5 with A = 1 counts as 1.2; ratio 0.5 with A = -1 counts as 0.8 (the pessimistic side)
    high = grpo_loss(torch.tensor([[math.log(1.5)]]), torch.zeros(1, 1), None, torch.ones(1, 1),
                     torch.tensor([1.0]), 0.2, 0.0)
    low = grpo_loss(torch.tensor([[math.log(0.5)]]), torch.zeros(1, 1), None, torch.ones(1, 1),
                    torch.tensor([-1.0]), 0.2, 0.0)
    assert torch.allclose(high, torch.tensor([-1.2])) and torch.allclose(low, torch.tensor([0.8]))


def test_rloo_hand_computed():
    adv = rloo_advantages(torch.tensor([1.0, 0.0, 0.0, 1.0]), 4)
    assert torch.allclose(adv, torch.tensor([2 / 3, -2 / 3, -2 / 3, 2 / 3]))
    mask = torch.tensor([[1.0, 1.0], [1.0, 0.0]])
    # on-policy the loss is -A; off-policy the sequence ratio is clipped: ratio 1.5, A = 2 -> -min(3, 2.4)
    logp = torch.tensor([[-1.0, -1.0], [math.log(1.5) - 1.0, 5.0]])
    old = torch.tensor([[-1.0, -1.0], [-1.0, 0.0]])
    assert torch.allclose(rloo_loss(logp, old, mask, torch.tensor([0.5, 2.0]), 0.2), torch.tensor([-0.5, -2.4]))


def test_rebel_loss_hand_computed():
    # log-ratios to pi_old: +0.5 and -0.5, difference 1; (1 - 0.5 * (1 - 0))^2 = 0.25, and 0 at eta 1
    logp, old, reward = torch.tensor([[-1.0, -2.0]]), torch.tensor([[-1.5, -1.5]]), torch.tensor([[1.0, 0.0]])
    assert torch.allclose(rebel_loss(logp, old, reward, 0.5), torch.tensor([0.25]))
    assert torch.allclose(rebel_loss(logp, old, reward, 1.0), torch.tensor([0.0]))


def test_gae_hand_computed():
    # rewards [0, 0, 1] (+ padding), V = 0.5 everywhere, gamma 1, lambda 0.5:
    # delta = [0, 0, 0.5]; A_2 = 0.5, A_1 = 0 + 0.5 * 0.5 = 0.25, A_0 = 0.125; returns = A + V
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0]])
    adv, ret = gae(torch.tensor([[0.0, 0.0, 1.0, 0.0]]), torch.full((1, 4), 0.5), mask, lam=0.5)
    assert torch.allclose(adv, torch.tensor([[0.125, 0.25, 0.5, 0.0]]))
    assert torch.allclose(ret, torch.tensor([[0.625, 0.75, 1.0, 0.0]]))


def test_ppo_loss_hand_computed():
    one = torch.ones(1, 1)
    # on-policy: policy term -A = -2; value 0.5 vs old 0.3 is inside the clip range: 0.1 * 0.5 * (0.5 - 1)^2
    got = ppo_loss(one * -1, one * -1, one, one * 2, one * 0.5, one * 0.3, one, 0.2, 0.1)
    assert torch.allclose(got, torch.tensor([-2 + 0.1 * 0.5 * 0.25]))
    # value 0.9 is clipped to 0.5 and the larger (pessimistic) error 0.25 counts, not 0.01
    got = ppo_loss(one * -1, one * -1, one, one * 2, one * 0.9, one * 0.3, one, 0.2, 0.1)
    assert torch.allclose(got, torch.tensor([-2 + 0.1 * 0.5 * 0.25]))


def test_objectives_return_one_loss_per_prompt():
    mask = torch.ones(8, 3)
    b = Batch(mask=mask, reward=torch.tensor([1.0, 0, 0, 0, 0, 1, 1, 0]), logp=-torch.rand(8, 3),
              ref_logp=-torch.rand(8, 3))
    b.old_logp = b.logp.clone()
    for name, prompts in [("grpo", 2), ("rloo", 2), ("rebel", 4)]:
        obj = OBJECTIVES[name](0.1, group_size=4) if name != "rebel" else OBJECTIVES[name](0.1)
        obj.prepare(b)
        assert obj.loss(b).shape == (prompts,)
    # RLOO with a KL penalty: the reward it regresses on is r - beta * sum_t log(pi_old / pi_ref)
    rloo = OBJECTIVES["rloo"](0.1, group_size=4)
    rloo.prepare(b)
    shaped = b.reward - 0.1 * seq_sum(b.old_logp - b.ref_logp, mask)
    assert torch.allclose(b.advantage, rloo_advantages(shaped, 4))


def test_tis_weights_each_policy_gradient_term_by_the_capped_ratio_to_the_engine():
    """TIS: the engine sampled from pi_engine, the loss assumes pi_old; each token's (RLOO: each response's)
    policy-gradient term is weighted by pi_old / pi_engine, capped, with no gradient through the weight. The
    KL term and the value loss are not weighted."""
    assert torch.allclose(truncated_is_weight(torch.tensor([0.0, -0.5, 0.5, 3.0]), 2.0),
                          torch.tensor([1.0, math.exp(-0.5), math.exp(0.5), 2.0]))
    g = torch.Generator().manual_seed(0)
    mask = (torch.arange(4) < torch.tensor([4, 2, 3, 4])[:, None]).float()
    old = -torch.rand(4, 4, generator=g) * mask
    engine = (old + 0.3 * torch.randn(4, 4, generator=g)) * mask  # another dtype's log-probs of the same tokens
    b = Batch(mask=mask, reward=torch.tensor([1.0, 0, 0, 1]), old_logp=old, ref_logp=old - 0.1 * mask,
              sampler_logp=engine, old_values=torch.rand(4, 4, generator=g) * mask)
    b.logp = (old + 0.05 * mask).requires_grad_()
    w = torch.exp(old - engine).clamp(max=1.5) * mask
    for name, plain in [("grpo", lambda o, b: grpo_loss(b.logp, b.old_logp, b.ref_logp, b.mask, b.advantage,
                                                        0.2, 0.1, w).view(-1, 2).mean(-1)),
                        ("rloo", lambda o, b: rloo_loss(b.logp, b.old_logp, b.mask, b.advantage, 0.2,
                                                        torch.exp(seq_sum(old - engine, mask)).clamp(max=1.5))
                         .view(-1, 2).mean(-1))]:
        obj = OBJECTIVES[name](0.1, group_size=2, tis_cap=1.5)
        assert "sampler_logp" in obj.inputs
        obj.prepare(b)
        assert torch.allclose(obj.loss(b), plain(obj, b))
        off = OBJECTIVES[name](0.1, group_size=2)
        assert "sampler_logp" not in off.inputs and not torch.allclose(off.loss(b), obj.loss(b))
    ppo = OBJECTIVES["ppo"](0.1, tis_cap=1.5)
    ppo.prepare(b)
    b.values = b.old_values.clone().requires_grad_()
    expected = ppo_loss(b.logp, b.old_logp, b.mask, b.advantage, b.values, b.old_values, b.returns, 0.2, 0.1, w)
    assert torch.allclose(ppo.loss(b), expected)
    grad, = torch.autograd.grad(ppo.loss(b).sum(), b.logp)
    assert torch.isfinite(grad).all()  # the weight itself carries no gradient (detached)


def test_tis_cap_belongs_to_ratio_methods_on_the_vllm_engine():
    with pytest.raises(ConfigError, match="tis_cap does not apply to algo astarpo"):
        TrainConfig(algo="astarpo", tis_cap=2.0)
    with pytest.raises(ConfigError, match="the hf engine samples from the policy itself"):
        TrainConfig(algo="grpo", tis_cap=2.0)
    with pytest.raises(ConfigError, match="tis_cap must be >= 1"):
        TrainConfig(algo="grpo", tis_cap=0.5)


def test_ppo_whitens_over_all_processes():
    """Two data-parallel halves, their statistics summed as accelerate's reduce would, get the advantages of the
    whole batch (plain torch whitening), so that two processes make the update of one."""
    g = torch.Generator().manual_seed(0)
    mask = (torch.arange(5) < torch.tensor([5, 3, 4, 1, 2, 5])[:, None]).float()

    def batch(rows):
        m = mask[rows]
        return Batch(mask=m, reward=torch.tensor([1.0, 0, 1, 0, 0, 1])[rows], old_logp=old[rows] * m,
                     ref_logp=ref[rows] * m, old_values=values[rows] * m)

    old, ref, values = -torch.rand(6, 5, generator=g), -torch.rand(6, 5, generator=g), torch.rand(6, 5, generator=g)
    whole = batch(list(range(6)))
    OBJECTIVES["ppo"](0.1).prepare(whole)
    raw, _ = gae(_ppo_token_reward(whole, 0.1), whole.old_values, mask, 0.95)
    plain = (raw - raw[mask.bool()].mean()) / (raw[mask.bool()].std() + 1e-8) * mask
    assert torch.allclose(whole.advantage, plain, atol=1e-5)

    rows = [[0, 2, 4], [1, 3, 5]]
    local, sums = [batch(r) for r in rows], []
    for h in local:  # each process on its own: its own sums, and advantages that differ from the whole batch's
        OBJECTIVES["ppo"](0.1, all_sum=lambda t: sums.append(t) or t).prepare(h)
    assert not torch.allclose(local[0].advantage, whole.advantage[rows[0]], atol=1e-3)
    for r in rows:  # with the sums of both
        h = batch(r)
        OBJECTIVES["ppo"](0.1, all_sum=lambda t: sums[0] + sums[1]).prepare(h)
        assert torch.allclose(h.advantage, whole.advantage[r], atol=1e-5)


def _ppo_token_reward(b, beta):
    r = -beta * (b.old_logp - b.ref_logp) * b.mask
    last = b.mask.sum(-1).long() - 1
    r[torch.arange(len(last)), last] += b.reward
    return r


def _cfg(model, out, algo, **kw):
    coefficient = {"beta2": 0.05, "kl_coef": 0.05, "rebel_eta": 20.0}.get(OBJECTIVES[algo].coefficient)
    return TrainConfig(**{**COMMON, "model": str(model), "output_dir": str(out), "algo": algo, "batch_size": 4,
                          "micro_batch_size": 4, "mini_batch_size": 2, "learning_rate": 1e-2, "save_every": 1,
                          **({OBJECTIVES[algo].coefficient: coefficient} if coefficient else {}), **kw})


@pytest.mark.parametrize("algo, group", [("grpo", 4), ("rloo", 2), ("rebel", 2), ("ppo", 1)])
def test_baseline_trains_in_the_shared_loop(tiny_model, tmp_path, algo, group):
    trainer = Trainer(_cfg(tiny_model, tmp_path / algo, algo, steps=2,
                           **({"group_size": group} if algo in ("grpo", "rloo") else {})), reward=DigitReward())
    assert (trainer.ref is not None) == (algo != "rebel")  # REBEL's log-ratios are to pi_old, not pi_ref
    assert (trainer.critic is not None) == (algo == "ppo")
    before = {k: v.clone() for k, v in trainer.policy.state_dict().items()}
    metrics = trainer.train()
    assert metrics["samples"] == 4 * group and metrics["skipped_samples"] == 0
    assert math.isfinite(metrics["loss"]) and ("kl" in metrics) == (algo != "rebel")
    after = load_file(tmp_path / algo / "final" / "model.safetensors")
    assert any(not torch.equal(before[k], after[k]) for k in after)
    ckpt = tmp_path / algo / "checkpoints" / "step-000002"
    assert (ckpt / "critic.safetensors").is_file() == (algo == "ppo")


def test_ppo_resume_restores_the_critic(tiny_model, tmp_path):
    Trainer(_cfg(tiny_model, tmp_path / "a", "ppo", steps=3), reward=DigitReward()).train()
    Trainer(_cfg(tiny_model, tmp_path / "b", "ppo", steps=2), reward=DigitReward()).train()
    Trainer(_cfg(tiny_model, tmp_path / "b", "ppo", steps=3), reward=DigitReward()).train()
    for f in ("model.safetensors", "critic.safetensors"):
        a = load_file(tmp_path / "a" / "checkpoints" / "step-000003" / f)
        b = load_file(tmp_path / "b" / "checkpoints" / "step-000003" / f)
        assert all(torch.equal(a[k], b[k]) for k in a), f


def test_a_new_objective_needs_no_change_to_the_loop(tiny_model, tmp_path, monkeypatch):
    class Reinforce(Objective):
        """Plain REINFORCE with the group mean as baseline: a few lines, registered by name."""

        name, group_size = "reinforce", 2

        def loss(self, b: Batch) -> torch.Tensor:
            r = b.reward.view(-1, 2)
            adv = (r - r.mean(-1, keepdim=True)).flatten()
            return (-adv * seq_sum(b.logp, b.mask)).view(-1, 2).mean(-1)

    monkeypatch.setitem(OBJECTIVES, "reinforce", Reinforce)
    metrics = Trainer(_cfg(tiny_model, tmp_path / "r", "reinforce", steps=1), reward=DigitReward()).train()
    assert metrics["samples"] == 8 and math.isfinite(metrics["loss"])


@pytest.mark.parametrize("settings, message", [
    ({"algo": "dpo"}, "algo must be one of astarpo, grpo, rloo, rebel, ppo"),
    ({"algo": "grpo", "values": "v.parquet"}, "values does not apply to algo grpo"),
    ({"algo": "grpo", "group_size": 1}, "group_size must be >= 2 for grpo"),
    ({"algo": "rebel", "group_size": 4}, "group_size does not apply to algo rebel \\(its own settings: rebel_eta\\)"),
    ({"algo": "rebel", "rebel_eta": 0}, "rebel_eta must be a positive number"),
    ({"algo": "ppo", "kl_coef": -1}, "kl_coef must be a number >= 0"),
    ({"algo": "grpo", "entropy_coef": -1e-3}, "entropy_coef must be a number >= 0"),
    ({"algo": "astarpo", "weight_decay": float("nan")}, "weight_decay must be a number >= 0"),
    ({"algo": "grpo", "beta2": 0.01}, "beta2 does not apply to algo grpo \\(its own settings: clip_eps, group_size, "
                                      "kl_coef, tis_cap\\)"),
    ({"algo": "astarpo", "kl_coef": 0.1}, "kl_coef does not apply to algo astarpo \\(its own settings: beta1, beta2, "
                                          "filter_unsolved, n, values\\)"),
    ({"algo": "rloo", "critic_learning_rate": 1e-5}, "critic_learning_rate does not apply to algo rloo"),
    # settings that another method reads, silently ignored before
    ({"algo": "astarpo", "clip_eps": 0.3}, "clip_eps does not apply to algo astarpo"),
    ({"algo": "astarpo", "gae_lambda": 0.9}, "gae_lambda does not apply to algo astarpo"),
    ({"algo": "grpo", "beta1": 1.0}, "beta1 does not apply to algo grpo"),
    ({"algo": "rloo", "n": 4}, "n does not apply to algo rloo"),
    ({"algo": "ppo", "filter_unsolved": False}, "filter_unsolved does not apply to algo ppo"),
    ({"algo": "rebel", "clip_eps": 0.3}, "clip_eps does not apply to algo rebel"),
    ({"algo": "ppo", "clip_eps": 1.5}, "clip_eps must be in"),
])
def test_baseline_config_errors(settings, message):
    with pytest.raises(ConfigError, match=message):
        TrainConfig(**settings)


def test_astarpo_without_values_is_refused(tiny_model, tmp_path):
    from astarpo.values import ValuesError

    with pytest.raises(ValuesError, match="astarpo needs the Stage 1 file"):
        Trainer(_cfg(tiny_model, tmp_path / "x", "astarpo"))


@pytest.mark.parametrize("algo, coefficient, value", [("astarpo", "beta2", 1e-3), ("grpo", "kl_coef", 0.0),
                                                      ("rloo", "kl_coef", 0.05), ("ppo", "kl_coef", 0.01),
                                                      ("rebel", "rebel_eta", 1.0)])
def test_each_method_owns_its_coefficient_with_the_cited_default(algo, coefficient, value):
    cfg = TrainConfig(algo=algo)
    assert OBJECTIVES[algo].coefficient == coefficient and getattr(cfg, coefficient) == value == cfg.coefficient
    assert (cfg.kl_coef is None) == (coefficient != "kl_coef")  # a method without a KL weight records none


def test_grpo_without_kl_loads_no_reference_and_ppo_critic_has_its_own_optimizer(tiny_model, tmp_path):
    grpo = Trainer(_cfg(tiny_model, tmp_path / "g", "grpo", steps=1, kl_coef=0.0, group_size=2),
                   reward=DigitReward())
    assert grpo.ref is None and "ref_logp" not in grpo.objective.inputs
    ppo = Trainer(_cfg(tiny_model, tmp_path / "p", "ppo", steps=1, critic_learning_rate=3e-3), reward=DigitReward())
    assert ppo.models.optimizer.param_groups[0]["lr"] == 1e-2
    assert ppo.models.critic_optimizer.param_groups[0]["lr"] == 3e-3
    critic_params = {id(p) for p in ppo.accelerator.unwrap_model(ppo.critic).parameters()}
    assert not critic_params & {id(p) for g in ppo.models.optimizer.param_groups for p in g["params"]}
