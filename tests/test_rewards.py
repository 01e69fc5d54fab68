import math

import pytest

from astarpo import rewards
from astarpo.rewards.arithmetic import last_number


@pytest.mark.parametrize("text, value", [
    ("12", 12.0), ("7 + 5 = 12.", 12.0), ("The answer is -3", -3.0), ("1,234 apples", 1234.0), ("none", None),
    ("2.5 then 7", 7.0),
])
def test_last_number(text, value):
    assert last_number(text) == value


def test_arithmetic_reward_by_name():
    fn = rewards.get("arithmetic")
    assert fn(prompts=["q"] * 3, completions=["12", "it is 11", "12 or 13"], answer=["12", "12", "12"]) == [1, 0, 0]


def test_unknown_reward_name():
    with pytest.raises(KeyError, match="unknown reward 'nope'; choose one of .*arithmetic"):
        rewards.get("nope")


def test_resolve_callable_uses_its_name():
    def exact(prompts, completions, answer, **_):
        return [float(c == a) for c, a in zip(completions, answer)]

    name, fn = rewards.resolve(exact)
    assert name.endswith("exact") and fn is exact


def _raises(prompts, completions, **_):
    raise ZeroDivisionError("boom")


@pytest.mark.parametrize("fn, message", [
    (_raises, "reward function raised ZeroDivisionError: boom"),
    (lambda prompts, completions, **_: [1.0], "returned 1 values for 2 completions"),
    (lambda prompts, completions, **_: [1.0, math.nan], "returned nan \\(not finite\\)"),
])
def test_score_rejects_bad_rewards(fn, message):
    with pytest.raises(rewards.RewardError, match=message):
        rewards.score(fn, ["a", "b"], ["x", "y"], {"answer": ["1", "2"]})


def test_score_skip_marks_failed_samples_nan():
    out = rewards.score(_raises, ["a", "b"], ["x", "y"], {}, on_error="skip")
    assert all(math.isnan(v) for v in out)
    out = rewards.score(lambda prompts, completions, **_: [1.0, math.inf], ["a", "b"], ["x", "y"], {}, on_error="skip")
    assert out[0] == 1.0 and math.isnan(out[1])
