"""`astarpo plan`: parameter counts are exact, and the memory formula is within 20% of measured allocations."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from transformers import Qwen2Config, Qwen2ForCausalLM

from astarpo.bench import cost
from astarpo.bench.plan import QWEN25, Shape, measure, plan, shape_of
from astarpo.cli import main
from astarpo.config import ConfigError
from astarpo.models import add_lora, load_model

SMALL = Shape(128, 2, 4, 2, 344, 2048, tied=True, qkv_bias=True)


def test_qwen25_shapes_have_the_published_parameter_counts():
    # model cards: 1.54B (1.31B non-embedding), 3.09B (2.77B), 7.61B (6.53B)
    published = {"qwen2.5-1.5b": (1.54, 1.31), "qwen2.5-3b": (3.09, 2.77), "qwen2.5-7b": (7.62, 6.53)}
    for name, (total, body) in published.items():
        s = QWEN25[name]
        assert round(s.params() / 1e9, 2) == total and round((s.params() - s.embedding_params()) / 1e9, 2) == body
    assert shape_of("Qwen/Qwen2.5-7B-Instruct") == QWEN25["qwen2.5-7b"]


@pytest.mark.parametrize("tied", [True, False])
def test_params_and_lora_params_are_exact(tmp_path, tied):
    s = Shape(64, 2, 4, 2, 96, 300, tied=tied, qkv_bias=True)
    model = Qwen2ForCausalLM(Qwen2Config(vocab_size=300, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=tied))
    model.save_pretrained(tmp_path)
    assert shape_of(str(tmp_path)) == s
    assert s.params() == sum(p.numel() for p in model.parameters())
    lora = add_lora(load_model(tmp_path), 8, 16, "all-linear")
    assert s.lora_params(8) == sum(p.numel() for p in lora.parameters() if p.requires_grad)


@pytest.mark.parametrize("checkpointing", [False, True])
def test_formula_within_20_percent_of_measured(checkpointing):
    """Weights, gradients, optimizer state and reference are exact; what a micro-batch adds (autocast copies,
    activations, log-prob chunks) and the whole peak are within 20% of measured tensor allocations."""
    torch.set_num_threads(2)
    got = measure(SMALL, micro_batch=4, prompt_tokens=32, response_tokens=96, gradient_checkpointing=checkpointing)
    want = plan(SMALL, gpus=1, strategy="ddp", micro_batch=4, prompt_tokens=32, response_tokens=96,
                gradient_checkpointing=checkpointing, generation_batch=0)
    for key in ("weights", "gradients", "optimizer", "reference", "optimizer_step"):
        assert got[key] == want[key], key
    for key in ("micro_batch", "peak"):
        assert abs(want[key] / got[key] - 1) < 0.2, (key, want[key], got[key])


def test_cli_table_and_json(capsys, tmp_path):
    assert main(["plan", "--model", "qwen2.5-7b", "--gpus", "8", "--micro-batch", "2"]) == 0
    out = capsys.readouterr().out
    assert "| peak |" in out and "| ddp | fsdp2 | zero2 | zero3 |" in out
    assert main(["plan", "--model", "qwen2.5-1.5b", "--strategy", "zero3", "--lora-rank", "64",
                 "--json", str(tmp_path / "plan.json")]) == 0
    assert "| zero3 |" in capsys.readouterr().out  # the table still prints; the raw bytes go to the file
    result = json.loads((tmp_path / "plan.json").read_text())
    assert set(result) == {"shape", "zero3"} and result["zero3"]["reference"] == 0
    assert result["zero3"]["trainable"] == QWEN25["qwen2.5-1.5b"].lora_params(64)
    assert main(["plan", "--model", "no-such-model"]) == 2


def test_gathering_for_generation_costs_the_whole_bf16_weights_while_sampling():
    """FSDP2 and ZeRO-3 hold every layer, in bf16, while sampling (astarpo's default); per-token gathering holds
    two layers and the embeddings at a time."""
    s = QWEN25["qwen2.5-7b"]
    for strategy in ("fsdp2", "zero3"):
        once, per_token = (plan(s, 8, strategy, micro_batch=2, gather_for_generation=g) for g in (True, False))
        assert once["generation"] - per_token["generation"] == 2 * s.params() - per_token["compute_copies"]
        assert once["peak"] > per_token["peak"]
    ddp = [plan(s, 8, "ddp", gather_for_generation=g) for g in (True, False)]
    assert ddp[0] == ddp[1]  # nothing to gather


def test_the_hybrid_engine_is_counted_beside_the_trainer():
    """vLLM in every process: its whole bf16 weights and the KV cache of this GPU's sequences (hand-computed for
    Qwen2.5-1.5B on 4 GPUs: 64 sequences of 1280 tokens, 28 layers, keys and values of 2 heads x 128, bf16).
    With sleep mode it holds them only while generating; without, through the update as well."""
    s = QWEN25["qwen2.5-1.5b"]
    awake = plan(s, 4, "fsdp2", engine="vllm", sleep_mode=False)
    asleep = plan(s, 4, "fsdp2", engine="vllm")
    assert asleep["engine_weights"] == 2 * s.params()
    assert asleep["engine_kv_cache"] == 64 * 1280 * 28 * 2 * 256 * 2
    states = sum(asleep[k] for k in ("weights", "gradients", "optimizer", "reference"))
    engine = asleep["engine_weights"] + asleep["engine_kv_cache"]
    assert asleep["peak"] == states + max(asleep["micro_batch"], asleep["optimizer_step"], engine)
    assert awake["peak"] == states + engine + max(awake["micro_batch"], awake["optimizer_step"])
    assert "engine_weights" not in plan(s, 4, "fsdp2")  # HF generate: the policy samples itself
    out = _cli_json(["plan", "--model", "qwen2.5-1.5b", "--gpus", "4", "--strategy", "fsdp2", "--engine", "vllm",
                     "--no-sleep-mode"])
    assert out["fsdp2"]["peak"] == awake["peak"]


def test_one_engine_over_several_gpus_holds_a_share_of_the_weights():
    """Tensor parallelism splits the engine's weights (hand-counted for Qwen2.5-1.5B over 2 GPUs: each layer's
    q and o projections, the MLP and the embeddings halved, its 2 key/value heads one per GPU, norms whole) and
    holds the KV cache of both GPUs' sequences with half the heads each; over 4 GPUs the 2 key/value heads are
    replicated, so each GPU keeps one head of 4 GPUs' sequences: twice one engine per GPU."""
    s = QWEN25["qwen2.5-1.5b"]
    h, m, v, hd = 1536, 8960, 151936, 128
    layer = h * 768 + 2 * h * hd + 768 * h + 3 * h * m // 2 + (768 + 2 * hd) + 2 * h
    assert s.engine_params_per_gpu(2) == 28 * layer + v * h // 2 + h
    assert s.engine_params_per_gpu(1) == s.params()
    one, two, four = (plan(s, 4, "fsdp2", engine="vllm", engine_tensor_parallel=t) for t in (1, 2, 4))
    assert two["engine_weights"] == 2 * s.engine_params_per_gpu(2) < one["engine_weights"] / 1.9
    assert two["engine_kv_cache"] == one["engine_kv_cache"] and four["engine_kv_cache"] == 2 * one["engine_kv_cache"]
    out = _cli_json(["plan", "--model", "qwen2.5-1.5b", "--gpus", "4", "--strategy", "fsdp2", "--engine", "vllm",
                     "--engine-tensor-parallel-size", "2"])
    assert out["fsdp2"]["engine_weights"] == two["engine_weights"]


def _cli_json(argv: list[str]) -> dict:
    """Run ``astarpo`` with ``--json`` to a temporary file (the table to a discarded stdout); the file's JSON."""
    import contextlib
    import io
    import tempfile

    with tempfile.TemporaryDirectory() as tmp, contextlib.redirect_stdout(io.StringIO()):
        path = Path(tmp) / "out.json"
        assert main([*argv, "--json", str(path)]) == 0
        return json.loads(path.read_text())


# ----- `astarpo plan --time`: hours per method ------------------------------------------------------------------
RESULTS = Path(__file__).resolve().parents[1] / "benchmarks" / "results"
H100 = cost.gpu("h100")
QWEN15 = QWEN25["qwen2.5-1.5b"]


def test_time_json_has_every_method_with_its_breakdown_and_the_assumptions():
    out = _cli_json(["plan", "--model", "qwen2.5-1.5b", "--time"])
    assert out["assumptions"]["recipe"]["gpus"] == 4  # the paper's recipe, whose GPUs --gpus overrides
    assert set(out) == {"methods", "assumptions"}
    assert {"astarpo", "grpo", "ppo", "rebel"} <= set(out["methods"])
    for m in out["methods"].values():
        parts = m["stage1_hours"] + m["generation_hours"] + m["training_hours"]
        assert m["hours"] == pytest.approx(parts) and m["training_hours"] == pytest.approx(
            sum(m["training_hours_by_pass"].values()))
        assert m["steps"] == 25 * (7500 // 256)  # configs/paper: 725 steps
    a = out["assumptions"]
    assert a["recipe"]["gpus"] == 4 and "989" in a["sources"]["peak_flops"] and "3.35" in a["sources"]["peak_bandwidth"]
    assert out["methods"]["grpo"]["group_size"] == 8 and out["methods"]["rebel"]["group_size"] == 2


def test_stage2_hours_scale_linearly_with_epochs_and_prompts():
    base = cost.Recipe(prompts=4 * 256, epochs=2)
    one, twice = cost.hours(QWEN15, H100, base), cost.hours(QWEN15, H100, replace(base, epochs=4))
    more = cost.hours(QWEN15, H100, replace(base, prompts=8 * 256))
    for algo in cost.METHODS:
        stage2 = one[algo]["hours"] - one[algo]["stage1_hours"]
        assert twice[algo]["hours"] - twice[algo]["stage1_hours"] == pytest.approx(2 * stage2)
        assert more[algo]["hours"] - more[algo]["stage1_hours"] == pytest.approx(2 * stage2)
        assert more[algo]["stage1_hours"] == pytest.approx(2 * one[algo]["stage1_hours"])  # 0 but for A*-PO


def test_astarpo_stage1_is_counted_once_and_only_for_astarpo():
    short, long = (cost.hours(QWEN15, H100, cost.Recipe(epochs=e)) for e in (1, 10))
    assert short["astarpo"]["stage1_hours"] > 0
    assert long["astarpo"]["stage1_hours"] == short["astarpo"]["stage1_hours"]
    assert all(short[algo]["stage1_hours"] == 0 for algo in cost.METHODS if algo != "astarpo")
    n16 = cost.hours(QWEN15, H100, cost.Recipe(epochs=1, stage1_n=16))
    assert n16["astarpo"]["stage1_hours"] > 1.5 * short["astarpo"]["stage1_hours"]
    assert n16["astarpo"]["generation_hours"] == short["astarpo"]["generation_hours"]


def test_method_ordering_follows_the_work_each_method_does():
    """At the paper's recipe: A*-PO (one sample, a reference forward) is cheapest in Stage 2; PPO pays a critic over
    A*-PO's work; more samples per prompt cost more (GRPO > RLOO > REBEL); a KL term adds a reference pass."""
    for model in QWEN25:
        h = cost.hours(QWEN25[model], H100, cost.Recipe())
        stage2 = {a: m["hours"] - m["stage1_hours"] for a, m in h.items()}
        assert min(stage2, key=stage2.get) == "astarpo"
        assert h["astarpo"]["hours"] < h["ppo"]["hours"] < h["rloo"]["hours"] < h["grpo"]["hours"]
        assert h["rebel"]["hours"] < h["rloo"]["hours"]
        assert h["ppo"]["training_hours_by_pass"]["critic"] > 0 == h["grpo"]["training_hours_by_pass"]["critic"]
    kl = cost.hours(QWEN15, H100, cost.Recipe(kl_coefs={"grpo": 1e-3}))["grpo"]
    assert kl["training_hours_by_pass"]["reference"] > 0
    four = cost.hours(QWEN15, H100, cost.Recipe(group_sizes={"grpo": 4}))["grpo"]
    assert four["hours"] < cost.hours(QWEN15, H100, cost.Recipe())["grpo"]["hours"]


@pytest.mark.parametrize("flags", [["--gpus", "0"], ["--epochs", "0"], ["--prompts", "100"], ["--batch", "64"],
                                   ["--response-tokens", "0"], ["--group-size", "astarpo=4"],
                                   ["--group-size", "grpo=1"], ["--group-size", "grpo"], ["--kl-coef", "rebel=0.1"],
                                   ["--device", "cpu", "--mfu", "0.5"], ["--mfu", "2"]])
def test_time_refuses_bad_input(flags, capsys):
    assert main(["plan", "--model", "qwen2.5-1.5b", "--time", *flags]) == 2
    assert "astarpo: error:" in capsys.readouterr().err


def test_async_step_is_the_overlap_of_sampling_on_the_server_and_training_on_the_rest_plus_the_push():
    """S server GPUs sample (one engine each, an S-th of the step's prompts) while the other 4 - S train: with lag
    >= 1 a step is max(sampling, training) + the weight push, with lag 0 their sum + the push; the hours add Stage 1
    (on all 4 GPUs, as colocated) and, overlapping, the one step's shorter side that cannot overlap."""
    r = cost.Recipe()
    push = 2 * QWEN15.params() / (900e9 / 2 * 0.8)  # bf16 weights, one direction of NVLink at the assumed 0.8
    stage1 = cost.method_seconds(QWEN15, H100, "astarpo", r)["stage1"]
    colocated = cost.method_seconds(QWEN15, H100, "astarpo", r)
    colocated_training = sum(colocated[p] for p in cost.PASSES)
    rows = {}
    for S in (1, 2, 3):
        prompts = -(-256 // S)
        gen = cost.decode_seconds(QWEN15, H100, prompts, prompts, r)  # A*-PO: one response per prompt
        train = colocated_training * 4 / (4 - S)  # every training pass split over the trainer's GPUs
        on = rows[S] = cost.split_hours(QWEN15, H100, r, S, 1)
        off = cost.split_hours(QWEN15, H100, r, S, 0)
        assert (on["server_gpus"], on["trainer_gpus"]) == (S, 4 - S)
        assert on["generation_seconds"] == pytest.approx(gen) and on["training_seconds"] == pytest.approx(train)
        assert on["push_seconds"] == pytest.approx(push) == off["push_seconds"]
        assert on["step_seconds"] == pytest.approx(max(gen, train) + push)
        assert off["step_seconds"] == pytest.approx(gen + train + push)
        assert on["hours"] == pytest.approx((stage1 + 725 * on["step_seconds"] + min(gen, train)) / 3600)
        assert off["hours"] == pytest.approx((stage1 + 725 * off["step_seconds"]) / 3600)
        assert on["stage1_hours"] == colocated["stage1"] / 3600
        assert cost.split_hours(QWEN15, H100, r, S, 3)["hours"] == on["hours"]  # fixed step times: lag 1 overlaps
    # Moving a GPU from the trainer to the server: sampling shorter, training longer.
    assert rows[1]["generation_seconds"] > rows[2]["generation_seconds"] > rows[3]["generation_seconds"]
    assert rows[1]["training_seconds"] < rows[2]["training_seconds"] < rows[3]["training_seconds"]
    assert rows[1]["waiting"] == "trainer" and rows[3]["waiting"] == "server"
    best = cost.best_split(QWEN15, H100, r)
    assert best["server_gpus"] == 2 and best["hours_by_server_gpus"][1] == rows[1]["hours"]
    # A larger model pushes proportionally more bytes over the same link.
    assert cost.push_seconds(QWEN25["qwen2.5-7b"], H100) == pytest.approx(push * QWEN25["qwen2.5-7b"].params()
                                                                        / QWEN15.params())


def test_no_server_gpus_is_the_colocated_loop_exactly(capsys):
    r = cost.Recipe()
    assert cost.split_hours(QWEN15, H100, r, 0, 0) == cost.hours(QWEN15, H100, r)["astarpo"]
    assert main(["plan", "--model", "qwen2.5-1.5b", "--time"]) == 0
    colocated = capsys.readouterr().out
    assert main(["plan", "--model", "qwen2.5-1.5b", "--time", "--server-gpus", "0"]) == 0
    assert capsys.readouterr().out == colocated and "server" not in colocated
    assert "async" not in _cli_json(["plan", "--model", "qwen2.5-1.5b", "--time", "--server-gpus", "0"])


def test_time_table_and_json_put_async_astarpo_beside_the_colocated_methods(capsys):
    r = cost.Recipe()
    assert main(["plan", "--model", "qwen2.5-1.5b", "--time", "--server-gpus", "1"]) == 0
    out = capsys.readouterr().out
    one = cost.split_hours(QWEN15, H100, r, 1, 1)  # the lag's default with server GPUs is 1
    assert f"| astarpo, server 1 + trainer 3 GPUs, lag 1 | 1 | {one['hours']:.2f} |" in out
    colocated = cost.hours(QWEN15, H100, r)
    assert f"| astarpo | 1 | {colocated['astarpo']['hours']:.2f} |" in out and "| grpo | 8 |" in out
    assert "(fewest: S=2)" in out
    got = _cli_json(["plan", "--model", "qwen2.5-1.5b", "--time", "--server-gpus", "2", "--async-lag", "0"])
    assert got["methods"] == colocated  # the colocated rows are unchanged
    assert got["async"]["astarpo"] == cost.split_hours(QWEN15, H100, r, 2, 0)
    assert got["async"]["best_split"]["server_gpus"] == 2
    assert set(got["async"]["best_split"]["hours_by_server_gpus"]) == {"1", "2", "3"}
    assert got["async"]["link"]["bytes_per_s"] == 900e9 / 2 * cost.LINK_EFFICIENCY
    assert "900 GB/s" in got["async"]["link"]["sources"]["nvlink"]


@pytest.mark.parametrize("flags, message", [
    (["--server-gpus", "4"], "server_gpus must be between 0 (the colocated loop) and gpus - 1 = 3"),
    (["--server-gpus", "-1"], "server_gpus must be between 0"),
    (["--gpus", "1", "--server-gpus", "1"], "gpus - 1 = 0 (the trainer needs a GPU), got 1"),
    (["--async-lag", "1"], "async lag needs server GPUs"),
    (["--server-gpus", "1", "--async-lag", "-1"], "async lag must be >= 0, got -1"),
    (["--server-gpus", "1", "--device", "cpu"], "is for a GPU device (h100, h200), got cpu")])
def test_time_refuses_a_bad_split(flags, message, capsys, tmp_path):
    argv = ["plan", "--model", "qwen2.5-1.5b", "--time", "--json", str(tmp_path / "out.json"), *flags]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("astarpo: error:") and message in err
    assert not (tmp_path / "out.json").exists()  # refused before anything is written


def test_cpu_rates_are_the_committed_bench_fit_and_predict_what_it_did_not_see():
    """`--device cpu`'s rates are fit_cpu(bench.json) (A*-PO's step, A*-PO's and GRPO's sampling); every other
    committed CPU figure (the other methods' steps, Stage 1, vllm_sampling.json's HF runs) is predicted within
    the factor stated in the README."""
    bench = json.loads((RESULTS / "bench" / "bench.json").read_text())
    sampling = json.loads((RESULTS / "vllm_sampling.json").read_text())
    fitted = cost.fit_cpu(bench)
    for rate in ("dense_flops", "decode_flops", "bandwidth"):
        assert getattr(cost.CPU, rate) == pytest.approx(getattr(fitted, rate), rel=0.01), rate
    rows = cost.cpu_check(bench, sampling)
    held_out = [r for r in rows if not r["fit"]]
    assert len(held_out) >= 8 and any("Stage 1" in r["figure"] for r in held_out)
    for r in rows:
        assert 1 / 1.5 < r["ratio"] < 1.5, r
    out = _cli_json(["plan", "--model", "smollm2-135m-instruct", "--gpus", "1", "--time", "--device", "cpu"])
    assert out["assumptions"]["device"] == "cpu"


# ----- `astarpo plan --time --setup paper`: the paper's run as its official code runs it ------------------------
QWEN7 = QWEN25["qwen2.5-7b"]


def test_paper_setup_counts_the_official_codes_passes():
    """verl's hybrid engine recomputes the old policy's log-probs of every sample and runs the reference forward of
    every sample for every method (GRPO too, which astarpo runs without either at its defaults), with no gradient
    checkpointing; PPO adds its critic's values forward and update. Hand-computed for GRPO at 1.5B: 8 samples per
    GPU per micro-batch, 64 micro-batches per GPU, each a forward of 8 x 1280 tokens at the training rate."""
    r = cost.Recipe()
    default = cost.passes("grpo", r)
    assert default["reference"] == 0 and default["old_policy"] == 0.5 and default["policy"] == 4
    for algo in cost.PAPER_METHODS:
        p = cost.paper_passes(algo, r)
        assert (p["policy"], p["reference"], p["old_policy"]) == (3, 1, 1.0), algo
        assert p["critic"] == (4 if algo == "ppo" else 0)
        assert p["micro_batch"] == p["group_size"]  # 1 per GPU x rollout.n
    assert [cost.paper_passes(a, r)["group_size"] for a in cost.PAPER_METHODS] == [1, 8, 1, 2]
    sec = cost.paper_method_seconds(QWEN15, H100, "grpo", r)
    forward = 64 * 2 * cost.matmul_params(QWEN15) * 8 * 1280 / H100.dense_flops
    assert sec["reference"] == pytest.approx(forward) and sec["old_policy"] == pytest.approx(forward)
    assert sec["policy"] == pytest.approx(3 * forward) and sec["critic"] == 0
    ppo = cost.paper_method_seconds(QWEN7, H100, "ppo", r)  # critic: 16 per GPU, no LM head, 4 micro-batches
    assert ppo["critic"] == pytest.approx(4 * 4 * 2 * cost.matmul_params(QWEN7, head=False) * 16 * 1280
                                          / H100.dense_flops)
    with pytest.raises(ConfigError, match="the paper's methods"):
        cost.paper_passes("rloo", r)


def test_paper_setup_latency_floor_binds_when_the_decode_is_small():
    """An eager step cannot take less than its kernel launches: (13 per layer x 28 + 30) x 10 us for Qwen2.5-1.5B.
    One sequence decodes at the floor for every step; 1024 sequences of a 7B model are bandwidth-bound above it."""
    floor = (13 * 28 + 30) * 10e-6
    assert cost.decode_floor_seconds(QWEN15) == pytest.approx(floor)
    r = cost.Recipe()
    one = cost.engine_generate_seconds(QWEN15, H100, 1, 1, r)
    assert one["decode"] == pytest.approx(1024 * floor) and one["floor_steps"] == 1024 == one["steps"]
    many = cost.engine_generate_seconds(QWEN7, H100, 2048, 256, r)
    assert many["floor_steps"] == 0 and many["steps"] == 2 * 1024  # two waves of max_num_seqs 1024
    assert many["decode"] > 2 * 1024 * cost.decode_floor_seconds(QWEN7)
    # A*-PO at 1.5B: the engine's 256 sequences and the trainer's micro-batches of one sequence sit at their floors.
    sec = cost.paper_method_seconds(QWEN15, H100, "astarpo", r)
    assert sec["generation_floor_share"] == 1.0
    assert sec["policy"] == pytest.approx(64 * cost.train_floor_seconds(QWEN15, True))
    assert sec["reference"] == pytest.approx(64 * cost.train_floor_seconds(QWEN15, False))


def test_paper_setup_fixed_costs_add_per_step_and_per_run():
    """Every step pays the weight sync (float32 shards gathered over NVLink: 3/4 of 4 bytes per parameter at one
    direction's 450 GB/s x 0.8) and the KV cache (0.4 x 80 GB at the decode bandwidth); the run pays 16
    validations (before, every 50 of 725 steps, at the end) and 14 float32 checkpoints, PPO's with its critic."""
    r = cost.Recipe()
    sync = 4 * QWEN15.params() * 3 / 4 / (450e9 * 0.8)
    assert cost.weight_sync_seconds(QWEN15, H100, r) == pytest.approx(sync)
    assert cost.kv_init_seconds(H100) == pytest.approx(0.4 * 80e9 / H100.bandwidth)
    h, twice = cost.paper_hours(QWEN15, H100, r), cost.paper_hours(QWEN15, H100, replace(r, epochs=50))
    for algo, m in h.items():
        assert m["fixed_hours"] == pytest.approx(725 * (sync + cost.kv_init_seconds(H100)) / 3600)
        assert twice[algo]["fixed_hours"] == pytest.approx(2 * m["fixed_hours"])
        assert (m["validations"], m["checkpoints"]) == (16, 14)
        assert m["hours"] == pytest.approx(m["stage1_hours"] + m["generation_hours"] + m["training_hours"]
                                           + m["fixed_hours"] + m["validation_hours"] + m["checkpoint_hours"])
        assert m["validation_hours"] > 0 and m["training_hours"] == pytest.approx(
            sum(m["training_hours_by_pass"].values()))
    assert h["ppo"]["checkpoint_hours"] > h["astarpo"]["checkpoint_hours"] == pytest.approx(
        14 * 4 * QWEN15.params() / 2e9 / 3600)


def test_paper_setup_table_shows_the_papers_hours_and_ratios_at_three_sizes(capsys, tmp_path):
    assert main(["plan", "--model", "qwen2.5-1.5b", "--time", "--setup", "paper",
                 "--json", str(tmp_path / "paper.json")]) == 0
    out = capsys.readouterr().out
    for row in ("| qwen2.5-1.5b | ", "6.92 / 15.01 / 10.84 / 10.33", "| qwen2.5-3b | ", "8.78 / 18.26 / 13.59 / 12.88",
                "| qwen2.5-7b | ", "11.01 / 20.15 / 20.53 / 14.67"):
        assert row in out, row
    for ratio in ("| 0.46 |", "| 0.48 |", "| 0.55 |"):  # the paper's A*-PO / GRPO at 1.5B, 3B, 7B
        assert ratio in out
    assert "apo_math.sh" in out and "10 us per eager kernel launch" in out
    got = json.loads((tmp_path / "paper.json").read_text())
    assert got["setup"] == "paper" and set(got["methods"]) == set(cost.PAPER_METHODS)
    assert set(got["comparison"]) == {"qwen2.5-1.5b", "qwen2.5-3b", "qwen2.5-7b"}
    c = got["comparison"]["qwen2.5-7b"]
    assert c["paper_ratios"]["ppo"] == pytest.approx(11.01 / 20.53)
    assert c["model_ratios"]["grpo"] == pytest.approx(c["model_hours"]["astarpo"] / c["model_hours"]["grpo"])
    assert "launch_seconds" in got["assumptions"]["paper_setup"] and "peak_flops" in got["assumptions"]["sources"]
    assert main(["plan", "--model", "qwen2.5-1.5b", "--time"]) == 0  # the default set-up is unchanged
    assert "paper" not in capsys.readouterr().out.split("\n")[0]


@pytest.mark.parametrize("flags", [["--device", "cpu"], ["--server-gpus", "1"], ["--async-lag", "0"]])
def test_paper_setup_refuses_what_the_official_code_does_not_run(flags, capsys):
    assert main(["plan", "--model", "qwen2.5-1.5b", "--time", "--setup", "paper", *flags]) == 2
    assert "--setup paper" in capsys.readouterr().err
