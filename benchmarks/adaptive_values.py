"""Adaptive Stage 1 against fixed N = 8: samples drawn, Stage 1 seconds, and V* error against N = 64.

On one fixed prompt subset of the default task (SmolLM2-135M-Instruct, arithmetic, 16 new tokens, temperature 1):
a reference run with N = 64 (its own seed, so its errors are independent of the runs measured), then for each
seed fixed N = 8 and each adaptive rule, interleaved so that noise from a shared machine hits all alike. Each
run is a real ``compute_values`` call; its seconds are those recorded in the file's provenance (model load and
sampling). The MAE of V* is over every prompt of the subset, for beta1 = 0.5 (the rule's) and beta1 = inf.
A second table gives the *expected* samples and MAE when each prompt's success rate is taken to be its N = 64
rate (exact enumeration of the binomial paths through each rule): computed, not measured, but free of the
noise of a single draw of 64 prompts. Writes ``results/adaptive_values.{md,json}``.

    PYTHONPATH=src python benchmarks/adaptive_values.py --prompts 64 --seeds 0
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import shutil
import time
from pathlib import Path

import numpy as np
import torch

from astarpo import ValuesConfig, compute_values
from astarpo.values import adaptive_stop, read_values, v_star, v_star_binary

TASK = {"model": "smollm2-135m-instruct", "data": "arithmetic", "reward": "arithmetic", "max_new_tokens": 16,
        "temperature": 1.0, "top_p": 1.0}


def v_of(values, ids: list[str], beta1: float) -> np.ndarray:
    row = {rid: i for i, rid in enumerate(values.ids)}
    return v_star(torch.from_numpy(values.rewards[[row[i] for i in ids]]), beta1).numpy()


def expected(p: float, cfg: ValuesConfig | None, beta1: float, n_fixed: int = 8) -> tuple[float, float]:
    """E[samples] and E[|V*_hat - V*(p)|] for one prompt with success rate p, by enumerating (successes, n)."""
    if cfg is None:
        probs = [math.comb(n_fixed, s) * p**s * (1 - p) ** (n_fixed - s) for s in range(n_fixed + 1)]
        return n_fixed, sum(q * abs(v_star_binary(s / n_fixed, beta1) - v_star_binary(p, beta1))
                            for s, q in enumerate(probs))
    r, states, samples, err = cfg.round_size, {0: 1.0}, 0.0, 0.0
    n = 0
    while states:
        n += r
        grown: dict[int, float] = {}
        for s, q in states.items():
            for k in range(r + 1):
                grown[s + k] = grown.get(s + k, 0.0) + q * math.comb(r, k) * p**k * (1 - p) ** (r - k)
        states = {}
        for s, q in grown.items():
            if adaptive_stop([1.0] * s + [0.0] * (n - s), cfg):
                samples += q * n
                err += q * abs(v_star_binary(s / n, beta1) - v_star_binary(p, beta1))
            else:
                states[s] = q
    return samples, err


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=TASK["model"])
    ap.add_argument("--prompts", type=int, default=64)
    ap.add_argument("--seeds", default="0", help="comma list: one fixed-N and one run per rule per seed")
    ap.add_argument("--ref-n", type=int, default=64)
    ap.add_argument("--ref-seed", type=int, default=64)
    ap.add_argument("--n", type=int, default=8, help="the fixed-N baseline")
    ap.add_argument("--round-size", type=int, default=4)
    ap.add_argument("--n-max", type=int, default=16)
    ap.add_argument("--confidence", type=float, default=0.9)
    ap.add_argument("--tolerance", type=float, default=0.25)
    ap.add_argument("--unsolved-p", default="0,0.6", help="comma list: one adaptive rule per value")
    ap.add_argument("--workdir", default="runs/adaptive_bench")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "adaptive_values"))
    args = ap.parse_args()
    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    common = {**TASK, "model": args.model, "limit": args.prompts, "split": "train"}
    rules = {f"adaptive (unsolved_p={u})": float(u) for u in args.unsolved_p.split(",")}
    rule_cfg = {name: ValuesConfig(**common, adaptive=True, round_size=args.round_size, n_max=args.n_max,
                                   beta1=0.5, confidence=args.confidence, tolerance=args.tolerance, unsolved_p=u)
                for name, u in rules.items()}

    t0 = time.perf_counter()
    ref_path = compute_values(ValuesConfig(**common, n=args.ref_n, seed=args.ref_seed,
                                           output=str(work / f"reference-n{args.ref_n}.parquet")))
    ref = read_values(ref_path)
    ids = ref.ids
    print(f"reference ready ({time.perf_counter() - t0:.0f} s)", flush=True)

    p64 = np.nanmean(ref.rewards, 1)
    hist_edges = [0, 1e-9, 1 / 16, 0.125, 0.25, 0.5, 0.75, 1 - 1e-9, 1.0 + 1e-9]
    hist = np.histogram(p64, hist_edges)[0].tolist()
    hist_labels = ["0", "(0, 1/16)", "[1/16, 1/8)", "[1/8, 1/4)", "[1/4, 1/2)", "[1/2, 3/4)", "[3/4, 1)", "1"]
    exp_rows = []
    for name, cfg in [("fixed N=8", None), *rule_cfg.items()]:
        for beta1 in (0.5, math.inf):
            pairs = [expected(float(p), cfg, beta1, args.n) for p in p64]
            exp_rows.append({"method": name, "beta1": beta1, "samples": float(np.sum([s for s, _ in pairs])),
                             "mae": float(np.mean([e for _, e in pairs]))})

    def ratio(rows: list[dict], name: str, key: str) -> float:
        base = [r[key] for r in rows if r["method"] == "fixed N=8"]
        mine = [r[key] for r in rows if r["method"] == name]
        return float(np.mean(mine) / np.mean(base)) if base and mine else float("nan")

    def write() -> None:

        keys = ("round_size", "n_max", "beta1", "confidence", "tolerance", "unsolved_p")
        result = {"task": {**common, "ref_n": args.ref_n, "ref_seed": args.ref_seed},
                  "rules": {name: {k: getattr(c, k) for k in keys} for name, c in rule_cfg.items()},
                  "runs": runs, "expected": exp_rows,
                  "ratios_vs_fixed": {name: {k: ratio(runs, name, k) for k in ("samples", "seconds", "mae_beta1_0.5",
                                                                              "mae_beta1_inf")} for name in rules},
                  "reference": {"mean_success": float(p64.mean()), "histogram": dict(zip(hist_labels, hist)),
                                "prompts_solved_at_least_once": int((p64 > 0).sum())},
                  "machine": f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} torch threads"}
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out + ".json").write_text(json.dumps(result, indent=1))
        md = [f"# Adaptive Stage 1 vs fixed N = {args.n}", "",
              f"{args.prompts} training prompts of the default task ({args.model}, arithmetic, "
              f"{TASK['max_new_tokens']} new tokens, temperature 1); V* reference: N = {args.ref_n} (seed "
              f"{args.ref_seed}). Adaptive: rounds of {args.round_size}, n_max {args.n_max}, Clopper-Pearson at "
              f"{args.confidence}, tolerance {args.tolerance} on the V* interval (beta1 0.5).", "",
              "## Measured (one run per method and seed)", "",
              "| method | seed | samples | Stage 1 s | samples/s | prompts kept | MAE V* (beta1 0.5) | MAE (inf) |",
              "|---|---|---|---|---|---|---|---|"]
        md += [f"| {r['method']} | {r['seed']} | {r['samples']} | {r['seconds']:.1f} | {r['samples_per_second']} | "
               f"{r['kept']} | {r['mae_beta1_0.5']:.4f} | {r['mae_beta1_inf']:.4f} |" for r in runs]
        md += ["", "Ratios adaptive / fixed (means over seeds): "
               + "; ".join(f"{n}: samples {v['samples']:.2f}, seconds {v['seconds']:.2f}, MAE(0.5) "
                           f"{v['mae_beta1_0.5']:.2f}, MAE(inf) {v['mae_beta1_inf']:.2f}"
                           for n, v in result["ratios_vs_fixed"].items()), "",
               "## Expected under p = N=64 success rate (computed, exact binomial enumeration)", "",
               "| method | beta1 | expected samples | expected MAE of V* vs V*(p) |", "|---|---|---|---|"]
        md += [f"| {r['method']} | {r['beta1']} | {r['samples']:.0f} | {r['mae']:.4f} |" for r in exp_rows]
        md += ["", f"## Success rates with N = {args.ref_n} (mean {p64.mean():.3f})", "",
               "| " + " | ".join(hist_labels) + " |", "|" + "---|" * len(hist),
               "| " + " | ".join(map(str, hist)) + " |",
               "", f"Machine: {result['machine']}. Seconds are one run each, interleaved."]
        Path(args.out + ".md").write_text("\n".join(md) + "\n")
        print("\n".join(md))


    runs: list[dict] = []
    for seed in [int(s) for s in args.seeds.split(",")]:
        plan = [("fixed N=8", ValuesConfig(**common, n=args.n, seed=seed))]
        plan += [(name, ValuesConfig(**{**vars(cfg), "seed": seed})) for name, cfg in rule_cfg.items()]
        if seed % 2:
            plan.reverse()
        for name, cfg in plan:
            out = work / f"{name.split(' ')[0]}-{len(runs)}-seed{seed}.parquet"
            for stale in (out, out.with_name(out.name + ".shards")):
                shutil.rmtree(stale, ignore_errors=True) if stale.is_dir() else stale.unlink(missing_ok=True)
            cfg.output = str(out)
            compute_values(cfg)
            vals = read_values(out)
            row = {"method": name, "seed": seed, "samples": int(vals.counts.sum()),
                   "seconds": vals.provenance["seconds"], "kept": int((np.nan_to_num(vals.rewards) > 0).any(1).sum())}
            for beta1, key in ((0.5, "mae_beta1_0.5"), (math.inf, "mae_beta1_inf")):
                row[key] = float(np.abs(v_of(vals, ids, beta1) - v_of(ref, ids, beta1)).mean())
            row["samples_per_second"] = round(row["samples"] / row["seconds"], 2)
            runs.append(row)
            print(json.dumps(row), flush=True)
            write()


if __name__ == "__main__":
    main()
