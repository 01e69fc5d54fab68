"""Bad input through the command line: one line on stderr naming the fix, exit code 2, nothing half-written."""

from pathlib import Path

import pytest

from astarpo.cli import main

# (name, argv with {model} and {tmp}, expected stderr line with {tmp}). Each runs against an empty tmp folder
# holding only the fixture files written by _fixtures.
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
]


def _fixtures(tmp: Path) -> None:
    (tmp / "bad.jsonl").write_text('{"id": "1", "prompt": "a", "answer": "1"}\n{not json\n')
    (tmp / "a_file").write_text("")


@pytest.mark.parametrize("argv, message", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input_one_line_exit_2(argv, message, tiny_model, tmp_path, capsys):
    _fixtures(tmp_path)
    before = {p for p in tmp_path.rglob("*") if p.is_file()}
    code = main(argv.format(model=tiny_model, tmp=tmp_path).split())
    err = capsys.readouterr().err
    assert code == 2
    assert err == f"astarpo: error: {message.format(tmp=tmp_path)}\n"
    assert {p for p in tmp_path.rglob("*") if p.is_file()} == before  # no output or shard file left behind
