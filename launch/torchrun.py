"""The torchrun command: one agent per node, c10d rendezvous, restarts, signals passed to workers."""

from __future__ import annotations

from dataclasses import dataclass

from launch.errors import LaunchError
from launch.training import Entry

# torchrun passes these on to its workers and waits for them (up to shutdown_timeout) before
# exiting; SIGUSR1 is SLURM's usual "time is nearly up" signal, on which the trainer checkpoints.
FORWARDED_SIGNALS = "SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1"

# With the agent's rendezvous store shared with the workers (torch's default), a restarted
# multi-node group can read the previous attempt's addresses and fail to connect: each agent counts
# its restarts locally, and a node restarted for a membership change counts differently
# (pytorch/pytorch#135712; seen here with gloo). Workers of each attempt then get a fresh store.
TORCHRUN_ENV = {"TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1"}


@dataclass
class TorchrunOptions:
    nnodes: int | str  # a number, or a shell word such as "$SLURM_JOB_NUM_NODES"
    nproc_per_node: int
    rdzv_endpoint: str  # HOST:PORT of the c10d store
    rdzv_id: str
    max_restarts: int = 1
    # Whether this agent hosts the c10d store (node rank 0 does); None = torchrun guesses from the
    # endpoint's address. c10d assigns ranks itself, so torchrun's --node-rank is not passed.
    is_host: bool | None = None
    shutdown_timeout: int = 120  # seconds workers get to save a checkpoint after a signal


def check_endpoint(endpoint: str) -> tuple[str, int]:
    host, sep, port = endpoint.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise LaunchError(f"--rdzv-endpoint must be HOST:PORT (a port 1-65535), got '{endpoint}'")
    return host, int(port)


def torchrun_options(o: TorchrunOptions) -> list[str]:
    """torchrun's own options (everything between `-m torch.distributed.run` and the script)."""
    if o.max_restarts < 0:
        raise LaunchError(f"--max-restarts must be 0 or more, got {o.max_restarts}")
    opts = [
        f"--nnodes={o.nnodes}",
        f"--nproc-per-node={o.nproc_per_node}",
        "--rdzv-backend=c10d",
        f"--rdzv-endpoint={o.rdzv_endpoint}",
        f"--rdzv-id={o.rdzv_id}",
        f"--max-restarts={o.max_restarts}",
        f"--signals-to-handle={FORWARDED_SIGNALS}",
        f"--shutdown-timeout={o.shutdown_timeout}",
    ]
    if o.is_host is not None:
        opts.append(f"--rdzv-conf=is_host={int(o.is_host)}")
    return opts


def torchrun_argv(python: str, o: TorchrunOptions, entry: Entry) -> list[str]:
    """`python -m torch.distributed.run ...`: the same interpreter (and venv) as the workers."""
    return [python, "-m", "torch.distributed.run", *torchrun_options(o), *entry.torchrun_tail()]
