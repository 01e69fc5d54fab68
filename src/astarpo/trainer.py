"""Stage 2: on-policy least-squares regression onto the optimal advantage.

Each step: one response per prompt from the current policy, its reward, the reference log-prob, then
AdamW updates on

    loss = mean_batch ( beta2 * [log pi(y|x) - log pi_ref(y|x)] - (r(x, y) - V*(x)) )^2

with V* from Stage 1. No critic, no clipping, no group of samples. The baselines (GRPO, RLOO, REBEL, PPO) run
in the same loop: the objective (``objectives.py``) says how many responses per prompt it samples and which
per-step inputs it reads, and turns them into one loss per prompt. A step is :meth:`Trainer.train_step`:
collect (sample, score), compute the objective's inputs, update. Checkpoints are Hugging Face model directories
plus accelerate's optimizer and RNG state (under FSDP2 and DeepSpeed: accelerate's sharded formats), so a killed
run resumes where its last checkpoint was. Several processes run DDP, FSDP2 or DeepSpeed ZeRO-2/3, as the
accelerate config says (``distributed.py``).
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import time
from pathlib import Path
from typing import Any

import torch
from accelerate.utils import gather_object, set_seed
from safetensors.torch import load_model as load_model_state
from safetensors.torch import save_file, save_model

from . import rewards
from .config import TrainConfig, to_dict
from .data import load_prompts
from .distributed import (
    as_float,
    check_supported,
    full_state_dict,
    make_accelerator,
    prepare_reference,
    ready_for_generation,
    strategy,
)
from .engines import make_sampler
from .evaluate import evaluate
from .generation import Rollout, SamplingParams, collect
from .logprobs import collate, response_logprobs, token_logprobs
from .models import ValueModel, add_lora, content_hash, eos_ids, load_model, load_tokenizer, resolve_model
from .objectives import OBJECTIVES, Batch
from .rundir import (
    RUN_FILE,
    Checkpoints,
    atomic_path,
    check_same_settings,
    check_writable,
    truncate_jsonl,
    write_json_atomic,
)
from .utils import peak_memory_mb
from .values import check_provenance, load_v_star, read_values, reference_provenance

log = logging.getLogger(__name__)
# Changing these between a run and its resume would make the resumed run a different experiment.
_RUN_KEYS = ("algo", "group_size", "clip_eps", "gae_lambda", "kl_coef", "rebel_eta", "critic_learning_rate",
             "critic_max_grad_norm", "model", "data", "split", "limit", "reward", "values", "beta1", "beta2", "n",
             "filter_unsolved",
             "learning_rate", "weight_decay", "batch_size", "mini_batch_size", "micro_batch_size", "seed",
             "temperature", "top_p", "max_new_tokens", "dtype", "use_chat_template", "prompt_template",
             "mixed_precision", "lora_rank", "lora_alpha", "lora_target_modules")
CONFIG_FILE = "train_config.json"
CRITIC_FILE = "critic.safetensors"  # PPO's value model, beside the policy in every checkpoint


class TrainError(RuntimeError):
    """Training cannot start as configured; the message says why and what to change."""


class Trainer:
    """Stage 2 trainer. ``Trainer(cfg).train()`` runs (or resumes) the whole loop and returns the last metrics."""

    def __init__(self, cfg: TrainConfig, reward: str | rewards.RewardFn | None = None) -> None:
        self.cfg = cfg
        self.reward_name, self.reward_fn = rewards.resolve(reward or cfg.reward)
        self.out = Path(cfg.output_dir)
        check_writable(self.out)  # before any model loading or sampling
        check_same_settings(self.out / CONFIG_FILE, {k: v for k, v in to_dict(cfg).items() if k in _RUN_KEYS},
                            "resume with the same settings or choose another --output-dir")
        self.accelerator = acc = make_accelerator(
            micro_batch_size=cfg.micro_batch_size, max_grad_norm=cfg.max_grad_norm, log_with=cfg.report_names or None,
            project_dir=self.out, mixed_precision=cfg.mixed_precision)
        self.strategy = strategy(acc)
        set_seed(cfg.seed)
        self.objective = OBJECTIVES[cfg.algo](
            cfg.coefficient, clip_eps=cfg.clip_eps, group_size=cfg.group_size, gae_lambda=cfg.gae_lambda,
            all_sum=lambda t: acc.reduce(t.to(acc.device), "sum").cpu() if acc.num_processes > 1 else t)
        check_supported(acc, critic=self.objective.trains_critic, engine=cfg.engine)
        self.model_dir = resolve_model(cfg.model)
        self.ref_hash = content_hash(self.model_dir)
        self.tokenizer = load_tokenizer(self.model_dir, cfg.trust_remote_code)
        self.records, self.prompt_ids = load_prompts(self.tokenizer, cfg)
        self.v_star, self.unsolved_dropped = None, 0
        if "v_star" in self.objective.inputs:
            keep, self.v_star, self.unsolved_dropped = self._load_values([r["id"] for r in self.records])
            self.records, self.prompt_ids = [self.records[i] for i in keep], [self.prompt_ids[i] for i in keep]
        self.steps = cfg.steps or math.ceil(len(self.records) / cfg.batch_size)
        world, mini = acc.num_processes, cfg.mini_batch_size or cfg.batch_size
        if cfg.batch_size % world or mini % world:  # every process takes an equal share of every mini-batch (under
            # FSDP2 and ZeRO-3 each forward pass is a collective that all processes must join)
            raise TrainError(f"batch_size {cfg.batch_size} and mini_batch_size {mini} must be multiples of the "
                             f"number of processes ({world})")
        self.eval_records, self.eval_prompt_ids = [], []
        if cfg.eval_data:
            self.eval_records, self.eval_prompt_ids = load_prompts(self.tokenizer, cfg, cfg.eval_data,
                                                                   cfg.eval_split, cfg.eval_limit)
        self._build_models()
        self.sampler = make_sampler(cfg, self.model_dir, self.tokenizer, acc.unwrap_model(self.policy))
        self.params = SamplingParams(cfg.temperature, cfg.top_p, cfg.max_new_tokens)
        self.checkpoints = Checkpoints(self.out / "checkpoints", cfg.keep_checkpoints, acc.is_main_process,
                                       acc.wait_for_everyone)
        self._perms: dict[int, list[int]] = {}
        acc.wait_for_everyone()  # every process has compared with the old config before it is replaced
        if acc.is_main_process:  # written once the inputs have been checked: bad input leaves no file behind
            write_json_atomic(self.out / CONFIG_FILE, to_dict(cfg))

    def _load_values(self, ids: list[str]) -> tuple[list[int], torch.Tensor, int]:
        """A*-PO's V* per prompt from the Stage 1 file, after checking that the file belongs to this run."""
        cfg = self.cfg
        if cfg.values is None:
            raise TrainError("astarpo needs the Stage 1 file from `astarpo values`: pass --values PATH")
        values = read_values(cfg.values)
        check_provenance(values.provenance, reference_provenance(cfg, self.model_dir, self.reward_name), cfg.values)
        keep, v_star, counts = load_v_star(values, ids, cfg.beta1, cfg.n, cfg.filter_unsolved)
        if not keep:
            raise TrainError("no prompt left to train on: every prompt's Stage 1 samples all failed; use an easier "
                             "task, a larger n in `astarpo values`, or --no-filter-unsolved")
        log.info("training on %d prompts (%d dropped: all Stage 1 samples failed)", len(keep),
                 counts["unsolved_dropped"])
        return keep, v_star, counts["unsolved_dropped"]

    def _build_models(self) -> None:
        """Policy, reference (frozen copy, or none with LoRA: the base model with adapters disabled), critic,
        optimizer; prepared by accelerate."""
        cfg, acc, obj = self.cfg, self.accelerator, self.objective
        policy = load_model(self.model_dir, cfg.dtype, cfg.trust_remote_code)
        self.eos = eos_ids(policy, self.tokenizer)
        if cfg.gradient_checkpointing:  # renamed to activation checkpointing in transformers 5.x
            if hasattr(policy, "activation_checkpointing_enable"):
                policy.activation_checkpointing_enable({"use_reentrant": False})
            else:
                policy.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        self.ref = None
        if cfg.lora_rank:
            policy = add_lora(policy, cfg.lora_rank, cfg.lora_alpha, cfg.lora_target_modules)
        elif "ref_logp" in obj.inputs:
            ref = load_model(self.model_dir, cfg.dtype, cfg.trust_remote_code).requires_grad_(False).eval()
            self.ref = prepare_reference(acc, ref)
        optimizer = torch.optim.AdamW([p for p in policy.parameters() if p.requires_grad], lr=cfg.learning_rate,
                                      weight_decay=cfg.weight_decay)
        self.policy, self.optimizer = acc.prepare(policy, optimizer)
        self.critic = self.critic_optimizer = None
        if obj.trains_critic:  # its own optimizer, learning rate and clipping; prepared alone (FSDP2: one per call)
            critic = ValueModel(self.model_dir, cfg.dtype, cfg.trust_remote_code)
            if cfg.gradient_checkpointing:
                critic.backbone.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            critic_optimizer = torch.optim.AdamW(critic.parameters(), lr=cfg.critic_learning_rate,
                                                 weight_decay=cfg.weight_decay)
            self.critic, self.critic_optimizer = acc.prepare(critic, critic_optimizer)
        acc.register_save_state_pre_hook(self._save_model_hook)
        acc.register_load_state_pre_hook(self._load_model_hook)

    # ----- one step ---------------------------------------------------------------------------------------------
    def train_step(self, step: int) -> dict[str, float]:
        """One step. Under ``accelerate launch`` process r takes prompts r::world of the global batch."""
        acc, G = self.accelerator, self.objective.group_size
        t0 = time.perf_counter()
        batch = self._batch(step)
        mine = list(range(acc.process_index, len(batch), acc.num_processes))  # my positions in the global batch
        prompts = [batch[g] for g in mine]
        with acc.autocast(), ready_for_generation(acc, self.policy, self.cfg.gather_for_generation):
            roll = collect(self.sampler, [self.records[i] for i in prompts], [self.prompt_ids[i] for i in prompts],
                           G, self.params, self.reward_fn, self.cfg.on_reward_error)
        gen_seconds = time.perf_counter() - t0
        reward = torch.tensor(roll.rewards, dtype=torch.float32)
        valid = ~reward.isnan().view(-1, G).any(-1)  # on_reward_error=skip: a prompt with a failed sample drops
        mini = self.cfg.mini_batch_size or self.cfg.batch_size
        minis = [[j for j, g in enumerate(mine) if m0 <= g < m0 + mini] for m0 in range(0, len(batch), mini)]
        data = self.inputs(roll, reward.nan_to_num(0.0), prompts, several_updates=len(minis) > 1)
        self.objective.prepare(data)
        losses, sampled_logp, grad_norm = self.update(roll, data, valid, minis)
        self.sampler.load_weights(acc.unwrap_model(self.policy))
        return self._metrics(roll, data, valid, losses, sampled_logp, grad_norm, len(batch),
                             gen_seconds, time.perf_counter() - t0)

    @torch.no_grad()
    def inputs(self, roll: Rollout, reward: torch.Tensor, prompts: list[int], several_updates: bool) -> Batch:
        """What the objective reads, computed once before any update and without gradients: [samples, tokens]."""
        pad, micro, G = self.tokenizer.pad_token_id, self.cfg.micro_batch_size, self.objective.group_size
        lengths = torch.tensor(roll.lengths)
        mask = (torch.arange(max(1, int(lengths.max()))) < lengths[:, None]).float()
        policy = self.accelerator.unwrap_model(self.policy)
        compute = {
            "v_star": lambda: self.v_star[prompts].float().repeat_interleave(G),
            "ref_logp": lambda: self.reference_logprobs(roll),
            "old_logp": lambda: token_logprobs(policy, roll, pad, micro),
            "old_values": lambda: token_logprobs(self.accelerator.unwrap_model(self.critic), roll, pad, micro,
                                                 lambda critic, batch: critic(batch)),  # FSDP2 hooks on __call__
        }
        # In one fixed order on every process: under FSDP2 and ZeRO-3 each forward pass is a collective.
        needed = self.objective.needs(several_updates)
        with self.accelerator.autocast():
            return Batch(mask=mask, reward=reward, **{k: f() for k, f in compute.items() if k in needed})

    def update(self, roll: Rollout, data: Batch, valid: torch.Tensor, minis: list[list[int]]
               ) -> tuple[torch.Tensor, torch.Tensor, float]:
        """One AdamW update per mini-batch of prompts (``minis``: this process's prompt positions in each),
        accumulated over micro-batches of whole groups. Returns per-prompt losses, the summed log-probs of the
        sampling policy per sample, and the mean gradient norm.

        Each process scales its summed per-prompt losses by world / (valid prompts in the global mini-batch);
        DDP averages gradients over processes, so the update equals the single-process one on the whole
        mini-batch, and the number of updates does not depend on the number of processes.
        """
        cfg, acc, obj, G = self.cfg, self.accelerator, self.objective, self.objective.group_size
        counts = torch.tensor([float(valid[m].sum()) for m in minis])
        counts = acc.reduce(counts.to(acc.device), "sum").cpu() if acc.num_processes > 1 else counts
        if counts.sum() == 0:
            raise TrainError("the reward failed for every sample of this step")
        models = [m for m in (self.policy, self.critic) if m is not None]
        optimizers = [o for o in (self.optimizer, self.critic_optimizer) if o is not None]
        for model in models:
            model.train()
        losses, sampled_logp, grad_norms = torch.zeros(len(valid)), torch.zeros(len(roll)), []
        per_micro = max(1, cfg.micro_batch_size // G)  # whole groups: a prompt's loss needs all of its samples
        for prompts, count in zip(minis, counts.tolist()):
            if count == 0:
                continue  # every process sees the same count, so all skip this update together
            micros = [prompts[u : u + per_micro] for u in range(0, len(prompts), per_micro)]
            for optimizer in optimizers:
                optimizer.zero_grad(set_to_none=True)
            for u, sub in enumerate(micros):
                rows = [j * G + s for j in sub for s in range(G)]
                batch = collate(roll.select(rows), self.tokenizer.pad_token_id, acc.device)
                with contextlib.ExitStack() as sync:
                    if u < len(micros) - 1:  # gradients are synchronised once per mini-batch, on its last micro
                        for model in models:
                            sync.enter_context(acc.no_sync(model))
                    logp = response_logprobs(self.policy, batch).float().cpu()
                    values = self.critic(batch).cpu() if self.critic is not None else None
                    mb = data.rows(rows, batch["response_mask"].shape[1], logp=logp, values=values)
                    if mb.old_logp is None:  # first update: the sampling policy is the current one
                        mb.old_logp = logp.detach()
                    loss = obj.loss(mb) * valid[sub]
                    self._backward(loss.sum() * acc.num_processes / count, last=u == len(micros) - 1)
                sampled_logp[rows] = (mb.old_logp * mb.mask).sum(-1)
                losses[sub] = loss.detach()
            grad_norms.append(self._step(optimizers))
        return losses, sampled_logp, sum(grad_norms) / len(grad_norms)

    def _backward(self, loss: torch.Tensor, last: bool) -> None:
        """Accumulate gradients; DeepSpeed is told which micro-batch closes the mini-batch (accelerate would
        step its engine after every backward)."""
        if self.strategy.startswith("zero"):
            self.policy.set_gradient_accumulation_boundary(last)
            self.policy.backward(loss)
        else:
            self.accelerator.backward(loss)

    def _step(self, optimizers: list) -> float:
        """One clipped AdamW step per model; the policy's gradient norm before clipping."""
        cfg, acc = self.cfg, self.accelerator
        if self.strategy.startswith("zero"):  # clips at gradient_clipping (= max_grad_norm), steps, zeroes
            self.policy.step()
            return as_float(self.policy.get_global_grad_norm())
        norm = as_float(acc.clip_grad_norm_(self.policy.parameters(), cfg.max_grad_norm))
        if self.critic is not None:
            acc.clip_grad_norm_(self.critic.parameters(), cfg.critic_max_grad_norm)
        for optimizer in optimizers:
            optimizer.step()
        return norm

    def _metrics(self, roll: Rollout, data: Batch, valid: torch.Tensor, losses: torch.Tensor,
                 sampled_logp: torch.Tensor, grad_norm: float, prompts: int, gen_seconds: float,
                 step_seconds: float) -> dict[str, float]:
        """Per-sample means over valid samples of every process (not a mean of per-process means)."""
        G = self.objective.group_size
        columns = {"reward": data.reward, "response_length": torch.tensor(roll.lengths).float(),
                   "truncated": torch.tensor(roll.truncated).float()}
        if data.ref_logp is not None:
            columns["log_ratio"] = sampled_logp - (data.ref_logp * data.mask).sum(-1)
        if data.v_star is not None:
            columns["v_star"] = data.v_star
        if roll.sampler_logp:  # the engine's log-probs (vLLM) against the training model's, per sequence
            columns["sampler_logp_diff"] = (torch.tensor([sum(x) for x in roll.sampler_logp]) - sampled_logp).abs()
        per_sample = torch.stack(list(columns.values()), 1)[valid.repeat_interleave(G)]
        per_prompt, n_tokens = losses[valid], float(sum(roll.lengths))
        if self.accelerator.num_processes > 1:
            per_sample = torch.cat(gather_object([per_sample]))
            per_prompt = torch.cat(gather_object([per_prompt]))
            n_tokens = sum(gather_object([n_tokens]))
        means = dict(zip(columns, per_sample.mean(0).tolist()))
        if "sampler_logp_diff" in columns:
            means["sampler_logp_diff_max"] = float(per_sample[:, list(columns).index("sampler_logp_diff")].max())
        metrics = {"reward": means["reward"]}
        if "v_star" in means:
            metrics.update(v_star=means["v_star"], advantage=means["reward"] - means["v_star"])
        metrics["loss"] = float(per_prompt.mean())
        if "log_ratio" in means:
            metrics.update(log_ratio=means["log_ratio"], kl=means["log_ratio"])
        if "sampler_logp_diff" in means:
            metrics.update(sampler_logp_diff=means["sampler_logp_diff"],
                           sampler_logp_diff_max=means["sampler_logp_diff_max"])
        return {
            **metrics, "response_length": means["response_length"], "truncated": means["truncated"],
            "grad_norm": grad_norm, "skipped_samples": (prompts - len(per_prompt)) * G, "samples": prompts * G,
            "generation_seconds": round(gen_seconds, 3), "step_seconds": round(step_seconds, 3),
            "tokens_per_second": n_tokens / step_seconds, "peak_memory_mb": round(peak_memory_mb(), 1),
            "learning_rate": self.optimizer.param_groups[0]["lr"],
        }

    def _batch(self, step: int) -> list[int]:
        """Prompt positions for ``step``: consecutive slices of a fresh seeded permutation per epoch."""
        P, B = len(self.records), self.cfg.batch_size
        out = []
        for i in range(step * B, (step + 1) * B):
            epoch, pos = divmod(i, P)
            if epoch not in self._perms:
                g = torch.Generator().manual_seed(self.cfg.seed * 7919 + epoch)
                self._perms[epoch] = torch.randperm(P, generator=g).tolist()
            out.append(self._perms[epoch][pos])
        return out

    def reference_logprobs(self, roll: Rollout) -> torch.Tensor:
        """Per-token log pi_ref [rows, longest response]: the frozen copy, or the policy with adapters disabled."""
        pad, micro = self.tokenizer.pad_token_id, self.cfg.micro_batch_size
        if self.ref is not None:
            return token_logprobs(self.ref, roll, pad, micro)
        policy = self.accelerator.unwrap_model(self.policy)
        with policy.disable_adapter():
            return token_logprobs(policy, roll, pad, micro)

    def evaluate(self) -> dict[str, Any]:
        """Greedy accuracy on the held-out prompts (``eval_data``)."""
        with self.accelerator.autocast(), ready_for_generation(self.accelerator, self.policy,
                                                              self.cfg.gather_for_generation):
            return evaluate(self.accelerator.unwrap_model(self.policy), self.tokenizer, self.eval_records,
                            self.eval_prompt_ids, self.reward_fn, max_new_tokens=self.cfg.max_new_tokens,
                            batch_size=self.cfg.generation_batch_size, on_reward_error=self.cfg.on_reward_error,
                            sampler=self.sampler)

    # ----- the loop, checkpoints, resume -------------------------------------------------------------------------
    def train(self) -> dict[str, Any]:
        """Run (or resume) Stage 2; returns the last step's metrics. The final model lands in ``output_dir/final``."""
        from tqdm.auto import tqdm

        cfg, acc = self.cfg, self.accelerator
        start = self._resume()
        if start:  # an engine with its own copy of the weights (vLLM) still holds the reference's
            self.sampler.load_weights(acc.unwrap_model(self.policy))
        acc.init_trackers("astarpo", config={k: v for k, v in to_dict(cfg).items()
                                             if isinstance(v, (int, float, str, bool))})
        if start == 0 and self.eval_records:
            self._log({"step": 0, "eval_accuracy": self.evaluate()["accuracy"]})
        metrics: dict[str, Any] = {}
        bar = tqdm(range(start, self.steps), initial=start, total=self.steps, desc="stage 2", dynamic_ncols=True,
                   disable=not acc.is_main_process)
        for step in bar:
            metrics = {"step": step + 1, **self.train_step(step)}
            due = (cfg.eval_every and (step + 1) % cfg.eval_every == 0) or step + 1 == self.steps
            if self.eval_records and due:
                metrics["eval_accuracy"] = self.evaluate()["accuracy"]
            self._log(metrics)
            bar.set_postfix({k: f"{metrics[k]:.2f}" for k in ("reward", "kl", "step_seconds") if k in metrics})
            if (step + 1) % cfg.save_every == 0 or step + 1 == self.steps:
                self.checkpoints.save(step + 1, acc.save_state, lambda d, s=step + 1: self._write_run_file(d, s))
        weights = full_state_dict(acc, self.policy)  # on every process: sharded weights are gathered to rank 0
        if acc.is_main_process:
            with atomic_path(self.out / "final") as tmp:  # a final/ that exists is complete
                acc.unwrap_model(self.policy).save_pretrained(tmp, state_dict=weights, safe_serialization=True)
                self._write_run_file(tmp, self.steps)
        if acc.num_processes > 1:
            acc.wait_for_everyone()  # rank 0 has written final/; no process leaves with a collective in flight
            acc.end_training()  # trackers, and the process group accelerate joined
        else:  # a process group here is a vLLM engine's own (a world of one), which outlives this run
            for tracker in acc.trackers:
                tracker.finish()
        return metrics

    def _resume(self) -> int:
        """Load the last complete checkpoint and cut metrics.jsonl back to it; the step to continue from."""
        path, step = self.checkpoints.latest()
        if path is not None:
            self.accelerator.load_state(str(path))
            log.info("resumed from %s (step %d)", path, step)
        if self.accelerator.is_main_process:  # from step 0 everything runs again, the step-0 evaluation included
            truncate_jsonl(self.out / "metrics.jsonl", step)
        return step

    def _log(self, metrics: dict[str, Any]) -> None:
        if not self.accelerator.is_main_process:
            return
        with (self.out / "metrics.jsonl").open("a") as f:
            f.write(json.dumps(metrics) + "\n")
        self.accelerator.log({k: v for k, v in metrics.items() if k != "step"}, step=metrics["step"])

    def _write_run_file(self, directory: Path, step: int) -> None:
        self.tokenizer.save_pretrained(directory)
        write_json_atomic(directory / RUN_FILE, {
            "reference_model": self.cfg.model, "reference_model_hash": self.ref_hash, "reward": self.reward_name,
            "step": step, "algo": self.cfg.algo, "beta1": self.cfg.beta1, "beta2": self.cfg.beta2})

    def _save_model_hook(self, models: list, weights: list, output_dir: str) -> None:
        # Every checkpoint holds the policy as a Hugging Face directory (PPO's critic beside it), which `astarpo
        # eval` reads. Under DDP it replaces accelerate's bare state dict; under FSDP2 and DeepSpeed accelerate has
        # saved its sharded format already (what a resume loads), and this copy is gathered on every process.
        acc, sharded = self.accelerator, self.strategy not in ("single", "ddp")
        for model in models:
            state = full_state_dict(acc, model) if sharded else None
            if not acc.is_main_process:
                continue
            m = acc.unwrap_model(model)
            if isinstance(m, ValueModel):
                path = str(Path(output_dir) / CRITIC_FILE)
                if state is None:
                    save_model(m, path)
                else:
                    save_file(state, path)
            else:
                m.save_pretrained(output_dir, state_dict=state, safe_serialization=True)
        weights.clear()

    def _load_model_hook(self, models: list, input_dir: str) -> None:
        while models:
            m = self.accelerator.unwrap_model(models.pop())
            if isinstance(m, ValueModel):
                load_model_state(m, str(Path(input_dir) / CRITIC_FILE))
            elif self.cfg.lora_rank:
                from peft import set_peft_model_state_dict
                from safetensors.torch import load_file

                set_peft_model_state_dict(m, load_file(Path(input_dir) / "adapter_model.safetensors"))
            else:
                m.load_state_dict(load_model(input_dir, self.cfg.dtype, self.cfg.trust_remote_code).state_dict())
