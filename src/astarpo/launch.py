"""The layout of a launch: which process runs which engine, who does which part of the work, who writes, how the
processes talk, and how a command ends. Every command builds one :class:`Launch` and goes through it; nothing else
in the package works out ranks, splits or the exit order.

One process (``python -m astarpo``, a script) is a launch of one: every split is the whole work, every collective
returns its input. Under ``accelerate launch`` (or torchrun) of W processes, the unit of sampling is the *engine*:
with a generation engine over t processes (vLLM's tensor parallelism; t = 1 for the HF engine), processes
t*e ... t*e + t - 1 run engine e together, as vLLM's tensor-parallel groups are consecutive ranks. vLLM's external
launcher runs a scheduler in every process of an engine and relies on them all being given the same requests and
drawing the same random numbers, so an engine's processes do the same sampling work with the same seed, and the
first of them (:attr:`Launch.speaks`) keeps what it produced.

Two splits of work, each where it is needed:

- **Training rows** (:meth:`Launch.process_rows`): process r takes positions r, r + W, ... of a step's batch, so
  that every mini-batch holds an equal share for every process (under FSDP2 and ZeRO-3 each forward pass is a
  collective all processes must join); its engine samples the rows of all its processes
  (:meth:`Launch.engine_rows`).
- **Everything else split over engines** (Stage 1's shards, eval's prompts: :meth:`Launch.engine_block`):
  contiguous blocks, the first engines one item more; a gather in engine order gives the items back in order.

This module imports no engine: an engine that must be cleaned up before the process group goes registers a
callback (:func:`at_finish`), which :func:`finish` runs.
"""

from __future__ import annotations

import atexit
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from accelerate import PartialState
from accelerate.utils import gather_object, reduce


class LayoutError(RuntimeError):
    """The launch's processes do not divide into the engines the settings ask for; the message says what to run."""


def cpu_processes() -> bool:
    """True when launched as several processes on a machine without CUDA: accelerate then needs ``cpu=True``
    to join them over gloo (otherwise each process would run alone)."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1 and not torch.cuda.is_available()


def blocks(n: int, parts: int) -> list[range]:
    """``n`` items in ``parts`` contiguous blocks, in order, the first ``n % parts`` one item longer."""
    per, extra = divmod(n, parts)
    starts = [p * per + min(p, extra) for p in range(parts + 1)]
    return [range(starts[p], starts[p + 1]) for p in range(parts)]


@dataclass(frozen=True)
class Launch:
    """This process's place in the launch (see the module's docstring); a launch of one by default."""

    process_index: int = 0
    processes: int = 1
    local_index: int = 0  # on this machine: the device this process uses
    engine_index: int = 0
    engines: int = 1

    @classmethod
    def current(cls, processes_per_engine: int = 1) -> Launch:
        """This process's launch, with engines of ``processes_per_engine`` processes. The one check of the engine
        layout, which every command makes before any model loads: a :class:`LayoutError` when the processes do
        not divide into such engines, or a single process asks for an engine over several. A single process would
        get vLLM's own worker processes, which sample with their own random streams (a shard's seed never reaches
        them) and which a policy's weights cannot be pushed into; a launch of that many processes runs the same
        engine inside them."""
        state = PartialState(cpu=cpu_processes())
        size, world = processes_per_engine, state.num_processes
        if world % size:
            how = "a single process" if world == 1 else f"the number of processes ({world}) must be a multiple of it"
            raise LayoutError(f"vllm_tensor_parallel_size {size} runs one engine over {size} processes of a launch, "
                              f"each seeding it and pushing the policy's weights into its part of it; {how}: "
                              f"accelerate launch --num_processes {size} (or a multiple of it) -m astarpo ...")
        return cls(state.process_index, world, state.local_process_index, state.process_index // size, world // size)

    @property
    def per_engine(self) -> int:
        return self.processes // self.engines

    @property
    def speaks(self) -> bool:
        """The first process of its engine: the one that keeps (writes, gathers) what the engine produced."""
        return self.process_index % self.per_engine == 0

    @property
    def is_main(self) -> bool:
        """The one process that writes the command's result and prints."""
        return self.process_index == 0

    @property
    def device(self) -> torch.device:
        """The device this process computes on."""
        return PartialState(cpu=cpu_processes()).device

    @property
    def engine_processes(self) -> range:
        """The processes that run this process's engine."""
        first = self.engine_index * self.per_engine
        return range(first, first + self.per_engine)

    # ----- splits of work --------------------------------------------------------------------------------------
    def process_rows(self, n: int) -> list[int]:
        """This process's positions among ``n`` training rows: every W-th from its index."""
        return list(range(self.process_index, n, self.processes))

    def engine_rows(self, n: int) -> list[int]:
        """The positions among ``n`` training rows that this process's engine samples: its processes' rows."""
        return [g for g in range(n) if g % self.processes // self.per_engine == self.engine_index]

    def engine_block(self, n: int) -> range:
        """This engine's contiguous block of ``n`` items (Stage 1's shards, eval's prompts)."""
        return blocks(n, self.engines)[self.engine_index]

    # ----- collectives (in a launch of one: the input itself) ---------------------------------------------------
    def all_sum(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` summed over the processes, on the CPU."""
        return reduce(x.to(PartialState().device), "sum").cpu() if self.processes > 1 else x

    def all_rows(self, x: torch.Tensor) -> torch.Tensor:
        """Every process's rows of ``x``, concatenated in process order."""
        return torch.cat(gather_object([x])) if self.processes > 1 else x

    def gather(self, item: Any) -> list[Any]:
        """Every process's ``item``, in process order."""
        return gather_object([item]) if self.processes > 1 else [item]

    def gather_engines(self, items: list[Any]) -> list[Any]:
        """Every engine's ``items`` (from its speaking process), concatenated in engine order: with
        :meth:`engine_block`, the items of all blocks in order."""
        if self.engines == 1:
            return items
        return [x for part in gather_object([items] if self.speaks else []) for x in part]

    def broadcast(self, item: Any) -> Any:
        """The main process's ``item``, on every process."""
        if self.processes == 1:
            return item
        from accelerate.utils import broadcast_object_list

        return broadcast_object_list([item])[0]

    def any(self, flag: bool) -> bool:
        """True on every process when ``flag`` is on one of them."""
        return any(self.gather(flag))

    def barrier(self) -> None:
        """Every process waits here for the others."""
        if self.processes > 1:
            PartialState().wait_for_everyone()


def is_main_process() -> bool:
    """Whether this process writes and prints (outside a command's :class:`Launch`: the CLI's output)."""
    return PartialState(cpu=cpu_processes()).is_main_process


_AT_FINISH: list[Callable[[], None]] = []


def at_finish(callback: Callable[[], None]) -> None:
    """Have :func:`finish` call ``callback`` (once) while the launch's process group still exists: an engine whose
    own process groups are built over the launch's registers how to destroy them."""
    if callback not in _AT_FINISH:
        _AT_FINISH.append(callback)


def finish() -> None:
    """End a command, or a script that ran astarpo under a launch (its last line), on every process, in a fixed
    order: the processes wait for each other (none leaves while another is still in a collective with it); the
    callbacks of :func:`at_finish` run (an engine's process groups go while the launch's still exists); then the
    launch's process group is destroyed and the process ends here (:func:`_exit`). In a single process the
    callbacks run and it returns: a single process's engine owns a world of one and stays for reuse, so the
    callbacks leave it."""
    multi = int(os.environ.get("WORLD_SIZE", "1")) > 1
    if multi:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            dist.barrier()
    for callback in _AT_FINISH:
        callback()
    if multi:
        _exit()


def _exit() -> None:
    """Leave the process group and end this process once its command has succeeded.

    1. Destroy the launch's process group if it exists.
    2. Run the ``atexit`` handlers (logging, the reward worker pools, ``weakref.finalize``) and flush stdout and
       stderr, then ``os._exit(0)``: no interpreter finalization, no C++ static destructors. The work is done and
       saved by then; a thread still running is stopped, not waited for.

    Why: gloo's worker threads release the work objects of the last collectives a little after those collectives
    have returned, and a late release during interpreter finalization aborts the process after all its work is
    done. Gloo's barrier holds the collectives issued before it (here the all-gathers of the final weights under
    FSDP2 and ZeRO-3); destroying them drops tensors whose Python objects need the GIL; a thread that asks for the
    GIL while the interpreter finalizes is ended inside that C++ destructor, and ``std::terminate`` aborts:
    "terminate called without an active exception", SIGABRT, on the rank that leaves right after its last
    collective. Core dump of a reproduction (two gloo processes, FSDP2, rank 0 leaving just after rank 1; rare, on
    busy cores): ``ProcessGroupGloo::runLoop`` > ``~AsyncBarrierWork`` > ``~AsyncAllgatherCoalescedWork`` >
    ``TensorImpl::decref_pyobject`` > ``gil_scoped_acquire`` > ``take_gil`` > ``PyThread_exit_thread`` >
    ``std::terminate``, with the main thread in ``Py_FinalizeEx``. ``destroy_process_group`` cannot prevent it:
    the groups even outlive it, held by the DDP reducer, FSDP2's mesh and DeepSpeed, threads included. With
    ``os._exit`` the interpreter never finalizes, so a late release takes the GIL as usual, or the process has
    ended first.
    """
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        stream.flush()
    os._exit(0)


def end_failed_process(code: int = 1, traceback: bool = True) -> None:
    """Under a multi-process launch, end this process at once after a failure (called inside the ``except``
    block), with the whole traceback on stderr unless the caller printed a message of its own. The other processes
    may be waiting for this one in a collective (the weight push's gathers, a step's all-gather, a broadcast of the
    server's samples): the launcher stops them as soon as this one exits, whereas a normal exit could itself wait
    on the process group's threads (see :func:`_exit`) and leave them to the collective's timeout. In a single
    process it returns, and the caller goes on."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return
    if traceback:
        import traceback as tb

        tb.print_exc()
        print(f"astarpo: process {os.environ.get('RANK', '?')} failed (above); ending it so that the launch stops",
              file=sys.stderr)
    for stream in (sys.stdout, sys.stderr):
        stream.flush()
    os._exit(code)
