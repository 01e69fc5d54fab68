"""`astarpo serve` on vLLM's CPU build: one server process, launches of two trainer processes as its clients.

One server serves the module (eager mode, a small KV cache; about half a minute to start), with a short lease so
that a killed launch does not hold it long. Each launch loads only the HF models (no engine of its own), so a
launch costs less than a colocated one. The tests run in file order: the last one kills the server.
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

pytest.importorskip("vllm")

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/: the launcher and the tiny model
from conftest import build_tiny_model  # noqa: E402
from launcher import ENV, command, kill_tree, launch, launch_and_kill  # noqa: E402

from astarpo import EvalConfig, ValuesConfig, compute_values  # noqa: E402
from astarpo.data import step_prompts  # noqa: E402
from astarpo.evaluate import run_eval  # noqa: E402
from astarpo.generation import sampling_settings  # noqa: E402
from astarpo.launch import finish  # noqa: E402

LENGTHS = ["--max-prompt-tokens", "64", "--max-new-tokens", "8"]
COLOCATED = ["--engine", "vllm", "--vllm-enforce-eager", "--vllm-kv-cache-gb", "0.25", *LENGTHS]
LEASE_S = 5


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _post(address: str, endpoint: str, body: dict) -> tuple[int, dict]:
    request = urllib.request.Request(f"http://{address}/{endpoint}", data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=60) as reply:
            return reply.status, json.loads(reply.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("server")
    build_tiny_model(d / "model", hidden_size=64)  # heads of 32: vLLM's CPU attention refuses 16
    return d


@pytest.fixture(scope="module")
def server(work):
    """`astarpo serve` in its own process; its address ("host:port") while it runs."""
    address = f"127.0.0.1:{_free_port()}"
    cmd = [sys.executable, "-m", "astarpo", "serve", "--model", str(work / "model"), "--port", address.split(":")[1],
           "--vllm-enforce-eager", "--vllm-kv-cache-gb", "0.25", "--max-model-len", "128", "--max-num-seqs", "16",
           "--lease-seconds", str(LEASE_S)]
    log = (work / "server.log").open("w")
    proc = subprocess.Popen(cmd, cwd=work, env=ENV, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.monotonic() + 240
    while True:
        try:
            with urllib.request.urlopen(f"http://{address}/health", timeout=5):
                break
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                kill_tree(proc)
                pytest.fail(f"the server did not start:\n{(work / 'server.log').read_text()[-3000:]}")
            time.sleep(0.5)
    proc.address = address
    yield proc
    kill_tree(proc)
    log.close()


def _server_args(server) -> list[str]:
    return ["--engine", "vllm", "--vllm-mode", "server", "--vllm-server", server.address, *LENGTHS]


@pytest.fixture(scope="module")
def stage1(work, server) -> Path:
    """Stage 1 through the server keeps its promise: two processes and one give the same rows (each shard's request
    is seeded from the shard's own stream). Its rewards are then replaced by varied ones for training (the tiny
    model earns none)."""
    args = ["--model", str(work / "model"), *_server_args(server), "--limit", "12", "--n", "3", "--shard-size", "2"]
    launch("ddp", ["values", *args, "--output", "two.parquet"], work)
    one = compute_values(ValuesConfig(model=str(work / "model"), engine="vllm", vllm_mode="server",
                                      vllm_server=server.address, max_prompt_tokens=64, max_new_tokens=8, limit=12,
                                      n=3, shard_size=2, output=str(work / "one.parquet")))
    finish()  # in a single process: the client detaches, and the process goes on
    two = pd.read_parquet(work / "two.parquet")
    assert len(two) == 12 and two.equals(pd.read_parquet(one))
    table = pq.read_table(work / "two.parquet")
    varied = pa.array([[-(i % 5) / 4, 0.0, -1.0] for i in range(table.num_rows)], pa.list_(pa.float64()))
    table = table.set_column(table.column_names.index("rewards"), "rewards", varied)
    # the training tests decode greedily (deterministic samples to compare): the file says so, as if drawn so
    provenance = json.loads(table.schema.metadata[b"astarpo"])
    provenance.update(temperature=0.0, sampler=sampling_settings(0.0, 1.0))
    pq.write_table(table.replace_schema_metadata({b"astarpo": json.dumps(provenance).encode()}), work / "v.parquet")
    return work / "v.parquet"


def _train(work: Path, out: str, engine: list[str], *extra: str) -> list[str]:
    return ["train", "--model", str(work / "model"), *engine, "--limit", "12", "--values", "v.parquet",
            "--no-filter-unsolved", "--batch-size", "4", "--micro-batch-size", "2", "--learning-rate", "1e-2",
            "--beta2", "0.1", "--steps", "4", "--save-every", "1", "--temperature", "0", "--output-dir", out, *extra]


def _read(run: Path, name: str = "metrics.jsonl") -> list[dict]:
    return [json.loads(line) for line in (run / name).read_text().splitlines()]


def test_a_second_launch_is_refused_while_the_first_holds_the_server(server):
    assert _post(server.address, "attach", {"client": "first"})[0] == 200
    status, reply = _post(server.address, "attach", {"client": "second"})
    assert status == 409 and "a second launch is refused" in reply["error"]
    status, reply = _post(server.address, "generate", {"client": "second", "prompt_tokens": [[1, 2]], "n": 1,
                                                       "temperature": 0, "top_p": 1, "max_new_tokens": 2, "seed": 0})
    assert status == 409 and "attach first" in reply["error"]
    assert _post(server.address, "attach", {"client": "first"})[0] == 200  # the same launch, resumed
    _post(server.address, "detach", {"client": "first"})
    assert _post(server.address, "attach", {"client": "second"})[0] == 200
    _post(server.address, "detach", {"client": "second"})


def test_synchronous_server_run_matches_the_colocated_one(work, server, stage1):
    """K = 0, greedy: the server's samples are the two colocated engines' (each sampled its own prompts), so the
    losses agree within float tolerance; every step's samples are drawn by the current policy (lag 0)."""
    launch("ddp", _train(work, "colocated", COLOCATED), work)
    launch("ddp", _train(work, "served", _server_args(server)), work)
    colocated, served = _read(work / "colocated"), _read(work / "served")
    assert [m["loss"] for m in served] == pytest.approx([m["loss"] for m in colocated], rel=1e-4, abs=1e-6)
    assert [m["reward"] for m in served] == [m["reward"] for m in colocated]
    assert [m["policy_lag"] for m in served] == [0, 0, 0, 0]


def test_async_lag_holds_its_bound(work, server, stage1):
    """K = 2: the server draws up to two versions ahead; no step trains on older samples, and some step trains on
    samples drawn before the last update (the overlap happened)."""
    launch("ddp", _train(work, "lag2", _server_args(server), "--async-lag", "2", "--steps", "5"), work)
    lags = [m["policy_lag"] for m in _read(work / "lag2")]
    assert len(lags) == 5 and max(lags) <= 2 and max(lags) >= 1
    ledger = _read(work / "lag2", "ledger.jsonl")
    assert [e["step"] - 1 - e["policy_version"] for e in ledger] == lags


@pytest.mark.parametrize("lag", [0, 2])
def test_kill_and_resume_loses_nothing(work, server, stage1, lag):
    """Killed after its second checkpoint and resumed: the server takes the checkpoint's weights again, samples in
    flight are dropped, every step trains once on its own prompts (the ledger) within the lag bound, and with K = 0
    the losses are the uninterrupted run's."""
    run = work / f"resumed-{lag}"
    args = _train(work, run.name, _server_args(server), "--async-lag", str(lag))
    launch_and_kill("ddp", args, work, until=run / "checkpoints" / "step-000002")
    launch("ddp", args, work)
    ledger = _read(run, "ledger.jsonl")
    assert [e["step"] for e in ledger] == [1, 2, 3, 4]
    records = pd.read_parquet(work / "v.parquet")["id"].tolist()
    for e in ledger:
        assert e["prompts"] == [records[i] for i in step_prompts(len(records), 4, e["step"] - 1, 0)]
        assert 0 <= e["step"] - 1 - e["policy_version"] <= lag
    if lag == 0:
        assert [m["loss"] for m in _read(run)] == pytest.approx([m["loss"] for m in _read(work / "served")],
                                                                rel=1e-4, abs=1e-6)


def test_lora_run_through_the_server(work, server, stage1):
    """With LoRA the merged weights reach the server after every update, ahead-sampling included."""
    launch("ddp", _train(work, "lora", _server_args(server), "--lora-rank", "4", "--async-lag", "1", "--steps", "2"),
           work)
    metrics = _read(work / "lora")
    assert len(metrics) == 2 and all(m["policy_lag"] <= 1 for m in metrics)
    assert (work / "lora" / "final" / "adapter_config.json").is_file()


def test_eval_through_the_server_pushes_the_checkpoint(work, server, stage1):
    """A trained checkpoint evaluated through the server, whose model is the reference: its weights are pushed,
    and the greedy answers are those of a colocated engine evaluating the same checkpoint."""
    common = dict(model=str(work / "served" / "final"), engine="vllm", max_prompt_tokens=64, max_new_tokens=8,
                  limit=8)
    served = run_eval(EvalConfig(**common, vllm_mode="server", vllm_server=server.address,
                                 output=str(work / "eval-served.json")))
    with urllib.request.urlopen(f"http://{server.address}/health", timeout=10) as reply:
        assert json.loads(reply.read())["weights_replaced"]
    finish()  # the client detaches
    local = run_eval(EvalConfig(**common, vllm_enforce_eager=True, vllm_kv_cache_gb=0.25,
                                output=str(work / "eval-local.json")))
    assert [s["greedy"] for s in served["samples"]] == [s["greedy"] for s in local["samples"]]
    assert served["accuracy"] == local["accuracy"]


def test_a_dead_server_stops_the_run_with_an_error(work, server, stage1):
    """The server killed mid-run: the launch ends with the error that says so, within the request timeout, not a
    hang (last in the file: the server is gone afterwards)."""
    args = _train(work, "orphan", _server_args(server), "--steps", "30", "--vllm-server-timeout", "20")
    logs = work / "launch-logs" / "orphan"
    with subprocess.Popen(command("ddp", args, logs), cwd=work, env=ENV, stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True) as proc:
        deadline = time.monotonic() + 240
        while not (work / "orphan" / "checkpoints" / "step-000001").exists():
            assert proc.poll() is None and time.monotonic() < deadline, "the run ended or hung before step 1"
            time.sleep(0.05)
        kill_tree(server)
        try:
            _, err = proc.communicate(timeout=120)
        except subprocess.TimeoutExpired:
            kill_tree(proc)
            pytest.fail("the launch hung after its server died")
    assert proc.returncode != 0
    assert "no vLLM server answers" in err or "did not answer" in err, err[-3000:]
