"""Stage 1: sample N responses per prompt from the reference policy, store every reward, compute V*.

    V*(x) = beta1 * log( (1/N) * sum_i exp(r_i / beta1) )        (beta1 -> inf: mean, beta1 -> 0: max)

Rewards, not V*, are stored, so N (any N up to the stored one) and beta1 can change at training time without
sampling again. The output is one parquet file, one row per prompt (``id``, ``rewards``, ``lengths``, and
``responses`` when asked), readable by pandas and ``datasets``; its schema metadata holds the provenance.

Work is done in shards of prompts, each written atomically and seeded by its own index, so a killed run
restarted with the same settings skips finished shards and ends with exactly the rows of an uninterrupted run.
Under ``accelerate launch`` shard k is sampled by process k % world_size and rank 0 merges the shards; since a
shard's samples depend only on its seed, the file is the same whatever the number of processes.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from accelerate import PartialState
from tqdm.auto import tqdm

from . import __version__, rewards
from .config import ValuesConfig
from .data import encode_prompts, load_records
from .generation import sample
from .models import content_hash, eos_ids, load_model, load_tokenizer, resolve_model

log = logging.getLogger(__name__)
FORMAT_VERSION = 1
_META_KEY = b"astarpo"
# Settings that change what is sampled; a resumed run or a training run must agree on them.
SAMPLING_KEYS = ("reference_model_hash", "reward", "temperature", "top_p", "max_new_tokens", "use_chat_template",
                 "prompt_template")


class ValuesError(ValueError):
    """The values file cannot be read or does not belong to this run."""


def v_star(rewards: torch.Tensor, beta1: float) -> torch.Tensor:
    """V* per row of a [prompts, N] reward matrix, via logsumexp (stable for tiny beta1 and large rewards)."""
    rewards = rewards.double()
    if math.isinf(beta1):
        return rewards.mean(-1)
    n = rewards.shape[-1]
    return beta1 * (torch.logsumexp(rewards / beta1, dim=-1) - math.log(n))


def shard_seed(seed: int, shard: int) -> int:
    """Each shard's own seed: its samples do not depend on which shards ran before it in this process."""
    return (seed * 1_000_003 + shard) % (2**63)


def cpu_processes() -> bool:
    """True when launched as several processes on a machine without CUDA: accelerate then needs ``cpu=True``
    to join them over gloo (otherwise each process would run alone)."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1 and not torch.cuda.is_available()


def check_writable(directory: Path) -> None:
    """Fail before any sampling if results could not be saved (read-only, full disk, a file in the way)."""
    try:
        directory.mkdir(parents=True, exist_ok=True)
        probe = directory / f".astarpo-write-test-{os.getpid()}"
        with open(probe, "wb") as f:
            f.write(b"0" * 4096)
            f.flush()
            os.fsync(f.fileno())
        probe.unlink()
    except OSError as e:
        reason = "Not a directory" if directory.exists() and not directory.is_dir() else e.strerror or str(e)
        raise ValuesError(f"cannot write to {directory} ({reason}); choose a writable output location "
                          "with free space") from e


def _write_atomic(table: pa.Table, path: Path) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    pq.write_table(table, tmp)
    os.replace(tmp, path)


def compute_values(cfg: ValuesConfig, reward: str | rewards.RewardFn | None = None) -> Path:
    """Run Stage 1 and return the path of the values file (resuming from finished shards)."""
    reward_name, reward_fn = rewards.resolve(reward or cfg.reward)
    out = Path(cfg.output)
    model_dir = resolve_model(cfg.model)
    provenance = {
        "format_version": FORMAT_VERSION, "astarpo_version": __version__,
        "reference_model": cfg.model, "reference_model_hash": content_hash(model_dir),
        "reward": reward_name, "n": cfg.n, "temperature": cfg.temperature, "top_p": cfg.top_p,
        "max_new_tokens": cfg.max_new_tokens, "seed": cfg.seed, "data": cfg.data, "split": cfg.split,
        "limit": cfg.limit, "max_prompt_tokens": cfg.max_prompt_tokens, "use_chat_template": cfg.use_chat_template,
        "prompt_template": cfg.prompt_template, "shard_size": cfg.shard_size,
    }
    state = PartialState(cpu=cpu_processes())  # rank and world size under `accelerate launch`; one process otherwise
    if out.exists():
        old = read_values(out).provenance
        diff = diff_settings(old, provenance, ignore=("astarpo_version", "created_at", "prompts", "skipped", "seconds"))
        if diff:
            raise ValuesError(f"{out} exists and was made with other settings ({diff}); "
                              "choose another --output or delete it")
        log.info("%s is already complete", out)
        return out
    check_writable(out.parent)
    # Bad data fails here, before anything is written.
    tokenizer = load_tokenizer(model_dir, cfg.trust_remote_code)
    records = load_records(cfg.data, cfg.split, cfg.limit, cfg.prompt_column, cfg.answer_column, cfg.prompt_template)
    records, prompt_ids = encode_prompts(tokenizer, records, cfg.max_prompt_tokens, cfg.use_chat_template,
                                         cfg.on_long_prompt)
    shards_dir = out.with_name(out.name + ".shards")
    prov_path = shards_dir / "provenance.json"
    if prov_path.exists():  # every process checks before any writes, so all of them fail alike
        diff = diff_settings(json.loads(prov_path.read_text()), provenance, ignore=("astarpo_version",))
        if diff:
            raise ValuesError(f"{shards_dir} holds an unfinished run with other settings ({diff}); "
                              "resume with the same settings, or delete that folder to start over")
    state.wait_for_everyone()
    if state.is_main_process:
        shards_dir.mkdir(exist_ok=True)
        if not prov_path.exists():
            prov_path.write_text(json.dumps(provenance, indent=1))
    state.wait_for_everyone()

    n_shards = math.ceil(len(records) / cfg.shard_size)
    mine = range(state.process_index, n_shards, state.num_processes)
    todo = [k for k in mine if not (shards_dir / f"shard-{k:05d}.parquet").exists()]
    start = time.perf_counter()
    if todo:
        model = load_model(model_dir, cfg.dtype, cfg.trust_remote_code).to(state.device)
        eos = eos_ids(model, tokenizer)
        my_prompts = sum(min(cfg.shard_size, len(records) - k * cfg.shard_size) for k in mine)
        done_samples = (len(mine) - len(todo)) * cfg.shard_size * cfg.n
        with tqdm(total=my_prompts * cfg.n, initial=min(done_samples, my_prompts * cfg.n), unit="sample",
                  desc="stage 1", dynamic_ncols=True, disable=not state.is_main_process) as bar:
            for k in todo:
                lo, hi = k * cfg.shard_size, min((k + 1) * cfg.shard_size, len(records))
                table = _sample_shard(cfg, model, tokenizer, eos, records[lo:hi], prompt_ids[lo:hi], reward_fn,
                                      shard_seed(cfg.seed, k), bar.update)
                _write_atomic(table, shards_dir / f"shard-{k:05d}.parquet")
    state.wait_for_everyone()
    if not state.is_main_process:
        state.wait_for_everyone()  # until rank 0 has written the merged file
        return out
    table = pa.concat_tables([pq.read_table(shards_dir / f"shard-{k:05d}.parquet") for k in range(n_shards)])
    skipped = len(records) - table.num_rows
    provenance.update(prompts=table.num_rows, skipped=skipped, seconds=round(time.perf_counter() - start, 2),
                      created_at=time.strftime("%Y-%m-%dT%H:%M:%S%z"))
    table = table.replace_schema_metadata({_META_KEY: json.dumps(provenance).encode()})
    _write_atomic(table, out)
    shutil.rmtree(shards_dir)
    state.wait_for_everyone()
    r = np.array(table.column("rewards").to_pylist(), dtype=float)
    log.info("stage 1: %d prompts x %d samples, mean reward %.3f, %d prompts with no success, %d skipped",
             len(r), cfg.n, r.mean() if r.size else float("nan"), int((r.max(1) <= 0).sum()) if r.size else 0,
             skipped)
    return out


def _sample_shard(cfg: ValuesConfig, model: Any, tokenizer: Any, eos: list[int], records: list[dict],
                  prompt_ids: list[list[int]], reward_fn: rewards.RewardFn, seed: int, progress: Any) -> pa.Table:
    torch.manual_seed(seed)
    roll = sample(model, tokenizer, prompt_ids, cfg.n, cfg.temperature, cfg.top_p, cfg.max_new_tokens, eos,
                  cfg.generation_batch_size, progress)
    extra = [k for k in records[0] if k not in ("id", "prompt")]
    columns = {k: [records[i][k] for i in roll.prompt_index] for k in extra}
    scores = rewards.score(reward_fn, [records[i]["prompt"] for i in roll.prompt_index], roll.completions,
                           columns, cfg.on_reward_error)
    rows: dict[str, list] = {"id": [], "rewards": [], "lengths": []}
    if cfg.save_responses:
        rows["responses"] = []
    skipped = 0
    for j, rec in enumerate(records):
        sl = slice(j * cfg.n, (j + 1) * cfg.n)
        r = scores[sl]
        if any(math.isnan(x) for x in r):
            skipped += 1  # on_reward_error=skip: a prompt needs all N rewards for an unbiased V*
            continue
        rows["id"].append(rec["id"])
        rows["rewards"].append(r)
        rows["lengths"].append(roll.lengths[sl])
        if cfg.save_responses:
            rows["responses"].append(roll.completions[sl])
    if skipped:
        log.warning("skipped %d prompt(s) whose reward failed", skipped)
    schema = pa.schema([("id", pa.string()), ("rewards", pa.list_(pa.float64())), ("lengths", pa.list_(pa.int32()))]
                       + ([("responses", pa.list_(pa.string()))] if cfg.save_responses else []))
    return pa.table(rows, schema=schema)


def diff_settings(old: dict, new: dict, ignore: tuple[str, ...] = ()) -> str:
    keys = [k for k in new if k not in ignore and old.get(k) != new.get(k)]
    return ", ".join(f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in keys)


@dataclass
class Values:
    provenance: dict[str, Any]
    ids: list[str]
    rewards: np.ndarray  # [prompts, N]


def read_values(path: str | Path) -> Values:
    """Read a values file written by :func:`compute_values`, with a clear error for anything else."""
    path = Path(path)
    if not path.is_file():
        raise ValuesError(f"{path}: no such values file; create it with `astarpo values`")
    try:
        table = pq.read_table(path)
    except Exception as e:  # pyarrow raises several types for corrupt files
        raise ValuesError(f"{path}: not a readable parquet file ({e}); recreate it with `astarpo values`") from e
    meta = (table.schema.metadata or {}).get(_META_KEY)
    if meta is None or not {"id", "rewards"} <= set(table.column_names):
        raise ValuesError(f"{path}: not an astarpo values file (no provenance or no id/rewards columns); "
                          "create it with `astarpo values`")
    rewards_list = table.column("rewards").to_pylist()
    if len({len(r) for r in rewards_list}) > 1:
        raise ValuesError(f"{path}: rows hold different numbers of rewards")
    return Values(json.loads(meta), [str(i) for i in table.column("id").to_pylist()],
                  np.asarray(rewards_list, dtype=np.float64).reshape(len(rewards_list), -1))


def check_provenance(provenance: dict[str, Any], expected: dict[str, Any], path: str | Path) -> None:
    """Refuse a values file made with another reference model, reward or sampling settings."""
    for key in SAMPLING_KEYS:
        if provenance.get(key) != expected.get(key):
            what = "reference model" if key == "reference_model_hash" else key
            old = provenance.get("reference_model") if key == "reference_model_hash" else provenance.get(key)
            new = expected.get("reference_model") if key == "reference_model_hash" else expected.get(key)
            raise ValuesError(f"{path} was made with {what} {old!r} but this run uses {new!r}; "
                              f"rerun `astarpo values` with this run's settings")


def load_v_star(values: Values, ids: list[str], beta1: float, n: int | None = None,
                filter_unsolved: bool = True) -> tuple[list[int], torch.Tensor, dict[str, int]]:
    """V* for each id in ``ids``, from the first ``n`` stored samples.

    Returns the positions in ``ids`` to train on, their V*, and counts (missing, unsolved-dropped). A prompt
    with no stored row is an error: it would silently train against a wrong baseline.
    """
    stored_n = values.rewards.shape[1]
    n = stored_n if n is None else n
    if n > stored_n:
        raise ValuesError(f"n={n} but the values file holds only {stored_n} samples per prompt; "
                          f"use n <= {stored_n} or rerun `astarpo values --n {n}`")
    row = {rid: i for i, rid in enumerate(values.ids)}
    missing = [rid for rid in ids if rid not in row]
    if missing:
        raise ValuesError(f"the values file has no row for {len(missing)} of {len(ids)} prompts (first: "
                          f"{missing[0]!r}); run `astarpo values` on the same data")
    r = torch.from_numpy(values.rewards[[row[rid] for rid in ids], :n])
    keep = (r > 0).any(-1) if filter_unsolved else torch.ones(len(ids), dtype=torch.bool)
    positions = keep.nonzero().flatten().tolist()
    return positions, v_star(r[keep], beta1), {"prompts": len(ids), "unsolved_dropped": int((~keep).sum())}
