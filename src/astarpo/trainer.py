"""Stage 2: on-policy least-squares regression onto the optimal advantage.

Each step: one response per prompt from the current policy, its reward, the reference log-prob, then
AdamW updates on

    loss = mean_batch ( beta2 * [log pi(y|x) - log pi_ref(y|x)] - (r(x, y) - V*(x)) )^2

with V* from Stage 1. No critic, no clipping, no group of samples. Checkpoints are Hugging Face model
directories plus accelerate's optimizer and RNG state, so a killed run resumes where its last checkpoint was.
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

from . import rewards
from .config import TrainConfig, to_dict
from .data import encode_prompts, load_records
from .evaluate import RUN_FILE, evaluate
from .generation import Rollout, collate, response_logprobs, sample, sequence_logprobs
from .models import add_lora, content_hash, eos_ids, load_model, load_tokenizer, resolve_model
from .objectives import astarpo_loss
from .values import ValuesError, check_provenance, check_writable, cpu_processes, load_v_star, read_values

log = logging.getLogger(__name__)
# Changing these between a run and its resume would make the resumed run a different experiment.
_RUN_KEYS = ("model", "data", "split", "limit", "reward", "values", "beta1", "beta2", "n", "filter_unsolved",
             "learning_rate", "weight_decay", "batch_size", "mini_batch_size", "micro_batch_size", "seed",
             "temperature", "top_p", "max_new_tokens", "dtype", "use_chat_template", "prompt_template",
             "mixed_precision", "lora_rank", "lora_alpha", "lora_target_modules")


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

        self.model_dir = resolve_model(cfg.model)
        self.ref_hash = content_hash(self.model_dir)
        values = read_values(cfg.values)
        check_provenance(values.provenance, {"reference_model": cfg.model, "reference_model_hash": self.ref_hash,
                                             "reward": self.reward_name, "temperature": cfg.temperature,
                                             "top_p": cfg.top_p, "max_new_tokens": cfg.max_new_tokens,
                                             "use_chat_template": cfg.use_chat_template,
                                             "prompt_template": cfg.prompt_template}, cfg.values)
        self.tokenizer = load_tokenizer(self.model_dir, cfg.trust_remote_code)
        records = load_records(cfg.data, cfg.split, cfg.limit, cfg.prompt_column, cfg.answer_column,
                               cfg.prompt_template)
        records, prompt_ids = encode_prompts(self.tokenizer, records, cfg.max_prompt_tokens, cfg.use_chat_template,
                                             cfg.on_long_prompt)
        keep, self.v_star, counts = load_v_star(values, [r["id"] for r in records], cfg.beta1, cfg.n,
                                                cfg.filter_unsolved)
        if not keep:
            raise TrainError("no prompt left to train on: every prompt's Stage 1 samples all failed; use an easier "
                             "task, a larger n in `astarpo values`, or --no-filter-unsolved")
        log.info("training on %d prompts (%d dropped: all Stage 1 samples failed)", len(keep),
                 counts["unsolved_dropped"])
        self.records = [records[i] for i in keep]
        self.prompt_ids = [prompt_ids[i] for i in keep]
        self.unsolved_dropped = counts["unsolved_dropped"]
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
        else:
            self.ref = load_model(self.model_dir, cfg.dtype, cfg.trust_remote_code).requires_grad_(False).eval()
            self.ref.to(self.accelerator.device)
        optimizer = torch.optim.AdamW([p for p in policy.parameters() if p.requires_grad], lr=cfg.learning_rate,
                                      weight_decay=cfg.weight_decay)
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
            tmp = cfg_file.with_name(f".{cfg_file.name}.tmp")
            tmp.write_text(json.dumps(to_dict(self.cfg), indent=1))
            os.replace(tmp, cfg_file)

    def _save_model_hook(self, models: list, weights: list, output_dir: str) -> None:
        # Write the policy as a Hugging Face directory instead of accelerate's bare state dict.
        if self.accelerator.is_main_process:
            for m in models:
                self.accelerator.unwrap_model(m).save_pretrained(output_dir, safe_serialization=True)
        weights.clear()

    def _load_model_hook(self, models: list, input_dir: str) -> None:
        while models:
            m = self.accelerator.unwrap_model(models.pop())
            if self.cfg.lora_rank:
                from peft import set_peft_model_state_dict
                from safetensors.torch import load_file

                set_peft_model_state_dict(m, load_file(Path(input_dir) / "adapter_model.safetensors"))
            else:
                m.load_state_dict(load_model(input_dir, self.cfg.dtype, self.cfg.trust_remote_code).state_dict())

    def _write_run_file(self, directory: Path, step: int) -> None:
        self.tokenizer.save_pretrained(directory)
        (directory / RUN_FILE).write_text(json.dumps({
            "reference_model": self.cfg.model, "reference_model_hash": self.ref_hash, "reward": self.reward_name,
            "step": step, "beta1": self.cfg.beta1, "beta2": self.cfg.beta2}, indent=1))

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
        ckpts = self._checkpoints()
        if not ckpts:
            return 0
        self.accelerator.load_state(str(ckpts[-1]))
        step = json.loads((ckpts[-1] / "trainer_state.json").read_text())["step"]
        log.info("resumed from %s (step %d)", ckpts[-1], step)
        metrics = self.out / "metrics.jsonl"
        if metrics.is_file() and self.accelerator.is_main_process:  # drop lines logged after that checkpoint
            keep = [ln for ln in metrics.read_text().splitlines() if json.loads(ln)["step"] <= step]
            metrics.write_text("".join(ln + "\n" for ln in keep))
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
        """One step. Under ``accelerate launch`` process r takes rows r::world of each global mini-batch.

        Each process scales its summed per-sample losses by world / (valid samples in the global mini-batch);
        DDP averages gradients over processes, so the update equals the single-process one on the whole
        mini-batch. The number of optimizer updates does not depend on the number of processes.
        """
        cfg, acc = self.cfg, self.accelerator
        rank, world = acc.process_index, acc.num_processes
        t0 = time.perf_counter()
        idx = self._batch(step)
        mini = cfg.mini_batch_size or cfg.batch_size
        minis = [range(m0, min(m0 + mini, len(idx))) for m0 in range(0, len(idx), mini)]
        mine = list(range(rank, len(idx), world))  # positions in the global batch that this process handles
        my_idx = [idx[g] for g in mine]
        policy = acc.unwrap_model(self.policy)
        with acc.autocast():
            roll = sample(policy, self.tokenizer, [self.prompt_ids[i] for i in my_idx], 1, cfg.temperature,
                          cfg.top_p, cfg.max_new_tokens, self.eos, cfg.generation_batch_size)
        gen_seconds = time.perf_counter() - t0
        extra = [c for c in self.records[0] if c not in ("id", "prompt")]
        reward = torch.tensor(rewards.score(
            self.reward_fn, [self.records[i]["prompt"] for i in my_idx], roll.completions,
            {c: [self.records[i][c] for i in my_idx] for c in extra}, cfg.on_reward_error), dtype=torch.float32)
        valid = ~reward.isnan()  # on_reward_error=skip: failed samples get zero weight
        reward = reward.nan_to_num(0.0)
        # Valid samples per global mini-batch, summed over processes: the loss's denominator.
        counts = torch.tensor([float(valid[[j for j, g in enumerate(mine) if g in m]].sum()) for m in minis])
        counts = acc.reduce(counts.to(acc.device), "sum").cpu() if world > 1 else counts
        if counts.sum() == 0:
            raise TrainError(f"step {step}: the reward failed for every sample")
        v = self.v_star[my_idx].float()
        pad = self.tokenizer.pad_token_id
        ref_logp = self.reference_logprobs(roll)

        logp_all = torch.zeros(len(roll))
        loss_all = torch.zeros(len(roll))
        grad_norms = []
        self.policy.train()
        for m, count in zip(minis, counts.tolist()):
            if count == 0:
                continue  # every process sees the same count, so all skip this update together
            rows = [j for j, g in enumerate(mine) if g in m]
            micros = [rows[u0 : u0 + cfg.micro_batch_size] for u0 in range(0, len(rows), cfg.micro_batch_size)]
            self.optimizer.zero_grad(set_to_none=True)
            for u, sub in enumerate(micros):
                batch = collate(roll.select(sub), pad, acc.device)
                # Gradients are synchronised once per mini-batch, on its last micro-batch.
                sync = acc.no_sync(self.policy) if u < len(micros) - 1 else contextlib.nullcontext()
                with sync:
                    logp = response_logprobs(self.policy, batch).sum(-1).float().cpu()
                    loss = astarpo_loss(logp, ref_logp[sub], reward[sub], v[sub], cfg.beta2) * valid[sub]
                    acc.backward(loss.sum() * world / count)
                logp_all[sub] = logp.detach()
                loss_all[sub] = loss.detach()
            grad_norms.append(float(acc.clip_grad_norm_(self.policy.parameters(), cfg.max_grad_norm)))
            self.optimizer.step()
        step_seconds = time.perf_counter() - t0
        # Per-sample values from every process, averaged over valid samples (not a mean of per-process means).
        per_sample = torch.stack([reward, v, loss_all, logp_all - ref_logp, torch.tensor(roll.lengths).float(),
                                  torch.tensor(roll.truncated).float()], 1)[valid]
        n_tokens = float(sum(roll.lengths))
        if world > 1:
            per_sample = torch.cat(gather_object([per_sample]))
            n_tokens = sum(gather_object([n_tokens]))
        reward_m, v_m, loss_m, log_ratio_m, length_m, truncated_m = per_sample.mean(0).tolist()
        return {
            "step": step + 1, "reward": reward_m, "v_star": v_m, "advantage": reward_m - v_m, "loss": loss_m,
            "log_ratio": log_ratio_m, "kl": log_ratio_m, "response_length": length_m, "truncated": truncated_m,
            "grad_norm": sum(grad_norms) / len(grad_norms), "skipped_samples": len(idx) - len(per_sample),
            "generation_seconds": round(gen_seconds, 3), "step_seconds": round(step_seconds, 3),
            "tokens_per_second": n_tokens / step_seconds, "peak_memory_mb": round(peak_memory_mb(), 1),
            "learning_rate": self.optimizer.param_groups[0]["lr"],
        }

    def reference_logprobs(self, roll: Rollout) -> torch.Tensor:
        """Summed response log-probs under pi_ref: the frozen copy, or the policy with its adapters disabled."""
        pad, micro = self.tokenizer.pad_token_id, self.cfg.micro_batch_size
        with self.accelerator.autocast():
            if self.ref is not None:
                return sequence_logprobs(self.ref, roll, pad, micro)
            policy = self.accelerator.unwrap_model(self.policy)
            with policy.disable_adapter():
                return sequence_logprobs(policy, roll, pad, micro)

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
            bar.set_postfix(reward=f"{metrics['reward']:.2f}", kl=f"{metrics['kl']:.2f}",
                            s_per_step=f"{metrics['step_seconds']:.1f}")
            if (step + 1) % cfg.save_every == 0 or step + 1 == self.steps:
                self.save_checkpoint(step + 1)
        self.accelerator.end_training()
        if self.accelerator.is_main_process:
            final = self.out / "final"
            self.accelerator.unwrap_model(self.policy).save_pretrained(final, safe_serialization=True)
            self._write_run_file(final, self.steps)
        return metrics
