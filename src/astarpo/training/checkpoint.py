"""Where a Stage 2 run keeps its state, and how a killed run resumes: one home for checkpoints and the final model.

An output directory holds ``train_config.json`` (the settings, compared on every resume), ``metrics.jsonl``,
``ledger.jsonl`` (each step's prompts and the policy version that sampled them),
``checkpoints/step-NNNNNN`` and, once the run ends, ``final/``. A checkpoint is accelerate's state (optimizer, RNG
streams of every process, under FSDP2 and DeepSpeed their sharded formats: what a resume loads) plus the policy
as a Hugging Face directory (PPO's critic beside it) and the run file, so ``astarpo eval`` reads any checkpoint.
Every folder is written under a temporary name and renamed once complete: a kill mid-save leaves the previous
checkpoint intact and a ``.step-*.tmp`` that the next resume removes.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

from accelerate import Accelerator
from safetensors.torch import load_file, load_model, save_file, save_model

from ..config import TrainConfig, to_dict
from ..distributed import full_state_dict, strategy
from ..models import ValueModel
from ..models import load_model as load_causal_lm
from ..rundir import atomic_path, check_same_settings, truncate_jsonl, write_json_atomic

log = logging.getLogger(__name__)

CONFIG_FILE = "train_config.json"
RUN_FILE = "astarpo_run.json"  # in every checkpoint and final model: which reference model it was trained against
LEDGER_FILE = "ledger.jsonl"  # per step: the prompts trained on and the policy version that sampled them
CRITIC_FILE = "critic.safetensors"  # PPO's value model, beside the policy in every checkpoint


class Checkpoints:
    """``<root>/step-NNNNNN`` folders, each written as a temporary folder and renamed when complete, the last
    ``keep`` of them kept. A kill mid-save leaves only ``.step-*.tmp``, which is never loaded and is removed on
    resume. ``barrier`` and ``is_main`` come from accelerate, so that every process writes its part (its RNG
    state) before rank 0 renames the folder."""

    def __init__(self, root: Path, keep: int, is_main: bool = True, barrier: Callable[[], None] = lambda: None):
        self.root, self.keep, self.is_main, self.barrier = Path(root), keep, is_main, barrier

    def all(self) -> list[Path]:
        return sorted(self.root.glob("step-*"))

    def latest(self) -> tuple[Path | None, int]:
        """The newest complete checkpoint and its step (None, 0 without one), after removing unfinished ones."""
        if self.is_main:
            for tmp in self.root.glob(".step-*.tmp"):
                shutil.rmtree(tmp, ignore_errors=True)
        ckpts = self.all()
        return (ckpts[-1], int(ckpts[-1].name.split("-")[1])) if ckpts else (None, 0)

    def save(self, step: int, write_all: Callable[[Path], None], write_main: Callable[[Path], None]) -> Path:
        """``write_all(tmp)`` runs on every process, ``write_main(tmp)`` on rank 0 only, then the rename."""
        final = self.root / f"step-{step:06d}"
        tmp = final.with_name(f".{final.name}.tmp")
        if self.is_main:
            shutil.rmtree(tmp, ignore_errors=True)
        self.barrier()
        write_all(tmp)
        self.barrier()
        if self.is_main:
            write_main(tmp)
            shutil.rmtree(final, ignore_errors=True)
            os.replace(tmp, final)
            for old in self.all()[: -self.keep]:
                shutil.rmtree(old)
        self.barrier()
        return final


def check_resume(out: Path, cfg: TrainConfig) -> None:
    """Refuse to continue a run in ``out`` with other settings (``TrainConfig.run_settings``)."""
    check_same_settings(out / CONFIG_FILE, cfg.run_settings(), "resume with the same settings or choose another "
                        "--output-dir")


class RunState:
    """A Stage 2 run's folder: its config, metrics log, checkpoints, resume and final model, for ``acc``'s prepared
    models.

    ``run_info`` is written into every checkpoint and the final model as the run file (which reference model, which
    reward, which algorithm), which ``astarpo eval`` reads to measure KL against the right reference.
    """

    def __init__(self, cfg: TrainConfig, acc: Accelerator, tokenizer: Any, run_info: dict[str, Any]) -> None:
        self.cfg, self.acc, self.tokenizer, self.run_info = cfg, acc, tokenizer, run_info
        self.out = Path(cfg.output_dir)
        self.checkpoints = Checkpoints(self.out / "checkpoints", cfg.keep_checkpoints, acc.is_main_process,
                                       acc.wait_for_everyone)
        acc.register_save_state_pre_hook(self._save_models)
        acc.register_load_state_pre_hook(self._load_models)

    def record_config(self) -> None:
        """Write the config once the inputs have been checked: bad input leaves no file behind."""
        self.acc.wait_for_everyone()  # every process has compared with the old config before it is replaced
        if self.acc.is_main_process:
            write_json_atomic(self.out / CONFIG_FILE, to_dict(self.cfg))

    def resume(self) -> int:
        """Load the last complete checkpoint and cut metrics.jsonl back to it; the step to continue from."""
        path, step = self.checkpoints.latest()
        if path is not None:
            self.acc.load_state(str(path))
            log.info("resumed from %s (step %d)", path, step)
        if self.acc.is_main_process:  # from step 0 everything runs again, the step-0 evaluation included
            truncate_jsonl(self.out / "metrics.jsonl", step)
            truncate_jsonl(self.out / LEDGER_FILE, step)
        return step

    def start_log(self) -> None:
        """The trackers the config reports to (``report_to``), with the config's plain settings."""
        self.acc.init_trackers("astarpo", config={k: v for k, v in to_dict(self.cfg).items()
                                                  if isinstance(v, (int, float, str, bool))})

    def log(self, metrics: dict[str, Any]) -> None:
        """One line of ``metrics.jsonl`` (rank 0), and the trackers' record of the step."""
        if not self.acc.is_main_process:
            return
        with (self.out / "metrics.jsonl").open("a") as f:
            f.write(json.dumps(metrics) + "\n")
        self.acc.log({k: v for k, v in metrics.items() if k != "step"}, step=metrics["step"])

    def record(self, step: int, prompts: list[str], policy_version: int) -> None:
        """One line of the ledger (rank 0): which prompts step ``step`` trained on, drawn by which policy version
        (updates applied before they were sampled), so that a resumed run shows that none was trained twice or
        skipped."""
        if self.acc.is_main_process:
            with (self.out / LEDGER_FILE).open("a") as f:
                f.write(json.dumps({"step": step, "policy_version": policy_version, "prompts": prompts}) + "\n")

    def end_log(self) -> None:
        for tracker in self.acc.trackers:
            tracker.finish()

    def save(self, step: int) -> None:
        self.checkpoints.save(step, self.acc.save_state, lambda d: self._write_run_file(d, step))

    def save_final(self, policy: Any, step: int) -> None:
        """The policy as a Hugging Face directory in ``final/``; a ``final/`` that exists is complete. Every process
        must call it: sharded weights are gathered to rank 0."""
        weights = full_state_dict(self.acc, policy)
        if self.acc.is_main_process:
            with atomic_path(self.out / "final") as tmp:
                self.acc.unwrap_model(policy).save_pretrained(tmp, state_dict=weights, safe_serialization=True)
                self._write_run_file(tmp, step)

    def _write_run_file(self, directory: Path, step: int) -> None:
        self.tokenizer.save_pretrained(directory)
        write_json_atomic(directory / RUN_FILE, {**self.run_info, "step": step})

    def _save_models(self, models: list, weights: list, output_dir: str) -> None:
        # Every checkpoint holds the policy as a Hugging Face directory (PPO's critic beside it), which `astarpo
        # eval` reads. Under DDP it replaces accelerate's bare state dict; under FSDP2 and DeepSpeed accelerate has
        # saved its sharded format already (what a resume loads), and this copy is gathered on every process.
        acc, sharded = self.acc, strategy(self.acc) not in ("single", "ddp")
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

    def _load_models(self, models: list, input_dir: str) -> None:
        cfg = self.cfg
        while models:
            m = self.acc.unwrap_model(models.pop())
            if isinstance(m, ValueModel):
                load_model(m, str(Path(input_dir) / CRITIC_FILE))
            elif cfg.lora_rank:
                from peft import set_peft_model_state_dict

                set_peft_model_state_dict(m, load_file(Path(input_dir) / "adapter_model.safetensors"))
            else:
                m.load_state_dict(load_causal_lm(input_dir, cfg.dtype, cfg.trust_remote_code).state_dict())


def read_run_file(model_dir: str | Path) -> dict[str, Any] | None:
    """The run file of a checkpoint or final model; None for a model that astarpo did not train."""
    path = Path(model_dir) / RUN_FILE
    return json.loads(path.read_text()) if path.is_file() else None
