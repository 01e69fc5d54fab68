"""`astarpo plan`: per-GPU memory of Stage 2 on paper, by component, for DDP, FSDP2, ZeRO-2, ZeRO-3 and LoRA
(``--time``: hours per method, in :mod:`astarpo.bench.cost`).

The formula counts what a training process holds at its peak (bytes per GPU):

    weights + gradients + optimizer state + reference + max(micro-batch, optimizer step, generation)

where the micro-batch term is the autocast copies or gathered layers, the activations saved for backward and the
log-prob chunk; generation is HF generate's KV cache for ``generation_batch_size`` sequences (under FSDP2 and
ZeRO-3 plus the whole bf16 weights, gathered once for sampling). Under DDP and
FSDP2 the trainer keeps float32 master weights and runs the forward pass under bf16 autocast; under DeepSpeed
(ZeRO-2/3) the engine holds bf16 weights and its optimizer the float32 master copy and the two AdamW moments (ZeRO
paper's accounting, 2 + 2 + 12 bytes per parameter). Sharded strategies divide their sharded terms by the GPU
count. The activation coefficients were derived from the saved tensors of a Qwen2/Llama decoder layer (residual
stream in float32 under autocast, bfloat16 elsewhere) and are checked against measured tensor allocations by
``tests/test_plan.py`` and ``benchmarks/memory_plan.py``. Not counted: CUDA context and allocator fragmentation
(often 1-3 GiB), communication buckets of ZeRO and FSDP, the tokenizer and data.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from ..config import ConfigError
from ..logprobs import LOGITS_CHUNK
from ..rundir import write_json_atomic

GIB = 2**30
STRATEGIES = ("ddp", "fsdp2", "zero2", "zero3")


@dataclass(frozen=True)
class Shape:
    """What memory depends on in a decoder-only transformer (Llama/Qwen2 layout: GQA attention, SwiGLU MLP)."""

    hidden: int
    layers: int
    heads: int
    kv_heads: int
    intermediate: int
    vocab: int
    tied: bool
    qkv_bias: bool = False
    head_dim: int | None = None

    @property
    def head_size(self) -> int:
        """Each attention head's width: ``head_dim`` where the config sets it, else hidden / heads."""
        return self.head_dim or self.hidden // self.heads

    @property
    def kv_dim(self) -> int:
        return self.kv_heads * self.head_size

    @property
    def q_dim(self) -> int:
        return self.heads * self.head_size

    def linears(self) -> list[tuple[int, int]]:
        """(in, out) of every linear layer of one decoder layer (LoRA's all-linear targets)."""
        h, m = self.hidden, self.intermediate
        return [(h, self.q_dim), (h, self.kv_dim), (h, self.kv_dim), (self.q_dim, h), (h, m), (h, m), (m, h)]

    def layer_params(self) -> int:
        bias = self.q_dim + 2 * self.kv_dim if self.qkv_bias else 0
        return sum(i * o for i, o in self.linears()) + bias + 2 * self.hidden  # two RMSNorm weights

    def embedding_params(self) -> int:
        return self.vocab * self.hidden * (1 if self.tied else 2)

    def params(self) -> int:
        return self.layers * self.layer_params() + self.embedding_params() + self.hidden  # final norm

    def lora_params(self, rank: int) -> int:
        return self.layers * sum(rank * (i + o) for i, o in self.linears())

    def kv_heads_per_gpu(self, tensor_parallel: int) -> int:
        """Key/value heads on each GPU of a tensor-parallel vLLM engine: split, or replicated once there are fewer
        heads than GPUs (vLLM's QKVParallelLinear)."""
        return max(1, self.kv_heads // tensor_parallel)

    def engine_params_per_gpu(self, tensor_parallel: int) -> int:
        """Weights on each GPU of a vLLM engine over ``tensor_parallel`` GPUs: the linear layers and the
        (vocabulary-parallel) embeddings split, key/value projections split or replicated, norms whole."""
        t, h = tensor_parallel, self.hidden
        kv = self.kv_heads_per_gpu(t) * self.head_size
        q, m = self.q_dim // t, self.intermediate // t
        linear = h * q + 2 * h * kv + q * h + 3 * h * m + ((q + 2 * kv) if self.qkv_bias else 0)
        return self.layers * (linear + 2 * h) + -(-self.embedding_params() // t) + h


# From the models' config.json on the Hugging Face hub (the Instruct models share their base model's shape).
QWEN25 = {
    "qwen2.5-1.5b": Shape(1536, 28, 12, 2, 8960, 151936, tied=True, qkv_bias=True),
    "qwen2.5-3b": Shape(2048, 36, 16, 2, 11008, 151936, tied=True, qkv_bias=True),
    "qwen2.5-7b": Shape(3584, 28, 28, 4, 18944, 152064, tied=False, qkv_bias=True),
}
# SmolLM2-135M(-Instruct), astarpo's built-in CPU model (HuggingFaceTB/SmolLM2-135M config.json: 134.5M).
SMOLLM2_135M = Shape(576, 30, 9, 3, 1536, 49152, tied=True)
SHAPES = {**QWEN25, "smollm2-135m": SMOLLM2_135M}


def shape_of(model: str) -> Shape:
    """A hard-coded shape (``qwen2.5-7b``, ``Qwen/Qwen2.5-7B-Instruct``, ``smollm2-135m-instruct``) or a local HF
    directory's config."""
    key = model.lower().split("/")[-1].removesuffix("-instruct")
    if key in SHAPES:
        return SHAPES[key]
    path = Path(model) / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"{model}: not one of {', '.join(SHAPES)} nor a directory with a config.json")
    c = json.loads(path.read_text())
    c = c.get("text_config", c)
    return Shape(c["hidden_size"], c["num_hidden_layers"], c["num_attention_heads"],
                 c.get("num_key_value_heads") or c["num_attention_heads"], c["intermediate_size"], c["vocab_size"],
                 tied=c.get("tie_word_embeddings", True),
                 qkv_bias=c.get("attention_bias", c.get("model_type") == "qwen2"), head_dim=c.get("head_dim"))


def activation_bytes_per_token(s: Shape, layer: bool = True) -> int:
    """Bytes saved for backward per token by one decoder layer under bf16 autocast with float32 weights.

    Two RMSNorms keep their float32 input and normalised output (2 x 8H); autocast makes a bf16 copy of the
    normed input for each of q, k, v, gate and up (5 x 2H); attention keeps bf16 q, k, v and its output and
    o_proj its input (2 x (3H + 2 kv)); the SwiGLU MLP keeps gate, silu(gate), up and their product (4 x 2I).
    """
    return 32 * s.hidden + 4 * s.kv_dim + 8 * s.intermediate


def plan(s: Shape, gpus: int = 8, strategy: str = "ddp", micro_batch: int = 8, prompt_tokens: int = 256,
         response_tokens: int = 1024, gradient_checkpointing: bool = True, chunked_logits: bool = True,
         lora_rank: int = 0, generation_batch: int = 256, batch: int = 256, group_size: int = 1,
         gather_for_generation: bool = True, engine: str = "hf", engine_bytes: int = 2,
         sleep_mode: bool = True, engine_tensor_parallel: int = 1) -> dict[str, float]:
    """Per-GPU bytes by component, and ``peak``: the sum of the states plus the largest transient phase.
    Each GPU generates its ``batch * group_size / gpus`` sequences, ``generation_batch`` at a time (HF generate).

    ``engine="vllm"``: the hybrid engine, a vLLM engine beside the trainer on every GPU, holding its own whole
    weights (``engine_bytes`` per parameter: 2 for bfloat16) and the KV cache of all this GPU's sequences at once.
    With ``sleep_mode`` the engine frees both during the update and holds them only while generating, so it
    competes with the trainer's transient phases instead of adding to them. vLLM itself reserves its
    ``gpu_memory_utilization`` share of the GPU, which must cover these two terms (plus its activations).
    ``engine_tensor_parallel`` t: one engine over t GPUs (``vllm_tensor_parallel_size``) holds a t-th of the
    weights per GPU (:meth:`Shape.engine_params_per_gpu`) and the KV cache of all t GPUs' sequences, its heads
    split t ways (replicated where there are fewer key/value heads than GPUs)."""
    if strategy not in STRATEGIES:
        raise ValueError(f"strategy {strategy!r}: one of {', '.join(STRATEGIES)}")
    P, N = s.params(), gpus
    T = s.lora_params(lora_rank) if lora_rank else P  # trainable parameters
    deepspeed = strategy.startswith("zero")
    shard = {"ddp": 1, "fsdp2": N, "zero2": 1, "zero3": N}[strategy]  # how many ways the weights are split
    w_bytes = 2 if deepspeed else 4  # DeepSpeed's engine holds bf16 weights; DDP/FSDP2 float32 master weights
    out: dict[str, float] = {"params": P, "trainable": T}
    out["weights"] = w_bytes * P / shard
    if deepspeed:  # ZeRO-2/3 shard gradients (bf16) and the optimizer's float32 master copy + two moments
        out["gradients"] = 2 * T / N
        out["optimizer"] = 12 * T / N
    else:
        out["gradients"] = 4 * T / shard + (4 * T if strategy == "ddp" and N > 1 else 0)  # + DDP's bucket copy
        out["optimizer"] = 8 * T / shard
    # The reference: a frozen copy in the weights' dtype (none with LoRA: the base with adapters disabled),
    # sharded like the policy under FSDP2 and ZeRO-3.
    out["reference"] = 0 if lora_rank else w_bytes * P / shard
    # Compute copies: bf16 casts of float32 weights that autocast caches through the forward pass (DDP; saved
    # for backward unless checkpointing recomputes; frozen LoRA weights are not cached), or the layers gathered
    # at a time under FSDP2/ZeRO-3 (two in flight, the root's embeddings, one layer's unsharded gradients).
    layer, embed = s.layer_params(), s.embedding_params()
    gathered = cached = 0
    if strategy in ("fsdp2", "zero3"):
        gathered = 2 * (2 * layer + embed) + (4 * layer if not lora_rank else 0)
    elif not deepspeed and not (lora_rank and gradient_checkpointing):
        cached = 2 * P
    out["compute_copies"] = gathered + cached
    tokens = micro_batch * (prompt_tokens + response_tokens)
    residual = 2 if deepspeed else 4  # bytes of the residual stream: bf16 weights, or float32 under autocast
    per_layer = activation_bytes_per_token(s) - (16 * s.hidden if deepspeed else 0)  # bf16: no norm casts
    rows = micro_batch * response_tokens
    kept = tokens * 3 * residual * s.hidden + rows * residual * s.hidden  # embeddings, final norm, head input
    # Log-probs: bf16 logits, their float32 copy, the log-softmax temporaries and the gradient in backward,
    # 16 bytes per logit, for one chunk of response tokens at a time (or the whole micro-batch, unchunked).
    chunk = min(rows, max(1, LOGITS_CHUNK // s.vocab)) if chunked_logits else rows
    out["logits"] = 16 * chunk * s.vocab
    if gradient_checkpointing:  # layer inputs kept; the peak is one of: the head's first float32 chunk while
        # autocast's cache still holds the copies, the head's chunk in backward, or one layer recomputed
        out["activations"] = kept + tokens * s.layers * residual * s.hidden
        out["micro_batch"] = gathered + out["activations"] + max(
            cached + 4 * chunk * s.vocab, out["logits"], tokens * per_layer)
    else:  # everything is saved for backward, which starts with the head's chunks
        out["activations"] = kept + tokens * s.layers * per_layer
        out["micro_batch"] = out["compute_copies"] + out["activations"] + out["logits"]
    out["optimizer_step"] = 4 * T / (1 if strategy == "ddp" else N)  # foreach AdamW's temporary sqrt(v)
    # Generation: KV cache (keys float32 after rotary under autocast, values bf16), and the layers gathered or
    # copied; FSDP2 and ZeRO-3 gather every layer once for sampling (distributed.ready_for_generation).
    kv = 2 * s.kv_dim * (2 if deepspeed else 3)
    mine = -(-batch * group_size // gpus)  # this GPU's sequences per step
    states = out["weights"] + out["gradients"] + out["optimizer"] + out["reference"]
    if engine == "vllm":  # the engine samples; the trainer holds nothing extra for it
        t = engine_tensor_parallel
        out["engine_weights"] = engine_bytes * s.engine_params_per_gpu(t)
        out["engine_kv_cache"] = (t * mine * (prompt_tokens + response_tokens) * s.layers * 2 * s.head_size
                                  * s.kv_heads_per_gpu(t) * engine_bytes)
        out["generation"] = out["engine_weights"] + out["engine_kv_cache"]
        awake = 0 if sleep_mode else out["generation"]  # held through the update too, without sleep mode
        out["peak"] = states + awake + max(out["micro_batch"], out["optimizer_step"], out["generation"] - awake)
        return out
    sequences = min(generation_batch, mine)
    gather = gather_for_generation and strategy in ("fsdp2", "zero3")
    weights_while_sampling = 2 * P if gather else out["compute_copies"]
    out["generation"] = sequences * (prompt_tokens + response_tokens) * s.layers * kv + weights_while_sampling
    out["peak"] = states + max(out["micro_batch"], out["optimizer_step"], out["generation"])
    return out


ROWS = ("weights", "gradients", "optimizer", "reference", "compute_copies", "activations", "logits", "micro_batch",
        "optimizer_step", "engine_weights", "engine_kv_cache", "generation", "peak")


def table(model: str, gpus: int, strategies: tuple[str, ...] = STRATEGIES, **kw) -> str:
    """A markdown table, GiB per GPU, one column per strategy."""
    s = shape_of(model)
    plans = {st: plan(s, gpus, st, **kw) for st in strategies}
    lora = f", LoRA rank {kw['lora_rank']}" if kw.get("lora_rank") else ""
    head = (f"{model}: {s.params() / 1e9:.2f}B parameters, {gpus} GPUs{lora}, micro-batch "
            f"{kw.get('micro_batch', 8)} x ({kw.get('prompt_tokens', 256)} + {kw.get('response_tokens', 1024)}) "
            f"tokens, GiB per GPU\n\n")
    lines = ["| component | " + " | ".join(strategies) + " |", "|---" * (len(strategies) + 1) + "|"]
    for row in ROWS:
        if row not in plans[strategies[0]]:
            continue
        lines.append(f"| {row} | " + " | ".join(f"{plans[st][row] / GIB:.1f}" for st in strategies) + " |")
    return head + "\n".join(lines) + "\n"


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The flags of ``astarpo plan``: memory per GPU, or with ``--time`` hours per method."""
    p.add_argument("--model", required=True,
                   help="qwen2.5-1.5b|3b|7b, smollm2-135m (or their hub ids) or a local HF directory")
    p.add_argument("--gpus", type=int, help="default 8; with --time the paper's recipe's 4")
    p.add_argument("--strategy", choices=STRATEGIES, action="append", help="repeat for several (default: all)")
    p.add_argument("--lora-rank", type=int, default=0)
    p.add_argument("--micro-batch", type=int, default=8, help="sequences per forward/backward")
    p.add_argument("--prompt-tokens", type=int, default=256)
    p.add_argument("--response-tokens", type=int, default=1024)
    p.add_argument("--batch", type=int, default=256, help="prompts per step, over all GPUs")
    p.add_argument("--generation-batch", type=int, default=256, help="sequences per generate() call")
    p.add_argument("--no-gradient-checkpointing", dest="gradient_checkpointing", action="store_false")
    p.add_argument("--no-gather-for-generation", dest="gather_for_generation", action="store_false",
                   help="FSDP2/ZeRO-3 gather layer by layer for every sampled token (astarpo train's flag)")
    p.add_argument("--engine", choices=("hf", "vllm"), default="hf",
                   help="vllm: the hybrid engine, a vLLM engine beside the trainer on every GPU")
    p.add_argument("--engine-dtype", choices=("bfloat16", "float32"), default="bfloat16",
                   help="vllm: the engine's weights and KV cache (astarpo train's vllm_dtype, default its dtype)")
    p.add_argument("--no-sleep-mode", dest="sleep_mode", action="store_false",
                   help="vllm: the engine keeps its weights and KV cache through the update")
    p.add_argument("--engine-tensor-parallel-size", type=int, default=1, metavar="T",
                   help="vllm: GPUs per engine (astarpo train's vllm_tensor_parallel_size)")
    p.add_argument("--json", metavar="FILE", help="also write the figures (bytes, or hours and assumptions) as JSON")
    t = p.add_argument_group("--time: hours per method (defaults: the paper's MATH recipe, configs/paper)")
    t.add_argument("--time", action="store_true", help="hours of a training recipe per method instead of memory")
    t.add_argument("--prompts", type=int, default=7500, help="training prompts (MATH train: 7,500)")
    t.add_argument("--epochs", type=float, default=25)
    t.add_argument("--mini-batch", type=int, default=128, help="prompts per optimizer update")
    t.add_argument("--n", type=int, default=8, help="A*-PO's Stage 1 samples per prompt")
    t.add_argument("--group-size", action="append", metavar="METHOD=G", help="e.g. grpo=4 (repeat for several)")
    t.add_argument("--kl-coef", action="append", metavar="METHOD=BETA",
                   help="e.g. grpo=0.001: a KL term adds the reference forward (repeat for several)")
    t.add_argument("--device", choices=("h100", "h200", "cpu"), default="h100",
                   help="cpu: rates fitted to the committed CPU bench (SmolLM2-135M, float32)")
    t.add_argument("--mfu", type=float, help="GPU training FLOP utilisation (default 0.4)")
    t.add_argument("--decode-efficiency", type=float, help="GPU share of peak bandwidth/FLOPs decoding (default 0.5)")
    t.add_argument("--setup", choices=("astarpo", "paper"), default="astarpo",
                   help="astarpo: the passes this implementation runs; paper: as the paper's official code runs "
                        "them (verl, one eager vLLM engine over the GPUs, per-step fixed costs, validation), with the "
                        "paper's hours and A*-PO's ratios at 1.5B/3B/7B beside the model's")
    t.add_argument("--server-gpus", type=int, default=0, metavar="S",
                   help="A*-PO with S of the GPUs running a vLLM generation server and the rest training (issue "
                        "#29's server mode); 0: today's colocated loop")
    t.add_argument("--async-lag", type=int, metavar="K",
                   help="with --server-gpus: samples up to K policy versions old, so sampling and training "
                        "overlap (default 1); 0: they take turns")


def run(a: argparse.Namespace) -> str:
    """The memory table for parsed ``astarpo plan`` flags (``--time``: :func:`astarpo.bench.cost.run`)."""
    a.gpus = 8 if a.gpus is None else a.gpus
    if a.gpus < 1:
        raise ConfigError(f"gpus must be >= 1, got {a.gpus}")
    if a.engine_tensor_parallel_size < 1 or a.gpus % a.engine_tensor_parallel_size:
        raise ConfigError(f"engine_tensor_parallel_size must divide gpus ({a.gpus}), got "
                          f"{a.engine_tensor_parallel_size}")
    kw = dict(micro_batch=a.micro_batch, prompt_tokens=a.prompt_tokens, response_tokens=a.response_tokens,
              gradient_checkpointing=a.gradient_checkpointing, lora_rank=a.lora_rank, batch=a.batch,
              generation_batch=a.generation_batch, gather_for_generation=a.gather_for_generation, engine=a.engine,
              engine_bytes=2 if a.engine_dtype == "bfloat16" else 4, sleep_mode=a.sleep_mode,
              engine_tensor_parallel=a.engine_tensor_parallel_size)
    strategies = tuple(a.strategy or STRATEGIES)
    s = shape_of(a.model)
    if a.json:  # the raw figures beside the printed table, as `astarpo bench --json FILE`
        write_json_atomic(Path(a.json), {"shape": asdict(s), **{st: plan(s, a.gpus, st, **kw) for st in strategies}})
    return table(a.model, a.gpus, strategies, **kw)


# ----- measured on this machine ------------------------------------------------------------------------------
class LiveTensorBytes:
    """Bytes of all live CPU tensor storages created by torch ops inside the ``with`` block, and their peak
    (a dispatch mode sees every op of forward, backward and the optimizer; each storage is counted once and
    forgotten when it is freed). Tensors created before the block are not counted."""

    def __init__(self) -> None:
        self.bytes = self.peak = 0
        self._live: dict[int, tuple[Any, int]] = {}

    def sweep(self) -> int:
        """Forget freed storages; the bytes still live."""
        for key in [k for k, (ref, _) in self._live.items() if ref.expired()]:
            self.bytes -= self._live.pop(key)[1]
        return self.bytes

    def reset_peak(self) -> None:
        self.peak = self.sweep()

    def __enter__(self) -> LiveTensorBytes:
        import torch
        from torch.multiprocessing.reductions import StorageWeakRef
        from torch.utils._python_dispatch import TorchDispatchMode
        from torch.utils._pytree import tree_leaves

        tracker = self

        class Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                out = func(*args, **(kwargs or {}))
                tracker.sweep()
                for t in tree_leaves(out):
                    if isinstance(t, torch.Tensor) and t.device.type == "cpu":
                        storage = t.untyped_storage()
                        if storage.data_ptr() and storage.data_ptr() not in tracker._live:
                            tracker._live[storage.data_ptr()] = (StorageWeakRef(storage), storage.nbytes())
                            tracker.bytes += storage.nbytes()
                tracker.peak = max(tracker.peak, tracker.bytes)
                return out

        self._mode = Mode()
        self._mode.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._mode.__exit__(*exc)


def measure(s: Shape, micro_batch: int, prompt_tokens: int, response_tokens: int, gradient_checkpointing: bool,
            micro_batches: int = 2, steps: int = 2) -> dict[str, float]:
    """Train a randomly initialised Qwen2 model of shape ``s`` the way Stage 2 does on one process (float32
    weights, bf16 autocast, frozen float32 reference, AdamW (foreach, as on GPU), ``micro_batches`` gradient
    accumulations per step, chunked log-probs) and measure: the bytes of weights, gradients, optimizer state
    and reference (exact, from the tensors), and the peak bytes of all tensors over the last step."""
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from ..generation import Rollout
    from ..logprobs import collate, response_logprobs

    torch.manual_seed(0)
    cfg = Qwen2Config(vocab_size=s.vocab, hidden_size=s.hidden, intermediate_size=s.intermediate,
                      num_hidden_layers=s.layers, num_attention_heads=s.heads, num_key_value_heads=s.kv_heads,
                      tie_word_embeddings=s.tied, max_position_embeddings=prompt_tokens + response_tokens)
    policy = Qwen2ForCausalLM(cfg)
    ref = Qwen2ForCausalLM(cfg).requires_grad_(False).eval()
    ref.load_state_dict(policy.state_dict())
    if gradient_checkpointing:
        policy.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    optimizer = torch.optim.AdamW(policy.parameters(), lr=1e-6, foreach=True)
    g = torch.Generator().manual_seed(0)
    B, V = micro_batch, s.vocab
    roll = Rollout(list(range(B)), [torch.randint(0, V, (prompt_tokens,), generator=g).tolist()] * B,
                   [torch.randint(0, V, (response_tokens,), generator=g).tolist()] * B, [""] * B, [False] * B)
    batch = collate(roll, 0)

    def micro_batches_then_step(live: LiveTensorBytes | None = None) -> tuple[int, int]:
        optimizer.zero_grad(set_to_none=True)
        for _ in range(micro_batches):
            with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
                ref_logp = response_logprobs(ref, batch)
            with torch.autocast("cpu", dtype=torch.bfloat16):
                logp = response_logprobs(policy, batch)
            ((logp - ref_logp).sum(-1) ** 2).mean().backward()
        micro_peak = live.peak if live else 0
        if live:
            live.reset_peak()
            start = live.bytes
        optimizer.step()
        return micro_peak, (live.peak - start if live else 0)

    for _ in range(steps - 1):
        micro_batches_then_step()
    nbytes = lambda ts: sum(t.numel() * t.element_size() for t in ts)  # noqa: E731
    states = {"weights": nbytes(policy.parameters()), "gradients": nbytes(p.grad for p in policy.parameters()),
              "optimizer": nbytes(t for st in optimizer.state.values() for t in st.values() if t.dim()),
              "reference": nbytes(ref.parameters())}
    with LiveTensorBytes() as live:  # the last step; it starts by freeing the gradients
        micro_peak, step_peak = micro_batches_then_step(live)
    # What the micro-batches add to the states (the gradients come back in the first backward) and the step.
    return {**states, "micro_batch": micro_peak - states["gradients"], "optimizer_step": step_peak,
            "peak": sum(states.values()) - states["gradients"] + max(micro_peak, states["gradients"] + step_peak)}
