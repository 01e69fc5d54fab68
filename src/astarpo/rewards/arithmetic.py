"""Reward for the built-in arithmetic task: 1 when the last number in the response equals the answer."""

from __future__ import annotations

import re

from . import register

_NUMBER = re.compile(r"-?\d+(?:\.\d+)?")


def last_number(text: str) -> float | None:
    """The last number written in ``text`` (thousands separators ignored), or None."""
    found = _NUMBER.findall(text.replace(",", ""))
    return float(found[-1]) if found else None


@register("arithmetic")
def arithmetic_reward(prompts: list[str], completions: list[str], answer: list, **_: object) -> list[float]:
    out = []
    for completion, ans in zip(completions, answer):
        got = last_number(completion)
        out.append(1.0 if got is not None and got == float(ans) else 0.0)
    return out
