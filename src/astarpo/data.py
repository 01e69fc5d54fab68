"""Prompt sets: load from a built-in task, a named training set, jsonl, parquet or a Hugging Face dataset;
normalize; tokenize.

Every record leaves here as ``{"id": str, "prompt": str, "answer": str, **extra_columns}``; the extra columns
are handed to the reward function untouched (TRL's convention).

The named training sets ``gsm8k`` and ``math`` come from public Hugging Face datasets (cached by ``datasets``, so
``HF_DATASETS_OFFLINE=1`` works once they are) and are reshaped to the columns of the packaged benchmark files
(``id``, ``problem``, ``answer``, ``solution``, ``source``, ...): ``--data gsm8k`` and a local copy in that format
(``--data train.jsonl --prompt-column problem``) give the same prompts and answers.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import torch

log = logging.getLogger(__name__)

PACKAGED_DATA = Path(__file__).with_name("benchmark_data")  # the benchmark test sets, README.md and SHA256SUMS


class DataError(ValueError):
    """The prompt set cannot be used as given; the message says what to change."""


def load_records(
    data: str,
    split: str = "train",
    limit: int | None = None,
    prompt_column: str = "prompt",
    answer_column: str = "answer",
    prompt_template: str = "{prompt}",
) -> list[dict[str, Any]]:
    """Load and validate a prompt set; ``prompt_template`` wraps each prompt (e.g. adds an answer-format line).

    ``data`` is a built-in task name (``arithmetic``), a named training set (``gsm8k``, ``math``; their
    ``problem`` column is the prompt), a ``.jsonl``/``.json``/``.parquet`` file, or a Hugging Face dataset name
    (read with ``datasets.load_dataset(data, split=split)``).
    """
    from .tasks import TASKS

    if data in TASKS:
        splits = TASKS[data]().splits()
        if split not in splits:
            raise DataError(f"task {data!r} has splits {sorted(splits)}, not {split!r}")
        rows = splits[split]
    elif data in TRAINING_SETS:
        rows = TRAINING_SETS[data](split)
        prompt_column = "problem" if prompt_column == "prompt" else prompt_column
    elif data.endswith((".jsonl", ".json")):
        rows = _read_jsonl(Path(data))
    elif data.endswith(".parquet"):
        if not Path(data).is_file():
            raise DataError(f"{data}: no such file")
        import pyarrow.parquet as pq

        rows = pq.read_table(data).to_pylist()
    elif Path(data).exists():
        raise DataError(f"{data}: unsupported file type; give a .jsonl, .json or .parquet file")
    else:
        import datasets

        try:
            rows = list(datasets.load_dataset(data, split=split))
        except Exception as e:  # hub or builder errors come in many types
            raise DataError(f"could not load {data!r} as a built-in task, a file, or a Hugging Face dataset "
                            f"(split {split!r}): {type(e).__name__}: {e}") from e
    records = normalize(rows, source=data, prompt_column=prompt_column, answer_column=answer_column)
    records = records[:limit] if limit is not None else records
    for rec in records:
        rec["prompt"] = prompt_template.replace("{prompt}", rec["prompt"])
    return records


def gsm8k_records(rows: list[dict[str, Any]], split: str) -> list[dict[str, Any]]:
    """GSM8K rows as published (``question``, ``answer`` = worked solution ending in ``#### N``) in the packaged
    format: ``answer`` is the text after ``####`` with thousands commas removed, the full text is ``solution``."""
    out = []
    for i, row in enumerate(rows):
        solution = row["answer"]
        if "####" not in solution:
            raise DataError(f"gsm8k {split} row {i}: no '####' final-answer line in {solution[-80:]!r}")
        out.append({"id": f"gsm8k/{split}/{i}", "problem": row["question"],
                    "answer": solution.split("####")[-1].strip().replace(",", ""), "solution": solution,
                    "source": "gsm8k", "orig_index": i})
    return out


def math_records(train_rows: list[dict[str, Any]], test_rows: list[dict[str, Any]],
                 exclude_problems: set[str]) -> list[dict[str, Any]]:
    """MATH training problems from MATH as published (``problem``, ``level`` "Level N", ``type``, ``solution``):
    every given train and test problem but the held-out MATH500 ones. With MATH's 7,500 train problems alone
    that is the A*-PO paper's training set; with its 5,000 test problems too, PRM800K's 12k training split.

    ``answer`` is the content of the solution's last ``\\boxed{}``, the rule that gives MATH500's official
    answers; the two rows whose last box is empty have no answer and are dropped.
    """
    from .rewards.math import last_boxed

    out = []
    for orig_split, rows in (("train", train_rows), ("test", test_rows)):
        for i, row in enumerate(rows):
            if row["problem"] in exclude_problems:
                continue
            answer = (last_boxed(row["solution"]) or "").strip()
            if not answer:
                log.info("math: dropped %s row %d (no answer in its solution's last \\boxed{})", orig_split, i)
                continue
            level = row["level"].removeprefix("Level ").strip()
            out.append({"id": f"math/{orig_split}/{i}", "problem": row["problem"], "answer": answer,
                        "solution": row["solution"], "source": "math", "subject": row["type"],
                        "level": int(level) if level.isdigit() else None, "orig_split": orig_split})
    return out


def _hub_rows(path: str, name: str | None, split: str, what: str) -> list[dict[str, Any]]:
    import datasets

    try:
        return list(datasets.load_dataset(path, name, split=split))
    except Exception as e:  # no network, no cache, hub errors: many types
        reason = " ".join(f"{type(e).__name__}: {e}".split())
        raise DataError(f"{what} comes from the Hugging Face dataset {path} and could not be loaded ({reason}); "
                        "connect once (it is then cached, and HF_DATASETS_OFFLINE=1 reads the cache), or pass a "
                        "local .jsonl/.parquet copy with columns id, problem, answer: --data FILE --prompt-column "
                        "problem") from e


def _gsm8k(split: str) -> list[dict[str, Any]]:
    if split not in ("train", "test"):
        raise DataError(f"gsm8k has splits train and test, not {split!r}")
    return gsm8k_records(_hub_rows("openai/gsm8k", "main", split, f"gsm8k ({split})"), split)


def _math(split: str) -> list[dict[str, Any]]:
    """``train``: MATH's training problems (the A*-PO paper's: its code reads lighteval's MATH train split);
    ``train12k``: PRM800K's split, which adds the test problems outside MATH500."""
    expected = {"train": 7498, "train12k": 11998}  # 7,500 (+ 5,000 - 500 in MATH500) - 2 with an empty box
    if split not in expected:
        raise DataError(f"math has the splits train (MATH's training problems, the paper's) and train12k "
                        f"(PRM800K's 12k split), not {split!r}; its test set is the math500 benchmark "
                        "(astarpo eval --benchmarks math500)")
    parts = ("train", "test") if split == "train12k" else ("train",)
    rows = {s: _hub_rows("DigitalLearningGmbH/MATH-lighteval", "default", s, f"math ({s})") for s in parts}
    math500 = {r["problem"] for r in _read_jsonl(PACKAGED_DATA / "math500" / "test.jsonl")}
    records = math_records(rows["train"], rows.get("test", []), math500)
    if len(records) != expected[split]:
        log.warning("math %s: %d rows, expected %d; another version of MATH?", split, len(records), expected[split])
    return records


TRAINING_SETS = {"gsm8k": _gsm8k, "math": _math}  # name -> split -> rows in the packaged benchmark format


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        raise DataError(f"{path}: no such file")
    rows = []
    with path.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{lineno}: not valid JSON ({e.msg}); each line must be one JSON object") from e
            if not isinstance(row, dict):
                raise DataError(f"{path}:{lineno}: expected a JSON object, got {type(row).__name__}")
            rows.append(row)
    return rows


def normalize(
    rows: list[dict[str, Any]],
    source: str = "data",
    prompt_column: str = "prompt",
    answer_column: str = "answer",
) -> list[dict[str, Any]]:
    """Check columns, ids and prompts; return records with ``id``, ``prompt`` and ``answer`` as strings."""
    if not rows:
        raise DataError(f"{source}: the prompt set is empty")
    cols = set(rows[0])
    missing = [c for c in (prompt_column, answer_column) if c not in cols]
    if missing:
        hint = " or pass --prompt-column/--answer-column" if set(missing) & {"prompt", "answer"} else ""
        raise DataError(f"{source}: missing column(s) {', '.join(missing)} (present: {', '.join(sorted(cols))}); "
                        f"rename them{hint}")
    out, seen = [], set()
    for i, row in enumerate(rows):
        rec = dict(row)
        prompt = rec.pop(prompt_column, None)
        answer = rec.pop(answer_column, None)
        if not isinstance(prompt, str):
            raise DataError(f"{source}: row {i}: {prompt_column!r} must be a string, got {type(prompt).__name__}")
        if not prompt.strip():
            raise DataError(f"{source}: row {i}: empty prompt; remove the row")
        if answer is None or isinstance(answer, (dict, list)):
            raise DataError(f"{source}: row {i}: {answer_column!r} must be a string or number, got {answer!r}")
        rid = str(rec.pop("id", i))
        if rid in seen:
            raise DataError(f"{source}: duplicate id {rid!r}; ids must be unique (values are matched to prompts by id)")
        seen.add(rid)
        out.append({"id": rid, "prompt": prompt, "answer": str(answer), **rec})
    return out


def load_prompts(tokenizer: Any, cfg: Any, data: str | None = None, split: str | None = None,
                 limit: int | None = None) -> tuple[list[dict[str, Any]], list[list[int]]]:
    """Records and their prompt tokens, as ``cfg`` (a :class:`~astarpo.config.CommonConfig`) says. ``data``
    names another prompt set (a held-out one), read with ``split`` and ``limit`` instead of the config's."""
    if data is None:
        data, split, limit = cfg.data, cfg.split, cfg.limit
    records = load_records(data, split, limit, cfg.prompt_column, cfg.answer_column, cfg.prompt_template)
    return encode_prompts(tokenizer, records, cfg.max_prompt_tokens, cfg.use_chat_template, cfg.on_long_prompt)


def format_prompt(tokenizer: Any, prompt: str, use_chat_template: bool = True) -> str:
    """The text the model sees: the tokenizer's chat template when it has one, else the prompt as is."""
    if use_chat_template and getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                             add_generation_prompt=True)
    return prompt


def encode_prompts(
    tokenizer: Any,
    records: list[dict[str, Any]],
    max_prompt_tokens: int,
    use_chat_template: bool = True,
    on_long_prompt: str = "error",
) -> tuple[list[dict[str, Any]], list[list[int]]]:
    """Tokenize every prompt; prompts over ``max_prompt_tokens`` raise, or are dropped and counted."""
    kept, ids, too_long = [], [], []
    for rec in records:
        text = format_prompt(tokenizer, rec["prompt"], use_chat_template)
        toks = tokenizer(text, add_special_tokens=not use_chat_template or not tokenizer.chat_template)["input_ids"]
        if len(toks) > max_prompt_tokens:
            too_long.append((rec["id"], len(toks)))
            continue
        kept.append(rec)
        ids.append(toks)
    if too_long:
        rid, n = too_long[0]
        if on_long_prompt != "skip":
            raise DataError(f"{len(too_long)} prompt(s) exceed max_prompt_tokens={max_prompt_tokens} "
                            f"(first: {rid!r}, {n} tokens); raise --max-prompt-tokens or pass --on-long-prompt skip")
        log.warning("skipped %d prompt(s) longer than %d tokens (first: %r, %d tokens)",
                    len(too_long), max_prompt_tokens, rid, n)
    if not kept:
        raise DataError("no prompt left after dropping over-long prompts")
    return kept, ids


def step_prompts(n_prompts: int, batch_size: int, step: int, seed: int) -> list[int]:
    """Positions of the prompts of training step ``step``: consecutive slices of a fresh seeded permutation per
    epoch (a step may span the end of one epoch and the start of the next), so every prompt is visited once per
    epoch and a resumed run visits them in the same order."""
    out, perms = [], {}
    for i in range(step * batch_size, (step + 1) * batch_size):
        epoch, pos = divmod(i, n_prompts)
        if epoch not in perms:
            perms[epoch] = torch.randperm(n_prompts, generator=torch.Generator().manual_seed(seed * 7919 + epoch))
        out.append(int(perms[epoch][pos]))
    return out
