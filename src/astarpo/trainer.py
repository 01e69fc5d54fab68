"""Stage 2: on-policy least-squares regression onto the optimal advantage.

Each step: one response per prompt from the current policy, its reward, the reference log-prob, then
AdamW updates on

    loss = mean_batch ( beta2 * [log pi(y|x) - log pi_ref(y|x)] - (r(x, y) - V*(x)) )^2

with V* from Stage 1. No critic, no clipping, no group of samples. The baselines (GRPO, RLOO, REBEL, PPO) run
in the same loop: the objective (``objectives.py``) says how many responses per prompt it samples and which
extra tensors it needs (log-probs of the sampling policy, a critic), and turns them into one loss per prompt.
Checkpoints are Hugging Face model directories plus accelerate's optimizer and RNG state, so a killed run
resumes where its last checkpoint was.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import logging
import math
import os
import resource
import shutil
import time
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import gather_object, set_seed
from safetensors.torch import load_model as load_model_state
from safetensors.torch import save_model

from . import rewards
from .config import TrainConfig, to_dict
from .data import encode_prompts, load_records
from .evaluate import RUN_FILE, evaluate, write_text_atomic
from .generation import Rollout, collate, response_logprobs, sample, token_logprobs
from .models import (
    ValueModel,
    add_lora,
    content_hash,
    eos_ids,
    load_model,
    load_tokenizer,
    resolve_model,
    tokenizer_hash,
)
from .objectives import OBJECTIVES, Batch
from .values import ValuesError, check_provenance, check_writable, cpu_processes, load_v_star, read_values

log = logging.getLogger(__name__)
# Changing these between a run and its resume would make the resumed run a different experiment.
_RUN_KEYS = ("algo", "group_size", "clip_eps", "gae_lambda",
             "model", "data", "split", "limit", "reward", "values", "beta1", "beta2", "n", "filter_unsolved",
             "learning_rate", "weight_decay", "batch_size", "mini_batch_size", "micro_batch_size", "seed",
             "temperature", "top_p", "max_new_tokens", "dtype", "use_chat_template", "prompt_template",
             "mixed_precision", "lora_rank", "lora_alpha", "lora_target_modules")


CRITIC_FILE = "critic.safetensors"  # PPO's value model, beside the policy in every checkpoint


class TrainError(RuntimeError):
    """Training cannot start as configured; the message says why and what to change."""


def peak_memory_mb() -> float:
    """Peak GPU memory allocated when on CUDA, else the process's peak resident set size."""
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


class Trainer:
    """Stage 2 trainer. ``Trainer(cfg).train()`` runs (or resumes) the whole loop and returns the last metrics."""

    def __init__(self, cfg: TrainConfig, reward: str | rewards.RewardFn | None = None) -> None:
        self.cfg = cfg
        self.reward_name, self.reward_fn = rewards.resolve(reward or cfg.reward)
        self.out = Path(cfg.output_dir)
        self._claim_run_dir()
        tensorboard = importlib.util.find_spec("tensorboard") is not None
        self.accelerator = Accelerator(log_with="tensorboard" if tensorboard else None, project_dir=self.out,
                                       mixed_precision=cfg.mixed_precision, cpu=cpu_processes())
        set_seed(cfg.seed)

        acc = self.accelerator
        self.objective = OBJECTIVES[cfg.algo](
            cfg.beta2, clip_eps=cfg.clip_eps, group_size=cfg.group_size, gae_lambda=cfg.gae_lambda,
            all_sum=lambda t: acc.reduce(t.to(acc.device), "sum").cpu() if acc.num_processes > 1 else t)
        self.model_dir = resolve_model(cfg.model)
        self.ref_hash = content_hash(self.model_dir)
        self.tokenizer = load_tokenizer(self.model_dir, cfg.trust_remote_code)
        records = load_records(cfg.data, cfg.split, cfg.limit, cfg.prompt_column, cfg.answer_column,
                               cfg.prompt_template)
        records, prompt_ids = encode_prompts(self.tokenizer, records, cfg.max_prompt_tokens, cfg.use_chat_template,
                                             cfg.on_long_prompt)
        keep, self.v_star, self.unsolved_dropped = list(range(len(records))), None, 0
        if self.objective.uses_values:
            keep, self.v_star, self.unsolved_dropped = self._load_values([r["id"] for r in records])
        self.records = [records[i] for i in keep]
        self.prompt_ids = [prompt_ids[i] for i in keep]
        self.steps = cfg.steps or math.ceil(len(self.records) / cfg.batch_size)
        world, mini = self.accelerator.num_processes, cfg.mini_batch_size or cfg.batch_size
        smallest = min(mini, cfg.batch_size % mini or mini)
        if smallest < world:  # every process needs a sample in every mini-batch to take part in the update
            raise TrainError(f"a mini-batch of {smallest} samples cannot be split over {world} processes; make "
                             "batch_size and mini_batch_size multiples of the number of processes")

        policy = load_model(self.model_dir, cfg.dtype, cfg.trust_remote_code)
        self.eos = eos_ids(policy, self.tokenizer)
        if cfg.gradient_checkpointing:  # renamed to activation checkpointing in transformers 5.x
            if hasattr(policy, "activation_checkpointing_enable"):
                policy.activation_checkpointing_enable({"use_reentrant": False})
            else:
                policy.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        # With LoRA the reference is the base model with adapters disabled: no second copy in memory.
        self.ref = None
        if cfg.lora_rank:
            policy = add_lora(policy, cfg.lora_rank, cfg.lora_alpha, cfg.lora_target_modules)
        elif self.objective.uses_reference:
            self.ref = load_model(self.model_dir, cfg.dtype, cfg.trust_remote_code).requires_grad_(False).eval()
            self.ref.to(self.accelerator.device)
        params = [p for p in policy.parameters() if p.requires_grad]
        self.critic = None
        if self.objective.uses_critic:
            critic = ValueModel(self.model_dir, cfg.dtype, cfg.trust_remote_code)
            if cfg.gradient_checkpointing:
                critic.backbone.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            params += list(critic.parameters())
        optimizer = torch.optim.AdamW(params, lr=cfg.learning_rate, weight_decay=cfg.weight_decay)
        if self.objective.uses_critic:
            self.policy, self.critic, self.optimizer = self.accelerator.prepare(policy, critic, optimizer)
        else:
            self.policy, self.optimizer = self.accelerator.prepare(policy, optimizer)
        self.accelerator.register_save_state_pre_hook(self._save_model_hook)
        self.accelerator.register_load_state_pre_hook(self._load_model_hook)

        self.eval_records: list[dict] = []
        self.eval_prompt_ids: list[list[int]] = []
        if cfg.eval_data:
            ev = load_records(cfg.eval_data, cfg.eval_split, cfg.eval_limit, cfg.prompt_column, cfg.answer_column,
                              cfg.prompt_template)
            self.eval_records, self.eval_prompt_ids = encode_prompts(
                self.tokenizer, ev, cfg.max_prompt_tokens, cfg.use_chat_template, cfg.on_long_prompt)
        self._perms: dict[int, list[int]] = {}
        self._write_run_config()

    def _load_values(self, ids: list[str]) -> tuple[list[int], torch.Tensor, int]:
        """A*-PO's V* per prompt from the Stage 1 file, after checking that the file belongs to this run."""
        cfg = self.cfg
        if cfg.values is None:
            raise TrainError("astarpo needs the Stage 1 file from `astarpo values`: pass --values PATH")
        values = read_values(cfg.values)
        check_provenance(values.provenance, {"reference_model": cfg.model, "reference_model_hash": self.ref_hash,
                                             "reference_tokenizer_hash": tokenizer_hash(self.model_dir),
                                             "reward": self.reward_name, "temperature": cfg.temperature,
                                             "top_p": cfg.top_p, "max_new_tokens": cfg.max_new_tokens,
                                             "use_chat_template": cfg.use_chat_template,
                                             "prompt_template": cfg.prompt_template}, cfg.values)
        keep, v_star, counts = load_v_star(values, ids, cfg.beta1, cfg.n, cfg.filter_unsolved)
        if not keep:
            raise TrainError("no prompt left to train on: every prompt's Stage 1 samples all failed; use an easier "
                             "task, a larger n in `astarpo values`, or --no-filter-unsolved")
        log.info("training on %d prompts (%d dropped: all Stage 1 samples failed)", len(keep),
                 counts["unsolved_dropped"])
        return keep, v_star, counts["unsolved_dropped"]

    # ----- run directory, checkpoints -------------------------------------------------------------------------
    def _claim_run_dir(self) -> None:
        """Refuse to mix two different runs in one output directory."""
        try:
            check_writable(self.out)  # before any model loading or sampling
        except ValuesError as e:
            raise TrainError(str(e)) from e
        cfg_file = self.out / "train_config.json"
        mine = {k: v for k, v in to_dict(self.cfg).items() if k in _RUN_KEYS}
        if cfg_file.is_file():
            old = {k: v for k, v in json.loads(cfg_file.read_text()).items() if k in _RUN_KEYS}
            diff = [f"{k}: {old.get(k)!r} -> {v!r}" for k, v in mine.items() if old.get(k) != v]
            if diff:
                raise TrainError(f"{self.out} holds a run with other settings ({', '.join(diff)}); "
                                 "resume with the same settings or choose another --output-dir")

    def _write_run_config(self) -> None:
        """Written once the inputs have been checked, so that bad input leaves no file behind."""
        cfg_file = self.out / "train_config.json"
        self.accelerator.wait_for_everyone()  # every process has compared with the old file before it is replaced
        if self.accelerator.is_main_process:
            write_text_atomic(cfg_file, json.dumps(to_dict(self.cfg), indent=1))

    def _save_model_hook(self, models: list, weights: list, output_dir: str) -> None:
        # Write the policy as a Hugging Face directory instead of accelerate's bare state dict.
        if self.accelerator.is_main_process:
            for m in map(self.accelerator.unwrap_model, models):
                if isinstance(m, ValueModel):
                    save_model(m, str(Path(output_dir) / CRITIC_FILE))
                else:
                    m.save_pretrained(output_dir, safe_serialization=True)
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

    def _write_run_file(self, directory: Path, step: int) -> None:
        self.tokenizer.save_pretrained(directory)
        (directory / RUN_FILE).write_text(json.dumps({
            "reference_model": self.cfg.model, "reference_model_hash": self.ref_hash, "reward": self.reward_name,
            "step": step, "algo": self.cfg.algo, "beta1": self.cfg.beta1, "beta2": self.cfg.beta2}, indent=1))

    def _checkpoints(self) -> list[Path]:
        return sorted((self.out / "checkpoints").glob("step-*"))

    def save_checkpoint(self, step: int) -> Path:
        final = self.out / "checkpoints" / f"step-{step:06d}"
        tmp = final.with_name(f".{final.name}.tmp")
        if self.accelerator.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)
        self.accelerator.wait_for_everyone()
        self.accelerator.save_state(str(tmp))
        self.accelerator.wait_for_everyone()  # each process writes its own RNG state into tmp
        if self.accelerator.is_main_process:
            self._write_run_file(tmp, step)
            (tmp / "trainer_state.json").write_text(json.dumps({"step": step}))
            shutil.rmtree(final, ignore_errors=True)
            os.replace(tmp, final)
            for old in self._checkpoints()[: -self.cfg.keep_checkpoints]:
                shutil.rmtree(old)
        self.accelerator.wait_for_everyone()
        return final

    def _resume(self) -> int:
        """Load the last finished checkpoint and cut metrics.jsonl back to it; the step to continue from.

        A kill while a checkpoint was being written leaves only ``.step-*.tmp``, which is never loaded; a kill
        between checkpoints leaves metrics lines for steps that will run again, and a kill mid-line leaves half
        a line: both are dropped here so that every step has exactly one line.
        """
        if self.accelerator.is_main_process:
            for tmp in (self.out / "checkpoints").glob(".step-*.tmp"):
                shutil.rmtree(tmp, ignore_errors=True)
        ckpts = self._checkpoints()
        step = 0
        if ckpts:
            self.accelerator.load_state(str(ckpts[-1]))
            step = json.loads((ckpts[-1] / "trainer_state.json").read_text())["step"]
            log.info("resumed from %s (step %d)", ckpts[-1], step)
        metrics = self.out / "metrics.jsonl"
        if metrics.is_file() and self.accelerator.is_main_process:
            # From step 0 everything runs again, the step-0 evaluation included.
            keep = [ln for ln in metrics.read_text().splitlines() if step > 0 and _logged_step(ln) <= step]
            write_text_atomic(metrics, "".join(ln + "\n" for ln in keep))  # a kill must not lose the file
        return step

    # ----- the loop ---------------------------------------------------------------------------------------------
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

    def train_step(self, step: int) -> dict[str, float]:
        """One step. Under ``accelerate launch`` process r takes prompts r::world of each global mini-batch.

        Each process scales its summed per-prompt losses by world / (valid prompts in the global mini-batch);
        DDP averages gradients over processes, so the update equals the single-process one on the whole
        mini-batch. The number of optimizer updates does not depend on the number of processes.
        """
        cfg, acc, obj = self.cfg, self.accelerator, self.objective
        rank, world, G = acc.process_index, acc.num_processes, obj.group_size
        t0 = time.perf_counter()
        idx = self._batch(step)
        mini = cfg.mini_batch_size or cfg.batch_size
        minis = [range(m0, min(m0 + mini, len(idx))) for m0 in range(0, len(idx), mini)]
        mine = list(range(rank, len(idx), world))  # positions in the global batch that this process handles
        my_idx = [idx[g] for g in mine]
        policy = acc.unwrap_model(self.policy)
        with acc.autocast():
            roll = sample(policy, self.tokenizer, [self.prompt_ids[i] for i in my_idx], G, cfg.temperature,
                          cfg.top_p, cfg.max_new_tokens, self.eos, cfg.generation_batch_size)
        gen_seconds = time.perf_counter() - t0
        rec = [self.records[my_idx[p]] for p in roll.prompt_index]  # G consecutive rows per prompt
        extra = [c for c in self.records[0] if c not in ("id", "prompt")]
        reward = torch.tensor(rewards.score(self.reward_fn, [r["prompt"] for r in rec], roll.completions,
                                            {c: [r[c] for r in rec] for c in extra}, cfg.on_reward_error),
                              dtype=torch.float32)
        valid = ~reward.isnan().view(-1, G).any(-1)  # on_reward_error=skip: a prompt with a failed sample drops
        reward = reward.nan_to_num(0.0)
        # Valid prompts per global mini-batch, summed over processes: the loss's denominator.
        counts = torch.tensor([float(valid[[j for j, g in enumerate(mine) if g in m]].sum()) for m in minis])
        counts = acc.reduce(counts.to(acc.device), "sum").cpu() if world > 1 else counts
        if counts.sum() == 0:
            raise TrainError(f"step {step}: the reward failed for every sample")

        # What the objective needs, computed once per step without gradients, [samples, longest response].
        pad, micro = self.tokenizer.pad_token_id, cfg.micro_batch_size
        lengths = torch.tensor(roll.lengths)
        mask = (torch.arange(max(1, int(lengths.max()))) < lengths[:, None]).float()
        # On the first update the sampling policy is the current one, so pi_old is the detached forward pass,
        # unless several mini-batches update the policy in between or prepare() needs pi_old before any update.
        old_first = obj.uses_old_logp and (len(minis) > 1 or obj.uses_reference or obj.uses_critic)
        with acc.autocast():
            data = Batch(
                mask=mask, reward=reward,
                ref_logp=self.reference_logprobs(roll) if obj.uses_reference else None,
                old_logp=token_logprobs(policy, roll, pad, micro) if old_first else None,
                v_star=self.v_star[my_idx].float().repeat_interleave(G) if obj.uses_values else None,
                old_values=token_logprobs(acc.unwrap_model(self.critic), roll, pad, micro,
                                          ValueModel.forward)
                if obj.uses_critic else None)
        obj.prepare(data)

        sampled_logp = torch.zeros(len(roll))  # summed log pi_old: the KL estimate against the reference
        loss_all = torch.zeros(len(valid))
        grad_norms = []
        models = [m for m in (self.policy, self.critic) if m is not None]
        for model in models:
            model.train()
        per_micro = max(1, micro // G)  # whole groups: a prompt's loss needs all of its samples
        for m, count in zip(minis, counts.tolist()):
            if count == 0:
                continue  # every process sees the same count, so all skip this update together
            prompts = [j for j, g in enumerate(mine) if g in m]
            micros = [prompts[u0 : u0 + per_micro] for u0 in range(0, len(prompts), per_micro)]
            self.optimizer.zero_grad(set_to_none=True)
            for u, sub in enumerate(micros):
                rows = [j * G + s for j in sub for s in range(G)]
                batch = collate(roll.select(rows), pad, acc.device)
                R = batch["response_mask"].shape[1]
                # Gradients are synchronised once per mini-batch, on its last micro-batch.
                with contextlib.ExitStack() as sync:
                    if u < len(micros) - 1:
                        for model in models:
                            sync.enter_context(acc.no_sync(model))
                    logp = response_logprobs(self.policy, batch).float().cpu()
                    mb = data.rows(rows, R, logp=logp, values=self.critic(batch).cpu() if self.critic else None)
                    if mb.old_logp is None:
                        mb.old_logp = logp.detach()
                    loss = obj.loss(mb) * valid[sub]
                    acc.backward(loss.sum() * world / count)
                sampled_logp[rows] = (mb.old_logp * mb.mask).sum(-1)
                loss_all[sub] = loss.detach()
            params = [p for model in models for p in model.parameters()]
            grad_norms.append(float(acc.clip_grad_norm_(params, cfg.max_grad_norm)))
            self.optimizer.step()
        step_seconds = time.perf_counter() - t0
        # Per-sample values from every process, averaged over valid ones (not a mean of per-process means).
        keep = valid.repeat_interleave(G)
        columns = {"reward": reward, "response_length": lengths.float(), "truncated": torch.tensor(roll.truncated)}
        if data.ref_logp is not None:
            columns["log_ratio"] = sampled_logp - (data.ref_logp * mask).sum(-1)
        if data.v_star is not None:
            columns["v_star"] = data.v_star
        per_sample = torch.stack([c.float() for c in columns.values()], 1)[keep]
        per_prompt, n_tokens = loss_all[valid], float(sum(roll.lengths))
        if world > 1:
            per_sample = torch.cat(gather_object([per_sample]))
            per_prompt = torch.cat(gather_object([per_prompt]))
            n_tokens = sum(gather_object([n_tokens]))
        means = dict(zip(columns, per_sample.mean(0).tolist()))
        metrics = {"step": step + 1, "reward": means["reward"]}
        if "v_star" in means:
            metrics.update(v_star=means["v_star"], advantage=means["reward"] - means["v_star"])
        metrics["loss"] = float(per_prompt.mean())
        if "log_ratio" in means:
            metrics.update(log_ratio=means["log_ratio"], kl=means["log_ratio"])
        return {
            **metrics, "response_length": means["response_length"], "truncated": means["truncated"],
            "grad_norm": sum(grad_norms) / len(grad_norms), "skipped_samples": (len(idx) - len(per_prompt)) * G,
            "samples": len(idx) * G, "generation_seconds": round(gen_seconds, 3),
            "step_seconds": round(step_seconds, 3), "tokens_per_second": n_tokens / step_seconds,
            "peak_memory_mb": round(peak_memory_mb(), 1), "learning_rate": self.optimizer.param_groups[0]["lr"],
        }

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
        with self.accelerator.autocast():
            return evaluate(self.accelerator.unwrap_model(self.policy), self.tokenizer, self.eval_records,
                            self.eval_prompt_ids, self.reward_fn, max_new_tokens=self.cfg.max_new_tokens,
                            batch_size=self.cfg.generation_batch_size, on_reward_error=self.cfg.on_reward_error)

    def _log(self, metrics: dict[str, Any]) -> None:
        if not self.accelerator.is_main_process:
            return
        with (self.out / "metrics.jsonl").open("a") as f:
            f.write(json.dumps(metrics) + "\n")
        self.accelerator.log({k: v for k, v in metrics.items() if k != "step"}, step=metrics["step"])

    def train(self) -> dict[str, Any]:
        """Run (or resume) Stage 2; returns the last step's metrics. The final model lands in ``output_dir/final``."""
        cfg = self.cfg
        start = self._resume()
        self.accelerator.init_trackers("astarpo", config={k: v for k, v in to_dict(cfg).items()
                                                          if isinstance(v, (int, float, str, bool))})
        if start == 0 and self.eval_records:
            self._log({"step": 0, "eval_accuracy": self.evaluate()["accuracy"]})
        metrics: dict[str, Any] = {}
        from tqdm.auto import tqdm

        bar = tqdm(range(start, self.steps), initial=start, total=self.steps, desc="stage 2", dynamic_ncols=True,
                   disable=not self.accelerator.is_main_process)
        for step in bar:
            metrics = self.train_step(step)
            due = (cfg.eval_every and (step + 1) % cfg.eval_every == 0) or step + 1 == self.steps
            if self.eval_records and due:
                metrics["eval_accuracy"] = self.evaluate()["accuracy"]
            self._log(metrics)
            bar.set_postfix({k: f"{metrics[k]:.2f}" for k in ("reward", "kl", "step_seconds") if k in metrics})
            if (step + 1) % cfg.save_every == 0 or step + 1 == self.steps:
                self.save_checkpoint(step + 1)
        self.accelerator.end_training()
        if self.accelerator.is_main_process:  # via a temporary folder: a final/ that exists is complete
            final = self.out / "final"
            tmp = final.with_name(f".{final.name}.tmp")
            shutil.rmtree(tmp, ignore_errors=True)
            self.accelerator.unwrap_model(self.policy).save_pretrained(tmp, safe_serialization=True)
            self._write_run_file(tmp, self.steps)
            shutil.rmtree(final, ignore_errors=True)
            os.replace(tmp, final)
        return metrics


def _logged_step(line: str) -> float:
    """The step of one metrics.jsonl line; infinity for a line a kill cut short, so that it is dropped."""
    try:
        return json.loads(line)["step"]
    except (json.JSONDecodeError, KeyError):
        return math.inf
