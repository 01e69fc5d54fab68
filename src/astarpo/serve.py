"""`astarpo serve`: one vLLM engine in its own process, and :class:`ServerSampler`, a launch's client of it.

Why: colocated (:mod:`astarpo.engines`), every process of a launch alternates between sampling and training. A
server samples on its own devices while the launch trains, and with ``--async-lag K`` A*-PO trains on samples up
to K policy versions old, so the two overlap: the optimal policy satisfies
beta2 * log(pi*(y|x) / pi_ref(y|x)) = r(x, y) - V*(x) for every response y, so the least-squares loss is minimized
by pi* whatever policy drew the responses (given coverage), with no importance ratio.

The protocol: HTTP with JSON bodies, one engine behind one lock, so that a request never runs beside a weight push
(a request that comes during a push waits for it).

- ``GET /health``: the model and its content hash, the engine's dtype and longest sequence, the client, the version,
  and whether the weights are another's than the model's.
- ``POST /attach {client}``: a launch claims the server, refused while another client has made a request within
  ``lease_seconds`` (the same client, a resumed run, is not). The engine goes back to the model's own weights,
  version 0: a run starts from them, a resumed run pushes its checkpoint's.
- ``POST /generate {client, prompt_tokens, n, temperature, top_p, max_new_tokens, seed}``: every random stream
  seeded with ``seed``, then the engine's samples (tokens, truncation, the engine's log-probs) and the policy
  version that drew them. The client draws ``seed`` from its own seeded stream, so that Stage 1's shards and a
  synchronous run are reproducible and resumable.
- ``POST /load_weights {client, path, version}``: the safetensors file at ``path`` (the client writes it to
  /dev/shm: client and server share a machine) pushed into the engine through ``reload_weights(weights_iterator=
  ...)``, as :meth:`VLLMSampler.load_tensors` does for a colocated engine; the version is the client's.
- ``POST /detach {client}``: the launch is done.

The engine runs inside the server's process (``VLLM_ENABLE_V1_MULTIPROCESSING=0``), so the weights iterator reaches
it without crossing processes: one engine of tensor-parallel size 1. Listening on an address other than 127.0.0.1
lets every host that reaches it sample and replace the weights: there is no authentication.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import torch

from .config import CommonConfig, ServeConfig
from .engines import VLLMSampler, engine_eos, policy_weights
from .generation import Rollout, SamplingParams
from .launch import Launch, at_finish
from .models import content_hash, load_tokenizer, resolve_model

log = logging.getLogger(__name__)


class ServerError(RuntimeError):
    """The server refused a request, failed on it, or did not answer; the message says which and what to do."""


class _Refused(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


class _Served:
    """The server's engine and who it serves; every engine call holds :attr:`lock`."""

    def __init__(self, cfg: ServeConfig, engine: VLLMSampler, model_dir: Path) -> None:
        self.cfg, self.engine, self.model_dir = cfg, engine, model_dir
        self.model_hash = content_hash(model_dir)
        self.lock = threading.Lock()
        self.version, self.client, self.seen = 0, None, 0.0

    def health(self) -> dict[str, Any]:
        return {"model": self.cfg.model, "model_hash": self.model_hash, "dtype": str(self.engine.torch_dtype),
                "max_model_len": self.engine.llm.llm_engine.model_config.max_model_len, "client": self.client,
                "version": self.version, "weights_replaced": self.engine.weights_replaced}

    def _check(self, body: dict[str, Any]) -> None:
        if body.get("client") != self.client:
            raise _Refused(409, f"this server serves {self.client!r}, not {body.get('client')!r}: attach first")
        self.seen = time.monotonic()

    def attach(self, body: dict[str, Any]) -> dict[str, Any]:
        with self.lock:
            idle = time.monotonic() - self.seen
            if self.client not in (None, body["client"]) and idle < self.cfg.lease_seconds:
                raise _Refused(409, f"the server serves the launch {self.client!r} (its last request {idle:.0f} s "
                                    f"ago); a second launch is refused: start another server (--port), or let the "
                                    f"first end (it detaches) or stay idle for {self.cfg.lease_seconds:.0f} s")
            if self.engine.weights_replaced:
                self.engine.load_weights_from(self.model_dir)
            self.client, self.seen, self.version = body["client"], time.monotonic(), 0
            log.info("serving %s", self.client)
            return self.health()

    def detach(self, body: dict[str, Any]) -> dict[str, Any]:
        with self.lock:
            if body.get("client") == self.client:
                self.client = None
                log.info("%s detached", body["client"])
            return {}

    def generate(self, body: dict[str, Any]) -> dict[str, Any]:
        from accelerate.utils import set_seed

        with self.lock:
            self._check(body)
            set_seed(body["seed"])
            params = SamplingParams(body["temperature"], body["top_p"], body["max_new_tokens"])
            roll = self.engine.generate(body["prompt_tokens"], body["n"], params)
            self.seen = time.monotonic()
            return {"version": self.version, "prompt_index": roll.prompt_index, "response_tokens": roll.response_tokens,
                    "truncated": roll.truncated, "sampler_logp": roll.sampler_logp}

    def load_weights(self, body: dict[str, Any]) -> dict[str, Any]:
        from safetensors import safe_open

        with self.lock:
            self._check(body)
            with safe_open(body["path"], framework="pt") as f:
                self.engine.load_tensors((name, f.get_tensor(name)) for name in f.keys())
            self.engine.weights_replaced = True
            self.version, self.seen = body["version"], time.monotonic()
            return {"version": self.version}


def _handler(served: _Served) -> type[BaseHTTPRequestHandler]:
    routes = {"/attach": served.attach, "/detach": served.detach, "/generate": served.generate,
              "/load_weights": served.load_weights}

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 (http.server's name)
            self._reply(200, served.health()) if self.path == "/health" else self._reply(404, {"error": self.path})

        def do_POST(self) -> None:  # noqa: N802
            route = routes.get(self.path)
            if route is None:
                self._reply(404, {"error": f"no such endpoint {self.path}"})
                return
            try:
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                self._reply(200, route(body))
            except _Refused as e:
                self._reply(e.status, {"error": str(e)})
            except Exception as e:  # the client gets the failure; the server goes on
                log.exception("%s failed", self.path)
                self._reply(500, {"error": f"{type(e).__name__}: {e}"})

        def _reply(self, status: int, obj: dict[str, Any]) -> None:
            data = json.dumps(obj).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, fmt: str, *args: Any) -> None:
            log.debug(fmt, *args)

    return Handler


def serve(cfg: ServeConfig) -> None:
    """Start the engine, then answer requests until the process is stopped."""
    model_dir = resolve_model(cfg.model)
    tokenizer = load_tokenizer(model_dir, cfg.trust_remote_code)
    engine = VLLMSampler(model_dir, tokenizer, engine_eos(model_dir, tokenizer), dtype=cfg.dtype, seed=cfg.seed,
                         max_model_len=cfg.max_model_len, gpu_memory_utilization=cfg.vllm_gpu_memory_utilization,
                         kv_cache_gb=cfg.vllm_kv_cache_gb, enforce_eager=cfg.vllm_enforce_eager,
                         trust_remote_code=cfg.trust_remote_code, max_num_seqs=cfg.max_num_seqs)
    server = ThreadingHTTPServer((cfg.host, cfg.port), _handler(_Served(cfg, engine, model_dir)))
    server.daemon_threads = True
    log.info("serving %s (%s) at http://%s:%d", cfg.model, cfg.dtype, cfg.host, server.server_port)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()


_CLIENT: list[ServerSampler] = []  # this process's attached client: one at a time


class ServerSampler:
    """A launch's client of ``astarpo serve`` (``--engine vllm --vllm-mode server``).

    Every process of the launch is a client of the one engine (:meth:`processes_per_engine`), and the first speaks
    to it: it sends the requests and broadcasts the samples, so every process sees every sample, as the processes
    of a tensor-parallel engine do. After each update the policy's weights (LoRA merged) are gathered by every
    process and sent by the first, with their version; :meth:`prefetch` sends a request ahead, whose samples
    :meth:`generate` hands back when asked for the same prompts (``--async-lag``).
    """

    uses_policy = False
    owns_weights = True
    starts_together = False
    can_sleep = False
    provenance: dict[str, Any] = {"vllm_mode": "server"}  # one stream, the server's: not a colocated engine's

    @staticmethod
    def processes_per_engine(cfg: CommonConfig) -> int:
        return int(os.environ.get("WORLD_SIZE", "1"))

    @staticmethod
    def weights_dtype(cfg: CommonConfig) -> str:
        return cfg.vllm_dtype or cfg.dtype

    def __init__(self, cfg: CommonConfig, model_dir: str | Path, tokenizer: Any, launch: Launch,
                 model: Any = None) -> None:
        """Attach to the server (the run's output path names the client, so that the same run resumed is
        recognized). ``model_dir`` must be the server's model, or ``model`` given: its weights are pushed (a
        checkpoint evaluated through the server)."""
        self.url, self.timeout = f"http://{cfg.vllm_server}", cfg.vllm_server_timeout
        self.tokenizer, self.launch = tokenizer, launch
        self.client = str(Path(getattr(cfg, "output_dir", None) or getattr(cfg, "output", "")).resolve())
        self.ahead: deque[tuple[int, Future]] = deque()
        self.pool: ThreadPoolExecutor | None = None
        info = None
        if launch.is_main:
            for old in _CLIENT:
                old.detach()
            info = self._call("attach", {"client": self.client})
            _CLIENT[:] = [self]
        info = launch.broadcast(info)
        self.dtype, self.version = getattr(torch, info["dtype"].removeprefix("torch.")), info["version"]
        if info["dtype"].removeprefix("torch.") != self.weights_dtype(cfg):
            raise ServerError(f"the server's engine samples in {info['dtype']}, this run asks for "
                              f"{self.weights_dtype(cfg)} (--vllm-dtype, else --dtype): set the same on both")
        if info["max_model_len"] < cfg.max_prompt_tokens + cfg.max_new_tokens:
            raise ServerError(f"the server takes sequences up to {info['max_model_len']} tokens, this run up to "
                              f"{cfg.max_prompt_tokens + cfg.max_new_tokens} (max_prompt_tokens + max_new_tokens): "
                              "start the server with a larger --max-model-len")
        at_finish(self.detach)
        if info["model_hash"] != content_hash(Path(model_dir)):
            if model is None:
                raise ServerError(f"the server holds {info['model']}, this run's model is {model_dir}: start a server "
                                  "with the run's model")
            self.load_weights(model, version=0)

    def _call(self, endpoint: str, body: dict[str, Any]) -> dict[str, Any]:
        request = urllib.request.Request(f"{self.url}/{endpoint}", data=json.dumps(body).encode(),
                                         headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(request, timeout=self.timeout) as reply:
                return json.loads(reply.read())
        except urllib.error.HTTPError as e:
            message = json.loads(e.read() or b"{}").get("error", e.reason)
            raise ServerError(f"the vLLM server at {self.url} refused {endpoint}: {message}") from None
        except (urllib.error.URLError, OSError) as e:
            reason = getattr(e, "reason", e)
            if isinstance(reason, TimeoutError) or "timed out" in str(reason):
                raise ServerError(f"the vLLM server at {self.url} did not answer {endpoint} within "
                                  f"{self.timeout:.0f} s (--vllm-server-timeout): it is stuck, overloaded or gone"
                                  ) from None
            raise ServerError(f"no vLLM server answers at {self.url} ({reason}): start one with `astarpo serve "
                              "--model MODEL`, or point --vllm-server at it") from None

    def _request(self, prompt_tokens: list[list[int]], n: int, params: SamplingParams) -> dict[str, Any]:
        seed = int(torch.randint(0, 2**31 - 1, (1,)))  # every process draws it: their streams stay the same
        return {"client": self.client, "prompt_tokens": prompt_tokens, "n": n, "temperature": params.temperature,
                "top_p": params.top_p, "max_new_tokens": params.max_new_tokens, "seed": seed}

    def prefetch(self, prompt_tokens: list[list[int]], n: int, params: SamplingParams) -> None:
        """Have the server sample these prompts now, with whatever weights it holds when their turn comes; the
        call of :meth:`generate` for the same prompts gets them. Every process calls it."""
        body = self._request(prompt_tokens, n, params)
        if self.launch.is_main:
            self.pool = self.pool or ThreadPoolExecutor(1, thread_name_prefix="astarpo-server")
            self.ahead.append((hash((json.dumps(prompt_tokens), n, params)), self.pool.submit(self._call, "generate",
                                                                                             body)))

    def generate(self, prompt_tokens: list[list[int]], n: int, params: SamplingParams,
                 progress: Any = None) -> Rollout:
        body, out = self._request(prompt_tokens, n, params), None
        if self.launch.is_main:
            key = hash((json.dumps(prompt_tokens), n, params))
            ahead = next((f for k, f in self.ahead if k == key), None)
            if ahead is not None:
                self.ahead = deque((k, f) for k, f in self.ahead if f is not ahead)
                out = ahead.result()
            else:
                out = self._call("generate", body)
        out = self.launch.broadcast(out)
        if progress is not None:
            progress(len(out["prompt_index"]))
        tokens = out["response_tokens"]
        return Rollout(out["prompt_index"], [prompt_tokens[i] for i in out["prompt_index"]], tokens,
                       self.tokenizer.batch_decode(tokens, skip_special_tokens=True), out["truncated"],
                       sampler_logp=out["sampler_logp"], policy_version=out["version"])

    @torch.no_grad()
    def load_weights(self, model: Any, version: int | None = None) -> None:
        """Send ``model``'s weights (whole, in the engine's dtype, LoRA merged) to the server as policy ``version``
        (the next one when not given). Every process takes part in gathering them; the first writes them to a
        file in shared memory and asks the server to load it."""
        from safetensors.torch import save_file

        version = self.version + 1 if version is None else version
        tensors, storages = {}, set()
        for name, tensor in policy_weights(model, self.dtype):
            if self.launch.is_main:
                tensor = tensor.detach().cpu().contiguous()
                if tensor.untyped_storage().data_ptr() in storages:  # a tied weight: safetensors stores each once
                    tensor = tensor.clone()
                storages.add(tensor.untyped_storage().data_ptr())
                tensors[name] = tensor
        if self.launch.is_main:
            folder = "/dev/shm" if os.path.isdir("/dev/shm") else tempfile.gettempdir()
            path = Path(folder) / f"astarpo-weights-{os.getpid()}-{version}.safetensors"
            try:
                save_file(tensors, path)
                self._call("load_weights", {"client": self.client, "path": str(path), "version": version})
            finally:
                path.unlink(missing_ok=True)
        self.version = version

    def detach(self) -> None:
        """Release the server for another launch (called by :func:`astarpo.launch.finish`)."""
        if self.pool is not None:
            self.pool.shutdown(wait=False, cancel_futures=True)
        if self.launch.is_main and self in _CLIENT:
            _CLIENT.remove(self)
            try:
                self._call("detach", {"client": self.client})
            except ServerError as e:  # a server that is gone holds nothing
                log.warning("%s", e)
