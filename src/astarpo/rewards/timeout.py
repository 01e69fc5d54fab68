"""Run grader calls in worker processes, each call under a wall-clock limit.

Why processes: a symbolic grader can hang on hostile model output (``\\boxed{9^{9^{9^{9}}}}``), often inside C code
that no Python-level timeout can interrupt, and ``signal.alarm`` only works in the main thread. A worker that
misses its deadline is killed and replaced, and the call scores ``default``. So grading never hangs, never raises
on a bad completion, and works from any thread or process (daemonic ``multiprocessing`` workers included).

Workers are plain ``subprocess`` children speaking length-prefixed pickle over their stdin/stdout, so the caller
needs no ``if __name__ == "__main__"`` guard (unlike ``multiprocessing`` spawn) and nothing is forked from a
process that may hold CUDA or thread locks. They are persistent: start-up (importing sympy) is paid once.
The function must be importable by reference (a module-level function); only the code is shared, never state.

Linux and macOS only (``os.read`` on pipes, ``setitimer``).
"""

from __future__ import annotations

import atexit
import importlib
import logging
import os
import pickle
import signal
import struct
import subprocess
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from multiprocessing.connection import wait
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

DEFAULT_TIMEOUT_S = 5.0
STARTUP_TIMEOUT_S = 120.0  # importing sympy on a loaded machine; a worker slower than this is a setup problem
MEMORY_LIMIT_MB = 4096  # address-space cap per worker, so a hostile expression cannot exhaust the host's memory
_HEADER = struct.Struct("!Q")
_PACKAGE_DIR = str(Path(__file__).resolve().parents[1])

# The worker imports astarpo.rewards.* without running astarpo/__init__.py, which pulls in torch (seconds and
# hundreds of MB per worker) that graders never need: a bare package object pointing at the same directory stands
# in for it.
_BOOT = (
    "import sys, types\n"
    "pkg = types.ModuleType('astarpo'); pkg.__path__ = [sys.argv[1]]; sys.modules.setdefault('astarpo', pkg)\n"
    "from astarpo.rewards.timeout import _worker_main\n"
    "_worker_main(sys.argv[2:])\n"
)


class GraderPoolError(RuntimeError):
    """A worker process could not be started (an installation problem, not a bad completion)."""


def default_workers() -> int:
    """Worker processes per pool: ``$ASTARPO_GRADER_WORKERS``, else one per usable core, at most 8.

    The caller only dispatches while a batch is graded (~0.1 ms per call), so every core can grade: on 2 cores,
    500 MATH500 answers graded at 238/s with 1 worker and 405/s with 2 (in-process, no time limit: 222/s). A math
    grade costs a worker ~4 ms, so 8 workers keep up with any generation speed; more would only add start-up
    time and memory.
    """
    env = os.environ.get("ASTARPO_GRADER_WORKERS")
    if env:
        return max(1, int(env))
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, min(cores, 8))


# ---------------------------------------------------------------------------------------------------------------
# Wire format: 8-byte big-endian length, then a pickle.


def _send(fd: int, obj: Any) -> None:
    data = pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)
    view = memoryview(_HEADER.pack(len(data)) + data)
    while view:
        view = view[os.write(fd, view):]


def _read_exact(fd: int, n: int) -> bytes | None:
    chunks, left = [], n
    while left:
        chunk = os.read(fd, min(left, 1 << 20))
        if not chunk:
            return None  # EOF: the other side exited
        chunks.append(chunk)
        left -= len(chunk)
    return b"".join(chunks)


def _recv_bytes(fd: int) -> bytes | None:
    header = _read_exact(fd, _HEADER.size)
    if header is None:
        return None
    return _read_exact(fd, _HEADER.unpack(header)[0])


# ---------------------------------------------------------------------------------------------------------------
# Worker side.


def _worker_main(preload: Sequence[str]) -> None:
    """Serve calls until the parent goes away. Runs in the child process."""
    try:
        _serve(preload)
    except BrokenPipeError:  # the parent exited or dropped us
        pass


def _serve(preload: Sequence[str]) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle; it kills us on exit
    signal.signal(signal.SIGALRM, signal.SIG_DFL)  # the backstop timer below terminates the process
    out_fd = os.dup(1)
    os.dup2(2, 1)  # stray prints from graded code must not corrupt the protocol: send them to stderr
    try:
        import resource

        cap = MEMORY_LIMIT_MB * 2**20
        resource.setrlimit(resource.RLIMIT_AS, (cap, cap))
    except (ImportError, ValueError, OSError):
        pass
    for name in preload:
        importlib.import_module(name)
    _send(out_fd, ("ready", os.getpid()))
    while True:
        raw = _recv_bytes(0)
        if raw is None:
            return  # parent closed our stdin (or died): exit
        try:
            fn, args, backstop_s = pickle.loads(raw)
            # Backstop for an orphaned worker (parent killed hard): SIGALRM's default action ends the process
            # even inside C code. While the parent lives, it kills us at the deadline, well before this fires.
            signal.setitimer(signal.ITIMER_REAL, backstop_s)
            reply = ("ok", fn(*args))
        except BaseException as e:  # noqa: BLE001 - any failure of graded code is reported, never fatal
            reply = ("error", type(e).__name__)  # not str(e): printing a huge sympy object can itself hang
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)
        try:
            _send(out_fd, reply)
        except (pickle.PicklingError, TypeError, AttributeError):  # an unpicklable result
            _send(out_fd, ("error", "unpicklable result"))


# ---------------------------------------------------------------------------------------------------------------
# Parent side.


class _Worker:
    def __init__(self, preload: Sequence[str]) -> None:
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(p or os.getcwd() for p in sys.path)  # same imports as the parent
        self.proc = subprocess.Popen([sys.executable, "-c", _BOOT, _PACKAGE_DIR, *preload],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env, bufsize=0)
        self.rfd = self.proc.stdout.fileno()
        self.wfd = self.proc.stdin.fileno()
        self.ready = False
        self.task: int | None = None  # index of the item being graded
        self.deadline = time.monotonic() + STARTUP_TIMEOUT_S

    def kill(self) -> None:
        self.proc.kill()
        self.proc.wait()
        self.proc.stdin.close()
        self.proc.stdout.close()


class WorkerPool:
    """Persistent worker processes that call a function on many argument tuples, each call with a deadline.

    Thread-safe: concurrent ``map`` calls take turns. After a ``fork`` the child starts its own workers.
    """

    def __init__(self, workers: int | None = None, preload: Sequence[str] = ()) -> None:
        self.max_workers = workers or default_workers()
        self.preload = tuple(preload)
        self._workers: list[_Worker] = []
        self._lock = threading.Lock()
        self._pid = os.getpid()

    def map(self, fn: Callable[..., Any], items: Sequence[tuple], timeout: float = DEFAULT_TIMEOUT_S,
            default: Any = 0.0) -> list[Any]:
        """``[fn(*args) for args in items]``; a call that raises or runs past ``timeout`` seconds gives ``default``."""
        if not items:
            return []
        with self._lock:
            if os.getpid() != self._pid:  # forked: the workers belong to the parent process
                self._workers, self._pid = [], os.getpid()
            try:
                return self._map(fn, items, timeout, default)
            except BaseException:  # e.g. KeyboardInterrupt: busy workers would answer the next map with stale results
                for w in [w for w in self._workers if w.task is not None]:
                    self._replace(w)
                raise

    def _map(self, fn: Callable[..., Any], items: Sequence[tuple], timeout: float, default: Any) -> list[Any]:
        results = [default] * len(items)
        pending = deque(range(len(items)))
        failures: dict[str, int] = {}
        while len(self._workers) < min(len(items), self.max_workers):
            self._workers.append(_Worker(self.preload))
        while pending or any(w.task is not None for w in self._workers):
            for w in self._workers:  # hand out work
                if w.ready and w.task is None and pending:
                    i = pending.popleft()
                    try:
                        _send(w.wfd, (fn, tuple(items[i]), 2 * timeout + 1))
                    except OSError:  # the idle worker died since the last call: retry the item on a new one
                        pending.appendleft(i)
                        self._replace(w)
                        continue
                    w.task, w.deadline = i, time.monotonic() + timeout
            waiting = [w for w in self._workers if w.task is not None or not w.ready]
            wait_s = max(0.0, min(w.deadline for w in waiting) - time.monotonic())
            readable = set(wait([w.rfd for w in waiting], timeout=wait_s))
            for w in list(waiting):
                if w.rfd in readable:
                    self._on_message(w, results, failures)
                elif time.monotonic() >= w.deadline:
                    if not w.ready:
                        self._replace(w)
                        raise GraderPoolError(f"grader worker did not start within {STARTUP_TIMEOUT_S:.0f} s")
                    failures["timeout"] = failures.get("timeout", 0) + 1
                    self._replace(w)
        if failures:
            summary = ", ".join(f"{n} {why}" for why, n in sorted(failures.items()))
            log.warning("%s: %d of %d call(s) scored %r (%s)", getattr(fn, "__name__", fn), sum(failures.values()),
                        len(items), default, summary)
        return results

    def _on_message(self, w: _Worker, results: list[Any], failures: dict[str, int]) -> None:
        raw = _recv_bytes(w.rfd)
        if raw is None:  # the worker exited: crashed, hit its memory cap, or failed to start
            if not w.ready:
                code = w.proc.wait()
                self._replace(w)
                raise GraderPoolError(f"grader worker exited with code {code} while starting; "
                                      "see its error output above")
            failures["worker died"] = failures.get("worker died", 0) + 1
            self._replace(w)
            return
        status, value = pickle.loads(raw)
        if status == "ready":
            w.ready = True
        elif status == "ok":
            results[w.task] = value
        else:
            failures[value] = failures.get(value, 0) + 1
        w.task = None

    def _replace(self, w: _Worker) -> None:
        w.kill()
        self._workers[self._workers.index(w)] = _Worker(self.preload)

    def close(self) -> None:
        """Stop the worker processes (a later ``map`` starts new ones)."""
        with self._lock:
            if os.getpid() == self._pid:
                for w in self._workers:
                    w.kill()
            self._workers = []


_POOLS: dict[tuple[int, tuple[str, ...]], WorkerPool] = {}
_POOLS_LOCK = threading.Lock()


def run_with_timeout(fn: Callable[..., Any], items: Sequence[tuple], timeout: float = DEFAULT_TIMEOUT_S,
                     default: Any = 0.0, workers: int | None = None) -> list[Any]:
    """``[fn(*args) for args in items]`` in a shared worker pool, each call limited to ``timeout`` seconds.

    A call that raises, crashes its worker or overruns gives ``default``. ``fn`` must be a module-level function;
    its module is imported in each worker at start-up, so imports do not count against the first call's limit.
    """
    key = (workers or default_workers(), (fn.__module__,))
    with _POOLS_LOCK:
        pool = _POOLS.get(key)
        if pool is None:
            pool = _POOLS[key] = WorkerPool(key[0], preload=key[1])
    return pool.map(fn, items, timeout=timeout, default=default)


@atexit.register
def close_pools() -> None:
    """Stop every shared pool's workers (also run at interpreter exit)."""
    with _POOLS_LOCK:
        pools = list(_POOLS.values())
        _POOLS.clear()
    for pool in pools:
        pool.close()
