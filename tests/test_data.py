import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from astarpo.data import DataError, encode_prompts, format_prompt, load_records
from astarpo.models import load_tokenizer
from astarpo.tasks import ArithmeticTask


def _jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def test_arithmetic_task_is_deterministic_disjoint_and_correct():
    a, b = ArithmeticTask().splits(), ArithmeticTask().splits()
    assert a == b
    assert len(a["train"]) == 512 and len(a["test"]) == 128
    assert not {r["expression"] for r in a["train"]} & {r["expression"] for r in a["test"]}
    mul = ArithmeticTask(ops="+*", n_operands=3, min_value=2, max_value=9, n_train=50, n_test=10).splits()
    for r in mul["train"]:
        assert int(r["answer"]) == eval(r["expression"])  # noqa: S307 - our own generated integers only
    with pytest.raises(ValueError, match="distinct problems"):
        ArithmeticTask(min_value=1, max_value=2, n_train=100)


def test_load_jsonl_and_parquet_keep_extra_columns(tmp_path):
    rows = [{"id": "a", "prompt": "p1", "answer": 3, "level": 1},
            {"id": "b", "prompt": "p2", "answer": "x", "level": 2}]
    recs = load_records(_jsonl(tmp_path / "d.jsonl", rows))
    assert recs[0] == {"id": "a", "prompt": "p1", "answer": "3", "level": 1}
    pq.write_table(pa.Table.from_pylist([dict(r, answer=str(r["answer"])) for r in rows]), tmp_path / "d.parquet")
    assert load_records(str(tmp_path / "d.parquet"), limit=1)[0]["id"] == "a"


def test_column_mapping(tmp_path):
    recs = load_records(_jsonl(tmp_path / "d.jsonl", [{"problem": "q", "final": 1}]), prompt_column="problem",
                        answer_column="final")
    assert recs == [{"id": "0", "prompt": "q", "answer": "1"}]


@pytest.mark.parametrize("rows, message", [
    ([], "the prompt set is empty"),
    ([{"id": 1, "question": "q", "answer": 1}], r"missing column\(s\) prompt \(present: answer, id, question\)"),
    ([{"id": 1, "prompt": "  ", "answer": 1}], "row 0: empty prompt"),
    ([{"id": 1, "prompt": 5, "answer": 1}], "'prompt' must be a string, got int"),
    ([{"id": 1, "prompt": "q", "answer": None}], "'answer' must be a string or number"),
    ([{"id": 1, "prompt": "q", "answer": 1}, {"id": 1, "prompt": "r", "answer": 2}], "duplicate id '1'"),
])
def test_bad_prompt_sets(tmp_path, rows, message):
    with pytest.raises(DataError, match=message):
        load_records(_jsonl(tmp_path / "d.jsonl", rows))


def test_bad_files(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"id": 1, "prompt": "q", "answer": 1}\n{oops\n')
    with pytest.raises(DataError, match=r"bad.jsonl:2: not valid JSON"):
        load_records(str(bad))
    with pytest.raises(DataError, match="no such file"):
        load_records(str(tmp_path / "missing.jsonl"))
    (tmp_path / "x.csv").write_text("a,b\n")
    with pytest.raises(DataError, match="unsupported file type"):
        load_records(str(tmp_path / "x.csv"))
    with pytest.raises(DataError, match="has splits"):
        load_records("arithmetic", split="validation")


def test_long_prompts_error_or_counted_skip(tiny_model, caplog):
    tok = load_tokenizer(tiny_model)
    recs = [{"id": "short", "prompt": "What is 1 + 2?", "answer": "3"},
            {"id": "long", "prompt": "What is 1 + 2? " * 50, "answer": "3"}]
    with pytest.raises(DataError, match="1 prompt\\(s\\) exceed max_prompt_tokens=32 \\(first: 'long'"):
        encode_prompts(tok, recs, max_prompt_tokens=32)
    kept, ids = encode_prompts(tok, recs, max_prompt_tokens=32, on_long_prompt="skip")
    assert [r["id"] for r in kept] == ["short"] and len(ids) == 1
    assert "skipped 1 prompt(s)" in caplog.text


def test_chat_template_used_when_present(tiny_model, tiny_chat_model):
    plain = load_tokenizer(tiny_model)
    chat = load_tokenizer(tiny_chat_model)
    assert format_prompt(plain, "hi") == "hi"
    assert format_prompt(chat, "hi") == "<s>user: hi</s><s>assistant:"
    assert format_prompt(chat, "hi", use_chat_template=False) == "hi"


def test_prompt_template_wraps_every_prompt(tmp_path):
    recs = load_records(_jsonl(tmp_path / "d.jsonl", [{"problem": "1+1?", "answer": 2}]), prompt_column="problem",
                        prompt_template="{prompt}\nPut the answer in \\boxed{}.")
    assert recs[0]["prompt"] == "1+1?\nPut the answer in \\boxed{}."


def test_step_prompts_visit_every_prompt_once_per_epoch_in_a_seeded_order():
    from astarpo.data import step_prompts

    steps = [step_prompts(10, 4, k, seed=3) for k in range(5)]  # 20 visits: two epochs, step 2 spans both
    visits = [i for s in steps for i in s]
    assert sorted(visits[:10]) == sorted(visits[10:]) == list(range(10))
    assert visits[:10] != visits[10:]  # a fresh permutation per epoch
    assert step_prompts(10, 4, 2, seed=3) == steps[2] and step_prompts(10, 4, 2, seed=4) != steps[2]
