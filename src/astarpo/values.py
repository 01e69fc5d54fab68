"""Stage 1: sample N responses per prompt from the reference policy, store every reward, compute V*.

    V*(x) = beta1 * log( (1/N) * sum_i exp(r_i / beta1) )        (beta1 -> inf: mean, beta1 -> 0: max)

Rewards, not V*, are stored, so N (any N up to the stored one) and beta1 can change at training time without
sampling again. The output is one parquet file, one row per prompt (``id``, ``rewards``, ``lengths``, and
``responses`` when asked), readable by pandas and ``datasets``; its schema metadata holds the provenance.

Work is done in shards of prompts, each written atomically and seeded by its own index, so a killed run
restarted with the same settings skips finished shards and ends with exactly the rows of an uninterrupted run.
Under ``accelerate launch`` each engine (each process, unless several processes run one vLLM engine) samples a
contiguous block of the shards (:mod:`astarpo.launch`) and rank 0 merges them; since a shard's samples depend only
on its seed, the file is the same whatever the number of processes. Sampling needs no gradients or optimizer
state, so under an FSDP2 or DeepSpeed config each process still holds a whole copy of the reference and samples
its shards alone.

Adaptive Stage 1 (``adaptive=True``, 0/1 rewards) samples in rounds of ``round_size`` and stops drawing for a
prompt once :func:`adaptive_stop` says its V* is settled, or at ``n_max``. Rows then hold different numbers of
samples, in the same format; V* is computed from each row's own samples.
"""

from __future__ import annotations

import json
import logging
import math
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from accelerate.utils import set_seed
from tqdm.auto import tqdm

from . import rewards
from ._version import __version__
from .config import CommonConfig, TrainConfig, ValuesConfig
from .data import load_prompts
from .distributed import whole_weights_on_every_process
from .generation import Sampler, SamplingParams, collect, sampling_settings
from .launch import Launch, blocks
from .models import content_hash, load_model, load_tokenizer, resolve_model, tokenizer_hash
from .rundir import atomic_path, check_writable, diff_settings
from .samplers import layout, make_sampler, sampler_class

log = logging.getLogger(__name__)
FORMAT_VERSION = 1
_META_KEY = b"astarpo"
# A shard's seconds of sampling and scoring (the engine's start-up and the model's loading excluded): their sum is
# the values file's ``sampling_seconds``, Stage 1's cost as `astarpo bench` counts it, also across a resume. With
# several engines their shards' times add up (engine-seconds, not wall-clock); ``sampling_wall_seconds`` is the
# wall-clock figure: the busiest engine's summed shard times (engines sample side by side). A shard written before
# this key existed counts 0.
_SECONDS_KEY = "astarpo_sampling_seconds"
# Settings that change what is sampled; a resumed run or a training run must agree on them.
SAMPLING_KEYS = ("reference_model_hash", "reference_tokenizer_hash", "reward", "temperature", "top_p",
                 "max_new_tokens", "use_chat_template", "prompt_template", "sampler")


class ValuesError(ValueError):
    """The values file cannot be read or does not belong to this run."""


def v_star(rewards: torch.Tensor, beta1: float) -> torch.Tensor:
    """V* per row of a [prompts, N] reward matrix, via logsumexp (stable for tiny beta1 and large rewards).

    NaN entries are padding (rows of an adaptive run hold different numbers of samples): each row's V* uses
    its own samples only.
    """
    rewards = rewards.double()
    present = ~rewards.isnan()
    count = present.sum(-1).double()
    if math.isinf(beta1):
        return rewards.nan_to_num(0.0).sum(-1) / count
    z = (rewards / beta1).masked_fill(~present, -math.inf)
    return beta1 * (torch.logsumexp(z, dim=-1) - count.log())


def v_star_binary(p: float, beta1: float) -> float:
    """V* of a prompt whose 0/1 reward succeeds with probability p: beta1 * log(1 - p + p e^(1/beta1)).

    Increasing in p and steepest at p = 0 (slope beta1 (e^(1/beta1) - 1): 3.2 for beta1 = 0.5), flat near p = 1.
    """
    if math.isinf(beta1) or p <= 0 or p >= 1:
        return min(max(p, 0.0), 1.0)
    return beta1 * float(np.logaddexp(math.log1p(-p), math.log(p) + 1 / beta1))


def _binom_at_least(s: int, n: int, p: float) -> float:
    return sum(math.comb(n, k) * p**k * (1 - p) ** (n - k) for k in range(s, n + 1))


def _bisect(f: Any, iters: int = 60) -> float:
    """The root in [0, 1] of an increasing function (precise to 1e-18, far below any tolerance used here)."""
    lo, hi = 0.0, 1.0
    for _ in range(iters):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if f(mid) < 0 else (lo, mid)
    return (lo + hi) / 2


def clopper_pearson(successes: int, n: int, confidence: float) -> tuple[float, float]:
    """Exact two-sided interval for a success rate: it misses p with probability at most (1 - confidence) / 2
    on each side, for every p and n (no normal approximation, which fails at the 0/n rows common here)."""
    alpha = (1 - confidence) / 2
    lo = 0.0 if successes == 0 else _bisect(lambda p: _binom_at_least(successes, n, p) - alpha)
    hi = 1.0 if successes == n else _bisect(lambda p: alpha - (1 - _binom_at_least(successes + 1, n, p)))
    return lo, hi


def adaptive_stop(rewards_so_far: list[float], cfg: ValuesConfig) -> bool:
    """Whether adaptive Stage 1 draws no more samples for a prompt with these 0/1 rewards.

    With 0/1 rewards V* = v_star_binary(p) depends only on the success rate p, and V* is increasing in p, so the
    Clopper-Pearson interval [lo, hi] for p (level ``confidence``) maps to the interval [V*(lo), V*(hi)] for V*
    with the same coverage. The prompt stops when that interval is at most ``tolerance`` wide (settled), when
    it has no success and hi < ``unsolved_p`` (confidently hard: train's filter_unsolved drops it anyway, so its
    V* is never used), or at ``n_max``. Decisions come only after whole rounds, so at least ``round_size``.
    Because V* is steep near p = 0, a prompt with few successes needs many samples to settle; ``unsolved_p``
    is the lever for tasks where most prompts are rarely solved.
    """
    n = len(rewards_so_far)
    if n >= cfg.n_max:
        return True
    if n < cfg.round_size:
        return False
    successes = int(sum(rewards_so_far))
    lo, hi = clopper_pearson(successes, n, cfg.confidence)
    if v_star_binary(hi, cfg.beta1) - v_star_binary(lo, cfg.beta1) <= cfg.tolerance:
        return True
    return successes == 0 and hi < cfg.unsolved_p


def shard_seed(seed: int, shard: int) -> int:
    """Each shard's own seed: its samples do not depend on which shards ran before it in this process."""
    return (seed * 1_000_003 + shard) % (2**63)


def _write_atomic(table: pa.Table, path: Path) -> None:
    with atomic_path(path) as tmp:
        pq.write_table(table, tmp)


def reference_provenance(cfg: CommonConfig, model_dir: Path, reward_name: str) -> dict[str, Any]:
    """What a values file must share with a training run (:data:`SAMPLING_KEYS`), and the model's name."""
    return {"reference_model": cfg.model, "reference_model_hash": content_hash(model_dir),
            "reference_tokenizer_hash": tokenizer_hash(model_dir), "reward": reward_name,
            "temperature": cfg.temperature, "top_p": cfg.top_p, "max_new_tokens": cfg.max_new_tokens,
            "use_chat_template": cfg.use_chat_template, "prompt_template": cfg.prompt_template,
            # every generate() setting that decides the tokens (top_k 0, no repetition penalty, ...)
            "sampler": sampling_settings(cfg.temperature, cfg.top_p)}


def compute_values(cfg: ValuesConfig, reward: str | rewards.RewardFn | None = None) -> Path:
    """Run Stage 1 and return the path of the values file (resuming from finished shards)."""
    reward_name, reward_fn = rewards.resolve(reward or cfg.reward)
    out = Path(cfg.output)
    model_dir = resolve_model(cfg.model)
    provenance = _provenance(cfg, model_dir, reward_name)
    launch = layout(cfg)  # this process's place under `accelerate launch` (the layout checked before any write)
    if out.exists():
        _check_finished(out, provenance)
        log.info("%s is already complete", out)
        return out
    check_writable(out.parent)
    # Bad data fails here, before anything is written.
    tokenizer = load_tokenizer(model_dir, cfg.trust_remote_code)
    records, prompt_ids = load_prompts(tokenizer, cfg)
    shards_dir = out.with_name(out.name + ".shards")
    _resume_shards(shards_dir, provenance, launch)
    n_shards = math.ceil(len(records) / cfg.shard_size)
    start = time.perf_counter()
    _sample_missing_shards(cfg, model_dir, tokenizer, records, prompt_ids, reward_name, reward_fn, shards_dir,
                           n_shards, launch)
    launch.barrier()
    if launch.is_main:
        _merge_shards(shards_dir, n_shards, len(records), provenance, start, out, launch.engines)
    launch.barrier()  # the other processes return once rank 0 has written the values file
    return out


def _provenance(cfg: ValuesConfig, model_dir: Path, reward_name: str) -> dict[str, Any]:
    """Every setting that decides the rows of the values file: a resumed or rerun Stage 1 must match all of them,
    a training run the :data:`SAMPLING_KEYS` among them."""
    provenance = {
        "format_version": FORMAT_VERSION, "astarpo_version": __version__,
        **reference_provenance(cfg, model_dir, reward_name), "n": cfg.n, "seed": cfg.seed, "data": cfg.data,
        "split": cfg.split, "limit": cfg.limit, "max_prompt_tokens": cfg.max_prompt_tokens,
        "shard_size": cfg.shard_size, "engine": cfg.engine,
        "dtype": sampler_class(cfg).weights_dtype(cfg),
    }
    provenance.update(sampler_class(cfg).provenance)  # what else decides its random stream
    if cfg.adaptive:  # only then, so that files from fixed-N runs keep matching their settings
        provenance.update(n=None, adaptive=True, round_size=cfg.round_size, n_max=cfg.n_max, beta1=cfg.beta1,
                          confidence=cfg.confidence, tolerance=cfg.tolerance, unsolved_p=cfg.unsolved_p)
    return provenance


def _check_finished(out: Path, provenance: dict[str, Any]) -> None:
    """A values file already at ``out`` is this run's result only if it was made with the same settings; another
    run's file would otherwise be taken for this one's."""
    old = read_values(out).provenance
    diff = diff_settings(old, provenance, ignore=("astarpo_version", "created_at", "prompts", "skipped", "seconds",
                                                    "sampling_seconds", "samples"))
    if diff:
        raise ValuesError(f"{out} exists and was made with other settings ({diff}); "
                          "choose another --output or delete it")


def _resume_shards(shards_dir: Path, provenance: dict[str, Any], launch: Launch) -> None:
    """Check that the shards of an unfinished run were made with these settings (so that finished shards can be
    kept), then create the shard folder with this run's provenance if it is new."""
    prov_path = shards_dir / "provenance.json"
    if prov_path.exists():  # every process checks before any writes, so all of them fail alike
        diff = diff_settings(json.loads(prov_path.read_text()), provenance, ignore=("astarpo_version",))
        if diff:
            raise ValuesError(f"{shards_dir} holds an unfinished run with other settings ({diff}); "
                              "resume with the same settings, or delete that folder to start over")
    launch.barrier()
    if launch.is_main:
        shards_dir.mkdir(exist_ok=True)
        if not prov_path.exists():
            prov_path.write_text(json.dumps(provenance, indent=1))
    launch.barrier()


def _shard_path(shards_dir: Path, k: int) -> Path:
    """Shard k's file, numbered so that the merge reads the shards in prompt order."""
    return shards_dir / f"shard-{k:05d}.parquet"


def _sample_missing_shards(cfg: ValuesConfig, model_dir: Path, tokenizer: Any, records: list[dict],
                           prompt_ids: list[list[int]], reward_name: str, reward_fn: rewards.RewardFn,
                           shards_dir: Path, n_shards: int, launch: Launch) -> None:
    """Sample and write this engine's block of the shards (:meth:`~astarpo.launch.Launch.engine_block`) that are
    not on disk yet.

    The model is loaded only when a shard is missing, so a run killed after its last shard goes on to the merge
    without it. vLLM engines under a launch start together (their start is collective) when any shard is missing."""
    per_prompt = cfg.n_max if cfg.adaptive else cfg.n  # at most, for the progress bar
    mine = launch.engine_block(n_shards)
    todo = [k for k in mine if not _shard_path(shards_dir, k).exists()]
    wanted, engine = bool(todo), sampler_class(cfg)
    if engine.starts_together:
        wanted = launch.any(wanted)
    if not wanted:
        return
    model = None  # an engine with weights of its own loads them itself
    if engine.uses_policy:
        with whole_weights_on_every_process():  # sampling only: a whole copy per process, no FSDP
            model = load_model(model_dir, cfg.dtype, cfg.trust_remote_code).to(launch.device)
    sampler = make_sampler(cfg, model_dir, tokenizer, model, launch=launch)
    my_prompts = sum(min(cfg.shard_size, len(records) - k * cfg.shard_size) for k in mine)
    done_samples = (len(mine) - len(todo)) * cfg.shard_size * per_prompt
    with tqdm(total=my_prompts * per_prompt, initial=min(done_samples, my_prompts * per_prompt),
              unit="sample", desc="stage 1", dynamic_ncols=True, disable=not launch.is_main) as bar:
        for k in todo:
            lo, hi = k * cfg.shard_size, min((k + 1) * cfg.shard_size, len(records))
            t0 = time.perf_counter()
            table, drawn = _sample_shard(cfg, sampler, records[lo:hi], prompt_ids[lo:hi], reward_name,
                                         reward_fn, shard_seed(cfg.seed, k), bar.update)
            seconds = json.dumps(time.perf_counter() - t0).encode()
            if launch.speaks:  # the engine's other processes sampled the same rows
                _write_atomic(table.replace_schema_metadata({_SECONDS_KEY: seconds}),
                              _shard_path(shards_dir, k))
            bar.update((hi - lo) * per_prompt - drawn)  # an adaptive shard stops short of n_max


def _merge_shards(shards_dir: Path, n_shards: int, n_records: int, provenance: dict[str, Any], start: float,
                  out: Path, engines: int) -> None:
    """Write the shards' rows, in prompt order, as the values file with the completed provenance (counts, time
    since ``start``, sampling time summed over shards and on the busiest of ``engines``, each of which sampled
    its block of the shards), then delete the shards. Rank 0 only."""
    shards = [pq.read_table(_shard_path(shards_dir, k)) for k in range(n_shards)]
    seconds = [json.loads((t.schema.metadata or {}).get(_SECONDS_KEY.encode(), b"0")) for t in shards]
    sampling = sum(seconds)
    wall = max(sum(seconds[b.start:b.stop]) for b in blocks(n_shards, engines)) if seconds else 0.0
    table = pa.concat_tables([t.replace_schema_metadata(None) for t in shards])
    skipped = n_records - table.num_rows
    rows = table.column("rewards").to_pylist()
    samples = sum(len(r) for r in rows)
    provenance.update(prompts=table.num_rows, skipped=skipped, samples=samples,
                      seconds=round(time.perf_counter() - start, 2), sampling_seconds=round(sampling, 2),
                      sampling_wall_seconds=round(wall, 2),
                      created_at=time.strftime("%Y-%m-%dT%H:%M:%S%z"))
    table = table.replace_schema_metadata({_META_KEY: json.dumps(provenance).encode()})
    _write_atomic(table, out)
    shutil.rmtree(shards_dir)
    log.info("stage 1: %d prompts, %d samples (%.1f per prompt), mean reward %.3f, %d prompts with no success, "
             "%d skipped", len(rows), samples, samples / max(1, len(rows)), sum(map(sum, rows)) / max(1, samples),
             sum(max(r) <= 0 for r in rows), skipped)


def _sample_shard(cfg: ValuesConfig, sampler: Sampler, records: list[dict], prompt_ids: list[list[int]],
                  reward_name: str, reward_fn: rewards.RewardFn, seed: int, progress: Any) -> tuple[pa.Table, int]:
    """One shard's rows and the number of samples drawn. Fixed N is a single round of ``n``; adaptive draws
    rounds of ``round_size`` for the prompts not yet stopped. Seeded once, every stream (torch, CUDA, numpy,
    random: engines and rewards draw from different ones), so the rounds are deterministic."""
    set_seed(seed)
    params = SamplingParams(cfg.temperature, cfg.top_p, cfg.max_new_tokens)
    got: list[dict[str, list]] = [{"rewards": [], "lengths": [], "responses": []} for _ in records]
    active, skipped, drawn = list(range(len(records))), set(), 0
    per_prompt = cfg.round_size if cfg.adaptive else cfg.n
    while active:
        roll = collect(sampler, [records[j] for j in active], [prompt_ids[j] for j in active], per_prompt, params,
                       reward_fn, cfg.on_reward_error, progress)
        drawn += len(roll)
        for a, j in enumerate(active):
            sl = slice(a * per_prompt, (a + 1) * per_prompt)
            r = roll.rewards[sl]
            if any(math.isnan(x) for x in r):
                skipped.add(j)  # on_reward_error=skip: a prompt needs all its rewards for an unbiased V*
                continue
            bad = next((x for x in r if x not in (0.0, 1.0)), None) if cfg.adaptive else None
            if bad is not None:
                raise ValuesError(f"adaptive Stage 1 needs 0/1 rewards (its stopping rule works on the success "
                                  f"rate), but reward {reward_name!r} returned {bad!r}; use a fixed --n instead")
            got[j]["rewards"] += r
            got[j]["lengths"] += roll.lengths[sl]
            got[j]["responses"] += roll.completions[sl]
        active = [j for j in active if cfg.adaptive and j not in skipped and not adaptive_stop(got[j]["rewards"],
                                                                                                   cfg)]
    if skipped:
        log.warning("skipped %d prompt(s) whose reward failed", len(skipped))
    keys = ["rewards", "lengths"] + (["responses"] if cfg.save_responses else [])
    kept = [j for j in range(len(records)) if j not in skipped]
    table_rows = {"id": [records[j]["id"] for j in kept], **{k: [got[j][k] for j in kept] for k in keys}}
    schema = pa.schema([("id", pa.string()), ("rewards", pa.list_(pa.float64())), ("lengths", pa.list_(pa.int32()))]
                       + ([("responses", pa.list_(pa.string()))] if cfg.save_responses else []))
    return pa.table(table_rows, schema=schema), drawn


@dataclass
class Values:
    provenance: dict[str, Any]
    ids: list[str]
    rewards: np.ndarray  # [prompts, N]; NaN pads rows of an adaptive run that hold fewer than the longest row

    @property
    def counts(self) -> np.ndarray:
        """Samples stored per prompt."""
        return (~np.isnan(self.rewards)).sum(1)


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
    if any(not r or any(x is None or math.isnan(x) for x in r) for r in rewards_list):
        raise ValuesError(f"{path}: a row holds no rewards, or a missing/NaN one; recreate it with `astarpo values`")
    rewards_np = np.full((len(rewards_list), max(map(len, rewards_list), default=0)), np.nan)
    for i, r in enumerate(rewards_list):
        rewards_np[i, : len(r)] = r
    return Values(json.loads(meta), [str(i) for i in table.column("id").to_pylist()], rewards_np)


def check_provenance(provenance: dict[str, Any], expected: dict[str, Any], path: str | Path) -> None:
    """Refuse a values file made with another reference model, reward or sampling settings."""
    for key in SAMPLING_KEYS:
        if key not in provenance:
            raise ValuesError(f"{path} does not record its {key} (written by an older astarpo); rerun "
                              "`astarpo values` with this run's settings")
        if provenance.get(key) != expected.get(key) and key == "reference_tokenizer_hash":
            raise ValuesError(f"{path} was made with the tokenizer or chat template of "
                              f"{provenance.get('reference_model')!r}, which differ from those of "
                              f"{expected.get('reference_model')!r}; rerun `astarpo values` with this run's settings")
        if provenance.get(key) != expected.get(key):
            what = "reference model" if key == "reference_model_hash" else key
            old = provenance.get("reference_model") if key == "reference_model_hash" else provenance.get(key)
            new = expected.get("reference_model") if key == "reference_model_hash" else expected.get(key)
            raise ValuesError(f"{path} was made with {what} {old!r} but this run uses {new!r}; "
                              f"rerun `astarpo values` with this run's settings")


def load_v_star(values: Values, ids: list[str], beta1: float, n: int | None = None,
                filter_unsolved: bool = True) -> tuple[list[int], torch.Tensor, dict[str, int]]:
    """V* for each id in ``ids``, from each row's first ``n`` stored samples (default: all of them).

    A fixed-N file needs n <= its N. In an adaptive file rows hold round_size..n_max samples and ``n`` caps
    each row at its first min(n, stored) samples, which is exactly the row an adaptive run with n_max = n
    would have stored (its stopping decisions up to n are the same); so n must be a multiple of round_size,
    at most n_max. Returns the positions in ``ids`` to train on, their V*, and counts (missing,
    unsolved-dropped). A prompt with no stored row is an error: it would silently train against a wrong baseline.
    """
    row = {rid: i for i, rid in enumerate(values.ids)}
    missing = [rid for rid in ids if rid not in row]
    if missing:
        raise ValuesError(f"the values file has no row for {len(missing)} of {len(ids)} prompts (first: "
                          f"{missing[0]!r}); run `astarpo values` on the same data")
    r = values.rewards[[row[rid] for rid in ids]]
    prov = values.provenance
    if n is not None and prov.get("adaptive"):
        if n > prov["n_max"] or n % prov["round_size"]:
            raise ValuesError(f"n={n} does not apply to this adaptive values file (rounds of {prov['round_size']} "
                              f"samples, at most {prov['n_max']}): use a multiple of {prov['round_size']} up to "
                              f"{prov['n_max']}, or leave n unset")
        r = r[:, :n]
    elif n is not None:
        stored_n = int(values.counts.min()) if len(values.ids) else 0
        if n > stored_n:
            raise ValuesError(f"n={n} but the values file holds only {stored_n} samples per prompt; "
                              f"use n <= {stored_n} or rerun `astarpo values --n {n}`")
        r = r[:, :n]
    r = torch.from_numpy(r)
    keep = (r > 0).any(-1) if filter_unsolved else torch.ones(len(ids), dtype=torch.bool)
    positions = keep.nonzero().flatten().tolist()
    return positions, v_star(r[keep], beta1), {"prompts": len(ids), "unsolved_dropped": int((~keep).sum())}


def training_values(cfg: TrainConfig, model_dir: Path, reward_name: str, ids: list[str]
                    ) -> tuple[list[int], torch.Tensor, int]:
    """A*-PO's V* for Stage 2, from the Stage 1 file ``cfg.values``: the positions in ``ids`` of the prompts to
    train on, their V*, and how many were dropped because all their Stage 1 samples failed.

    The file must come from this run's reference model, tokenizer, reward and sampling settings: V* of other
    samples would be a baseline for another policy, and the advantages would be wrong without any error.
    """
    if cfg.values is None:
        raise ValuesError("astarpo needs the Stage 1 file from `astarpo values`: pass --values PATH")
    values = read_values(cfg.values)
    check_provenance(values.provenance, reference_provenance(cfg, model_dir, reward_name), cfg.values)
    keep, kept_v_star, counts = load_v_star(values, ids, cfg.beta1, cfg.n, cfg.filter_unsolved)
    if not keep:
        raise ValuesError("no prompt left to train on: every prompt's Stage 1 samples all failed; use an easier "
                          "task, a larger n in `astarpo values`, or --no-filter-unsolved")
    log.info("training on %d prompts (%d dropped: all Stage 1 samples failed)", len(keep),
             counts["unsolved_dropped"])
    return keep, kept_v_star, counts["unsolved_dropped"]
