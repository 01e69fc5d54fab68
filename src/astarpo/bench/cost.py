"""`astarpo plan --time`: hours of a training recipe for each method, from counted work and stated device rates.

The work is counted from what this implementation runs, not from wall-clock guesses: for each objective in
:data:`astarpo.training.objectives.OBJECTIVES` the passes :class:`astarpo.training.trainer.Trainer` makes per step
(its group of samples, the reference forward where the objective reads ``ref_logp``, the old-policy forward for
mini-batches after the first update or for all samples where the objective reads ``old_logp``, the critic's
forward and training) and, for A*-PO, Stage 1's N samples per prompt, drawn once. Then

    hours = Stage 1 (A*-PO only) + epochs x steps per epoch x (sampling + training passes)

Sampling is decoding: each decode step of a wave of sequences reads the sampler's weights once and every
sequence's KV cache (memory bandwidth), and multiplies each sequence's token through the weights; the two add up
(no overlap is assumed: the CPU bench bears it out; a GPU partly overlaps them). Prefill and training passes
are dense matrix products at the training rate (a forward costs twice the parameters in FLOPs per token, a
backward twice that, and gradient checkpointing runs the forward again). The GPUs split every step evenly (data
parallel); what they say to each other is not counted, nor are attention's own FLOPs (small beside the weights'
at these lengths), the optimizer step, pushing weights into the engine, reward scoring, checkpoints and
evaluation. Every device rate is a stated assumption with its source (:func:`assumptions`); the CPU's are fitted
to the committed CPU bench (:func:`fit_cpu`) and checked on runs the fit did not see (:func:`cpu_check`).

The asynchronous case (:func:`split_hours`, ``--server-gpus S --async-lag K``; issue #29's vLLM server mode, A*-PO
only: the baselines' ratios need the sampling policy, so they stay synchronous): S of the recipe's GPUs run the
generation server, one engine per GPU (tensor-parallel 1: each takes an S-th of the step's prompts, with the same
decode model as above; a tensor-parallel engine is not modelled, its per-layer all-reduces would need a term of
their own), and the other G - S train, every training pass split over them. Then

    hours = Stage 1 (all G GPUs, before training, as above) + steps x (overlap + push) + fill
    overlap = max(sampling on S, training on G - S) with K >= 1;  their sum with K = 0

K >= 1 lets the server draw step t + 1 while the trainer trains on step t; with fixed step times a lag of 1 already
overlaps fully (a larger K only absorbs step-to-step variation, which is not modelled), and ``fill`` is what cannot
overlap, once: the first step's sampling before the trainer has anything to train on, or the last step's training
after the server has nothing left to draw, whichever side is not the bottleneck: min(sampling, training). K = 0 does
not overlap: the server only frees the trainer's GPUs of the engine's memory. Stage 1 is assumed to run on all G
GPUs before the server starts (as `astarpo values` does today). The push is the policy's weights in the engine's
dtype sent from the trainer to the server once per step (after the step's last optimizer update; the server samples
with one policy version per step), over NVLink in one direction (:data:`NVLINK`, at the assumed
:data:`LINK_EFFICIENCY`); it is assumed to stall both sides (the trainer sends, the server pauses generation while
the weights load), so it adds to the step either way. In the colocated case the push is not counted (above): there
it is a copy within each GPU's own memory, at HBM rather than link bandwidth, and every method pays it alike. Here
it crosses between GPUs, and it sits on the path of a step whose other terms overlap; across nodes (InfiniBand or
Ethernet instead of NVLink) it would be slower still. Counted are its bytes only: not the trainer's gather of
sharded weights before sending, the per-tensor latency of a push that goes tensor by tensor, nor the engine's own
loading of the weights. The number of steps is the synchronous run's: what training on samples up to K versions old
does to learning (the steps needed to reach an accuracy) is not modelled.

The paper's set-up (:func:`paper_hours`, ``--setup paper``; the default, ``--setup astarpo``, is everything above)
counts the work as the paper's official code runs it (github.com/ZhaolinGao/A-PO: verl with a vLLM 0.6.3 hybrid
engine; each constant's file and setting is in a comment beside it) instead of as astarpo runs it:

    hours = Stage 1 + steps x (sampling + training passes + weight sync + KV cache) + validations + checkpoints

- Every method recomputes the old policy's log-probs of every sample and runs the reference forward of every sample
  (verl's hybrid engine always does both); PPO adds its critic (a values forward, then its update); no gradient
  checkpointing. GRPO's and REBEL's samples per prompt are not in the official code (no baseline script exists):
  astarpo's defaults, 8 and 2, are kept and said to be assumptions.
- Sampling runs on one engine over all the GPUs (tensor parallel), all of a step's sequences at once up to
  max_num_seqs 1024, in eager mode. A decode step takes its bandwidth and compute time (a tensor-parallel share of
  the weights, this GPU's key/value heads of every sequence's cache) or the engine's latency floor, whichever is
  longer: the floor is the step's kernel launches (counted from vLLM 0.6.3's Qwen2 code path) times the host time of
  one eager launch (:data:`LAUNCH_SECONDS`, an assumption: no documented per-token latency of such an engine was
  found). Training runs in micro-batches of n sequences per GPU (1 x rollout.n), each taking its FLOPs at the
  training rate or its own launches (HF Qwen2 under FSDP, counted by hand), whichever is longer.
- Per step: the weight sync into the engine (float32 shards gathered over NVLink) and the KV cache rebuilt
  (free_cache_engine). Over the run: a greedy validation of the 5,000 MATH test problems before training, every 50
  steps and at the end, and a float32 checkpoint every 50 steps.

Every constant of this set-up was fixed, with its source, before the model's hours were put beside the paper's
table, and none was changed after: nothing is fitted to the paper. :func:`paper_comparison` puts A*-PO's ratio to
each baseline beside the paper's at 1.5B, 3B and 7B; where they differ by more than 0.15 the README says which term
is missing and why.
"""

from __future__ import annotations

import argparse
import math
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from ..config import ConfigError
from ..rundir import write_json_atomic
from ..training.objectives import OBJECTIVES
from .plan import SHAPES, SMOLLM2_135M, Shape, shape_of

METHODS = tuple(OBJECTIVES)  # astarpo, grpo, rloo, rebel, ppo
PASSES = ("policy", "reference", "old_policy", "critic")

# The paper's training hours (arXiv 2505.20686, MATH, 4 x H100): the 1.5B row as issue #22 quotes it, the 3B and
# 7B rows as issue #30 quotes the paper's table (the paper's own text is not in our search corpora, and the authors'
# README, github.com/ZhaolinGao/A-PO, has no timing table).
PAPER_HOURS = {"qwen2.5-1.5b": {"astarpo": 6.92, "grpo": 15.01, "ppo": 10.84, "rebel": 10.33},
               "qwen2.5-3b": {"astarpo": 8.78, "grpo": 18.26, "ppo": 13.59, "rebel": 12.88},
               "qwen2.5-7b": {"astarpo": 11.01, "grpo": 20.15, "ppo": 20.53, "rebel": 14.67}}


@dataclass(frozen=True)
class Device:
    """What one device achieves per second: dense FLOPs (training passes, prefill), decode FLOPs, and memory
    bandwidth while decoding; ``weight_bytes`` per parameter of the sampler's weights and KV cache."""

    name: str
    dense_flops: float
    decode_flops: float
    bandwidth: float
    weight_bytes: int
    sources: dict[str, str] = field(default_factory=dict, compare=False)


# NVIDIA's datasheets (SXM parts): dense bf16 tensor-core FLOP/s (half the "with sparsity" figure) and HBM bandwidth.
PEAK = {"h100": (989e12, 3.35e12), "h200": (989e12, 4.8e12)}
TRAIN_MFU = 0.4  # assumption: model FLOP utilisation of FSDP/DeepSpeed training of 1-7B models
DECODE_EFFICIENCY = 0.5  # assumption: the share of peak bandwidth and peak FLOP/s a decode step achieves
# NVIDIA's datasheets (SXM parts): NVLink 900 GB/s per GPU, both directions together (18 fourth-generation links);
# a weight push goes one way, so it has half of it. (Read in copies quoting the datasheets, not NVIDIA's PDF.)
NVLINK = {"h100": 900e9, "h200": 900e9}
# assumption: the share of one direction's NVLink bandwidth a NCCL broadcast of the weights achieves (near what
# NVIDIA/nccl issue #1264 reports for CUDA's p2pBandwidthLatencyTest on H100 SXM: 380 of 450 GB/s one way)
LINK_EFFICIENCY = 0.8


def gpu(name: str, mfu: float = TRAIN_MFU, decode_efficiency: float = DECODE_EFFICIENCY) -> Device:
    """A GPU from its datasheet peaks and the two stated efficiencies; sampling in bfloat16 (vLLM's dtype in the
    paper's runs and in ``configs/paper``)."""
    flops, hbm = PEAK[name]
    sheet = f"NVIDIA {name.upper()} SXM datasheet"
    return Device(name, flops * mfu, flops * decode_efficiency, hbm * decode_efficiency, 2, {
        "peak_flops": f"{flops / 1e12:.0f} TFLOP/s dense bf16 ({sheet})",
        "peak_bandwidth": f"{hbm / 1e12:.2f} TB/s HBM ({sheet})",
        "train_mfu": f"{mfu} (assumption: typical model FLOP utilisation of sharded 1-7B training)",
        "decode_efficiency": f"{decode_efficiency} (assumption: share of peak bandwidth and FLOP/s in a decode step)",
        "weight_bytes": "2 (bfloat16 sampler weights and KV cache)"})


@dataclass(frozen=True)
class Recipe:
    """A training run's shape; the defaults are the paper's MATH run (``configs/paper/math_qwen2.5-1.5b.yaml``,
    the MATH training set), so that `astarpo plan --time` with no recipe flags answers for the paper's table.
    Prompts and responses are counted at their caps (an upper bound: real responses stop earlier).
    ``generation_batch`` is how many sequences a GPU decodes at once; ``group_sizes`` and ``kl_coefs`` override
    a method's defaults, as TrainConfig's ``group_size`` and ``kl_coef`` do."""

    gpus: int = 4
    prompts: int = 7500
    epochs: float = 25
    batch: int = 256
    mini_batch: int = 128
    prompt_tokens: int = 256
    response_tokens: int = 1024
    stage1_n: int = 8
    generation_batch: int = 256
    gradient_checkpointing: bool = True
    group_sizes: dict[str, int] = field(default_factory=dict)
    kl_coefs: dict[str, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for name in ("gpus", "batch", "mini_batch", "prompt_tokens", "response_tokens", "stage1_n",
                     "generation_batch"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not self.epochs > 0:
            raise ConfigError(f"epochs must be > 0, got {self.epochs}")
        if self.prompts < self.batch:
            raise ConfigError(f"prompts ({self.prompts}) must be at least one batch ({self.batch})")
        if self.mini_batch > self.batch:
            raise ConfigError(f"mini_batch ({self.mini_batch}) must be <= batch ({self.batch})")
        for algo, g in self.group_sizes.items():
            if algo not in OBJECTIVES or "group_size" not in OBJECTIVES[algo].settings:
                raise ConfigError(f"group size: {algo!r} has none to set (only "
                                  f"{', '.join(a for a, o in OBJECTIVES.items() if 'group_size' in o.settings)})")
            if g < 2:
                raise ConfigError(f"group size of {algo} must be >= 2, got {g}")
        for algo, beta in self.kl_coefs.items():
            if algo not in OBJECTIVES or OBJECTIVES[algo].coefficient != "kl_coef":
                raise ConfigError(f"kl coefficient: {algo!r} has none (only "
                                  f"{', '.join(a for a, o in OBJECTIVES.items() if o.coefficient == 'kl_coef')})")
            if beta < 0:
                raise ConfigError(f"kl coefficient of {algo} must be >= 0, got {beta}")

    @property
    def steps_per_epoch(self) -> int:
        """Whole batches only: verl, and ``configs/paper``'s step counts, drop each epoch's last partial batch."""
        return self.prompts // self.batch


def matmul_params(s: Shape, head: bool = True) -> int:
    """Parameters a token is multiplied through: every layer, the final norm and the LM head (a critic has a
    scalar head instead); the input embedding is a lookup, not a product."""
    return s.layers * s.layer_params() + s.hidden + (s.vocab * s.hidden if head else 0)


def passes(algo: str, r: Recipe) -> dict[str, Any]:
    """What the trainer runs per step for ``algo``: its group size, and per sample token of each network the
    passes in forward-pass units (a backward costs two forwards; checkpointing adds one), read from the
    objective's declared inputs so that the count follows the implementation when an objective changes."""
    o = OBJECTIVES[algo]
    beta = r.kl_coefs.get(algo, o.default)
    inputs = o.inputs | (o.kl_inputs if beta > 0 else frozenset())  # as Objective.__init__ does
    train = 3 + (1 if r.gradient_checkpointing else 0)
    updates = math.ceil(r.batch / r.mini_batch)
    # Trainer.inputs: log pi_old for the samples of later mini-batches (the policy has moved), or for all of them
    # where the objective's prepare() reads them; the first mini-batch's come from its own training forward.
    old = 1.0 if "old_logp" in inputs else (updates - 1) / updates
    return {"group_size": r.group_sizes.get(algo, o.group_size), "policy": train,
            "reference": 1 if "ref_logp" in inputs else 0, "old_policy": old,
            "critic": 1 + train if o.trains_critic else 0}  # old values, then its own training


def decode_seconds(s: Shape, d: Device, sequences: int, prompts: int, r: Recipe) -> float:
    """Seconds for one device to sample ``sequences`` responses to ``prompts`` prompts (each prefilled once, as
    both engines do), in waves of at most ``generation_batch`` sequences; a wave decodes until its longest
    response ends, so every response is counted at ``response_tokens``."""
    if sequences == 0:
        return 0.0
    mp, R = matmul_params(s), r.response_tokens
    waves = math.ceil(sequences / r.generation_batch)
    context = r.prompt_tokens + R / 2  # mean tokens in a sequence's KV cache while it decodes
    kv_bytes = s.layers * 2 * s.kv_dim * d.weight_bytes * context
    memory = (waves * d.weight_bytes * mp + sequences * kv_bytes) * R / d.bandwidth
    compute = sequences * R * 2 * mp / d.decode_flops
    prefill = prompts * r.prompt_tokens * 2 * mp / d.dense_flops
    return memory + compute + prefill


def method_seconds(s: Shape, d: Device, algo: str, r: Recipe) -> dict[str, Any]:
    """Seconds of one step of ``algo`` (sampling, each training pass) and of its Stage 1, on ``r.gpus`` devices."""
    p = passes(algo, r)
    G = p["group_size"]
    prompts_per_gpu = math.ceil(r.batch / r.gpus)
    out: dict[str, Any] = {"group_size": G, "samples_per_step": r.batch * G,
                           "generation": decode_seconds(s, d, prompts_per_gpu * G, prompts_per_gpu, r)}
    tokens = r.batch * G * (r.prompt_tokens + r.response_tokens)
    forward = {"policy": 2 * matmul_params(s) * tokens, "critic": 2 * matmul_params(s, head=False) * tokens}
    for name in PASSES:
        out[name] = p[name] * forward["critic" if name == "critic" else "policy"] / (r.gpus * d.dense_flops)
    stage1_prompts = math.ceil(r.prompts / r.gpus)
    out["stage1"] = decode_seconds(s, d, stage1_prompts * r.stage1_n, stage1_prompts, r) if algo == "astarpo" else 0.0
    out["decode_tokens_per_second_per_gpu"] = prompts_per_gpu * G * r.response_tokens / out["generation"]
    return out


def hours(s: Shape, d: Device, r: Recipe, methods: tuple[str, ...] = METHODS) -> dict[str, dict[str, Any]]:
    """Per method: total hours and their breakdown (Stage 1, sampling, each training pass), steps, samples."""
    steps = r.epochs * r.steps_per_epoch
    out = {}
    for algo in methods:
        sec = method_seconds(s, d, algo, r)
        training = {name: steps * sec[name] / 3600 for name in PASSES}
        row = {"stage1_hours": sec["stage1"] / 3600, "generation_hours": steps * sec["generation"] / 3600,
               "training_hours": sum(training.values())}
        row["hours"] = sum(row.values())
        out[algo] = {"hours": row["hours"], **{k: v for k, v in row.items() if k != "hours"},
                     "training_hours_by_pass": training, "steps": steps, "group_size": sec["group_size"],
                     "samples_per_step": sec["samples_per_step"], "step_seconds":
                     sec["generation"] + sum(sec[name] for name in PASSES),
                     "decode_tokens_per_second_per_gpu": sec["decode_tokens_per_second_per_gpu"]}
    return out


def link(d: Device, efficiency: float = LINK_EFFICIENCY) -> dict[str, Any]:
    """The trainer-to-server link of a GPU: bytes per second one way, and where the figure comes from."""
    if d.name not in NVLINK:
        raise ConfigError(f"the asynchronous case (server GPUs) is for a GPU device ({', '.join(NVLINK)}), "
                          f"got {d.name}")
    return {"bytes_per_s": NVLINK[d.name] / 2 * efficiency, "sources": {
        "nvlink": f"{NVLINK[d.name] / 1e9:.0f} GB/s per GPU, both directions ({NVLINK[d.name] / 2e9:.0f} GB/s "
                  f"one way; NVIDIA {d.name.upper()} SXM datasheet)",
        "link_efficiency": f"{efficiency} (assumption: share of one direction a NCCL broadcast achieves; "
                           "NVIDIA/nccl issue #1264 measures 380 of 450 GB/s on H100 SXM)"}}


def push_seconds(s: Shape, d: Device) -> float:
    """Seconds to send the policy's weights in the engine's dtype (``d.weight_bytes``) from trainer to server."""
    return d.weight_bytes * s.params() / link(d)["bytes_per_s"]


def split_hours(s: Shape, d: Device, r: Recipe, server_gpus: int, lag: int = 1) -> dict[str, Any]:
    """A*-PO's hours with ``server_gpus`` of the recipe's GPUs sampling (a vLLM engine each) and the others
    training, the two overlapping with ``lag`` >= 1 and taking turns with 0 (the module docstring gives the
    formula). ``server_gpus`` 0 is the colocated loop: :func:`hours`' own A*-PO row. ``generation_hours`` and
    ``training_hours`` are each side's busy hours on its own GPUs; with ``lag`` >= 1 they overlap, so they do not
    add up to ``hours``."""
    if lag < 0:
        raise ConfigError(f"async lag must be >= 0, got {lag}")
    if server_gpus == 0:
        if lag:
            raise ConfigError("async lag needs server GPUs (--server-gpus >= 1): colocated GPUs take turns "
                              "sampling and training, so nothing overlaps")
        return hours(s, d, r, ("astarpo",))["astarpo"]
    if not 0 < server_gpus < r.gpus:
        raise ConfigError(f"server_gpus must be between 0 (the colocated loop) and gpus - 1 = {r.gpus - 1} (the "
                          f"trainer needs a GPU), got {server_gpus}")
    server = method_seconds(s, d, "astarpo", replace(r, gpus=server_gpus))
    trainer = method_seconds(s, d, "astarpo", replace(r, gpus=r.gpus - server_gpus))
    generation, by_pass = server["generation"], {name: trainer[name] for name in PASSES}
    training, push = sum(by_pass.values()), push_seconds(s, d)
    step = (max(generation, training) if lag else generation + training) + push
    fill = min(generation, training) if lag else 0.0
    stage1 = method_seconds(s, d, "astarpo", r)["stage1"]
    steps = r.epochs * r.steps_per_epoch
    return {"hours": (stage1 + steps * step + fill) / 3600, "stage1_hours": stage1 / 3600,
            "generation_hours": steps * generation / 3600, "training_hours": steps * training / 3600,
            "training_hours_by_pass": {name: steps * sec / 3600 for name, sec in by_pass.items()},
            "push_hours": steps * push / 3600, "fill_hours": fill / 3600, "steps": steps,
            "group_size": server["group_size"], "samples_per_step": server["samples_per_step"],
            "step_seconds": step, "generation_seconds": generation, "training_seconds": training,
            "push_seconds": push, "push_bytes": d.weight_bytes * s.params(), "server_gpus": server_gpus,
            "trainer_gpus": r.gpus - server_gpus, "async_lag": lag,
            "waiting": ("trainer" if generation > training else "server") if lag else "alternating",
            "decode_tokens_per_second_per_gpu": server["decode_tokens_per_second_per_gpu"]}


def best_split(s: Shape, d: Device, r: Recipe, lag: int = 1) -> dict[str, Any]:
    """A*-PO's hours for every split S = 1 .. gpus - 1, and the S with the fewest."""
    by = {S: split_hours(s, d, r, S, lag)["hours"] for S in range(1, r.gpus)}
    return {"hours_by_server_gpus": by, "server_gpus": min(by, key=by.get) if by else None}


def assumptions(s: Shape, d: Device, r: Recipe, setup: str = "astarpo") -> dict[str, Any]:
    """Every number the hours rest on, with where it comes from; with ``setup="paper"`` also the paper set-up's
    constants and their sources (:func:`paper_assumptions`)."""
    if setup == "paper":
        return {**assumptions(s, d, r), "paper_setup": paper_assumptions(s, d, r)}
    return {"device": d.name, "dense_flops_per_s": d.dense_flops, "decode_flops_per_s": d.decode_flops,
            "decode_bandwidth_bytes_per_s": d.bandwidth, "sources": d.sources,
            "params": s.params(), "matmul_params": matmul_params(s),
            "recipe": {k: v for k, v in r.__dict__.items()},
            "counting": "responses at response_tokens, prompts at prompt_tokens (their caps: an upper bound); "
                        "FLOPs 2/4/2 per parameter per token for forward/backward/recompute; attention FLOPs, "
                        "optimizer step, weight pushes, reward scoring and communication not counted; GPUs split "
                        "every step evenly",
            "passes": {algo: passes(algo, r) for algo in METHODS}}


def _pairs(values: list[str] | None, cast: type, flag: str) -> dict[str, Any]:
    out = {}
    for v in values or []:
        algo, sep, x = v.partition("=")
        try:
            out[algo.strip()] = cast(x)
        except ValueError:
            sep = ""
        if not sep:
            raise ConfigError(f"{flag} {v!r}: expected METHOD=VALUE, e.g. grpo=4")
    return out


def run(a: argparse.Namespace) -> str:
    """The hours table for parsed ``astarpo plan --time`` flags (:func:`astarpo.bench.plan.add_arguments`); with
    ``--json FILE`` the hours and every assumption go to FILE as well."""
    for name in ("mfu", "decode_efficiency"):
        value = getattr(a, name)
        if value is not None and (a.device == "cpu" or not 0 < value <= 1):
            raise ConfigError(f"--{name.replace('_', '-')} must be in (0, 1] and is for a GPU device")
    device = CPU if a.device == "cpu" else gpu(a.device, a.mfu or TRAIN_MFU, a.decode_efficiency or DECODE_EFFICIENCY)
    recipe = Recipe(gpus=Recipe.gpus if a.gpus is None else a.gpus, prompts=a.prompts, epochs=a.epochs,
                    batch=a.batch, mini_batch=a.mini_batch,
                    prompt_tokens=a.prompt_tokens, response_tokens=a.response_tokens, stage1_n=a.n,
                    generation_batch=a.generation_batch, gradient_checkpointing=a.gradient_checkpointing,
                    group_sizes=_pairs(a.group_size, int, "--group-size"),
                    kl_coefs=_pairs(a.kl_coef, float, "--kl-coef"))
    s = shape_of(a.model)
    if a.setup == "paper":
        if a.device == "cpu" or a.server_gpus or a.async_lag is not None:
            raise ConfigError("--setup paper costs the official code's colocated run on GPUs: not with --device cpu, "
                              "--server-gpus or --async-lag")
        rows = paper_hours(s, device, recipe)  # checks the methods and group sizes before anything is written
        if a.json:
            write_json_atomic(Path(a.json), {"setup": "paper", "methods": rows,
                                             "comparison": paper_comparison(device, recipe),
                                             "assumptions": assumptions(s, device, recipe, "paper")})
        return paper_table(a.model, s, device, recipe)
    server_gpus = a.server_gpus
    lag = (1 if server_gpus else 0) if a.async_lag is None else a.async_lag
    split = split_hours(s, device, recipe, server_gpus, lag)  # checks both before anything is written
    if a.json:
        out = {"methods": hours(s, device, recipe), "assumptions": assumptions(s, device, recipe)}
        if server_gpus:
            out["async"] = {"astarpo": split, "best_split": best_split(s, device, recipe, lag),
                            "link": link(device)}
        write_json_atomic(Path(a.json), out)
    return table(a.model, s, device, recipe, server_gpus, lag)


def table(model: str, s: Shape, d: Device, r: Recipe, server_gpus: int = 0, lag: int = 0) -> str:
    """A markdown table of hours per method and where they go; with ``server_gpus``, A*-PO on a generation
    server of that many GPUs (:func:`split_hours`) as a row of its own, explained below the table."""
    rows = hours(s, d, r)
    head = (f"{model}: {s.params() / 1e9:.2f}B parameters on {r.gpus} x {d.name}, {r.prompts} prompts x "
            f"{r.epochs:g} epochs, batch {r.batch} (mini-batch {r.mini_batch}), {r.prompt_tokens} + "
            f"{r.response_tokens} tokens, Stage 1 N {r.stage1_n}; hours\n\n")
    lines = ["| method | samples/prompt | hours | Stage 1 | sampling | policy | reference | old policy | critic |"
             " decode tok/s per device |", "|---" * 10 + "|"]
    for algo, m in rows.items():
        t = m["training_hours_by_pass"]
        lines.append(f"| {algo} | {m['group_size']} | {m['hours']:.2f} | {m['stage1_hours']:.2f} | "
                     f"{m['generation_hours']:.2f} | {t['policy']:.2f} | {t['reference']:.2f} | "
                     f"{t['old_policy']:.2f} | {t['critic']:.2f} | {m['decode_tokens_per_second_per_gpu']:,.0f} |")
    if not server_gpus:
        return head + "\n".join(lines) + "\n"
    a = split_hours(s, d, r, server_gpus, lag)
    t = a["training_hours_by_pass"]
    name = f"astarpo, server {server_gpus} + trainer {r.gpus - server_gpus} GPUs, lag {lag}"
    lines.append(f"| {name} | 1 | {a['hours']:.2f} | {a['stage1_hours']:.2f} | {a['generation_hours']:.2f} | "
                 f"{t['policy']:.2f} | {t['reference']:.2f} | {t['old_policy']:.2f} | {t['critic']:.2f} | "
                 f"{a['decode_tokens_per_second_per_gpu']:,.0f} |")
    best = best_split(s, d, r, lag)
    step = (f"max(sampling {a['generation_seconds']:.2f} s, training {a['training_seconds']:.2f} s)" if lag else
            f"sampling {a['generation_seconds']:.2f} s + training {a['training_seconds']:.2f} s")
    note = (f"\nThe last row samples on {server_gpus} GPU(s) (a vLLM engine each) while {r.gpus - server_gpus} "
            f"train; its sampling and training columns are each side's busy hours on its own GPUs"
            + (", which overlap, so they do not add up to its hours" if lag else "") + f". A step is {step} + "
            f"weight push {a['push_seconds']:.3f} s ({a['push_bytes'] / 1e9:.2f} GB at "
            f"{link(d)['bytes_per_s'] / 1e9:.0f} GB/s) = {a['step_seconds']:.2f} s"
            + (f"; the {a['waiting']} waits" if lag else "") + f" ({a['steps']:g} steps"
            + (f", plus {a['fill_hours'] * 3600:.2f} s once before the overlap starts" if lag else "") + "). "
            f"A*-PO's hours by server GPUs at lag {lag}: "
            + ", ".join(f"S={S} {h:.2f}" for S, h in best["hours_by_server_gpus"].items())
            + f" (fewest: S={best['server_gpus']}).\n")
    return head + "\n".join(lines) + "\n" + note


# ----- the paper's set-up, as the official code runs it (`astarpo plan --time --setup paper`) ------------------
# Read in github.com/ZhaolinGao/A-PO at c8823a3 (scripts/apo_math.sh, verl/trainer/config/apo_trainer.yaml and
# ppo_trainer.yaml, verl/trainer/apo/ray_trainer.py and ppo/ray_trainer.py, verl/trainer/main_apo.py and
# main_ppo.py, verl/workers/fsdp_workers_apo.py, verl/workers/actor/dp_actor_apo.py,
# verl/workers/rollout/vllm_rollout/vllm_rollout.py, verl/workers/sharding_manager/fsdp_vllm.py,
# verl/third_party/vllm/vllm_v_0_6_3/). Every constant below was fixed, with its source, before the model's hours
# were put beside the paper's table; none was changed after (README, "Training time per method, on paper").
PAPER_METHODS = ("astarpo", "grpo", "ppo", "rebel")  # the paper's table; RLOO is not in it
# Samples per prompt (verl's actor_rollout_ref.rollout.n). A*-PO and PPO: 1 (apo_trainer.yaml / ppo_trainer.yaml
# default n: 1). The repository holds no GRPO, PPO or REBEL script (only scripts/apo_math.sh and apo_gsm8k.sh), and
# the paper's text was not readable here, so GRPO's and REBEL's group sizes are NOT from the official code: they are
# astarpo's own defaults (GRPO 8, as TRL's num_generations; REBEL 2, a pair), an assumption; --group-size changes it.
PAPER_GROUP_SIZES = {"astarpo": 1, "grpo": 8, "ppo": 1, "rebel": 2}
GROUP_SIZE_SOURCES = {True: "rollout.n default 1, apo_trainer.yaml and ppo_trainer.yaml",
                      False: "assumption: astarpo's default; not in the official code nor a readable paper text"}
# vLLM rollout (apo_trainer.yaml, apo_math.sh): one engine over all GPUs (tensor_model_parallel_size=4 with
# GPUS_PER_NODE=4: the engine's TP is taken as the recipe's GPU count), eager (enforce_eager: True: no CUDA graphs),
# free_cache_engine: True (the KV cache is built before and freed after every generate call, vllm_rollout.py),
# gpu_memory_utilization 0.4 (of the memory free when the engine starts: third_party/vllm_v_0_6_3/worker.py), at most
# max_num_seqs 1024 sequences at once and max_num_batched_tokens 8192 tokens per prefill step. The KV cache holds
# 1024 sequences of 256 + 1024 tokens at all three sizes (about 19-24 GB per GPU against about 26-31 GB), so
# max_num_seqs, not the cache, bounds a wave.
ENGINE_MAX_NUM_SEQS = 1024
ENGINE_MAX_BATCHED_TOKENS = 8192
ENGINE_GPU_MEMORY_UTILIZATION = 0.4
# Micro-batches (apo_math.sh: MICRO_BATCH_SIZE_PER_DEVICE=1, ppo_micro_batch_size and both log_prob_micro_batch_size
# = 4 over 4 GPUs; fsdp_workers_apo.py multiplies each by rollout.n): the actor's training, old log-prob and
# reference forwards run n sequences per GPU at a time, padded to prompt + response caps (use_remove_padding: False,
# responses padded to response_length in vllm_rollout.py), so training tokens are the caps exactly. The critic's
# micro-batch is ppo_trainer.yaml's critic.ppo_micro_batch_size 64 over the GPUs (not multiplied by n); the script
# does not set it (no PPO script exists; assumed run with the A*-PO script's settings).
ACTOR_MICRO_BATCH_PER_GPU = 1
CRITIC_MICRO_BATCH = 64
# Validation and checkpoints (apo_math.sh: +trainer.val_before_train=True, test_freq=50, save_freq=50; ray_trainer.py
# also validates once at the end): greedy answers to the whole validation file (the dataloader's batch is
# len(val_dataset)), ~/data/math/test.parquet from preprocess/data_preprocess/math_dataset.py: the MATH test split,
# 5,000 problems (Hendrycks et al. 2021). A checkpoint is the FSDP actor's full float32 state dict (the actor is
# built in float32, fsdp_workers_apo.py), gathered to rank 0's CPU and written by save_pretrained; PPO also writes
# its critic. No upload (default_hdfs_dir and default_hub_dir are null).
VALIDATION_PROMPTS = 5000
TEST_FREQ = SAVE_FREQ = 50
# assumption: sequential write speed of the checkpoint's local disk (datacenter NVMe SSDs are specified at 3-4 GB/s
# sequential write, e.g. Samsung PM9A3, Intel D7-P5510 datasheets; a single-threaded safetensors write of a CPU
# state dict is taken at about half that). Not measured.
CHECKPOINT_WRITE_BYTES_PER_S = 2e9
# NVIDIA's datasheets (SXM parts): HBM capacity, for the KV cache the engine builds before every generate call.
HBM_BYTES = {"h100": 80e9, "h200": 141e9}
# The latency floor. No documented per-token latency of a tensor-parallel-4 eager vLLM 0.6.3 engine was found, so it
# is an ASSUMPTION built from two stated numbers: the kernels a step launches, counted by hand from the code, times
# the host time to launch one kernel from eager PyTorch. A step cannot take less than its launches, since in eager
# mode the CPU issues every kernel of every step (CUDA graphs, which replay a step in one launch, are off).
# Host time per launch: 10 us. Sources: NVIDIA's CUDA Graphs guide (docs.nvidia.com/dl-cuda-graph) and programming
# guide 4.2 (a per-kernel launch overhead paid in a stream, removed by graphs), Modal's GPU glossary ("each launch
# takes on the order of microseconds"), and a published breakdown of eager PyTorch's per-op host path (Python,
# pybind11, autograd, dispatcher, driver: ~5-25 us before the kernel; jiahuanglin.xyz, "From PyTorch op to kernel
# launch"); vLLM's v0.6.0 performance post (blog.vllm.ai, 2024-09-05) measured 62% of Llama-3-8B's time on one H100
# outside the GPU (HTTP server, scheduling), i.e. host work, not bandwidth, bounds small-model decoding.
LAUNCH_SECONDS = 10e-6
# Kernels per decode step of vLLM 0.6.3's Qwen2 under tensor parallelism with the XFORMERS backend (apo_math.sh sets
# VLLM_ATTENTION_BACKEND=XFORMERS), counted by hand: per layer fused_add_rms_norm, qkv GEMM (bias fused), rotary,
# reshape_and_cache, paged attention (v2: 2), o_proj GEMM, all-reduce, fused_add_rms_norm, gate_up GEMM,
# silu_and_mul, down GEMM, all-reduce = 13; per step about 30 (vocabulary-parallel embedding with its masking and
# all-reduce, final norm, LM head and its gather, the sampler at temperature 1 with logprobs=1 as vllm_rollout.py
# asks, the host-to-device copies of the step's inputs).
DECODE_LAUNCHES_PER_LAYER, DECODE_LAUNCHES_PER_STEP = 13, 30
# Kernels per training micro-batch of HF transformers' Qwen2 (< 4.48, requirements.txt) in eager mode with flash
# attention 2 under FSDP (FULL_SHARD per decoder layer, bf16 mixed precision), counted by hand: per layer forward
# two RMSNorms of 7 kernels each (casts, pow, mean, add, rsqrt, muls), q/k/v projections (3), rotary on q and k (10),
# flash attention with its layout copies (4), o_proj, the MLP (gate, up, silu, mul, down: 5), two residual adds and
# FSDP's all-gather and cast (3) = 42; a backward launches about twice its forward's kernels (each op's gradient,
# FSDP's re-gather and reduce-scatter); per pass about 30 (embedding, rotary tables, final norm, LM head,
# temperature, log-softmax and gather, dp_actor_apo.py's entropy, the loss).
TRAIN_LAUNCHES_PER_LAYER, TRAIN_BACKWARD_FACTOR, TRAIN_LAUNCHES_PER_PASS = 42, 2, 30


def decode_floor_seconds(s: Shape) -> float:
    """The least time one decode step of the eager engine takes: its kernel launches, one after the other."""
    return LAUNCH_SECONDS * (s.layers * DECODE_LAUNCHES_PER_LAYER + DECODE_LAUNCHES_PER_STEP)


def train_floor_seconds(s: Shape, backward: bool) -> float:
    """The least time one eager training micro-batch takes on the host: a forward's launches, or a forward and its
    backward's."""
    per_layer = TRAIN_LAUNCHES_PER_LAYER * (1 + (TRAIN_BACKWARD_FACTOR if backward else 0))
    return LAUNCH_SECONDS * (s.layers * per_layer + TRAIN_LAUNCHES_PER_PASS * (2 if backward else 1))


def engine_generate_seconds(s: Shape, d: Device, sequences: int, prompts: int, r: Recipe) -> dict[str, float]:
    """Seconds for the one tensor-parallel engine over all ``r.gpus`` GPUs to answer ``prompts`` prompts with
    ``sequences`` responses (prompts prefilled once, as vLLM does for n samples of a prompt): prefill in steps of
    ENGINE_MAX_BATCHED_TOKENS tokens, then waves of at most ENGINE_MAX_NUM_SEQS sequences, each decoding
    ``response_tokens`` steps (responses at their cap). A decode step takes its bandwidth and compute time on each
    GPU (a tensor-parallel share of the weights, this GPU's key/value heads of every sequence's cache) or the latency
    floor, whichever is longer; ``floor_steps`` counts the steps the floor bounds."""
    t, R = r.gpus, r.response_tokens
    mp, floor = matmul_params(s), decode_floor_seconds(s)
    context = r.prompt_tokens + R / 2
    kv_per_sequence = s.layers * 2 * s.head_size * s.kv_heads_per_gpu(t) * d.weight_bytes * context
    decode = floor_steps = 0.0
    left = sequences
    while left > 0:
        wave = min(left, ENGINE_MAX_NUM_SEQS)
        step = ((d.weight_bytes * mp / t + wave * kv_per_sequence) / d.bandwidth
                + wave * 2 * mp / t / d.decode_flops)
        decode += R * max(step, floor)
        floor_steps += R if floor > step else 0
        left -= wave
    tokens = prompts * r.prompt_tokens
    chunks = math.ceil(tokens / ENGINE_MAX_BATCHED_TOKENS)
    prefill = chunks * max(floor, min(tokens, ENGINE_MAX_BATCHED_TOKENS) * 2 * mp / t / d.dense_flops)
    return {"decode": decode, "prefill": prefill, "seconds": decode + prefill, "floor_steps": floor_steps,
            "steps": R * math.ceil(sequences / ENGINE_MAX_NUM_SEQS) if sequences else 0}


def paper_passes(algo: str, r: Recipe) -> dict[str, Any]:
    """What the official code runs per step for ``algo``, per sample token in forward-pass units (a backward is two;
    no gradient checkpointing: enable_gradient_checkpointing False in both trainer configs), with the micro-batch
    per GPU of each network. Every method: the actor's update, a reference forward of every sample (main_apo.py and
    main_ppo.py always map Role.RefPolicy; ray_trainer.py always calls compute_ref_log_prob: A*-PO's regression and
    GRPO's KL loss read it, PPO's reward penalty too) and the old policy's log-probs recomputed for every sample
    right after sampling (fsdp_workers_apo.py generate_sequences: 'we should always recompute old_log_probs when it
    is HybridEngine'). PPO (adv_estimator gae) adds its critic: a forward for the values, then its own update."""
    if algo not in PAPER_METHODS:
        raise ConfigError(f"--setup paper costs the paper's methods ({', '.join(PAPER_METHODS)}), not {algo!r}")
    G = r.group_sizes.get(algo, PAPER_GROUP_SIZES[algo])
    return {"group_size": G, "policy": 3, "reference": 1, "old_policy": 1.0, "critic": 1 + 3 if algo == "ppo" else 0,
            "micro_batch": ACTOR_MICRO_BATCH_PER_GPU * G, "critic_micro_batch": max(1, CRITIC_MICRO_BATCH // r.gpus)}


def weight_sync_seconds(s: Shape, d: Device, r: Recipe) -> float:
    """Pushing the actor into the engine before a generate call (sharding_manager/fsdp_vllm.py __enter__): the FSDP
    state dict's float32 shards, each gathered whole (dtensor_weight_loaders.py: full_tensor()), so every GPU
    receives (G - 1) / G of the float32 weights over NVLink; the cast into the engine's shard is not counted."""
    return 4 * s.params() * (r.gpus - 1) / r.gpus / link(d)["bytes_per_s"] if r.gpus > 1 else 0.0


def kv_init_seconds(d: Device) -> float:
    """Building the KV cache before a generate call (free_cache_engine): at most ENGINE_GPU_MEMORY_UTILIZATION of the
    GPU's memory, written once at the decode bandwidth (an upper bound: zeroed, as vLLM's cache engine allocates)."""
    return ENGINE_GPU_MEMORY_UTILIZATION * HBM_BYTES[d.name] / d.bandwidth


def paper_method_seconds(s: Shape, d: Device, algo: str, r: Recipe) -> dict[str, Any]:
    """Seconds of one step of ``algo`` as the official code runs it, on ``r.gpus`` GPUs: sampling on the one engine
    (:func:`engine_generate_seconds`), each training pass in micro-batches per GPU, each micro-batch taking its
    FLOPs at the training rate or its launches (:func:`train_floor_seconds`), whichever is longer, and the step's
    fixed costs (weight sync and KV cache). Stage 1 is :func:`method_seconds`' (the authors' model_generate.py runs a
    plain vLLM engine with CUDA graphs, not the eager trainer's)."""
    if d.name not in HBM_BYTES:
        raise ConfigError(f"--setup paper is for a GPU device ({', '.join(HBM_BYTES)}), got {d.name}")
    p = paper_passes(algo, r)
    G = p["group_size"]
    gen = engine_generate_seconds(s, d, r.batch * G, r.batch, r)
    per_gpu = math.ceil(r.batch * G / r.gpus)
    seq = r.prompt_tokens + r.response_tokens

    def passes_of(mb: int, backward: bool, head: bool = True) -> float:
        flops = (3 if backward else 1) * 2 * matmul_params(s, head) * mb * seq
        return math.ceil(per_gpu / mb) * max(train_floor_seconds(s, backward), flops / d.dense_flops)

    mb, cmb = p["micro_batch"], p["critic_micro_batch"]
    out: dict[str, Any] = {"group_size": G, "samples_per_step": r.batch * G, "generation": gen["seconds"],
                           "generation_floor_share": gen["floor_steps"] / gen["steps"] if gen["steps"] else 0.0,
                           "policy": passes_of(mb, True), "reference": passes_of(mb, False),
                           "old_policy": passes_of(mb, False),
                           "critic": passes_of(cmb, False, False) + passes_of(cmb, True, False) if p["critic"] else 0.0,
                           "weight_sync": weight_sync_seconds(s, d, r), "kv_init": kv_init_seconds(d)}
    out["train_floor_bound"] = {"forward": train_floor_seconds(s, False) > 2 * matmul_params(s) * mb * seq
                                / d.dense_flops, "update": train_floor_seconds(s, True) > 6 * matmul_params(s) * mb
                                * seq / d.dense_flops}
    out["stage1"] = method_seconds(s, d, "astarpo", r)["stage1"] if algo == "astarpo" else 0.0
    return out


PAPER_PASSES = ("policy", "reference", "old_policy", "critic")


def paper_hours(s: Shape, d: Device, r: Recipe, methods: tuple[str, ...] = PAPER_METHODS) -> dict[str, dict[str, Any]]:
    """Per method, the paper's set-up: hours and their breakdown (Stage 1, sampling, each training pass, the per-step
    fixed costs, validation and checkpoints over the run)."""
    steps = r.epochs * r.steps_per_epoch
    validations = 1 + int(steps // TEST_FREQ) + 1  # before training, every TEST_FREQ steps, at the end
    val = engine_generate_seconds(s, d, VALIDATION_PROMPTS, VALIDATION_PROMPTS, r)["seconds"]
    out = {}
    for algo in methods:
        sec = paper_method_seconds(s, d, algo, r)
        saves = int(steps // SAVE_FREQ)
        ckpt_bytes = 4 * s.params() + (4 * (s.params() - s.vocab * s.hidden * (0 if s.tied else 1))
                                       if algo == "ppo" else 0)  # the critic has no LM head
        training = {name: steps * sec[name] / 3600 for name in PAPER_PASSES}
        row = {"stage1_hours": sec["stage1"] / 3600, "generation_hours": steps * sec["generation"] / 3600,
               "training_hours": sum(training.values()),
               "fixed_hours": steps * (sec["weight_sync"] + sec["kv_init"]) / 3600,
               "validation_hours": validations * (val + sec["weight_sync"] + sec["kv_init"]) / 3600,
               "checkpoint_hours": saves * ckpt_bytes / CHECKPOINT_WRITE_BYTES_PER_S / 3600}
        out[algo] = {"hours": sum(row.values()), **row, "training_hours_by_pass": training, "steps": steps,
                     "group_size": sec["group_size"], "samples_per_step": sec["samples_per_step"],
                     "validations": validations, "checkpoints": saves,
                     "step_seconds": sec["generation"] + sum(sec[n] for n in PAPER_PASSES) + sec["weight_sync"]
                     + sec["kv_init"], "generation_floor_share": sec["generation_floor_share"],
                     "train_floor_bound": sec["train_floor_bound"]}
    return out


def paper_ratios(h: dict[str, float]) -> dict[str, float]:
    """A*-PO's hours over each baseline's."""
    return {b: h["astarpo"] / h[b] for b in PAPER_METHODS if b != "astarpo"}


def paper_comparison(d: Device, r: Recipe) -> dict[str, dict[str, Any]]:
    """For each of the paper's three model sizes: the paper set-up's hours and A*-PO's ratios beside the paper's."""
    out = {}
    for model, paper in PAPER_HOURS.items():
        h = {a: m["hours"] for a, m in paper_hours(SHAPES[model], d, r).items()}
        mine, theirs = paper_ratios(h), paper_ratios(paper)
        out[model] = {"model_hours": h, "paper_hours": paper, "model_ratios": mine, "paper_ratios": theirs,
                      "within_0.15": {b: abs(mine[b] - theirs[b]) <= 0.15 for b in mine}}
    return out


def paper_assumptions(s: Shape, d: Device, r: Recipe) -> dict[str, Any]:
    """The paper set-up's constants, each with where it comes from (beside :func:`assumptions`' device rates)."""
    return {
        "source": "github.com/ZhaolinGao/A-PO at c8823a3 (scripts/apo_math.sh, verl/trainer/config/*.yaml, "
                  "verl/trainer/{apo,ppo}/ray_trainer.py, verl/workers/fsdp_workers_apo.py, "
                  "verl/workers/rollout/vllm_rollout/vllm_rollout.py); no GRPO, PPO or REBEL script in it",
        "group_sizes": {a: f"{r.group_sizes.get(a, g)} ({GROUP_SIZE_SOURCES[g == 1]})"
                        for a, g in PAPER_GROUP_SIZES.items()},
        "passes": "every method: reference forward and old log-probs of every sample (verl's hybrid engine), "
                  "actor update without gradient checkpointing; PPO: critic values forward and critic update",
        "engine": f"one vLLM 0.6.3 engine, tensor parallel {r.gpus}, eager, KV cache rebuilt per generate call, "
                  f"max_num_seqs {ENGINE_MAX_NUM_SEQS}, max_num_batched_tokens {ENGINE_MAX_BATCHED_TOKENS}, "
                  f"gpu_memory_utilization {ENGINE_GPU_MEMORY_UTILIZATION} (apo_trainer.yaml, apo_math.sh)",
        "micro_batches": f"actor, old log-probs, reference: {ACTOR_MICRO_BATCH_PER_GPU} x n sequences per GPU "
                         f"(apo_math.sh, fsdp_workers_apo.py); critic: {CRITIC_MICRO_BATCH} / GPUs "
                         "(ppo_trainer.yaml critic.ppo_micro_batch_size)",
        "launch_seconds": f"{LAUNCH_SECONDS * 1e6:.0f} us per eager kernel launch (assumption: no documented "
                          "per-token latency of a TP-4 eager engine found; NVIDIA CUDA Graphs guide, Modal GPU "
                          "glossary, eager PyTorch per-op host path 5-25 us)",
        "decode_floor_seconds": f"{decode_floor_seconds(s) * 1e3:.2f} ms = {DECODE_LAUNCHES_PER_LAYER} launches x "
                                f"{s.layers} layers + {DECODE_LAUNCHES_PER_STEP} per step (vLLM 0.6.3 Qwen2 decode, "
                                "counted by hand) x launch",
        "train_floor_seconds": {"forward": train_floor_seconds(s, False), "update": train_floor_seconds(s, True),
                                "count": f"{TRAIN_LAUNCHES_PER_LAYER} launches per layer forward, backward "
                                         f"{TRAIN_BACKWARD_FACTOR}x, {TRAIN_LAUNCHES_PER_PASS} per pass (HF Qwen2 "
                                         "eager under FSDP, counted by hand)"},
        "weight_sync_seconds": f"{weight_sync_seconds(s, d, r):.3f} (float32 shards gathered whole over NVLink at "
                               f"{link(d)['bytes_per_s'] / 1e9:.0f} GB/s; fsdp_vllm.py, dtensor_weight_loaders.py)",
        "kv_init_seconds": f"{kv_init_seconds(d):.3f} ({ENGINE_GPU_MEMORY_UTILIZATION} x {HBM_BYTES[d.name] / 1e9:.0f}"
                           " GB written once at the decode bandwidth, an upper bound; free_cache_engine)",
        "validation": f"{VALIDATION_PROMPTS} MATH test problems, greedy, at the response cap, before training, "
                      f"every {TEST_FREQ} steps and at the end (apo_math.sh, ray_trainer.py)",
        "checkpoints": f"every {SAVE_FREQ} steps, float32 actor (and PPO's critic) at "
                       f"{CHECKPOINT_WRITE_BYTES_PER_S / 1e9:.0f} GB/s (assumption: NVMe datasheets' 3-4 GB/s "
                       "sequential write, about half for a single-threaded safetensors write)",
        "device": "rates as the default set-up: datasheet peaks x MFU and decode efficiency (assumptions)",
        "not_counted": "the engine's per-sequence host work (scheduling, per-token logprobs), Ray's moving of each "
                       "step's tensors between driver and workers, reward scoring, the allocator's re-mallocs after "
                       "every empty_cache(), attention FLOPs, the optimizer step, TP all-reduce latency on the GPU",
        "fitted": "nothing: every constant was fixed before the comparison with the paper's table"}


def paper_table(model: str, s: Shape, d: Device, r: Recipe) -> str:
    """The paper set-up's hours for ``model`` by term, then the three sizes' ratios beside the paper's, then the
    constants and their sources."""
    rows = paper_hours(s, d, r)
    head = (f"{model}, the paper's set-up as the official code runs it (verl + one eager vLLM 0.6.3 engine over "
            f"{r.gpus} x {d.name}): {r.prompts} prompts x {r.epochs:g} epochs, batch {r.batch} (mini-batch "
            f"{r.mini_batch}), {r.prompt_tokens} + {r.response_tokens} tokens; hours\n\n")
    lines = ["| method | samples/prompt | hours | Stage 1 | sampling | policy | reference | old policy | critic | "
             "per-step fixed | validation | checkpoints | decode steps at the floor |", "|---" * 13 + "|"]
    for algo, m in rows.items():
        t = m["training_hours_by_pass"]
        lines.append(f"| {algo} | {m['group_size']} | {m['hours']:.2f} | {m['stage1_hours']:.2f} | "
                     f"{m['generation_hours']:.2f} | {t['policy']:.2f} | {t['reference']:.2f} | "
                     f"{t['old_policy']:.2f} | {t['critic']:.2f} | {m['fixed_hours']:.2f} | "
                     f"{m['validation_hours']:.2f} | {m['checkpoint_hours']:.2f} | "
                     f"{m['generation_floor_share']:.0%} |")
    comp = paper_comparison(d, r)
    cmp_lines = ["", "A*-PO's hours over each baseline's, the model (paper set-up) beside the paper's table (4 x H100; "
                 "hours A*-PO / GRPO / PPO / REBEL):", "",
                 "| model | model hours | paper hours | / GRPO model | paper | / PPO model | paper | / REBEL model | "
                 "paper |", "|---" * 9 + "|"]
    for m, c in comp.items():
        mh, ph = c["model_hours"], c["paper_hours"]
        hours = lambda h: " / ".join(f"{h[a]:.2f}" for a in PAPER_METHODS)  # noqa: E731
        cmp_lines.append(f"| {m} | {hours(mh)} | {hours(ph)} | " + " | ".join(
            f"{c['model_ratios'][b]:.2f} | {c['paper_ratios'][b]:.2f}" for b in ("grpo", "ppo", "rebel")) + " |")
    a = paper_assumptions(s, d, r)
    src = ["", "Constants (fixed before the comparison, none fitted to the paper's table):"]
    for k in ("source", "passes", "engine", "micro_batches", "launch_seconds", "decode_floor_seconds", "validation",
              "checkpoints", "weight_sync_seconds", "kv_init_seconds", "not_counted"):
        src.append(f"- {k}: {a[k]}")
    src.append("- group sizes: " + "; ".join(f"{k} {v}" for k, v in a["group_sizes"].items()))
    f = a["train_floor_seconds"]
    src.append(f"- train floor: forward {f['forward'] * 1e3:.1f} ms, update {f['update'] * 1e3:.1f} ms per "
               f"micro-batch ({f['count']})")
    return head + "\n".join(lines) + "\n" + "\n".join(cmp_lines) + "\n" + "\n".join(src) + "\n"


# ----- the CPU, fitted to the committed bench and checked on what the fit did not see --------------------------
# `astarpo bench`'s recipe (benchmarks/results/bench/bench.json): SmolLM2-135M-Instruct, float32 weights, one
# process, 8 prompts per step, 12 steps from 160 prompts, 16 new tokens, HF generate 64 sequences at a time,
# no gradient checkpointing. The prompt (the arithmetic task in SmolLM2's chat template, its system prompt
# included) is about 40 tokens, counted from the template by hand, not measured.
CPU_BENCH = Recipe(gpus=1, prompts=160, epochs=12 * 8 / 160, batch=8, mini_batch=8, prompt_tokens=40,
                   response_tokens=16, stage1_n=8, generation_batch=64, gradient_checkpointing=False)
FIT_METHODS = ("astarpo", "grpo")  # one sequence per prompt and the largest group: the decode fit's two ends


def fit_cpu(bench: dict[str, Any]) -> Device:
    """The CPU's three rates from as few bench figures as determine them, so the rest can test the model: the
    dense rate from A*-PO's training time (its step minus its sampling), then bandwidth and decode rate from the
    sampling times of A*-PO and GRPO (the fewest and the most sequences decoded at once), two linear equations
    in their inverses."""
    s, r, m = SMOLLM2_135M, CPU_BENCH, bench["methods"]
    unit = Device("cpu", 1.0, 1.0, 1.0, 4)  # rates of 1: each term returns its FLOPs or bytes
    probe = method_seconds(s, unit, "astarpo", r)
    dense = sum(probe[p] for p in PASSES) / (m["astarpo"]["step_seconds"] - m["astarpo"]["generation_seconds"])
    rows = []
    for algo in FIT_METHODS:
        G = passes(algo, r)["group_size"]
        only = {"memory": replace(unit, decode_flops=math.inf, dense_flops=math.inf),
                "compute": replace(unit, bandwidth=math.inf, dense_flops=math.inf)}
        coef = {k: decode_seconds(s, dev, r.batch * G, r.batch, r) for k, dev in only.items()}
        prefill = decode_seconds(s, replace(unit, dense_flops=dense, bandwidth=math.inf, decode_flops=math.inf),
                                 r.batch * G, r.batch, r)
        rows.append((coef["memory"], coef["compute"], m[algo]["generation_seconds"] - prefill))
    (a1, c1, y1), (a2, c2, y2) = rows
    det = a1 * c2 - a2 * c1
    inv_bw, inv_flops = (y1 * c2 - y2 * c1) / det, (a1 * y2 - a2 * y1) / det
    return Device("cpu", dense, 1 / inv_flops, 1 / inv_bw, 4, CPU_SOURCES)


BENCH_PATH = "benchmarks/results/bench/bench.json"
SAMPLING_PATH = "benchmarks/results/vllm_sampling.json"
CPU_SOURCES = {
    "dense_flops": f"fitted: A*-PO's step minus its sampling in {BENCH_PATH}",
    "decode": f"fitted: A*-PO's and GRPO's sampling seconds in {BENCH_PATH} (8 and 64 sequences at once)",
    "weight_bytes": "4 (float32: the bench samples with the training model under HF generate)",
    "machine": "the 2-core x86_64 machine of the committed bench (torch threads 2)"}
# fit_cpu(bench.json) as committed, rounded (tests/test_plan.py checks they agree), for `astarpo plan --device cpu`
CPU = Device("cpu", 1.547e11, 1.104e11, 1.229e10, 4, CPU_SOURCES)


def cpu_check(bench: dict[str, Any], sampling: dict[str, Any] | None = None,
              device: Device | None = None) -> list[dict[str, Any]]:
    """Predicted beside measured seconds for every committed CPU figure: each method's step and sampling and
    Stage 1 in ``bench.json``, and HF generate's Stage 1 draw and A*-PO step in ``vllm_sampling.json`` (another
    recipe: more prompts per step, longer responses). ``fit`` marks the figures the rates were fitted to; the
    rest are held out, and are what the model is judged by."""
    d, s, r = device or fit_cpu(bench), SMOLLM2_135M, CPU_BENCH
    rows = []
    for algo, m in bench["methods"].items():
        if algo not in OBJECTIVES:
            continue
        sec = method_seconds(s, d, algo, r)
        step = sec["generation"] + sum(sec[p] for p in PASSES)
        rows.append({"figure": f"bench {algo} s/step", "predicted": step, "measured": m["step_seconds"],
                     "fit": algo == "astarpo"})
        rows.append({"figure": f"bench {algo} sampling s/step", "predicted": sec["generation"],
                     "measured": m["generation_seconds"], "fit": algo in FIT_METHODS})
        if algo == "astarpo":
            rows.append({"figure": "bench Stage 1 s (160 prompts x 8)", "predicted": sec["stage1"],
                         "measured": m["stage1_seconds"], "fit": False})
    if sampling:
        st = sampling["settings"]
        r2 = replace(r, prompts=st["prompts"], stage1_n=st["n"], response_tokens=st["max_new_tokens"],
                     batch=st["stage2_prompts"], mini_batch=st["stage2_prompts"])
        hf = sampling["stage1"]["hf"]
        rows.append({"figure": f"vllm_sampling HF Stage 1 draw s ({st['prompts']} prompts x {st['n']}, "
                               f"{st['max_new_tokens']} tokens)",
                     "predicted": method_seconds(s, d, "astarpo", r2)["stage1"], "measured": hf["draw_s"],
                     "fit": False})
        step2 = method_seconds(s, d, "astarpo", r2)
        two = sampling["stage2"]["hf"]
        rows.append({"figure": f"vllm_sampling HF A*-PO s/step ({st['stage2_prompts']} prompts)",
                     "predicted": step2["generation"] + sum(step2[p] for p in PASSES), "measured": two["step_s"],
                     "fit": False})
        rows.append({"figure": "vllm_sampling HF A*-PO sampling s/step", "predicted": step2["generation"],
                     "measured": two["generation_s"], "fit": False})
    for row in rows:
        row["ratio"] = row["predicted"] / row["measured"]
    return rows
