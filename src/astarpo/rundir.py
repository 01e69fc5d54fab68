"""Output folders that survive kills: writability probe, atomic writes, settings guard, log truncation.

Every command (values, train, eval, bench) writes through these, so that a crash or a SIGKILL leaves either the
old file or the new one, never half of one, and a rerun of the same command resumes instead of mixing runs.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any


class OutputError(RuntimeError):
    """The output location cannot be written, or holds the results of a run with other settings."""


def check_writable(directory: Path) -> None:
    """Fail before any model loading or sampling if results could not be saved (read-only, full, a file in the
    way): a 4 KiB probe file, synced."""
    try:
        directory.mkdir(parents=True, exist_ok=True)
        probe = directory / f".astarpo-write-test-{os.getpid()}"
        with open(probe, "wb") as f:
            f.write(b"0" * 4096)
            f.flush()
            os.fsync(f.fileno())
        probe.unlink()
    except OSError as e:
        reason = "Not a directory" if directory.exists() and not directory.is_dir() else e.strerror or str(e)
        raise OutputError(f"cannot write to {directory} ({reason}); choose a writable output location "
                          "with free space") from e


@contextlib.contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """Yield a temporary sibling of ``path`` (file or folder) to write; it replaces ``path`` only once complete."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True) if tmp.is_dir() else tmp.unlink(missing_ok=True)
    yield tmp
    if path.is_dir() and tmp.is_dir():
        shutil.rmtree(path)  # a folder cannot be renamed over a non-empty one
    os.replace(tmp, path)


def write_text_atomic(path: Path, text: str) -> None:
    """Write via a temporary file and a rename, so an interrupted run never leaves a half-written file."""
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def write_json_atomic(path: Path, data: Any) -> None:
    write_text_atomic(path, json.dumps(data, indent=1))


def diff_settings(old: dict, new: dict, ignore: tuple[str, ...] = ()) -> str:
    """``key: old -> new`` for every setting of ``new`` that ``old`` has otherwise; empty when they agree."""
    keys = [k for k in new if k not in ignore and old.get(k) != new.get(k)]
    return ", ".join(f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in keys)


def check_same_settings(path: Path, settings: dict[str, Any], fix: str) -> None:
    """Refuse to mix two runs: ``path`` (a JSON file of settings), if present, must hold ``settings``."""
    if path.is_file():
        diff = diff_settings(json.loads(path.read_text()), settings)
        if diff:
            raise OutputError(f"{path.parent} holds a run with other settings ({diff}); {fix}")


def truncate_jsonl(path: Path, last_step: int) -> None:
    """Keep the lines of steps 1..``last_step`` (none when 0): a resumed run logs the later ones again, and a kill
    mid-line leaves half a line, which is dropped too."""
    if not path.is_file():
        return
    keep = [ln for ln in path.read_text().splitlines() if last_step > 0 and _logged_step(ln) <= last_step]
    write_text_atomic(path, "".join(ln + "\n" for ln in keep))


def _logged_step(line: str) -> float:
    try:
        return json.loads(line)["step"]
    except (json.JSONDecodeError, KeyError, TypeError):
        return math.inf
