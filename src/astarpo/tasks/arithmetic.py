"""A deterministic arithmetic word task: "What is 7 + 5?" with an integer answer.

Small enough that a 135M model gets some right and some wrong, which is what RL needs to learn anything.
Difficulty knobs: the operand range, the operators and the number of operands. Train and test never share a
problem, for any seed.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

_OPS = "+-*"


@dataclass(frozen=True)
class ArithmeticTask:
    min_value: int = 1
    max_value: int = 20
    ops: str = "+-"
    n_operands: int = 2
    n_train: int = 512
    n_test: int = 128
    seed: int = 0
    template: str = "What is {expr}? Reply with only the final number."

    def __post_init__(self) -> None:
        if self.min_value > self.max_value:
            raise ValueError(f"min_value {self.min_value} > max_value {self.max_value}")
        if not self.ops or set(self.ops) - set(_OPS):
            raise ValueError(f"ops must be a non-empty subset of {''.join(_OPS)!r}, got {self.ops!r}")
        if self.n_operands < 2:
            raise ValueError("n_operands must be at least 2")
        space = (self.max_value - self.min_value + 1) ** self.n_operands * len(self.ops) ** (self.n_operands - 1)
        if self.n_train + self.n_test > space:
            raise ValueError(f"only {space} distinct problems exist for these knobs, "
                             f"but n_train + n_test = {self.n_train + self.n_test}; widen the range")

    def _problem(self, rng: random.Random) -> tuple[str, int]:
        nums = [rng.randint(self.min_value, self.max_value) for _ in range(self.n_operands)]
        ops = [rng.choice(self.ops) for _ in range(self.n_operands - 1)]
        expr = " ".join([str(nums[0])] + [f"{op} {x}" for op, x in zip(ops, nums[1:])])
        value = _evaluate(nums, ops)  # standard precedence, so the question means what it says
        return expr, value

    def splits(self) -> dict[str, list[dict]]:
        """{'train': [...], 'test': [...]}: records with id, prompt, answer, expression."""
        rng = random.Random(self.seed)
        seen: set[str] = set()
        rows: list[dict] = []
        while len(rows) < self.n_train + self.n_test:
            expr, value = self._problem(rng)
            if expr in seen:
                continue
            seen.add(expr)
            rows.append({"prompt": self.template.format(expr=expr), "answer": str(value), "expression": expr})
        out = {"train": rows[: self.n_train], "test": rows[self.n_train :]}
        for split, recs in out.items():
            for i, r in enumerate(recs):
                r["id"] = f"arithmetic/{split}/{i}"
        return out


def _evaluate(nums: list[int], ops: list[str]) -> int:
    """Value of nums[0] ops[0] nums[1] ... with * binding tighter than + and -."""
    terms = [nums[0]]
    signs = [1]
    for op, x in zip(ops, nums[1:]):
        if op == "*":
            terms[-1] = terms[-1] * x
        else:
            terms.append(x)
            signs.append(1 if op == "+" else -1)
    return sum(s * t for s, t in zip(signs, terms))
