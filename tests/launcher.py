"""`astarpo` under `accelerate launch` with two CPU processes, for the multi-process tests.

Every launch has a time limit: a hang between processes fails the test, and the whole process tree is killed. A
failed or hung launch shows the launcher's last lines and then the last lines of each rank's own output
(torchrun's per-rank logs, ``--log_dir`` with ``--tee 3``), not only which rank died.
"""

from __future__ import annotations

import itertools
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
LIMIT_S = 300
_launches = itertools.count()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rank_logs(log_dir: Path, lines: int = 40) -> str:
    """The last ``lines`` lines of every rank's own stdout and stderr (``DIR/<run>/attempt_<n>/<rank>/std*.log``):
    the dying process's message is otherwise interleaved with the other rank's output, or cut off."""
    out = []
    for f in sorted(Path(log_dir).glob("*/attempt_*/*/std*.log")):
        tail = f.read_text(errors="replace").splitlines()[-lines:]
        out.append(f"----- rank {f.parent.name}, {f.stem}: last {len(tail)} lines -----\n" + "\n".join(tail))
    return "\n".join(out) or f"(no per-rank logs under {log_dir})"


def rank_stderr(log_dir: Path) -> dict[int, list[str]]:
    """Every rank's own stderr lines (``DIR/<run>/attempt_<n>/<rank>/stderr.log``), where astarpo logs: what each
    process did, when the result is the same whichever process did it."""
    return {int(f.parent.name): f.read_text(errors="replace").splitlines()
            for f in sorted(Path(log_dir).glob("*/attempt_*/*/stderr.log"))}


def command(strategy: str, args: list[str], log_dir: Path, script: Path | None = None) -> list[str]:
    """``astarpo ARGS`` (or ``python SCRIPT ARGS``) in two processes under the shipped accelerate config of
    ``strategy``."""
    config = ROOT / "configs" / "accelerate" / f"{strategy}_1node_8gpu.yaml"
    program = [str(script)] if script is not None else ["-m", "astarpo"]
    return [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(config), "--num_processes", "2",
            "--main_process_port", str(_free_port()), "--log_dir", str(log_dir), "--tee", "3", *program, *args]


def kill_tree(proc: subprocess.Popen) -> None:
    """The launcher and every worker: torchrun's workers outlive a killed launcher. The shared-memory files they had
    mapped (a vLLM engine's message queue and CPU communicator) are removed too: a killed process cannot, and each
    would stay in /dev/shm until the machine restarts."""
    try:
        procs = [psutil.Process(proc.pid), *psutil.Process(proc.pid).children(recursive=True)]
    except psutil.NoSuchProcess:
        return
    shared = set()
    for p in procs:
        try:
            shared |= {m.path for m in p.memory_maps() if m.path.startswith("/dev/shm/")}
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            pass
    for p in procs:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass
    proc.wait()
    psutil.wait_procs(procs, timeout=10)
    for path in shared:
        Path(path).unlink(missing_ok=True)


def _log_dir(cwd: Path, strategy: str, args: list[str]) -> Path:
    return cwd / "launch-logs" / f"{next(_launches):02d}-{strategy}-{args[0]}"


def launch(strategy: str, args: list[str], cwd: Path, ok: bool = True, env: dict[str, str] | None = None,
           script: Path | None = None, logs: Path | None = None) -> str:
    """Run ``astarpo ARGS`` (or ``SCRIPT ARGS``) in two processes under ``strategy``; its stderr. Each rank's
    output is kept under ``logs`` (default: a new folder under ``cwd/launch-logs``)."""
    logs = logs or _log_dir(cwd, strategy, args)
    with subprocess.Popen(command(strategy, args, logs, script), cwd=cwd, env=env or ENV, stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True) as proc:
        try:
            _, err = proc.communicate(timeout=LIMIT_S)
        except subprocess.TimeoutExpired:
            kill_tree(proc)
            pytest.fail(f"{strategy}: `astarpo {args[0]}` did not finish in {LIMIT_S} s (processes out of step?)\n"
                        f"{rank_logs(logs)}")
    if ok:
        assert proc.returncode == 0, f"{strategy}: {err[-3000:]}\n{rank_logs(logs)}"
    else:
        assert proc.returncode != 0
    return err


def launch_and_kill(strategy: str, args: list[str], cwd: Path, until: Path, env: dict[str, str] | None = None) -> None:
    """Launch ``astarpo ARGS`` and kill every process as soon as ``until`` exists (a checkpoint)."""
    logs = _log_dir(cwd, strategy, args)
    with subprocess.Popen(command(strategy, args, logs), cwd=cwd, env=env or ENV, stdout=subprocess.DEVNULL,
                          stderr=subprocess.DEVNULL) as proc:
        deadline = time.monotonic() + LIMIT_S
        while not until.exists():
            if proc.poll() is not None or time.monotonic() > deadline:
                kill_tree(proc)
                pytest.fail(f"the run ended or hung before {until.name} existed\n{rank_logs(logs)}")
            time.sleep(0.02)
        kill_tree(proc)
