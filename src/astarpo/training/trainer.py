"""Stage 2: on-policy least-squares regression onto the optimal advantage.

Each step: one response per prompt from the current policy, its reward, the reference log-prob, then
AdamW updates on

    loss = mean_batch ( beta2 * [log pi(y|x) - log pi_ref(y|x)] - (r(x, y) - V*(x)) )^2

with V* from Stage 1. No critic, no clipping, no group of samples. The baselines (GRPO, RLOO, REBEL, PPO) run
in the same loop: the objective (``objectives.py``) says how many responses per prompt it samples and which
per-step inputs it reads, and turns them into one loss per prompt. A step is :meth:`Trainer.train_step`: sample
and score, compute the objective's inputs, update, push the weights to the engine.
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any

import torch
from accelerate.utils import set_seed

from .. import rewards
from ..config import TrainConfig
from ..data import load_prompts, step_prompts
from ..distributed import check_supported, make_accelerator, ready_to_sample
from ..engines import COLOCATED_GPU_SHARE
from ..evaluate import evaluate
from ..generation import Rollout, SamplingParams, collect
from ..logprobs import collate, response_logprobs, response_logprobs_entropy, token_logprobs
from ..models import content_hash, load_tokenizer, resolve_model
from ..rundir import check_writable
from ..samplers import layout, make_sampler
from ..utils import peak_memory_mb
from ..values import training_values
from .assembly import build_training_models, reference_logprobs
from .checkpoint import RunState, check_resume
from .metrics import UpdateStats, sample_columns, step_metrics
from .objectives import OBJECTIVES, Batch, entropy_bonus


class TrainError(RuntimeError):
    """Training cannot go on as configured; the message says why and what to change."""


class Trainer:
    """Stage 2 trainer. ``Trainer(cfg).train()`` runs (or resumes) the whole loop and returns the last metrics."""

    def __init__(self, cfg: TrainConfig, reward: str | rewards.RewardFn | None = None) -> None:
        self.cfg = cfg
        self.reward_name, self.reward_fn = rewards.resolve(reward or cfg.reward)
        self.out = Path(cfg.output_dir)
        check_writable(self.out)  # before any model loading or sampling
        check_resume(self.out, cfg)
        self.accelerator = acc = make_accelerator(
            micro_batch_size=cfg.micro_batch_size, max_grad_norm=cfg.max_grad_norm, log_with=cfg.report_names or None,
            project_dir=self.out, mixed_precision=cfg.mixed_precision)
        self.launch = launch = layout(cfg)
        set_seed(cfg.seed + launch.engine_index)  # each engine its own stream (the processes of one: the same)
        self.objective = OBJECTIVES[cfg.algo].from_config(cfg, all_sum=launch.all_sum)
        check_supported(acc, critic=self.objective.trains_critic)
        self.model_dir = resolve_model(cfg.model)
        self.tokenizer = load_tokenizer(self.model_dir, cfg.trust_remote_code)
        self.records, self.prompt_ids = load_prompts(self.tokenizer, cfg)
        self.v_star, self.unsolved_dropped = None, 0
        if "v_star" in self.objective.inputs:
            keep, self.v_star, self.unsolved_dropped = training_values(cfg, self.model_dir, self.reward_name,
                                                                       [r["id"] for r in self.records])
            self.records, self.prompt_ids = [self.records[i] for i in keep], [self.prompt_ids[i] for i in keep]
        self.steps = cfg.steps or math.ceil(len(self.records) / cfg.batch_size)
        world, self.mini_batch_size = launch.processes, cfg.mini_batch_size or cfg.batch_size
        if cfg.batch_size % world or self.mini_batch_size % world:  # each process: a share of every mini-batch
            raise TrainError(f"batch_size {cfg.batch_size} and mini_batch_size {self.mini_batch_size} must be "
                             f"multiples of the number of processes ({world})")
        self.eval_records, self.eval_prompt_ids = (load_prompts(self.tokenizer, cfg, cfg.eval_data, cfg.eval_split,
                                                                cfg.eval_limit) if cfg.eval_data else ([], []))
        self.models = m = build_training_models(cfg, acc, self.model_dir, self.objective, self.tokenizer)
        self.policy, self.ref, self.critic, self.eos = m.policy, m.ref, m.critic, m.eos
        self.sampler = make_sampler(cfg, self.model_dir, self.tokenizer, acc.unwrap_model(self.policy),
                                    gpu_share=COLOCATED_GPU_SHARE, launch=launch)
        self.params = SamplingParams(cfg.temperature, cfg.top_p, cfg.max_new_tokens)
        self.state = RunState(cfg, acc, self.tokenizer, {
            "reference_model": cfg.model, "reference_model_hash": content_hash(self.model_dir),
            "reward": self.reward_name, "algo": cfg.algo, "beta1": cfg.beta1, "beta2": cfg.beta2})
        self.state.record_config()

    def train_step(self, step: int) -> dict[str, float]:
        """One step. Under ``accelerate launch`` each process takes its rows of the global batch, its engine samples
        those of all the processes that run it (:class:`~astarpo.launch.Launch`)."""
        acc, launch, G = self.accelerator, self.launch, self.objective.group_size
        t0 = time.perf_counter()
        batch, mine, ours = self._rows(step)
        with ready_to_sample(acc, self.policy, self.sampler, self.cfg.gather_for_generation):
            roll = collect(self.sampler, [self.records[batch[g]] for g in ours],
                           [self.prompt_ids[batch[g]] for g in ours], G, self.params, self.reward_fn,
                           self.cfg.on_reward_error, keep=[ours.index(g) for g in mine])
        version = step if roll.policy_version is None else roll.policy_version  # updates before the sampling
        if step - version > self.cfg.async_lag:
            raise TrainError(f"step {step + 1}'s samples are {step - version} versions old, past async_lag")
        self.state.record(step + 1, [self.records[i]["id"] for i in batch], version)
        if self.sampler.can_sleep:  # a vLLM engine on a GPU frees its memory for the update
            self.sampler.sleep()
        gen_seconds = time.perf_counter() - t0
        reward = torch.tensor(roll.rewards, dtype=torch.float32)
        valid = ~reward.isnan().view(-1, G).any(-1)  # on_reward_error=skip: a prompt with a failed sample drops
        B = self.mini_batch_size
        minis = [[j for j, g in enumerate(mine) if m0 <= g < m0 + B] for m0 in range(0, len(batch), B)]
        data = self.inputs(roll, reward.nan_to_num(0.0), [batch[g] for g in mine])
        stats = self.update(roll, data, valid, minis)
        if self.sampler.owns_weights:
            self.sampler.load_weights(acc.unwrap_model(self.policy), version=step + 1)
            self._sample_ahead(step + 1 + self.cfg.async_lag)
        columns = sample_columns(roll, data)
        per_sample = launch.all_rows(torch.stack(list(columns.values()), 1)[valid.repeat_interleave(G)])
        losses = launch.all_rows(stats.losses[valid])
        tokens = float(launch.all_sum(torch.tensor(float(sum(roll.lengths)))))
        entropy = {} if stats.entropies is None else {"entropy": float(launch.all_rows(stats.entropies[valid]).mean())}
        seconds = time.perf_counter() - t0
        return {**step_metrics(dict(zip(columns, per_sample.T)), losses), **entropy, "grad_norm": stats.grad_norm,
                "skipped_samples": (len(batch) - len(losses)) * G, "samples": len(batch) * G,
                "policy_lag": step - version, "generation_seconds": round(gen_seconds, 3),
                "step_seconds": round(seconds, 3),
                "tokens_per_second": tokens / seconds, "peak_memory_mb": round(peak_memory_mb(), 1),
                "learning_rate": self.models.optimizer.param_groups[0]["lr"]}

    @torch.no_grad()
    def inputs(self, roll: Rollout, reward: torch.Tensor, prompts: list[int]) -> Batch:
        """What the objective reads from outside the policy, computed once before any update and without
        gradients: [samples, tokens]. (log pi_old, the policy's own, is :meth:`update`'s.)"""
        acc, G, wanted = self.accelerator, self.objective.group_size, self.objective.inputs
        pad, micro = self.tokenizer.pad_token_id, self.cfg.micro_batch_size
        lengths = torch.tensor(roll.lengths)
        mask = (torch.arange(max(1, int(lengths.max()))) < lengths[:, None]).float()
        # In one fixed order on every process: under FSDP2 and ZeRO-3 each forward pass is a collective.
        with acc.autocast():
            v_star = self.v_star[prompts].float().repeat_interleave(G) if "v_star" in wanted else None
            ref_logp = reference_logprobs(acc, self.models, roll, pad, micro) if "ref_logp" in wanted else None
            old_values = None
            if "old_values" in wanted:  # through the prepared critic's __call__: FSDP2's hooks live there
                old_values = token_logprobs(acc.unwrap_model(self.critic), roll, pad, micro,
                                            lambda critic, batch: critic(batch))
        sampler_logp = roll.sampler_logp_tokens(mask.shape[1]) if "sampler_logp" in wanted else None
        return Batch(mask=mask, reward=reward, v_star=v_star, ref_logp=ref_logp, old_logp=torch.zeros_like(mask),
                     old_values=old_values, sampler_logp=sampler_logp)

    def update(self, roll: Rollout, data: Batch, valid: torch.Tensor, minis: list[list[int]]) -> UpdateStats:
        """The objective's ``prepare``, then one AdamW update per mini-batch of prompts (``minis``: this process's
        prompt positions in each), accumulated over micro-batches of whole groups.

        ``data.old_logp`` (log pi_old, the sampling policy) is filled here, before the first update: the first
        mini-batch's from its own forward pass (the policy has not moved yet), the others' from a pass without
        gradients, and all of them that way when ``prepare`` reads them.

        Each process scales its summed per-prompt losses by world / (valid prompts in the global mini-batch); the
        strategy averages gradients over processes, so the update equals the single-process one on the whole
        mini-batch, and the number of updates does not depend on the number of processes.
        """
        acc, obj, learner, G = self.accelerator, self.objective, self.models.learner, self.objective.group_size
        first_from_forward = "old_logp" not in obj.inputs
        ahead = [j * G + s for m in (minis[1:] if first_from_forward else minis) for j in m for s in range(G)]
        if ahead:
            with torch.no_grad(), acc.autocast():
                logp = token_logprobs(acc.unwrap_model(self.policy), roll.select(ahead), self.tokenizer.pad_token_id,
                                      self.cfg.micro_batch_size)
            data.old_logp[ahead, : logp.shape[1]] = logp
        obj.prepare(data)
        counts = self.launch.all_sum(torch.tensor([float(valid[m].sum()) for m in minis]))
        if counts.sum() == 0:
            raise TrainError("the reward failed for every sample of this step")
        losses, grad_norms = torch.zeros(len(valid)), []
        entropies = torch.zeros(len(valid)) if self.cfg.entropy_coef > 0 else None
        per_micro = max(1, self.cfg.micro_batch_size // G)  # whole groups: a prompt's loss needs all of its samples
        for k, (prompts, count) in enumerate(zip(minis, counts.tolist())):
            if count == 0:
                continue  # every process sees the same count, so all skip this update together
            learner.start_update()
            micros = [prompts[u : u + per_micro] for u in range(0, len(prompts), per_micro)]
            for u, sub in enumerate(micros):
                rows = [j * G + s for j in sub for s in range(G)]
                batch = collate(roll.select(rows), self.tokenizer.pad_token_id, acc.device)
                with learner.accumulating(last=u == len(micros) - 1):
                    logp, entropy = (response_logprobs_entropy(self.policy, batch) if self.cfg.entropy_coef > 0
                                     else (response_logprobs(self.policy, batch), None))
                    logp = logp.float().cpu()
                    values = self.critic(batch).cpu() if self.critic is not None else None
                    if k == 0 and first_from_forward:
                        data.old_logp[rows, : logp.shape[1]] = logp.detach()
                    mb = data.rows(rows, logp.shape[1], logp=logp, values=values)
                    loss = obj.loss(mb)
                    if entropy is not None:  # the official A*-PO code's entropy bonus
                        bonus = entropy_bonus(entropy.float().cpu(), mb.mask, G)
                        loss = loss - self.cfg.entropy_coef * bonus
                        entropies[sub] = bonus.detach()
                    loss = loss * valid[sub]
                    learner.backward(loss.sum() * self.launch.processes / count)
                losses[sub] = loss.detach()
            grad_norms.append(learner.step())
        return UpdateStats(losses, sum(grad_norms) / len(grad_norms), entropies)

    def _rows(self, step: int) -> tuple[list[int], list[int], list[int]]:
        """Step ``step``'s prompts, and this process's and its engine's positions among them."""
        batch = step_prompts(len(self.records), self.cfg.batch_size, step, self.cfg.seed)
        return batch, self.launch.process_rows(len(batch)), self.launch.engine_rows(len(batch))

    def _sample_ahead(self, step: int) -> None:
        """With ``async_lag`` K, once policy version v is the server's, it may draw step v + K's samples: they are
        asked for now, and trained on K updates later at most."""
        if self.cfg.async_lag and step < self.steps:
            batch, _, ours = self._rows(step)
            self.sampler.prefetch([self.prompt_ids[batch[g]] for g in ours], self.objective.group_size, self.params)

    def evaluate(self) -> dict[str, Any]:
        """Greedy accuracy on the held-out prompts (``eval_data``)."""
        acc = self.accelerator
        with ready_to_sample(acc, self.policy, self.sampler, self.cfg.gather_for_generation):
            return evaluate(acc.unwrap_model(self.policy), self.tokenizer, self.eval_records, self.eval_prompt_ids,
                            self.reward_fn, max_new_tokens=self.cfg.max_new_tokens,
                            batch_size=self.cfg.generation_batch_size, on_reward_error=self.cfg.on_reward_error,
                            sampler=self.sampler)

    def train(self) -> dict[str, Any]:
        """Run (or resume) Stage 2; returns the last step's metrics. The final model lands in ``output_dir/final``."""
        from tqdm.auto import tqdm

        cfg, acc = self.cfg, self.accelerator
        start = self.state.resume()
        if start and self.sampler.owns_weights:  # the engine's copy is still the reference's
            self.sampler.load_weights(acc.unwrap_model(self.policy), version=start)
        for ahead in range(start + 1, start + 1 + cfg.async_lag):  # drawn by version start, as step start's
            self._sample_ahead(ahead)
        self.state.start_log()
        if start == 0 and self.eval_records:
            self.state.log({"step": 0, "eval_accuracy": self.evaluate()["accuracy"]})
        metrics: dict[str, Any] = {}
        bar = tqdm(range(start, self.steps), initial=start, total=self.steps, desc="stage 2", dynamic_ncols=True,
                   disable=not acc.is_main_process)
        for step in bar:
            metrics = {"step": step + 1, **self.train_step(step)}
            due = (cfg.eval_every and (step + 1) % cfg.eval_every == 0) or step + 1 == self.steps
            if self.eval_records and due:
                metrics["eval_accuracy"] = self.evaluate()["accuracy"]
            self.state.log(metrics)
            bar.set_postfix({k: f"{metrics[k]:.2f}" for k in ("reward", "kl", "step_seconds") if k in metrics})
            if (step + 1) % cfg.save_every == 0 or step + 1 == self.steps:
                self.state.save(step + 1)
        self.state.save_final(self.policy, self.steps)
        self.launch.barrier()  # rank 0 has written final/ when train() returns on any process
        self.state.end_log()  # a launch itself ends with astarpo.launch.finish()
        return metrics
