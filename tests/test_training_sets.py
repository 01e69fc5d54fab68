"""Named training sets (`--data gsm8k`, `--data math`): hub rows reshaped to the packaged benchmark format, checked
against the project's normalised copies, and the one-line error when neither the hub nor its cache is reachable."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from astarpo.cli import main
from astarpo.data import DataError, gsm8k_records, load_records, math_records

SHARED_DATA = Path(os.environ.get("ASTARPO_DATA_DIR") or Path(__file__).resolve().parents[2] / "shared" / "data")
needs_data = pytest.mark.skipif(not (SHARED_DATA / "math" / "train.jsonl").is_file(),
                                reason=f"no training data at {SHARED_DATA}")


def _rows(relpath: str) -> list[dict]:
    with (SHARED_DATA / relpath).open(encoding="utf-8") as f:
        return [json.loads(line) for line in f]


@needs_data
def test_gsm8k_hub_rows_give_the_normalised_file():
    expected = _rows("gsm8k/train.jsonl")
    hub = [{"question": r["problem"], "answer": r["solution"]} for r in expected]  # openai/gsm8k's schema
    got = gsm8k_records(hub, "train")
    keys = ("id", "problem", "answer", "solution", "source", "orig_index")
    assert [{k: r[k] for k in keys} for r in got] == [{k: r[k] for k in keys} for r in expected]
    assert got[0]["answer"] == "72" and any("," in r["solution"].split("####")[-1] for r in expected)
    with pytest.raises(DataError, match="no '####'"):
        gsm8k_records([{"question": "q", "answer": "no marker"}], "train")


@needs_data
def test_math_hub_rows_give_prm800k_train_split():
    """MATH as published (7,500 train and 5,000 test rows, "Level N", type) minus MATH500 is the 12k split."""
    expected, math500 = _rows("math/train.jsonl"), _rows("math500/test.jsonl")

    def hub(r):  # DigitalLearningGmbH/MATH-lighteval's schema
        return {"problem": r["problem"], "level": "Level ?" if r["level"] is None else f"Level {r['level']}",
                "type": r["subject"], "solution": r["solution"]}

    empty_box = {"problem": "A problem whose reference solution boxes nothing.", "level": "Level 1",
                 "type": "Algebra", "solution": "So the answer is $\\boxed{}$."}
    train = [hub(r) for r in expected if r["orig_split"] == "train"] + [empty_box]
    test = [hub(r) for r in math500] + [hub(r) for r in expected if r["orig_split"] == "test"]
    got = math_records(train, test, {r["problem"] for r in math500})
    keys = ("problem", "answer", "solution", "subject", "level", "orig_split")
    assert [{k: r[k] for k in keys} for r in got] == [{k: r[k] for k in keys} for r in expected]
    assert len(got) == 11998 and len({r["id"] for r in got}) == len(got)
    assert got[-1]["id"] == f"math/test/{len(test) - 1}"  # the row index in the hub split
    assert sum(r["level"] is None for r in got) == 2  # "Level ?" in MATH
    paper = math_records(train, [], {r["problem"] for r in math500})  # split train: MATH's train problems alone
    assert len(paper) == 7498 and all(r["orig_split"] == "train" for r in paper)


@pytest.fixture
def offline_empty_cache(tmp_path, monkeypatch):
    """The hub unreachable and nothing cached: HF_DATASETS_OFFLINE=1 with an empty cache folder."""
    import datasets
    import huggingface_hub

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "datasets")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))


@pytest.mark.parametrize("name, hub_id", [("gsm8k", "openai/gsm8k"), ("math", "DigitalLearningGmbH/MATH-lighteval")])
def test_unreachable_hub_names_both_routes(name, hub_id, offline_empty_cache):
    with pytest.raises(DataError) as e:
        load_records(name, "train")
    msg = str(e.value)
    assert hub_id in msg and "--data FILE --prompt-column problem" in msg and "HF_DATASETS_OFFLINE" in msg
    assert "\n" not in msg


def test_unreachable_hub_is_one_cli_line(tiny_model, tmp_path, offline_empty_cache, capsys):
    argv = ["values", "--model", str(tiny_model), "--data", "gsm8k", "--reward", "gsm8k", "--output",
            str(tmp_path / "v.parquet")]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("astarpo: error: gsm8k (train) comes from the Hugging Face dataset openai/gsm8k")
    assert err.count("\n") == 1


def test_split_errors():
    with pytest.raises(DataError, match="splits train .* and train12k .*math500 benchmark"):
        load_records("math", "test")
    with pytest.raises(DataError, match="splits train and test"):
        load_records("gsm8k", "validation")


@needs_data
def test_local_copy_is_the_same_route(tmp_path):
    """The fallback the error names: a local file in the packaged format, its problem column as the prompt."""
    path = tmp_path / "train.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in _rows("gsm8k/train.jsonl")[:3]))
    recs = load_records(str(path), prompt_column="problem")
    assert [r["answer"] for r in recs] == ["72", "10", "5"] and recs[0]["prompt"].startswith("Natalia")
