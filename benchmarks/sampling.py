"""Stage 1 sampling throughput, and the Stage 2 step time, side by side on the same prompts and model.

Stage 1 variants: our shared-prefill ``sample()``, in float32 and with bfloat16 weights (``--dtype bfloat16``);
plain ``generate(num_return_sequences=N)``; transformers' continuous batching (``generate_batch`` with paged
attention), which frees a finished sequence's slot for the next one; and, when TRL is installed, TRL's
A2POTrainer Stage 1 (its ``_estimate_optimal_values``). All run in one process, interleaved (the order turns
around every repetition) so that noise from a shared machine hits them alike; each repetition seeds every
variant the same, so shared prefill and plain generate, whose next-token distributions are equal, draw (nearly)
the same tokens. One untimed warm-up call per variant comes first.
Then a few Stage 2 steps of astarpo's A*-PO trainer and of TRL's A2POTrainer (batch-size / N prompts per step, one
sample each), the first step of each left out of the median as warm-up. Writes ``results/sampling.{md,json}``.

    PYTHONPATH=src python benchmarks/sampling.py --prompts 16 --reps 3
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import platform
import shutil
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import transformers
from transformers import AutoModelForCausalLM, GenerationConfig

from astarpo import TrainConfig, Trainer, ValuesConfig, compute_values, rewards
from astarpo.data import encode_prompts, load_records
from astarpo.generation import _trim, sample
from astarpo.models import eos_ids, load_model, load_tokenizer, resolve_model

HAS_TRL = importlib.util.find_spec("trl") is not None
# One draw of every prompt's N samples: (prompt index per sample, completion texts, response tokens or None where
# the variant does not hand them back).
Draw = tuple[list[int], list[str], list[list[int]] | None]


def continuous_batching(model_dir: Path, tok: Any, eos: list[int], prompt_ids: list[list[int]],
                        args: argparse.Namespace) -> Callable[[], Draw]:
    """transformers' continuous batching with its default scheduler settings (paged attention, SDPA kernels)."""
    model = AutoModelForCausalLM.from_pretrained(model_dir, attn_implementation="paged|sdpa")
    config = GenerationConfig(do_sample=True, temperature=1.0, top_p=1.0, top_k=0,
                              max_new_tokens=args.max_new_tokens, num_return_sequences=args.n, eos_token_id=eos,
                              pad_token_id=tok.pad_token_id)
    index = {tuple(p): i for i, p in enumerate(prompt_ids)}

    def draw() -> Draw:
        out = model.generate_batch(inputs=prompt_ids, generation_config=config)
        rows = sorted((index[tuple(o.prompt_ids)], _trim(list(o.generated_tokens), set(eos))[0]) for o in out.values())
        tokens = [t for _, t in rows]
        return [i for i, _ in rows], tok.batch_decode(tokens, skip_special_tokens=True), tokens

    return draw


def trl_a2po(model_dir: Path, args: argparse.Namespace, out_dir: Path) -> tuple[Any, Callable[[], Draw]]:
    """TRL's A2POTrainer and a draw that runs its Stage 1 (the reward it calls records what was sampled)."""
    from astarpo.bench.trl import build

    spec = {"trainer": "trl-a2po", "model_dir": str(model_dir), "output_dir": str(out_dir), "data": "arithmetic",
            "reward": "arithmetic", "train_prompts": args.prompts, "batch_size": args.batch_size // args.n,
            "group_size": 1, "steps": args.steps, "save_every": 10**6, "max_new_tokens": args.max_new_tokens,
            "learning_rate": 1e-6, "beta": 1e-3, "beta1": 0.5, "n": args.n, "seed": args.seed}
    trainer, _ = build(spec, [])
    trainer.args.filter_all_incorrect = False  # keep every prompt: Stage 2 below then sees the same ones as ours
    texts: list[str] = []
    inner = trainer.reward_funcs[0]

    def recording(prompts: list[str], completions: list[str], **columns: Any) -> list[float]:
        texts.extend(completions)
        return inner(prompts, completions, **columns)

    trainer.reward_funcs[0] = recording

    def draw() -> Draw:
        texts.clear()
        trainer._estimate_optimal_values()
        return [i for i in range(args.prompts) for _ in range(args.n)], list(texts), None

    return trainer, draw


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--prompts", type=int, default=16)
    ap.add_argument("--n", type=int, default=8)
    ap.add_argument("--max-new-tokens", type=int, default=32)
    ap.add_argument("--batch-size", type=int, default=64, help="sequences per generate() call")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--steps", type=int, default=4, help="Stage 2 steps per trainer")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "sampling"))
    args = ap.parse_args()

    model_dir = resolve_model(args.model)
    tok, model = load_tokenizer(model_dir), load_model(model_dir)
    eos = eos_ids(model, tok)
    records = load_records("arithmetic", "train", args.prompts)
    records, prompt_ids = encode_prompts(tok, records, max_prompt_tokens=512)
    reward = rewards.get("arithmetic")
    work = Path(tempfile.mkdtemp(prefix="astarpo-sampling-"))

    def ours(shared: bool, model: Any = model) -> Callable[[], Draw]:
        def draw() -> Draw:
            roll = sample(model, tok, prompt_ids, args.n, 1.0, 1.0, args.max_new_tokens, eos, args.batch_size,
                          shared_prefill=shared)
            return roll.prompt_index, roll.completions, roll.response_tokens
        return draw

    variants = {"shared_prefill": ours(True), "plain_generate": ours(False),
                "shared_prefill_bf16": ours(True, load_model(model_dir, "bfloat16")),  # `--dtype bfloat16`
                "continuous_batching": continuous_batching(model_dir, tok, eos, prompt_ids, args)}
    if HAS_TRL:
        trl_trainer, variants["trl_a2po_stage1"] = trl_a2po(model_dir, args, work / "trl")
    for draw in variants.values():  # warm-up (first-call allocations, TRL's dataloader), not timed
        torch.manual_seed(args.seed)
        draw()
    runs: dict[str, list[dict]] = {v: [] for v in variants}
    for rep in range(args.reps):
        for name in list(variants) if rep % 2 == 0 else list(reversed(variants)):
            torch.manual_seed(args.seed + rep)
            t0 = time.perf_counter()
            index, completions, tokens = variants[name]()
            sec = time.perf_counter() - t0
            r = rewards.score(reward, [records[i]["prompt"] for i in index], completions,
                              {"answer": [records[i]["answer"] for i in index]})
            runs[name].append({"seconds": sec, "samples": len(index), "mean_reward": sum(r) / len(r),
                               "tokens": None if tokens is None else sum(map(len, tokens)), "responses": tokens})
            print(f"rep {rep} {name:20s} {sec:7.1f} s  {len(index) / sec:6.2f} samples/s  reward {sum(r) / len(r):.3f}",
                  flush=True)
        write_results(args, runs, prompt_ids, {})  # after every repetition: a killed run keeps what it measured

    # Stage 2: a few A*-PO steps of ours (values from our Stage 1) and of TRL's (its Stage 1 above is reused).
    values = compute_values(ValuesConfig(model=str(model_dir), data="arithmetic", reward="arithmetic",
                                         limit=args.prompts, n=args.n, max_new_tokens=args.max_new_tokens,
                                         seed=args.seed, output=str(work / "values.parquet")))
    run_dir = work / "run"
    Trainer(TrainConfig(model=str(model_dir), values=str(values), data="arithmetic", reward="arithmetic",
                        limit=args.prompts, batch_size=args.batch_size // args.n, steps=args.steps,
                        max_new_tokens=args.max_new_tokens, filter_unsolved=False, save_every=10**6, seed=args.seed,
                        output_dir=str(run_dir))).train()
    stage2 = {"astarpo": [json.loads(x)["step_seconds"] for x in (run_dir / "metrics.jsonl").read_text().splitlines()]}
    if HAS_TRL:
        stage2["trl_a2po"] = trl_step_seconds(trl_trainer)
    write_results(args, runs, prompt_ids, stage2)
    shutil.rmtree(work)  # the values file and both trainers' outputs (a model copy each) were only for timing
    print(Path(args.out).with_suffix(".md").read_text())


def trl_step_seconds(trainer: Any) -> list[float]:
    """Wall time of each of TRL's training steps (sampling included, as in ours)."""
    from transformers import TrainerCallback

    seconds: list[float] = []

    class Timer(TrainerCallback):
        def on_step_begin(self, *a: Any, **kw: Any) -> None:
            self.t0 = time.perf_counter()

        def on_step_end(self, *a: Any, **kw: Any) -> None:
            seconds.append(time.perf_counter() - self.t0)

    trainer.add_callback(Timer())
    trainer.train()
    return seconds


def write_results(args: argparse.Namespace, runs: dict[str, list[dict]], prompt_ids: list[list[int]],
                  stage2: dict[str, list[float]]) -> None:
    same = [sum(a == b for a, b in zip(x["responses"], y["responses"])) / len(x["responses"])
            for x, y in zip(runs["shared_prefill"], runs["plain_generate"])]
    summary = {}
    for name, rs in runs.items():
        summary[name] = {
            "seconds_median": statistics.median(x["seconds"] for x in rs),
            "samples_per_s": statistics.median(x["samples"] / x["seconds"] for x in rs),
            "tokens_per_s": None if rs[0]["tokens"] is None else statistics.median(x["tokens"] / x["seconds"]
                                                                                    for x in rs),
            "mean_reward": statistics.mean(x["mean_reward"] for x in rs),
            "runs": [{k: v for k, v in x.items() if k != "responses"} for x in rs],
        }
    base = summary["plain_generate"]["samples_per_s"]
    ratio = [p["seconds"] / s["seconds"] for s, p in zip(runs["shared_prefill"], runs["plain_generate"])]
    step = {name: statistics.median(s[1:] or s) for name, s in stage2.items()}
    prompt_len = statistics.mean(len(p) for p in prompt_ids)
    result = {
        "machine": f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} torch threads, "
                   f"{platform.platform()}",
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__,
                     "python": platform.python_version(),
                     **({"trl": importlib.import_module("trl").__version__} if HAS_TRL else {})},
        "settings": {**{k: v for k, v in vars(args).items() if k != "out"}, "temperature": 1.0, "top_p": 1.0,
                     "mean_prompt_tokens": round(prompt_len, 1), "reps_done": len(ratio)},
        "variants": summary,
        "speedup_per_rep": ratio,
        "identical_responses_per_rep": same,
        "stage2_step_seconds": stage2,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(result, indent=1))
    lines = [
        "# Stage 1 sampling and the Stage 2 step",
        "",
        f"Model {args.model}, arithmetic train prompts ({args.prompts}, mean {prompt_len:.1f} prompt tokens), "
        f"N={args.n}, max_new_tokens={args.max_new_tokens}, temperature 1, {args.batch_size} sequences per "
        f"generate() call, {len(ratio)} interleaved repetitions, seed {args.seed}.",
        f"Machine: {result['machine']}; " + ", ".join(f"{k} {v}" for k, v in result["versions"].items()) + ".",
        "",
        "| Stage 1 variant | median s | samples/s | x plain generate | tokens/s | mean reward |",
        "|---|---|---|---|---|---|",
    ]
    for name, s in summary.items():
        tps = "n/a" if s["tokens_per_s"] is None else f"{s['tokens_per_s']:.1f}"
        lines.append(f"| {name} | {s['seconds_median']:.1f} | {s['samples_per_s']:.2f} | "
                     f"{s['samples_per_s'] / base:.2f} | {tps} | {s['mean_reward']:.3f} |")
    lines += ["", f"Speed-up (plain s / shared s) per repetition: {', '.join(f'{x:.2f}' for x in ratio)}.",
              f"Identical responses between shared prefill and plain generate under the same seed, per repetition: "
              f"{', '.join(f'{x:.0%}' for x in same)}.", ""]
    if step:
        lines += [f"Stage 2, {args.batch_size // args.n} prompts per step, one sample each, median of steps 2-"
                  f"{args.steps}: " + ", ".join(f"{k} {v:.2f} s/step" for k, v in step.items()) + ".", ""]
    out.with_suffix(".md").write_text("\n".join(lines))


if __name__ == "__main__":
    main()
