"""Several processes: which strategy the launch asked for, and what sharded strategies need beyond DDP.

The strategy comes from the accelerate config, as accelerate's users expect (``configs/accelerate/``): DDP,
FSDP2, or DeepSpeed ZeRO-2/3. What differs from DDP lives here, so that the trainer reads the same for all and
never asks which strategy runs:

- **No CUDA.** accelerate 1.15 runs FSDP and DeepSpeed on accelerators only (on a CPU-only machine an FSDP
  config silently becomes plain data parallelism, and DeepSpeed needs ``cpu=False``). :func:`make_accelerator`
  joins the processes over gloo and keeps the strategy the config asked for, so that the CPU tests run the very
  code a GPU cluster runs.
- **The reference model** is sharded like the policy (FSDP2: accelerate's own ``fully_shard`` wrapping; ZeRO-3: a
  DeepSpeed inference engine), not a whole copy on every process. Under ZeRO-2 the policy's weights are whole
  on every process by design, and so are the reference's.
- **Lockstep.** FSDP2 and ZeRO-3 gather weights with collectives inside every forward pass, so every process must
  run the same number of forward passes (``generate(synced_gpus=True)`` keeps finished processes stepping).
- **The update** (:class:`Learner`): gradients accumulate over micro-batches and are reduced once per mini-batch
  (``no_sync``); DeepSpeed is told which backward closes the mini-batch and steps, clips and zeroes its engine
  itself, where the other strategies clip with accelerate and step each optimizer.
- **Saving.** A sharded model's whole weights exist on no process: every process takes part in gathering them
  (:func:`full_state_dict`), rank 0 writes a Hugging Face directory. Checkpoints hold accelerate's own format
  for the strategy as well (what a resume loads: the sharded AdamW state included).
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
from accelerate import Accelerator, PartialState
from accelerate.utils import DistributedType, InitProcessGroupKwargs

from .launch import cpu_processes

STRATEGIES = ("single", "ddp", "fsdp2", "zero2", "zero3")


class StrategyError(RuntimeError):
    """The launch asks for a strategy or combination that astarpo does not run; the message says what to use."""


def _env_true(name: str) -> bool:
    return os.environ.get(name, "false").lower() in ("1", "true", "yes")


def make_accelerator(*, micro_batch_size: int, max_grad_norm: float, **kwargs: Any) -> Accelerator:
    """An ``Accelerator`` for the strategy the launch's accelerate config names, on GPUs or on CPUs alike.

    DeepSpeed takes its per-process micro-batch and gradient clipping from astarpo's settings (one optimizer
    step per mini-batch, clipped at ``max_grad_norm``), whatever the config file's "auto" values would give.
    """
    multi_cpu = cpu_processes()
    if _env_true("ACCELERATE_USE_FSDP") and os.environ.get("FSDP_VERSION", "1") != "2":
        raise StrategyError("FSDP1 is not supported; set fsdp_version: 2 in the accelerate config "
                            "(configs/accelerate/fsdp2_1node_8gpu.yaml)")
    if _env_true("ACCELERATE_USE_DEEPSPEED"):
        if multi_cpu:  # DeepSpeed's CPU accelerator, with the process group over gloo
            os.environ.setdefault("DS_ACCELERATOR", "cpu")
            kwargs["kwargs_handlers"] = [*kwargs.get("kwargs_handlers", []), InitProcessGroupKwargs(backend="gloo")]
        acc = Accelerator(**kwargs)
        ds = acc.state.deepspeed_plugin.deepspeed_config
        ds.update(train_micro_batch_size_per_gpu=micro_batch_size, gradient_accumulation_steps=1,
                  gradient_clipping=max_grad_norm)
        if ds.get("zero_optimization", {}).get("stage") == 3:  # the final model is gathered, not left as shards
            ds["zero_optimization"]["stage3_gather_16bit_weights_on_model_save"] = True
        return acc
    acc = Accelerator(cpu=multi_cpu, **kwargs)
    if multi_cpu and _env_true("ACCELERATE_USE_FSDP"):
        from accelerate import FullyShardedDataParallelPlugin

        plugin = FullyShardedDataParallelPlugin()  # from the config's FSDP_* variables, as accelerate reads it
        if acc.mixed_precision != "no":
            plugin.set_mixed_precision(acc.mixed_precision)
        acc.state.fsdp_plugin = plugin
        # as accelerate records it on GPUs: in both states, since AcceleratorState() re-reads PartialState's
        acc.state.distributed_type = PartialState().distributed_type = DistributedType.FSDP
    return acc


def strategy(acc: Accelerator) -> str:
    """One of :data:`STRATEGIES`."""
    if acc.distributed_type == DistributedType.FSDP:
        return "fsdp2"
    if acc.distributed_type == DistributedType.DEEPSPEED:
        return f"zero{acc.state.deepspeed_plugin.zero_stage}"
    return "ddp" if acc.num_processes > 1 else "single"


def check_supported(acc: Accelerator, *, critic: bool) -> None:
    """Refuse, before any model loads, what the strategy cannot do yet."""
    name = strategy(acc)
    if name in ("zero0", "zero1"):
        raise StrategyError(f"DeepSpeed ZeRO stage {name[-1]} is not supported; use zero_stage 2 or 3")
    if critic and name.startswith("zero"):
        raise StrategyError("PPO's critic under DeepSpeed needs a second DeepSpeed engine, which astarpo does not "
                            "set up; run PPO under FSDP2 or DDP")
    if name == "zero3" and importlib.util.find_spec("trl") is None:
        raise StrategyError("sampling under ZeRO-3 gathers the weights with TRL's unwrap_model_for_generation: "
                            "pip install 'astarpo[deepspeed]' (or trl)")


def prepare_reference(acc: Accelerator, model: Any) -> Any:
    """The frozen reference copy, sharded like the policy (not registered with accelerate: never saved), and in
    the policy's compute precision: DeepSpeed with bf16 or fp16 holds the policy's weights in that dtype (its
    float32 master copy lives in the optimizer), so under ZeRO-2 the whole reference is cast to it too, or
    log pi - log pi_ref would not be zero for identical weights."""
    name = strategy(acc)
    if name == "fsdp2":
        from accelerate.utils.fsdp_utils import fsdp2_prepare_model

        return fsdp2_prepare_model(acc, model)
    if name == "zero3":
        import deepspeed

        ds = acc.state.deepspeed_plugin.deepspeed_config
        config = {"train_micro_batch_size_per_gpu": ds["train_micro_batch_size_per_gpu"],
                  "zero_optimization": {"stage": 3}, "bf16": {"enabled": acc.mixed_precision == "bf16"},
                  "fp16": {"enabled": acc.mixed_precision == "fp16"}}
        engine, *_ = deepspeed.initialize(model=model, config=config)
        engine.eval()
        return engine
    if name == "zero2" and acc.mixed_precision in ("bf16", "fp16"):
        return model.to(acc.device, dtype=torch.bfloat16 if acc.mixed_precision == "bf16" else torch.float16)
    return model.to(acc.device)


@dataclass
class Trained:
    """A model that trains (prepared by accelerate), its optimizer, and the norm its gradients are clipped to."""

    model: Any
    optimizer: Any
    max_grad_norm: float


class Learner:
    """One optimizer update over micro-batches, the same calls under every strategy.

    ``start_update()``, then per micro-batch ``with accumulating(last): ...; backward(loss)``, then ``step()``.
    The first of ``trained`` is the policy, whose gradient norm ``step`` returns. DeepSpeed's engine clips at its
    ``gradient_clipping`` (:func:`make_accelerator` sets it to the policy's ``max_grad_norm``), steps and zeroes
    itself; accelerate would step it after every backward, so it is driven directly.
    """

    def __init__(self, acc: Accelerator, trained: list[Trained]) -> None:
        self.acc, self.trained = acc, trained
        self.deepspeed = strategy(acc).startswith("zero")

    def start_update(self) -> None:
        """Before a mini-batch's micro-batches: training mode and no gradients left from the last update."""
        for t in self.trained:
            t.model.train()
            t.optimizer.zero_grad(set_to_none=True)

    @contextlib.contextmanager
    def accumulating(self, last: bool) -> Iterator[None]:
        """One micro-batch's forward and backward: gradients are reduced across processes once per mini-batch,
        in the backward of its ``last`` micro-batch."""
        with contextlib.ExitStack() as stack:
            if not last:
                for t in self.trained:
                    stack.enter_context(self.acc.no_sync(t.model))
            if self.deepspeed:
                self.trained[0].model.set_gradient_accumulation_boundary(last)
            yield

    def backward(self, loss: torch.Tensor) -> None:
        if self.deepspeed:
            self.trained[0].model.backward(loss)
        else:
            self.acc.backward(loss)

    def step(self) -> float:
        """Clip and step every optimizer; the policy's gradient norm before clipping."""
        if self.deepspeed:
            policy = self.trained[0].model
            policy.step()
            return as_float(policy.get_global_grad_norm())
        norms = [as_float(self.acc.clip_grad_norm_(t.model.parameters(), t.max_grad_norm)) for t in self.trained]
        for t in self.trained:
            t.optimizer.step()
        return norms[0]


@contextlib.contextmanager
def ready_to_sample(acc: Accelerator, model: Any, sampler: Any, gather: bool = True) -> Iterator[None]:
    """A sampler that uses the policy itself (``sampler.uses_policy``) runs under the policy's autocast, with its
    weights ready (:func:`ready_for_generation`); an engine with weights of its own needs nothing from the policy
    and runs as it is (its kernels under another autocast would compute in the wrong dtype)."""
    if not sampler.uses_policy:
        yield
        return
    with acc.autocast(), ready_for_generation(acc, model, gather):
        yield


@contextlib.contextmanager
def ready_for_generation(acc: Accelerator, model: Any, gather: bool = True) -> Iterator[None]:
    """The policy ready for a block of sampling under FSDP2 or ZeRO-3; other strategies: nothing to do.

    ``gather``: gather the weights once for the block, not once per token. Both strategies gather a layer's
    weights in every forward pass and free them after it, so sampling T tokens would gather the whole model T
    times (the README, "Sharded training", has the measured generation times with and without). The
    price: while sampling, every GPU holds the whole weights in the compute dtype, as under DDP (``astarpo plan``
    counts them in the generation phase); ``gather=False`` (``--no-gather-for-generation``) keeps the least memory.
    FSDP2 keeps each layer gathered from its first forward pass to the end of the block. ZeRO-3 goes through TRL's
    ``unwrap_model_for_generation``, which gathers every parameter and lifts DeepSpeed's per-module hooks
    meanwhile (it reaches into DeepSpeed's internals; TRL keeps it working across DeepSpeed releases).

    A peft model under FSDP2, gathered or not: peft's ``generate()`` calls the inner model, around the FSDP root,
    whose own hooks then never run. The root is initialised by a one-token forward pass and its own weights (the
    final norm's) are unsharded by hand for the block.
    """
    name = strategy(acc)
    if name == "zero3" and gather:
        from trl.models.utils import unwrap_model_for_generation

        with unwrap_model_for_generation(model, acc):
            yield
        return
    if name != "fsdp2":
        yield
        return
    from torch.distributed.fsdp import FSDPModule

    root = acc.unwrap_model(model)
    modules = [m for m in root.modules() if isinstance(m, FSDPModule)] if gather else []
    peft = hasattr(root, "get_base_model")
    for m in modules:
        m.set_reshard_after_forward(False, recurse=False)
    if peft:
        was_training = root.training
        root.eval()
        with torch.no_grad():
            root(input_ids=torch.zeros((1, 1), dtype=torch.long, device=acc.device))
        root.train(was_training)
        root.unshard()
    try:
        yield
    finally:
        after = bool(acc.state.fsdp_plugin.reshard_after_forward)
        for m in modules:  # the root keeps its weights after forward, as fully_shard sets it
            m.set_reshard_after_forward(after and m is not root, recurse=False)
            m.reshard()
        if peft and not modules:
            root.reshard()


@contextlib.contextmanager
def whole_weights_on_every_process() -> Iterator[None]:
    """Load a model whole on every process. Under an FSDP config with cpu_ram_efficient_loading, transformers
    loads the weights on rank 0 only (the others get empty 'meta' tensors until FSDP broadcasts them), which only
    FSDP's own preparation repairs: a model used unwrapped (Stage 1's sampler) needs its weights everywhere."""
    old = os.environ.pop("FSDP_CPU_RAM_EFFICIENT_LOADING", None)
    try:
        yield
    finally:
        if old is not None:
            os.environ["FSDP_CPU_RAM_EFFICIENT_LOADING"] = old


def full_state_dict(acc: Accelerator, model: Any) -> dict[str, torch.Tensor]:
    """The model's whole weights on rank 0 (empty elsewhere), on the CPU; every process must call it.

    FSDP2 is gathered here one tensor at a time (torch's get_model_state_dict, which accelerate calls, hands
    back the shards on a CPU mesh). A tied weight (lm_head.weight of a model that ties it to the input embedding)
    is kept once, under its first name, as save_pretrained does: DeepSpeed's copies no longer share storage.
    """
    unique = {n for n, _ in acc.unwrap_model(model).named_parameters()}
    unique |= {n for n, _ in acc.unwrap_model(model).named_buffers()}
    if strategy(acc) != "fsdp2":
        return {k: v for k, v in (acc.get_state_dict(model) or {}).items() if k in unique}  # None off rank 0
    from torch.distributed.tensor import DTensor

    out = {}
    for name, value in model.state_dict().items():
        if name not in unique:
            continue
        full = value.full_tensor() if isinstance(value, DTensor) else value
        if acc.is_main_process:
            out[name] = full.cpu()
    return out


def whole_weights(model: Any, dtype: torch.dtype | None = None) -> Iterator[tuple[str, torch.Tensor]]:
    """``model.state_dict()``'s tensors, each whole on every process, in its order, floating-point ones in ``dtype``
    when given: what each process's own generation engine loads after an optimizer step. Every process must
    consume the whole iterator.

    A DDP or ZeRO-2 model holds its tensors whole already: they are only cast. FSDP2's shards (DTensors) and
    ZeRO-3's partitions are cast first, so that a bfloat16 engine's weights move in bfloat16, and gathered
    several tensors at a time: one all-gather of the concatenated local pieces per bucket of up to
    :data:`BUCKET_BYTES` of whole tensors (a larger tensor is a bucket of its own), where one collective per
    tensor would pay a collective's latency hundreds of times per push. A process holds at most one bucket's whole
    tensors at a time, plus the all-gather's buffer.
    """
    from torch.distributed.tensor import DTensor

    params = dict(model.named_parameters(remove_duplicate=False))
    bucket: list[tuple[str, Any]] = []  # (name, ZeRO-3 parameter or FSDP2 DTensor) still to be gathered
    key: tuple = ()
    size = 0
    for name, value in model.state_dict().items():
        param = params.get(name)
        if param is not None and hasattr(param, "ds_id"):  # a ZeRO-3 partition
            value, shape = param, param.ds_shape
            item_key: tuple | None = ("zero3", _cast_dtype(param, dtype), id(param.ds_process_group))
        elif isinstance(value, DTensor) and _dim0_sharded(value):
            shape = value.shape
            item_key = ("fsdp2", _cast_dtype(value, dtype), value.device_mesh)
        else:
            item_key = None
        nbytes = 0 if item_key is None else shape.numel() * item_key[1].itemsize
        if bucket and (item_key != key or size + nbytes > BUCKET_BYTES):
            yield from _gather_bucket(bucket, key[1])
            bucket, size = [], 0
        if item_key is None:
            whole = value.full_tensor() if isinstance(value, DTensor) else value  # any other DTensor layout
            yield name, whole.to(_cast_dtype(whole, dtype))
            continue
        bucket.append((name, value))
        key, size = item_key, size + nbytes
    if bucket:
        yield from _gather_bucket(bucket, key[1])


BUCKET_BYTES = 256 * 2**20
"""The most bytes of whole tensors (in the engine's dtype) that :func:`whole_weights` gathers in one collective."""


def _cast_dtype(t: torch.Tensor, dtype: torch.dtype | None) -> torch.dtype:
    """The dtype ``t`` is sent in: ``dtype`` for floating-point tensors when given, else its own."""
    return dtype if dtype is not None and t.is_floating_point() else t.dtype


def _dim0_sharded(value: Any) -> bool:
    """An FSDP2 shard: rows of a tensor split over a one-dimensional mesh (``Shard(0)``)."""
    from torch.distributed.tensor import Shard

    return value.device_mesh.ndim == 1 and tuple(value.placements) == (Shard(0),) and value.dim() > 0


def _gather_bucket(bucket: list[tuple[str, Any]], dtype: torch.dtype) -> Iterator[tuple[str, torch.Tensor]]:
    """The bucket's tensors whole, in ``dtype``, from one all-gather of every process's pieces of them, in order.

    ZeRO-3: each process holds an equal slice (``ds_tensor``, padded) of the flattened parameter, process i the
    i-th. FSDP2 splits rows as ``torch.chunk`` does: ceil(rows / processes) each, in process order, so the last
    processes may hold fewer rows or none; each process's piece sizes follow from the global shapes, and the
    process's own are checked against them.
    """
    import torch.distributed as dist

    first = bucket[0][1]
    if hasattr(first, "ds_id"):
        group = first.ds_process_group
        world, rank = dist.get_world_size(group), dist.get_rank(group)
        locals_ = [p.ds_tensor.reshape(-1) for _, p in bucket]
        # rows of one element: process r holds elements [r * n, (r + 1) * n) of the flattened parameter
        pieces = [[t.numel()] * world for t in locals_]
        device = torch.device(_zero3_device())
    else:
        mesh = first.device_mesh
        group, world, rank = mesh.get_group(), mesh.size(), mesh.get_local_rank()
        locals_ = [v.to_local() for _, v in bucket]
        pieces = []
        for _, v in bucket:
            rows, row = v.shape[0], v.shape[1:].numel()
            step = -(-rows // world)
            pieces.append([max(0, min(step, rows - r * step)) * row for r in range(world)])
        device = locals_[0].device
        for (name, _), t, sizes in zip(bucket, locals_, pieces):
            if t.numel() != sizes[rank]:
                raise RuntimeError(f"{name}: this process holds {t.numel()} elements of its FSDP2 shard, the "
                                   f"row split (torch.chunk) gives {sizes[rank]}")
    per_rank = [sum(sizes[r] for sizes in pieces) for r in range(world)]
    longest = max(per_rank)
    send = torch.zeros(longest, dtype=dtype, device=device)
    torch.cat([t.reshape(-1).to(device=device, dtype=dtype) for t in locals_], out=send[:per_rank[rank]])
    received = torch.empty(world * longest, dtype=dtype, device=device)
    dist.all_gather_into_tensor(received, send, group=group)
    parts = [received[r * longest:r * longest + per_rank[r]].split([sizes[r] for sizes in pieces])
             for r in range(world)]
    for i, (name, value) in enumerate(bucket):
        shape = value.ds_shape if hasattr(value, "ds_id") else value.shape
        whole = torch.cat([parts[r][i] for r in range(world)])[:shape.numel()]  # ZeRO-3: the padding cut off
        yield name, whole.view(shape)


def _zero3_device() -> str:
    """Where DeepSpeed gathers ZeRO-3 parameters (its partitions may be offloaded to the CPU)."""
    from deepspeed.accelerator import get_accelerator

    return get_accelerator().current_device_name()


def as_float(x: Any) -> float:
    """A gradient norm as a float: FSDP2 returns a replicated DTensor."""
    if hasattr(x, "full_tensor"):
        x = x.full_tensor()
    return float(x)
