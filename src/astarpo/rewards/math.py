"""MATH-style reward: 1 when the response's last ``\\boxed{...}`` is mathematically equivalent to the answer.

Equivalence is decided by ``math_verify`` (LaTeX -> sympy, then numeric, symbolic, set, interval and matrix
comparison). This module only finds the final box and adds a few normalisations that math_verify lacks (see
``normalize_answer``). The reward grades each completion in a worker process under a time limit (``timeout.py``),
because sympy can hang on hostile expressions such as ``9^{9^{9^{9}}}``; math_verify's own signal-based timeouts
are switched off, as they only work in the main thread.
"""

from __future__ import annotations

import logging
import re
from fractions import Fraction

from math_verify import ExprExtractionConfig, LatexExtractionConfig, parse, verify

from . import register
from .timeout import DEFAULT_TIMEOUT_S, run_with_timeout

MAX_ANSWER_CHARS = 1000  # the longest reference answer in the bundled data is ~200 characters
_EXTRACTION = (LatexExtractionConfig(boxed_match_priority=0), ExprExtractionConfig())


class _NoTimeoutWarning(logging.Filter):
    """math_verify warns once per process that its signal timeouts are off; ours are in ``timeout.py``."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "Timeout is disabled" not in record.getMessage()


for _name in ("math_verify.parser", "math_verify.grader"):
    logging.getLogger(_name).addFilter(_NoTimeoutWarning())


def last_boxed(text: str) -> str | None:
    """Content of the last ``\\boxed{...}`` / ``\\fbox{...}`` (nested braces kept), or of ``\\boxed 5``; else None.

    None too when that last box is empty or never closed (a truncated response has no final answer).
    """
    start = max(text.rfind("\\boxed"), text.rfind("\\fbox"))
    if start < 0:
        return None
    i = start + (6 if text.startswith("\\boxed", start) else 5)
    if i < len(text) and text[i] != "{" and not text[i].isspace():
        return None  # some other command, e.g. \boxedsymbol
    while i < len(text) and text[i].isspace():
        i += 1
    if i >= len(text):
        return None
    if text[i] != "{":  # brace-less form: "\boxed 5$" -> "5" (the MATH dataset's rule)
        content = re.split(r"[$\n]", text[i:], maxsplit=1)[0]
        return content.strip() or None
    depth = 0
    for j in range(i, len(text)):
        if text[j] == "{":
            depth += 1
        elif text[j] == "}":
            depth -= 1
            if depth == 0:
                return text[i + 1:j].strip() or None
    return None


_THIN_SPACE_THOUSANDS = re.compile(r"(?<=\d)\\[,; ]\s*(?=\d{3}(?!\d))")  # "10\,000" parses as 10*0
_TEXT_AND = re.compile(r",?\s*\\(?:text|mbox|textrm)\{\s*,?\s*(?:and|or)\s*,?\s*\}")  # "8\text{, and }10" is kept
_CHOICE_LIST = re.compile(r"\\(?:text|textbf|textrm|mbox|mathrm)\{\s*(\(?[A-Z]\)?(?:\s*,\s*\(?[A-Z]\)?)+)\s*\}")
_REPEATING = re.compile(r"(-?)(\d*)\.(\d*)\\overline\{(\d+)\}")  # 0.1\overline{6}: not parsed at all


def _repeating_to_fraction(m: re.Match) -> str:
    sign, whole, fixed, period = m.groups()
    value = Fraction(int(whole or "0")) + Fraction(int(fixed or "0"), 10 ** len(fixed))
    value += Fraction(int(period), (10 ** len(period) - 1) * 10 ** len(fixed))
    return f"{sign}\\frac{{{value.numerator}}}{{{value.denominator}}}"


def normalize_answer(answer: str) -> str:
    """Rewrite the few answer forms that math_verify misparses, keeping their meaning (each has a test)."""
    answer = answer.strip()
    if answer.endswith((".", ",")):  # "\boxed{5.}": math_verify cannot parse "5."
        answer = answer[:-1].rstrip()
    answer = _THIN_SPACE_THOUSANDS.sub("", answer)
    answer = _TEXT_AND.sub(",", answer)
    choices = _CHOICE_LIST.fullmatch(answer)
    if choices:  # "\text{A, C}" (choose all that apply) would be the one symbol "a,c"; bare, it is the set {a, c}
        answer = choices.group(1)
    return _REPEATING.sub(_repeating_to_fraction, answer)


def parse_answer(answer: str) -> list:
    """math_verify's parse of one bare answer (no surrounding text): sympy object(s) plus the string fallback."""
    return parse("\\boxed{" + normalize_answer(answer) + "}", extraction_config=_EXTRACTION, parsing_timeout=None)


def is_equivalent(predicted: str, reference: str) -> bool:
    """True when two bare answers are mathematically equal (``verify(gold, pred)``: the reference is the gold).

    Not time-limited itself: untrusted input goes through ``grade_math_batch`` or the ``math`` reward.
    """
    if len(predicted) > MAX_ANSWER_CHARS:
        return False
    gold, pred = parse_answer(reference), parse_answer(predicted)
    return bool(gold and pred and verify(gold, pred, timeout_seconds=None))


def grade_math(completion: str, answer: str) -> float:
    """1.0 if the completion's last box is equivalent to ``answer``, else 0.0 (also when there is no box).

    Not time-limited itself; ``grade_math_batch`` runs it in workers under a deadline.
    """
    boxed = last_boxed(completion)
    return 1.0 if boxed is not None and is_equivalent(boxed, str(answer)) else 0.0


def grade_math_batch(completions: list[str], answers: list, timeout: float = DEFAULT_TIMEOUT_S,
                     workers: int | None = None) -> list[float]:
    """``grade_math`` on every pair, in worker processes, each call limited to ``timeout`` seconds (0.0 past it)."""
    return run_with_timeout(grade_math, [(c, str(a)) for c, a in zip(completions, answers)], timeout=timeout,
                            default=0.0, workers=workers)


@register("math")
def math_reward(prompts: list[str], completions: list[str], answer: list, **_: object) -> list[float]:
    """TRL-style reward for MATH-style problems: 1.0 when the last ``\\boxed{}`` equals ``answer``, else 0.0."""
    return grade_math_batch(completions, answer)
