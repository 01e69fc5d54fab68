"""What the vLLM engine's set-up decides without vLLM itself: the push's API check and eval's share of the GPU.
The engine itself runs in tests/vllm_cpu."""

from __future__ import annotations

import pytest

from astarpo.config import ConfigError
from astarpo.engines import ALONE_GPU_SHARE, check_push_api
from astarpo.evaluate import GPU_MARGIN, MODEL_HEADROOM, engine_gpu_share

GiB = 2**30


def test_a_vllm_whose_reload_takes_no_weights_iterator_is_refused():
    """The push calls reload_weights(weights_iterator=...): a vLLM whose runner lost that parameter is refused at
    import, in one message naming the version, not in the middle of the first step."""

    def current(self, weights_iterator=None, weights_path=None, is_checkpoint_format=True): ...

    def other(self, weights_path=None): ...

    check_push_api(current, "0.32.0")
    with pytest.raises(ImportError, match="vLLM 0.99.0 cannot take the policy's weights"):
        check_push_api(other, "0.99.0")


def test_eval_engine_leaves_room_for_the_models():
    """vLLM's start-up check wants its whole share free, and the HF models go onto the GPU after it: the share is
    what the models (with room for their KL passes) leave, never more than the engine's default alone."""
    total = 80 * GiB
    assert engine_gpu_share(total, total, 0) == ALONE_GPU_SHARE
    share = engine_gpu_share(78 * GiB, total, 30 * GiB)  # a 7B model and its reference in bfloat16
    assert share == pytest.approx((78 - MODEL_HEADROOM * 30) / 80 - GPU_MARGIN)
    assert share * total + MODEL_HEADROOM * 30 * GiB <= 78 * GiB  # both fit in what was free
    with pytest.raises(ConfigError, match="leaving none for the vLLM engine"):
        engine_gpu_share(20 * GiB, total, 30 * GiB)


def _client(address: str, timeout: float, tmp_path):
    from types import SimpleNamespace

    from astarpo.launch import Launch
    from astarpo.serve import ServerSampler

    cfg = SimpleNamespace(vllm_server=address, vllm_server_timeout=timeout, output_dir=str(tmp_path / "run"))
    return lambda: ServerSampler(cfg, tmp_path, None, Launch())


def test_a_missing_server_is_an_error_that_says_how_to_start_one(tmp_path):
    """Nothing listens at the address: the run stops at once, naming the address and the command."""
    import socket

    from astarpo.serve import ServerError

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # free, and nothing listens on it once the socket is closed
    with pytest.raises(ServerError, match=f"no vLLM server answers at http://127.0.0.1:{port}.*astarpo serve"):
        _client(f"127.0.0.1:{port}", 5, tmp_path)()


def test_a_server_that_does_not_answer_is_an_error_within_the_timeout(tmp_path):
    """A server that accepts the connection and then says nothing (stuck, overloaded): an error after the stated
    timeout, not a hang."""
    import socket
    import time

    from astarpo.serve import ServerError

    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen()
        t0 = time.monotonic()
        with pytest.raises(ServerError, match="did not answer attach within 1 s"):
            _client(f"127.0.0.1:{silent.getsockname()[1]}", 1, tmp_path)()
        assert time.monotonic() - t0 < 30
