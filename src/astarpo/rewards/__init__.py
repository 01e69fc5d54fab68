"""Reward functions ("verifiers"), looked up by name.

A reward function has TRL's signature::

    f(prompts: list[str], completions: list[str], **columns) -> list[float]

where ``columns`` holds the dataset's other columns (``answer`` always among them), one value per completion.
Any Python callable with that signature works wherever a reward name is accepted.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from math import isfinite, nan
from typing import Any

RewardFn = Callable[..., list[float]]

_REGISTRY: dict[str, RewardFn] = {}
log = logging.getLogger(__name__)


class RewardError(RuntimeError):
    """A reward function raised, returned the wrong number of values, or returned NaN/inf."""


def register(name: str) -> Callable[[RewardFn], RewardFn]:
    """Decorator: make ``fn`` reachable as ``astarpo.rewards.get(name)`` and ``--reward name``."""

    def deco(fn: RewardFn) -> RewardFn:
        _REGISTRY[name] = fn
        fn.reward_name = name  # type: ignore[attr-defined]
        return fn

    return deco


def names() -> list[str]:
    _load_builtins()
    return sorted(_REGISTRY)


def get(name: str) -> RewardFn:
    """The registered reward called ``name``."""
    _load_builtins()
    if name not in _REGISTRY:
        raise KeyError(f"unknown reward {name!r}; choose one of {', '.join(sorted(_REGISTRY))} "
                       "or pass a Python callable f(prompts, completions, **columns) -> list[float]")
    return _REGISTRY[name]


def resolve(reward: str | RewardFn) -> tuple[str, RewardFn]:
    """(name, function) for a registry name or a callable; the name goes into the values file's provenance."""
    if callable(reward):
        name = getattr(reward, "reward_name", None) or f"{reward.__module__}.{reward.__qualname__}"
        return name, reward
    return reward, get(reward)


def score(
    fn: RewardFn,
    prompts: Sequence[str],
    completions: Sequence[str],
    columns: dict[str, Sequence[Any]],
    on_error: str = "raise",
) -> list[float]:
    """Call ``fn`` and check what it returns.

    A reward that raises, returns the wrong number of values, or a NaN/inf is a bug that would silently
    corrupt V* or the loss. With ``on_error="raise"`` it stops the run with a one-line message; with
    ``on_error="skip"`` the affected samples come back as NaN for the caller to drop and count.
    """
    n = len(completions)
    try:
        out = fn(prompts=list(prompts), completions=list(completions), **{k: list(v) for k, v in columns.items()})
    except Exception as e:  # noqa: BLE001 - any failure of user code is reported the same way
        if on_error == "skip":
            log.warning("reward function raised %s: %s; skipping %d samples", type(e).__name__, e, n)
            return [nan] * n
        raise RewardError(f"reward function raised {type(e).__name__}: {e} "
                          "(fix the reward, or pass --on-reward-error skip to drop such samples)") from e
    out = list(out)
    if len(out) != n:
        raise RewardError(f"reward function returned {len(out)} values for {n} completions; "
                          "it must return one float per completion")
    vals = []
    for v in out:
        v = float(v)
        if not isfinite(v):
            if on_error != "skip":
                raise RewardError(f"reward function returned {v} (not finite); return a finite float, "
                                  "or pass --on-reward-error skip to drop such samples")
            v = nan
        vals.append(v)
    return vals


def score_records(fn: RewardFn, records: Sequence[dict[str, Any]], completions: Sequence[str],
                  on_error: str = "raise") -> list[float]:
    """:func:`score` for one completion per record: the prompt, and every column but ``id``, from the record."""
    extra = [c for c in records[0] if c not in ("id", "prompt")] if records else []
    return score(fn, [r["prompt"] for r in records], completions, {c: [r[c] for r in records] for c in extra},
                 on_error)


def _load_builtins() -> None:
    from . import arithmetic, gsm8k, math  # noqa: F401 - they register themselves
