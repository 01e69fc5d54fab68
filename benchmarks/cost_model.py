"""The cost model of ``astarpo plan --time`` against what it can be checked on: the paper's hours and the CPU bench.

1. The paper's recipe (MATH, 4 x H100, 25 epochs, ``configs/paper``) for Qwen2.5-1.5B/3B/7B: the model's hours per
   method and A*-PO's ratio to each baseline, beside the paper's (1.5B as issue #22 quotes it, 3B and 7B as issue
   #30 does). The device rates are datasheet peaks times stated efficiencies, not fitted to the paper; the gap is
   reported as it is, with what-ifs that show which unmodelled costs could explain it (none of them is adopted).
   Then the paper's set-up as its official code runs it (``--setup paper``, ``astarpo.bench.cost.paper_hours``):
   verl's passes, one eager vLLM engine with a latency floor, per-step fixed costs, validation and checkpoints, its
   constants fixed before the comparison; its ratios beside the paper's at the three sizes, and which land within
   0.15.
   Then A*-PO on a generation server (issue #29): S of the 4 GPUs sampling while the others train
   (``astarpo.bench.cost.split_hours``), overlapped (lag 1) or taking turns (lag 0).
2. The CPU: rates fitted to two rows of the committed bench (``results/bench/bench.json``), then every committed
   CPU figure predicted beside its measurement (``astarpo.bench.cost.cpu_check``; held-out figures are the check).

Reads only committed files and runs no model. Writes ``results/cost_model.{md,json}``.

    PYTHONPATH=src python benchmarks/cost_model.py
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

from astarpo.bench import cost
from astarpo.bench.plan import QWEN25

ROOT = Path(__file__).resolve().parents[1]
BASELINES = ("grpo", "ppo", "rebel")
CPU_FACTOR = 1.5  # the factor the held-out CPU predictions must stay within (tests/test_plan.py)


def ratios(h: dict[str, float]) -> dict[str, float]:
    """A*-PO's hours over each baseline's, from hours by method."""
    return {b: h["astarpo"] / h[b] for b in BASELINES}


def main() -> None:
    device, recipe = cost.gpu("h100"), cost.Recipe()
    paper = cost.PAPER_HOURS["qwen2.5-1.5b"]
    models = {m: cost.hours(s, device, recipe) for m, s in QWEN25.items()}
    md = ["# Cost model (`astarpo plan --time`) against the paper and the CPU bench", "",
          "Reads only committed files; runs no model. `PYTHONPATH=src python benchmarks/cost_model.py`.", "",
          "## The paper's recipe on 4 x H100", "",
          f"Device: H100 SXM, {cost.PEAK['h100'][0] / 1e12:.0f} TFLOP/s dense bf16 and "
          f"{cost.PEAK['h100'][1] / 1e12:.2f} TB/s HBM (datasheet); training at MFU {cost.TRAIN_MFU}, decoding at "
          f"{cost.DECODE_EFFICIENCY} of peak bandwidth and FLOP/s (assumptions, not fitted). Recipe: "
          "configs/paper (7,500 prompts, 25 epochs, batch 256 in two updates of 128, 256 + 1024 tokens counted "
          "at their caps, Stage 1 N 8, 256 sequences decoded at once per GPU, gradient checkpointing); each "
          "method with its defaults in this implementation (GRPO 8 samples per prompt and no KL term, RLOO 4, "
          "REBEL 2, PPO 1 with a critic).", ""]
    for m, s in QWEN25.items():
        md += [cost.table(m, s, device, recipe), ""]
    model_ratios = ratios({a: r["hours"] for a, r in models["qwen2.5-1.5b"].items()})
    paper_ratios = ratios(paper)
    md += ["### A*-PO's hours over each baseline's, Qwen2.5-1.5B", "",
           "| | A*-PO h | / GRPO | / PPO | / REBEL |", "|---|---|---|---|---|",
           f"| paper (4 x H100) | {paper['astarpo']:.2f} | " + " | ".join(f"{paper_ratios[b]:.2f}" for b in BASELINES)
           + " |",
           f"| model | {models['qwen2.5-1.5b']['astarpo']['hours']:.2f} | "
           + " | ".join(f"{model_ratios[b]:.2f}" for b in BASELINES) + " |"]
    for m in ("qwen2.5-3b", "qwen2.5-7b"):
        r = ratios({a: x["hours"] for a, x in models[m].items()})
        p = ratios(cost.PAPER_HOURS[m])
        md.append(f"| paper, {m[-2:].upper()} (as issue #30 quotes it) | {cost.PAPER_HOURS[m]['astarpo']:.2f} | "
                  + " | ".join(f"{p[b]:.2f}" for b in BASELINES) + " |")
        md.append(f"| model, {m[-2:].upper()} | {models[m]['astarpo']['hours']:.2f} | "
                  + " | ".join(f"{r[b]:.2f}" for b in BASELINES) + " |")
    # What-ifs: costs the model leaves out or settings the paper's baselines may have used. None is adopted.
    h15 = models["qwen2.5-1.5b"]
    steps = h15["astarpo"]["steps"]
    fixed = (paper["astarpo"] - h15["astarpo"]["hours"]) * 3600 / steps  # per-step seconds that close A*-PO's gap
    whatif = {
        "a fixed cost per step that closes A*-PO's gap (weight sync, engine wake/sleep, scheduling)":
            {a: h15[a]["hours"] + fixed * steps / 3600 for a in ("astarpo", *BASELINES)},
        "GRPO with 4 samples per prompt": {"grpo": cost.hours(QWEN25["qwen2.5-1.5b"], device, replace(
            recipe, group_sizes={"grpo": 4}), ("grpo",))["grpo"]["hours"]},
        "GRPO with a KL term (a reference forward, as verl's GRPO examples)": {"grpo": cost.hours(
            QWEN25["qwen2.5-1.5b"], device, replace(recipe, kl_coefs={"grpo": 1e-3}), ("grpo",))["grpo"]["hours"]},
        "half the assumed efficiencies (MFU 0.2, decode 0.25)": {a: x["hours"] for a, x in cost.hours(
            QWEN25["qwen2.5-1.5b"], cost.gpu("h100", 0.2, 0.25), recipe).items() if a in ("astarpo", *BASELINES)},
    }
    md += ["", f"The model's hours are {paper['astarpo'] / h15['astarpo']['hours']:.1f}x under the paper's for "
           f"A*-PO and its A*-PO/GRPO ratio is {model_ratios['grpo']:.2f} against the paper's "
           f"{paper_ratios['grpo']:.2f}; PPO and REBEL are within "
           f"{max(abs(model_ratios[b] / paper_ratios[b] - 1) for b in ('ppo', 'rebel')):.0%}. What-ifs (hours; "
           "none is part of the model):", "",
           "| what if | A*-PO | GRPO | PPO | REBEL | A*-PO / GRPO |", "|---|---|---|---|---|---|"]
    for name, h in whatif.items():
        row = {a: h.get(a, h15[a]["hours"]) for a in ("astarpo", *BASELINES)}
        md.append(f"| {name} | " + " | ".join(f"{row[a]:.2f}" for a in ("astarpo", *BASELINES))
                  + f" | {row['astarpo'] / row['grpo']:.2f} |")
    md += ["", f"(The fixed cost is {fixed:.0f} s per step over {steps:.0f} steps.)", ""]
    # Issue #30: the paper's set-up as its official code runs it (cost.paper_hours), constants fixed beforehand.
    comparison = cost.paper_comparison(device, recipe)
    paper_rows = {m: cost.paper_hours(s, device, recipe) for m, s in QWEN25.items()}
    pa = cost.paper_assumptions(QWEN25["qwen2.5-1.5b"], device, recipe)
    md += ["### The paper's set-up as its official code runs it (`--setup paper`, issue #30)", "",
           "github.com/ZhaolinGao/A-PO's verl: the old policy's log-probs and the reference forward of every sample "
           "for every method, PPO's critic, no gradient checkpointing, micro-batches of n sequences per GPU; one "
           "eager vLLM 0.6.3 engine over the 4 GPUs (tensor parallel 4, max_num_seqs 1024) whose decode step takes "
           "its bandwidth and compute time or a latency floor (its kernel launches x an assumed "
           f"{cost.LAUNCH_SECONDS * 1e6:.0f} us host time per launch); per step the weight sync and the KV cache; "
           "over the run 16 greedy validations of the 5,000 MATH test problems and 14 float32 checkpoints. GRPO's 8 "
           "and REBEL's 2 samples per prompt are astarpo's defaults: no baseline script is in the official code. "
           "Every constant was fixed, with its source, before this table was computed; none is fitted to it.", ""]
    for m, s in QWEN25.items():
        md += [cost.paper_table(m, s, device, recipe).split("\n\nA*-PO's hours over")[0], ""]
    md += ["A*-PO's hours over each baseline's, the paper set-up beside the paper (within 0.15: yes/no):", "",
           "| model | A*-PO h model / paper | / GRPO model | paper | within | / PPO model | paper | within | "
           "/ REBEL model | paper | within |", "|---" * 11 + "|"]
    for m, c in comparison.items():
        md.append(f"| {m} | {c['model_hours']['astarpo']:.2f} / {c['paper_hours']['astarpo']:.2f} | " + " | ".join(
            f"{c['model_ratios'][b]:.2f} | {c['paper_ratios'][b]:.2f} | {'yes' if c['within_0.15'][b] else 'no'}"
            for b in BASELINES) + " |")
    def show(v: object) -> str:
        if isinstance(v, dict):
            return "; ".join(f"{k} {show(x)}" for k, x in v.items())
        return f"{v * 1e3:.1f} ms" if isinstance(v, float) else str(v)

    md += ["", "Constants and their sources:", ""] + [f"- {k}: {show(v)}" for k, v in pa.items()] + [""]
    # Issue #29's server mode: A*-PO sampling on S of the 4 GPUs while the others train (cost.split_hours).
    splits = {m: {f"S={S},K={K}": cost.split_hours(s, device, recipe, S, K) for S in range(1, recipe.gpus)
                  for K in (1, 0)} for m, s in QWEN25.items()}
    link = cost.link(device)
    md += ["### A*-PO on a generation server (issue #29), the same recipe", "",
           "S of the 4 GPUs run the vLLM server (an engine each) and the other 4 - S train; with lag K = 1 a step "
           "costs max(sampling, training) + the weight push, with K = 0 their sum + the push "
           f"({link['bytes_per_s'] / 1e9:.0f} GB/s: NVLink's {cost.NVLINK['h100'] / 2e9:.0f} GB/s one way at an "
           f"assumed {cost.LINK_EFFICIENCY}); Stage 1 on all 4 GPUs as colocated. The model's prediction: astarpo's "
           "server mode has not run on GPUs. A*-PO's hours:", "",
           "| model | colocated | " + " | ".join(f"S={S}, K={K}" for K in (1, 0) for S in range(1, recipe.gpus))
           + " |", "|---" * (2 + 2 * (recipe.gpus - 1)) + "|"]
    for m in QWEN25:
        md.append(f"| {m} | {models[m]['astarpo']['hours']:.2f} | " + " | ".join(
            f"{splits[m][f'S={S},K={K}']['hours']:.2f}" for K in (1, 0) for S in range(1, recipe.gpus)) + " |")
    co = cost.method_seconds(QWEN25["qwen2.5-1.5b"], device, "astarpo", recipe)
    md += ["", "Qwen2.5-1.5B per step, seconds (colocated: the 4 GPUs sample, then train):", "",
           "| split | sampling | training | weight push | step | idle side |", "|---|---|---|---|---|---|",
           f"| colocated | {co['generation']:.2f} | {sum(co[p] for p in cost.PASSES):.2f} | not counted | "
           f"{co['generation'] + sum(co[p] for p in cost.PASSES):.2f} | none (they take turns) |"]
    for S in range(1, recipe.gpus):
        a = splits["qwen2.5-1.5b"][f"S={S},K=1"]
        md.append(f"| S={S}, K=1 | {a['generation_seconds']:.2f} | {a['training_seconds']:.2f} | "
                  f"{a['push_seconds']:.3f} | {a['step_seconds']:.2f} | {a['waiting']} |")
    md.append("")
    bench = json.loads((ROOT / cost.BENCH_PATH).read_text())
    sampling = json.loads((ROOT / cost.SAMPLING_PATH).read_text())
    fitted = cost.fit_cpu(bench)
    rows = cost.cpu_check(bench, sampling, fitted)
    held = [r for r in rows if not r["fit"]]
    worst = max(max(r["ratio"], 1 / r["ratio"]) for r in held)
    md += ["## The CPU bench: predicted beside measured", "",
           f"Rates fitted to A*-PO's step and A*-PO's and GRPO's sampling in `{cost.BENCH_PATH}` "
           f"(SmolLM2-135M-Instruct, float32, HF generate, 2 cores): dense {fitted.dense_flops / 1e9:.0f} GFLOP/s, "
           f"decode {fitted.decode_flops / 1e9:.0f} GFLOP/s, {fitted.bandwidth / 1e9:.1f} GB/s per decode step "
           "(weights read plus the per-step overhead of generate). Held-out figures (not fitted) are the check; "
           f"all {len(held)} are within {worst:.2f}x (the test's bound: {CPU_FACTOR}x).", "",
           "| figure | predicted s | measured s | predicted / measured | fitted |", "|---|---|---|---|---|"]
    md += [f"| {r['figure']} | {r['predicted']:.2f} | {r['measured']:.2f} | {r['ratio']:.2f} | "
           f"{'yes' if r['fit'] else ''} |" for r in rows]
    out = ROOT / "benchmarks" / "results"
    (out / "cost_model.md").write_text("\n".join(md) + "\n")
    (out / "cost_model.json").write_text(json.dumps({
        "paper_recipe_h100x4": {m: {"methods": h, "assumptions": cost.assumptions(QWEN25[m], device, recipe)}
                                for m, h in models.items()},
        "ratios_1.5b": {"model": model_ratios, "paper": paper_ratios, "paper_hours": paper},
        "paper_setup_h100x4": {"methods": paper_rows, "comparison": comparison, "assumptions": pa},
        "what_if_hours_1.5b": whatif, "fixed_seconds_per_step_closing_astarpo_gap": fixed,
        "astarpo_on_a_server_h100x4": {"splits": splits, "link": link},
        "cpu": {"fitted": {"dense_flops": fitted.dense_flops, "decode_flops": fitted.decode_flops,
                           "bandwidth": fitted.bandwidth}, "check": rows, "worst_held_out_factor": worst}},
        indent=1) + "\n")
    print("\n".join(md))


if __name__ == "__main__":
    main()
