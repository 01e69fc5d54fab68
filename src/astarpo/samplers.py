"""Which generation engine a command gets, and the launch layout that engine implies.

``cfg.engine`` hf: :class:`~astarpo.generation.HFSampler` (Hugging Face ``generate`` on a model this process
holds); vllm with ``vllm_mode`` colocate: :class:`~astarpo.engines.VLLMSampler` (a vLLM engine inside every
process, or inside each tensor-parallel group of processes); vllm with ``vllm_mode`` server:
:class:`~astarpo.serve.ServerSampler` (the client of one ``astarpo serve`` engine in its own processes). The
commands ask the class what it can do (:class:`~astarpo.generation.Sampler`), never the engine's name.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .config import CommonConfig
from .engines import ALONE_GPU_SHARE, VLLMSampler, vllm_sampler
from .generation import HFSampler, Sampler
from .launch import Launch
from .models import eos_ids
from .serve import ServerSampler


def sampler_class(cfg: CommonConfig) -> type[Sampler]:
    """The class of the engine ``cfg`` asks for, which the commands ask what it needs before one is built."""
    if cfg.engine == "hf":
        return HFSampler
    return ServerSampler if cfg.vllm_mode == "server" else VLLMSampler


def layout(cfg: CommonConfig) -> Launch:
    """This process's launch, its engines as large as ``cfg``'s engine runs them (and the layout checked)."""
    return Launch.current(sampler_class(cfg).processes_per_engine(cfg))


def make_sampler(cfg: CommonConfig, model_dir: str | Path, tokenizer: Any, model: Any = None, *,
                 gpu_share: float = ALONE_GPU_SHARE, launch: Launch | None = None) -> Sampler:
    """The engine ``cfg`` asks for. ``model`` is the HF model an ``hf`` sampler samples from, and the weights a
    vLLM engine takes where ``model_dir`` is not what it loads itself (a LoRA checkpoint, a checkpoint evaluated
    through a server). ``gpu_share``: a colocated vLLM engine's share of each GPU, as the caller knows what else
    is there. ``launch``: the command's (:func:`layout` when not given)."""
    cls = sampler_class(cfg)
    if cls is HFSampler:
        return HFSampler(model, tokenizer, eos_ids(model, tokenizer), cfg.generation_batch_size)
    launch = launch or layout(cfg)
    if cls is ServerSampler:
        return ServerSampler(cfg, model_dir, tokenizer, launch, model)
    return vllm_sampler(cfg, model_dir, tokenizer, model, gpu_share=gpu_share, launch=launch)
