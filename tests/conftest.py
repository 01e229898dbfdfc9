"""Shared pytest fixtures."""
from __future__ import annotations

import socket

import pytest


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def megatron_single_process():
    """A gloo world of one process with megatron-core's parallel state initialised (TP = PP = 1), so
    megatron-core GPT/BERT models can be built in the test process. The process group is kept at
    teardown (other fixtures may reuse it); the model-parallel state is destroyed if we created it."""
    import torch.distributed as dist
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

    from model import cpu_shim

    if not dist.is_initialized():
        dist.init_process_group("gloo", world_size=1, rank=0, init_method=f"tcp://127.0.0.1:{_free_port()}")
    cpu_shim.apply()
    created = not parallel_state.model_parallel_is_initialized()
    if created:
        parallel_state.initialize_model_parallel(1)
    model_parallel_cuda_manual_seed(0)
    yield
    if created:
        parallel_state.destroy_model_parallel()
