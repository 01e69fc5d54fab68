import json
import logging
import math
import re

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from astarpo.config import TrainConfig
from astarpo.generation import sampling_settings
from astarpo.values import (
    _META_KEY,
    Values,
    ValuesError,
    check_provenance,
    load_v_star,
    read_values,
    reference_provenance,
    training_values,
    v_star,
)


def test_v_star_matches_definition():
    r = torch.tensor([[1.0, 0.0, 0.0, 1.0], [0.0, 0.0, 0.0, 0.0], [0.3, -0.2, 2.0, 1.0]])
    beta = 0.5
    expected = beta * torch.log(torch.exp(r.double() / beta).mean(-1))
    assert torch.allclose(v_star(r, beta), expected)


def test_v_star_stable_for_tiny_beta_and_large_rewards():
    r = torch.tensor([[1e4, 0.0, 5e3], [3.0, 3.0, 3.0]])
    v = v_star(r, 1e-4)
    assert torch.isfinite(v).all()
    # beta1 -> 0 gives the max (minus beta1 * log N, which vanishes)
    assert torch.allclose(v, r.double().max(-1).values, atol=1e-3)
    assert torch.isfinite(v_star(r, 1e-12)).all()


def test_v_star_limits():
    r = torch.tensor([[1.0, 0.0, 0.0, 0.0], [0.2, 0.4, 0.6, 0.8]])
    assert torch.allclose(v_star(r, math.inf), r.double().mean(-1))
    assert torch.allclose(v_star(r, 1e6), r.double().mean(-1), atol=1e-5)
    assert torch.allclose(v_star(r, 1e-3), r.double().max(-1).values, atol=5e-3)
    # monotone in beta1: between mean and max
    vs = [v_star(r, b) for b in (0.125, 0.25, 0.5, 1.0, 2.0)]
    for a, b in zip(vs, vs[1:]):
        assert (a >= b - 1e-12).all()


def _values(rewards, ids=None):
    rewards = np.asarray(rewards, dtype=float)
    return Values({"reward": "r"}, ids or [f"p{i}" for i in range(len(rewards))], rewards)


def test_load_v_star_first_n_and_filter():
    vals = _values([[0, 0, 1, 1], [0, 0, 0, 0], [1, 1, 1, 1]])
    pos, v, counts = load_v_star(vals, ["p2", "p1", "p0"], beta1=math.inf, n=2)
    # first 2 samples: p0 has [0, 0] -> unsolved and dropped; p1 too; p2 kept
    assert pos == [0] and v.tolist() == [1.0] and counts["unsolved_dropped"] == 2
    pos, v, _ = load_v_star(vals, ["p0", "p1"], beta1=math.inf, filter_unsolved=False)
    assert pos == [0, 1] and v.tolist() == [0.5, 0.0]


def test_load_v_star_errors():
    vals = _values([[0, 1]])
    with pytest.raises(ValuesError, match="holds only 2 samples"):
        load_v_star(vals, ["p0"], beta1=0.5, n=3)
    with pytest.raises(ValuesError, match="no row for 1 of 2 prompts"):
        load_v_star(vals, ["p0", "other"], beta1=0.5)


def test_read_values_rejects_foreign_and_corrupt_files(tmp_path):
    bad = tmp_path / "bad.parquet"
    bad.write_bytes(b"not parquet at all")
    with pytest.raises(ValuesError, match="not a readable parquet file"):
        read_values(bad)
    plain = tmp_path / "plain.parquet"
    pq.write_table(pa.table({"id": ["a"], "rewards": [[1.0]]}), plain)
    with pytest.raises(ValuesError, match="not an astarpo values file"):
        read_values(plain)
    with pytest.raises(ValuesError, match="no such values file"):
        read_values(tmp_path / "missing.parquet")


def test_check_provenance_names_the_mismatch():
    prov = {"reference_model": "a", "reference_model_hash": "h1", "reference_tokenizer_hash": "t1", "reward": "math",
            "temperature": 1.0, "top_p": 1.0, "max_new_tokens": 32, "use_chat_template": True, "prompt_template": None,
            "sampler": sampling_settings(1.0, 1.0)}
    check_provenance(prov, dict(prov), "v.parquet")
    leaky = {k: v for k, v in prov.items() if k != "sampler"}  # drawn before every sampling setting was explicit
    with pytest.raises(ValuesError, match="does not record its sampler"):
        check_provenance(leaky, prov, "v.parquet")
    older = {k: v for k, v in prov.items() if k != "reference_tokenizer_hash"}
    with pytest.raises(ValuesError, match="does not record its reference_tokenizer_hash"):
        check_provenance(older, prov, "v.parquet")
    with pytest.raises(ValuesError, match="made with reward 'math' but this run uses 'gsm8k'"):
        check_provenance(prov, {**prov, "reward": "gsm8k"}, "v.parquet")
    with pytest.raises(ValuesError, match="made with reference model 'a' but this run uses 'b'"):
        check_provenance(prov, {**prov, "reference_model": "b", "reference_model_hash": "h2"}, "v.parquet")



def _write_values(path, provenance, rows):
    """A Stage 1 file as compute_values writes it: one row of rewards per prompt, the provenance as metadata."""
    table = pa.table({"id": list(rows), "rewards": list(rows.values())})
    pq.write_table(table.replace_schema_metadata({_META_KEY: json.dumps(provenance).encode()}), path)


def test_training_values_keeps_solved_prompts_of_this_run(tiny_model, tmp_path, caplog):
    path = tmp_path / "v.parquet"
    cfg = TrainConfig(model=str(tiny_model), values=str(path), beta1=math.inf, n=2)
    _write_values(path, reference_provenance(cfg, tiny_model, "arithmetic"),
                  {"p0": [0.0, 1.0, 1.0], "p1": [0.0, 0.0, 1.0], "p2": [1.0, 1.0, 0.0]})
    with caplog.at_level(logging.INFO, logger="astarpo.values"):
        keep, v, dropped = training_values(cfg, tiny_model, "arithmetic", ["p2", "p1", "p0"])
    # the first n=2 samples: p1 has none solved and is dropped
    assert keep == [0, 2] and v.tolist() == [1.0, 0.5] and dropped == 1
    assert "training on 2 prompts (1 dropped: all Stage 1 samples failed)" in caplog.text
    with pytest.raises(ValuesError, match="made with reward 'arithmetic' but this run uses 'gsm8k'"):
        training_values(cfg, tiny_model, "gsm8k", ["p0"])


def test_training_values_errors(tiny_model, tmp_path):
    with pytest.raises(ValuesError, match=re.escape("astarpo needs the Stage 1 file from `astarpo values`: pass "
                                                    "--values PATH")):
        training_values(TrainConfig(model=str(tiny_model)), tiny_model, "arithmetic", ["p0"])
    path = tmp_path / "v.parquet"
    cfg = TrainConfig(model=str(tiny_model), values=str(path))
    _write_values(path, reference_provenance(cfg, tiny_model, "arithmetic"), {"p0": [0.0, 0.0], "p1": [0.0, 0.0]})
    with pytest.raises(ValuesError, match=re.escape(
            "no prompt left to train on: every prompt's Stage 1 samples all failed; use an easier task, a larger n "
            "in `astarpo values`, or --no-filter-unsolved")):
        training_values(cfg, tiny_model, "arithmetic", ["p0", "p1"])
    unfiltered = TrainConfig(model=str(tiny_model), values=str(path), filter_unsolved=False)
    keep, v, dropped = training_values(unfiltered, tiny_model, "arithmetic", ["p1"])
    assert keep == [0] and v.tolist() == [0.0] and dropped == 0
