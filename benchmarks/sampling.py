"""Stage 1 sampling throughput: shared-prefill ``sample()`` vs plain ``generate(num_return_sequences=N)``.

Both variants run in one process on the same prompts, interleaved (ABBA order per repetition) so that noise from
a shared machine hits both alike; each repetition seeds both variants the same, so with equal next-token
distributions they should draw (nearly) the same tokens.
One untimed warm-up call per variant comes first. Writes ``results/sampling.{md,json}``.

    PYTHONPATH=src python benchmarks/sampling.py --prompts 16 --reps 2
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import torch
import transformers

from astarpo import rewards
from astarpo.data import encode_prompts, load_records
from astarpo.generation import sample
from astarpo.models import eos_ids, load_model, load_tokenizer, resolve_model

VARIANTS = {"shared_prefill": True, "plain_generate": False}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--prompts", type=int, default=16)
    ap.add_argument("--n", type=int, default=8)
    ap.add_argument("--max-new-tokens", type=int, default=32)
    ap.add_argument("--batch-size", type=int, default=64, help="sequences per generate() call")
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "sampling"))
    args = ap.parse_args()

    model_dir = resolve_model(args.model)
    tok, model = load_tokenizer(model_dir), load_model(model_dir)
    eos = eos_ids(model, tok)
    records = load_records("arithmetic", "train", args.prompts)
    records, prompt_ids = encode_prompts(tok, records, max_prompt_tokens=512)
    reward = rewards.get("arithmetic")
    for shared in VARIANTS.values():  # warm-up (first-call allocations), not timed
        sample(model, tok, prompt_ids[:2], 2, 1.0, 1.0, 4, eos, shared_prefill=shared)
    runs: dict[str, list[dict]] = {v: [] for v in VARIANTS}
    for rep in range(args.reps):
        order = list(VARIANTS) if rep % 2 == 0 else list(reversed(VARIANTS))
        for name in order:
            torch.manual_seed(args.seed + rep)
            t0 = time.perf_counter()
            roll = sample(model, tok, prompt_ids, args.n, 1.0, 1.0, args.max_new_tokens, eos, args.batch_size,
                          shared_prefill=VARIANTS[name])
            sec = time.perf_counter() - t0
            r = rewards.score(reward, [records[i]["prompt"] for i in roll.prompt_index], roll.completions,
                              {"answer": [records[i]["answer"] for i in roll.prompt_index]})
            runs[name].append({"seconds": sec, "samples": len(roll), "tokens": sum(roll.lengths),
                               "mean_reward": sum(r) / len(r), "responses": roll.response_tokens})
            print(f"rep {rep} {name:15s} {sec:7.1f} s  {len(roll) / sec:6.2f} samples/s  "
                  f"{sum(roll.lengths) / sec:7.1f} tokens/s  reward {sum(r) / len(r):.3f}", flush=True)
        write_results(args, runs, prompt_ids)  # after every repetition: a killed run keeps what it measured
    print(Path(args.out).with_suffix(".md").read_text())


def write_results(args: argparse.Namespace, runs: dict[str, list[dict]], prompt_ids: list[list[int]]) -> None:
    same = [sum(a == b for a, b in zip(x["responses"], y["responses"])) / len(x["responses"])
            for x, y in zip(runs["shared_prefill"], runs["plain_generate"])]
    summary = {}
    for name, rs in runs.items():
        summary[name] = {
            "seconds_median": statistics.median(x["seconds"] for x in rs),
            "samples_per_s": statistics.median(x["samples"] / x["seconds"] for x in rs),
            "tokens_per_s": statistics.median(x["tokens"] / x["seconds"] for x in rs),
            "mean_reward": statistics.mean(x["mean_reward"] for x in rs),
            "runs": [{k: v for k, v in x.items() if k != "responses"} for x in rs],
        }
    ratio = [p["seconds"] / s["seconds"] for s, p in zip(runs["shared_prefill"], runs["plain_generate"])]
    prompt_len = statistics.mean(len(p) for p in prompt_ids)
    result = {
        "machine": f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} torch threads, "
                   f"{platform.platform()}",
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__,
                     "python": platform.python_version()},
        "settings": {**{k: v for k, v in vars(args).items() if k != "out"}, "temperature": 1.0, "top_p": 1.0,
                     "mean_prompt_tokens": round(prompt_len, 1), "reps_done": len(ratio)},
        "variants": summary,
        "speedup_per_rep": ratio,
        "identical_responses_per_rep": same,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(result, indent=1))
    lines = [
        "# Stage 1 sampling: shared prefill vs plain generate",
        "",
        f"Model {args.model}, arithmetic train prompts ({args.prompts}, mean {prompt_len:.1f} prompt tokens), "
        f"N={args.n}, max_new_tokens={args.max_new_tokens}, temperature 1, {args.batch_size} sequences per "
        f"generate() call, {len(ratio)} interleaved repetitions, seed {args.seed}.",
        f"Machine: {result['machine']}; torch {torch.__version__}, transformers {transformers.__version__}.",
        "",
        "| variant | median s | samples/s | tokens/s | mean reward |",
        "|---|---|---|---|---|",
    ]
    for name, s in summary.items():
        lines.append(f"| {name} | {s['seconds_median']:.1f} | {s['samples_per_s']:.2f} | {s['tokens_per_s']:.1f} "
                     f"| {s['mean_reward']:.3f} |")
    lines += ["", f"Speed-up (plain s / shared s) per repetition: {', '.join(f'{x:.2f}' for x in ratio)}.",
              f"Identical responses between the two variants under the same seed, per repetition: "
              f"{', '.join(f'{x:.0%}' for x in same)}.", ""]
    out.with_suffix(".md").write_text("\n".join(lines))


if __name__ == "__main__":
    main()
