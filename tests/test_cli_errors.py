"""Bad input through the command line: one line on stderr naming the fix, exit code 2, nothing half-written."""

import json
import math
import shutil
from pathlib import Path

import pytest
from conftest import build_tiny_model

from astarpo import rewards
from astarpo.cli import main

TINY = "--limit 4 --n 2 --max-new-tokens 4"  # Stage 1 in a second
TRAIN = "--limit 4 --max-new-tokens 4"

# (name, argv, expected last stderr line); {model}, {other_model}, {chat_model}, {tmp} and {artifacts} are filled
# in. Each runs in a tmp folder holding only the fixture files written by _fixtures (a values file v.parquet and a
# one-step run from the tiny model among them); every one of them must be byte for byte the same afterwards.
CASES = [
    ("bad shard size", "values --model {model} --shard-size 0 --output {tmp}/out.parquet",
     "shard_size must be >= 1, got 0"),
    ("unknown reward", "values --model {model} --reward nope --output {tmp}/out.parquet",
     "unknown reward 'nope'; choose one of arithmetic, gsm8k, math or pass a Python callable "
     "f(prompts, completions, **columns) -> list[float]"),
    ("missing data file", "values --model {model} --data {tmp}/none.jsonl --output {tmp}/out.parquet",
     "{tmp}/none.jsonl: no such file"),
    ("invalid JSON line", "values --model {model} --data {tmp}/bad.jsonl --output {tmp}/out.parquet",
     "{tmp}/bad.jsonl:2: not valid JSON (Expecting property name enclosed in double quotes); each line must "
     "be one JSON object"),
    ("prompt too long", "values --model {model} --limit 3 --max-prompt-tokens 2 --output {tmp}/out.parquet",
     "3 prompt(s) exceed max_prompt_tokens=2 (first: 'arithmetic/train/0', 13 tokens); raise "
     "--max-prompt-tokens or pass --on-long-prompt skip"),
    ("missing config file", "values --config {tmp}/none.yaml --output {tmp}/out.parquet",
     "{tmp}/none.yaml: no such config file"),
    ("output below a file", "values --model {model} --limit 2 --output {tmp}/a_file/out.parquet",
     "cannot write to {tmp}/a_file (Not a directory); choose a writable output location with free space"),
    ("beta1 zero", "train --model {model} --beta1 0 --values {tmp}/v.parquet --output-dir {tmp}/out",
     "beta1 must be > 0 (inf for the mean), got 0.0"),
    ("missing values file", "train --model {model} --values {tmp}/none.parquet --output-dir {tmp}/out",
     "{tmp}/none.parquet: no such values file; create it with `astarpo values`"),
    ("values file not parquet", "train --model {model} --values {tmp}/bad.jsonl --output-dir {tmp}/out",
     "{tmp}/bad.jsonl: not a readable parquet file (Could not open Parquet input source '{tmp}/bad.jsonl': "
     "Parquet magic bytes not found in footer. Either the file is corrupted or this is not a parquet file.); "
     "recreate it with `astarpo values`"),
    ("prompt not a string", "values --model {model} --data {tmp}/int_prompt.jsonl --output {tmp}/out.parquet",
     "{tmp}/int_prompt.jsonl: row 1: 'prompt' must be a string, got int"),
    ("answer not a string or number", "values --model {model} --data {tmp}/list_answer.jsonl --output {tmp}/o.parquet",
     "{tmp}/list_answer.jsonl: row 0: 'answer' must be a string or number, got [1, 2]"),
    ("missing column", "values --model {model} --data {tmp}/no_answer.jsonl --output {tmp}/out.parquet",
     "{tmp}/no_answer.jsonl: missing column(s) answer (present: id, prompt); rename them or pass "
     "--prompt-column/--answer-column"),
    ("empty dataset", "values --model {model} --data {tmp}/empty.jsonl --output {tmp}/out.parquet",
     "{tmp}/empty.jsonl: the prompt set is empty"),
    ("duplicate ids", "values --model {model} --data {tmp}/dup.jsonl --output {tmp}/out.parquet",
     "{tmp}/dup.jsonl: duplicate id 'a'; ids must be unique (values are matched to prompts by id)"),
    ("reward raises", "values --model {model} " + TINY + " --reward test-raises --output {tmp}/out.parquet",
     "reward function raised ValueError: cannot parse (fix the reward, or pass --on-reward-error skip to drop "
     "such samples)"),
    ("reward wrong length", "values --model {model} " + TINY + " --reward test-short --output {tmp}/out.parquet",
     "reward function returned 1 values for 8 completions; it must return one float per completion"),
    ("reward NaN", "values --model {model} " + TINY + " --reward test-nan --output {tmp}/out.parquet",
     "reward function returned nan (not finite); return a finite float, or pass --on-reward-error skip to drop "
     "such samples"),
    ("n zero", "values --model {model} --n 0 --output {tmp}/out.parquet", "n must be >= 1, got 0"),
    ("unknown algo", "train --model {model} --algo dpo --output-dir {tmp}/out",
     "algo must be one of astarpo, grpo, rloo, rebel, ppo, got 'dpo'"),
    ("values given to a baseline", "train --model {model} --algo grpo --values {tmp}/v.parquet --output-dir {tmp}/o",
     "values does not apply to algo grpo (its own settings: clip_eps, group_size, kl_coef, tis_cap); drop it"),
    ("astarpo without values", "train --model {model} --output-dir {tmp}/out",
     "astarpo needs the Stage 1 file from `astarpo values`: pass --values PATH"),
    ("values from another model", "train --model {other_model} --values {tmp}/v.parquet " + TRAIN
     + " --output-dir {tmp}/out",
     "{tmp}/v.parquet was made with reference model '{model}' but this run uses '{other_model}'; rerun "
     "`astarpo values` with this run's settings"),
    ("values from another tokenizer", "train --model {chat_model} --values {tmp}/v.parquet " + TRAIN
     + " --output-dir {tmp}/out",  # same weights, a chat template added: other prompt tokens
     "{tmp}/v.parquet was made with the tokenizer or chat template of '{model}', which differ from those of "
     "'{chat_model}'; rerun `astarpo values` with this run's settings"),
    ("values from another reward", "train --model {model} --values {tmp}/v.parquet " + TRAIN + " --reward gsm8k "
     "--output-dir {tmp}/out",
     "{tmp}/v.parquet was made with reward 'arithmetic' but this run uses 'gsm8k'; rerun `astarpo values` with "
     "this run's settings"),
    ("checkpoints from another run", "train --model {model} --values {artifacts}/v.parquet --steps 1 --batch-size 2 "
     + TRAIN + " --no-filter-unsolved --beta2 0.01 --output-dir {tmp}/run",
     "{tmp}/run holds a run with other settings (beta2: 0.001 -> 0.01); resume with the same settings or choose "
     "another --output-dir"),
]




def _raises(prompts, completions, **columns):
    raise ValueError("cannot parse")


def _short(prompts, completions, **columns):
    return [0.0]


def _nan(prompts, completions, **columns):
    return [math.nan] * len(completions)


BROKEN_REWARDS = {"test-raises": _raises, "test-short": _short, "test-nan": _nan}


@pytest.fixture(scope="module")
def other_model(tmp_path_factory) -> Path:
    """Same architecture and tokenizer as tiny_model, other weights."""
    return build_tiny_model(tmp_path_factory.mktemp("other") / "model", seed=1)


@pytest.fixture(scope="module")
def artifacts(tiny_model, tmp_path_factory) -> Path:
    """A values file and a one-step training run from the tiny model, built once and copied into each case."""
    d = tmp_path_factory.mktemp("artifacts")
    assert main(f"values --model {tiny_model} {TINY} --output {d}/v.parquet".split()) == 0
    assert main(f"train --model {tiny_model} --values {d}/v.parquet --steps 1 --batch-size 2 {TRAIN} "
                f"--no-filter-unsolved --output-dir {d}/run".split()) == 0
    return d


def _fixtures(tmp: Path, artifacts: Path) -> None:
    (tmp / "bad.jsonl").write_text('{"id": "1", "prompt": "a", "answer": "1"}\n{not json\n')
    (tmp / "int_prompt.jsonl").write_text('{"id": "a", "prompt": "1+1", "answer": "2"}\n'
                                          '{"id": "b", "prompt": 7, "answer": "2"}\n')
    (tmp / "list_answer.jsonl").write_text('{"id": "a", "prompt": "1+1", "answer": [1, 2]}\n')
    (tmp / "no_answer.jsonl").write_text('{"id": "a", "prompt": "1+1"}\n')
    (tmp / "empty.jsonl").write_text("")
    (tmp / "dup.jsonl").write_text('{"id": "a", "prompt": "1+1", "answer": "2"}\n'
                                   '{"id": "a", "prompt": "2+2", "answer": "4"}\n')
    (tmp / "a_file").write_text("")
    shutil.copy(artifacts / "v.parquet", tmp / "v.parquet")
    shutil.copytree(artifacts / "run", tmp / "run")


def _snapshot(tmp: Path) -> dict[Path, bytes]:
    return {p: p.read_bytes() for p in tmp.rglob("*") if p.is_file()}


@pytest.mark.parametrize("argv, message", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input_one_line_exit_2(argv, message, tiny_model, tiny_chat_model, other_model, artifacts, tmp_path, capsys,
                                   monkeypatch):
    for name, fn in BROKEN_REWARDS.items():  # registered by name, as a user's plugin would be, for this case only
        if f"--reward {name}" in argv:
            monkeypatch.setitem(rewards._REGISTRY, name, fn)
    _fixtures(tmp_path, artifacts)
    before = _snapshot(tmp_path)
    names = {"model": tiny_model, "other_model": other_model, "chat_model": tiny_chat_model, "tmp": tmp_path,
             "artifacts": artifacts}
    code = main(argv.format(**names).split())
    err = capsys.readouterr().err
    assert code == 2
    # the error is the last line; progress bars of the work done before it (sampling, loading) may precede it
    assert err.endswith(f"\nastarpo: error: {message.format(**names)}\n") or \
        err == f"astarpo: error: {message.format(**names)}\n"
    assert err.count("astarpo: error") == 1 and "Traceback" not in err
    after = _snapshot(tmp_path)
    assert {p: b for p, b in after.items() if p in before} == before  # no input, checkpoint or run file changed
    # No output and no shard: at most Stage 1's resume marker, whole, when the failure came after sampling began.
    for new in after.keys() - before.keys():
        assert new.parent.name == "out.parquet.shards" and new.name == "provenance.json", new
        assert json.loads(new.read_text())["reward"] in BROKEN_REWARDS
