"""GSM8K reward: 1 when the response's final number equals the reference answer, compared numerically.

The final number is the one after the last ``####`` (GSM8K's own answer format, "strict"), or when there is no
number after a ``####``, the last number anywhere in the response ("flexible"). Thousands commas, ``$`` and any
trailing units or text are ignored, so "#### $1,000.00 dollars" matches "1000".
"""

from __future__ import annotations

import re
from decimal import Decimal, InvalidOperation

from . import register
from .timeout import DEFAULT_TIMEOUT_S, run_with_timeout

# A number: an optional minus (not when it joins two numbers, as in "5-3"), digits and commas (a comma only between
# digits, so the list "1, 2" gives two numbers), optional decimals. Linear-time on any input.
_NUMBER = re.compile(r"(?:(?<![\d.])-)?\d(?:[\d,]*\d)?(?:\.\d+)?")
# What may sit between "####" and its number: spaces, currency, "**" bold, a colon, a minus handled by _NUMBER.
_AFTER_HASHES = re.compile(r"[\s:*$€£]*")


def extract_strict(text: str) -> str | None:
    """The number right after the last ``####`` (``$`` and commas allowed), or None."""
    at = text.rfind("####")
    if at < 0:
        return None
    start = _AFTER_HASHES.match(text, at + 4).end()
    m = _NUMBER.match(text, start)
    return _clean(m.group()) if m else None


def extract_flexible(text: str) -> str | None:
    """The last number anywhere in ``text``, or None."""
    last = None
    for last in _NUMBER.finditer(text):  # noqa: B007 - only the last match is wanted
        pass
    return _clean(last.group()) if last else None


def extract_answer(text: str) -> str | None:
    """The graded answer: strict (after ``####``) when there is one, else flexible (the last number)."""
    strict = extract_strict(text)
    return strict if strict is not None else extract_flexible(text)


def to_number(text: str) -> Decimal | None:
    """``text`` as an exact decimal (commas, ``$`` and surrounding spaces ignored), or None if it is no number."""
    cleaned = _clean(text.strip().lstrip("$€£").strip())
    try:
        value = Decimal(cleaned)
    except (InvalidOperation, ValueError):
        return None
    return value if value.is_finite() else None


def _clean(number: str) -> str:
    return number.replace(",", "")


def grade_gsm8k(completion: str, answer: str) -> float:
    """1.0 if the completion's answer (see ``extract_answer``) equals ``answer`` numerically, else 0.0."""
    got = extract_answer(completion)
    if got is None:
        return 0.0
    want, got_value = to_number(str(answer)), to_number(got)
    return 1.0 if want is not None and got_value is not None and got_value == want else 0.0


def grade_gsm8k_batch(completions: list[str], answers: list, timeout: float = DEFAULT_TIMEOUT_S,
                      workers: int | None = None) -> list[float]:
    """``grade_gsm8k`` on every pair, in worker processes, each call limited to ``timeout`` seconds (0.0 past it)."""
    return run_with_timeout(grade_gsm8k, [(c, str(a)) for c, a in zip(completions, answers)], timeout=timeout,
                            default=0.0, workers=workers)


@register("gsm8k")
def gsm8k_reward(prompts: list[str], completions: list[str], answer: list, **_: object) -> list[float]:
    """TRL-style reward for GSM8K: 1.0 when the final number matches ``answer``, else 0.0."""
    return grade_gsm8k_batch(completions, answer)
