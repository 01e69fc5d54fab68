"""Adaptive Stage 1: the stopping rule, variable-length rows end to end, resume, and config errors."""

import json
import math

import numpy as np
import pytest
import torch
from conftest import InterruptibleReward

from astarpo import TrainConfig, Trainer, ValuesConfig, compute_values
from astarpo import values as V
from astarpo.cli import main
from astarpo.config import ConfigError
from astarpo.values import Values, ValuesError, adaptive_stop, load_v_star, read_values

COMMON = {"data": "arithmetic", "reward": "arithmetic", "max_new_tokens": 6, "limit": 24}
RULE = {"adaptive": True, "round_size": 4, "n_max": 16, "beta1": 0.5, "confidence": 0.9, "tolerance": 0.25}


class HasDigit(InterruptibleReward):
    """0/1 reward with a success rate between 0 and 1 for an untrained tiny model: whether any digit appears."""

    reward_name = "has_digit"

    def score(self, completion: str) -> float:
        return float(any(ch.isdigit() for ch in completion))


def _stops_at(sequence: list[float], **kw) -> int:
    """Feed ``sequence`` round by round, as Stage 1 does; the number of samples drawn when the rule stops."""
    cfg = ValuesConfig(**{**RULE, **kw})
    for n in range(cfg.round_size, len(sequence) + 1, cfg.round_size):
        if adaptive_stop(sequence[:n], cfg):
            return n
    raise AssertionError("the rule never stopped")


def test_clopper_pearson_matches_known_values():
    assert V.clopper_pearson(0, 4, 0.95) == (0.0, pytest.approx(1 - 0.025 ** (1 / 4)))
    assert V.clopper_pearson(8, 8, 0.95) == (pytest.approx(0.025 ** (1 / 8)), 1.0)
    lo, hi = V.clopper_pearson(2, 8, 0.95)  # R: binom.test(2, 8)$conf.int
    assert lo == pytest.approx(0.03185, abs=1e-5) and hi == pytest.approx(0.65086, abs=1e-5)


def test_v_star_binary_equals_v_star_of_the_samples():
    for beta1 in (0.125, 0.5, 2.0, math.inf):
        for k in range(9):
            r = torch.tensor([[1.0] * k + [0.0] * (8 - k)])
            assert V.v_star_binary(k / 8, beta1) == pytest.approx(V.v_star(r, beta1).item(), abs=1e-12)


def test_stopping_rule_on_hand_made_sequences():
    # 4/4 gives V* in [0.70, 1] (too wide at confidence 0.9); 8/8 gives [0.84, 1]: settled after two rounds
    assert _stops_at([1.0] * 32) == 8
    # no success: V* stays wide near p = 0 (0/16 still allows V* = 0.37), so only the cap stops it...
    assert _stops_at([0.0] * 32) == 16
    # ...unless unsolved_p says when a failing prompt is hard enough to drop (0/8: p < 0.31 at 90%)
    assert _stops_at([0.0] * 32, unsolved_p=0.5) == 8
    assert _stops_at([0.0] * 32, unsolved_p=0.6) == 4
    assert _stops_at([1.0, 0.0, 0.0, 0.0] * 8, unsolved_p=0.6) == 16  # one success: never dropped early
    # a mixed prompt is never settled within 16 samples at this tolerance; the cap is never exceeded
    assert _stops_at([1.0, 0.0] * 32, n_max=32) == 32
    # a loose tolerance stops after the first round, never before it
    cfg = ValuesConfig(**{**RULE, "tolerance": 10.0})
    assert not any(adaptive_stop([1.0] * n, cfg) for n in range(4)) and adaptive_stop([1.0] * 4, cfg)


def test_load_v_star_uses_each_rows_own_samples():
    r = np.full((3, 8), np.nan)
    r[0, :4] = [0, 0, 0, 0]
    r[1, :8] = [1, 0, 0, 0, 1, 1, 0, 0]
    r[2, :4] = [1, 1, 1, 1]
    vals = Values({"adaptive": True, "round_size": 4, "n_max": 8}, ["a", "b", "c"], r)
    assert vals.counts.tolist() == [4, 8, 4]
    pos, v, counts = load_v_star(vals, ["a", "b", "c"], beta1=math.inf)
    assert pos == [1, 2] and v.tolist() == [3 / 8, 1.0] and counts["unsolved_dropped"] == 1
    pos, v, _ = load_v_star(vals, ["b", "c"], beta1=math.inf, n=4)  # n caps each row: b uses its first round
    assert v.tolist() == [0.25, 1.0]
    with pytest.raises(ValuesError, match="n=6 does not apply to this adaptive values file .* multiple of 4 up to 8"):
        load_v_star(vals, ["a"], beta1=0.5, n=6)
    with pytest.raises(ValuesError, match="n=12 does not apply"):
        load_v_star(vals, ["a"], beta1=0.5, n=12)


def _values(model, path, reward_fn=None, **kw):
    cfg = ValuesConfig(**{**COMMON, **RULE, "model": str(model), "output": str(path), "shard_size": 5, **kw})
    return compute_values(cfg, reward=reward_fn or HasDigit())


def test_adaptive_values_file_is_valid_and_trains(tiny_model, tmp_path):
    path = _values(tiny_model, tmp_path / "v.parquet", save_responses=True)
    values = read_values(path)
    prov = values.provenance
    assert (prov["adaptive"], prov["n"], prov["round_size"], prov["n_max"], prov["beta1"]) == (True, None, 4, 16, 0.5)
    counts = values.counts
    assert len(values.ids) == 24 and prov["samples"] == counts.sum()
    assert set(counts.tolist()) <= {4, 8, 12, 16} and len(set(counts.tolist())) > 1  # rows really differ
    cfg = ValuesConfig(**RULE)
    for row, n in zip(values.rewards, counts):  # every row stopped exactly where the rule says
        rounds = [row[:k].tolist() for k in range(4, n + 1, 4)]
        assert [adaptive_stop(r, cfg) for r in rounds] == [False] * (len(rounds) - 1) + [True]
    import pandas as pd

    df = pd.read_parquet(path)
    assert [len(x) for x in df.lengths] == [len(x) for x in df.rewards] == [len(x) for x in df.responses]

    run = tmp_path / "run"
    trainer = Trainer(TrainConfig(**COMMON, model=str(tiny_model), values=str(path), output_dir=str(run),
                                  batch_size=6, micro_batch_size=3, learning_rate=1e-2, beta2=0.1, steps=2),
                      reward=HasDigit())
    expected = load_v_star(values, values.ids, 0.5)[1]
    assert torch.allclose(trainer.v_star, expected)
    trainer.train()
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == [1, 2] and all(math.isfinite(m["loss"]) for m in metrics)


def test_adaptive_resume_after_interruption_equals_uninterrupted(tiny_model, tmp_path):
    full = read_values(_values(tiny_model, tmp_path / "full.parquet"))
    out = tmp_path / "resumed.parquet"
    with pytest.raises(KeyboardInterrupt):
        _values(tiny_model, out, reward_fn=HasDigit(fail_after=5))  # dies within a shard, between rounds
    assert 1 <= len(list((tmp_path / "resumed.parquet.shards").glob("shard-*.parquet"))) < 5 and not out.exists()
    resumed = read_values(_values(tiny_model, out))
    assert resumed.ids == full.ids
    assert np.array_equal(resumed.rewards, full.rewards, equal_nan=True)
    with pytest.raises(ValuesError, match="exists and was made with other settings \\(n_max: 16 -> 8"):
        _values(tiny_model, out, n_max=8)


def test_adaptive_needs_binary_rewards(tiny_model, tmp_path):
    def fraction(prompts, completions, **_):
        return [0.5 for _ in completions]

    with pytest.raises(ValuesError, match="needs 0/1 rewards .* returned 0.5; use a fixed --n instead"):
        _values(tiny_model, tmp_path / "v.parquet", reward_fn=fraction)


@pytest.mark.parametrize("kw, message", [
    ({"n_max": 2}, "n_max must be a multiple of round_size=4 (at least one round), got 2"),
    ({"n_max": 10}, "n_max must be a multiple of round_size=4 (at least one round), got 10"),
    ({"n": 4}, "n does not apply with adaptive (rows get round_size..n_max samples); set n_max and round_size "
               "instead"),
    ({"round_size": 0}, "round_size must be >= 1, got 0"),
    ({"confidence": 1.0}, "confidence must be in (0, 1), got 1.0"),
    ({"tolerance": 0.0}, "tolerance must be > 0, got 0.0"),
    ({"unsolved_p": 1.0}, "unsolved_p must be in [0, 1), got 1.0"),
    ({"beta1": 0.0}, "beta1 must be > 0 (inf for the mean), got 0.0"),
    ({"temperature": 0.0}, "temperature 0 (greedy) gives the same response every round; adaptive needs sampling"),
])
def test_adaptive_config_errors(kw, message):
    with pytest.raises(ConfigError) as e:
        ValuesConfig(**{**RULE, **kw})
    assert str(e.value) == message


def test_adaptive_config_error_on_the_command_line(tmp_path, capsys):
    assert main(["values", "--adaptive", "--round-size", "8", "--n-max", "4",
                 "--output", str(tmp_path / "v.parquet")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["astarpo: error: n_max must be a multiple of round_size=8 (at least one round), got 4"]
