"""Distributed set-up: process group from torchrun or SLURM variables, megatron parallel state,
the PKM memory-parallel layout, the `mpu` adapter DeepSpeed expects, and the one home of collectives
over small host values (loss and token sums, flags, counters): `all_reduce_values` and
`all_reduce_tensor` place their tensors on the device the group's backend needs (CUDA for NCCL), so
no caller builds a bare `torch.tensor([...])` for a collective (tests check it with
pretrain/device_guard.py)."""

from __future__ import annotations

import datetime
import logging
import os
import socket
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from model import cpu_shim
from model.pkm.value_table import MemoryParallel
from pretrain.config import ParallelConfig
from pretrain.errors import PretrainError
from pretrain.layout import check_layout  # noqa: F401  (re-exported: the trainer and tests import it from here)

log = logging.getLogger("pkm.dist")


@dataclass
class DistEnv:
    rank: int
    world_size: int
    local_rank: int
    tp_size: int
    tp_rank: int
    dp_size: int
    dp_rank: int
    device: torch.device
    memory_parallel: MemoryParallel  # the PKM value tables' layout and groups
    stats_group: object | None  # DP group for PKM query BatchNorm statistics

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def all_reduce_sum(self, values: Sequence[float], group=None) -> list[float]:
        """Sums of small host values over `group` (None: every rank), as Python floats (float64)."""
        return all_reduce_values(values, "sum", group)

    def all_reduce_max(self, values: Sequence[float], group=None) -> list[float]:
        return all_reduce_values(values, "max", group)


_OPS = {"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX, "min": dist.ReduceOp.MIN}


def backend_device(group=None) -> torch.device:
    """The device a collective over `group` takes its tensors on: the current CUDA device for NCCL,
    the CPU for gloo (and without a process group)."""
    if dist.is_initialized() and dist.get_backend(group) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _group_size(group) -> int:
    return dist.get_world_size(group) if dist.is_initialized() else 1


def all_reduce_values(values: Sequence[float], op: str = "sum", group=None) -> list[float]:
    """All-reduce a few host numbers (float64, on the backend's device); returns Python floats. In one
    process (or a group of one) the values come back as they are, without a collective."""
    values = [float(v) for v in values]
    if _group_size(group) == 1:
        return values
    t = torch.tensor(values, dtype=torch.float64, device=backend_device(group))
    dist.all_reduce(t, op=_OPS[op], group=group)
    return t.tolist()


def all_reduce_tensor(t: torch.Tensor, op: str = "sum", group=None) -> torch.Tensor:
    """All-reduce a tensor that may live elsewhere (e.g. host-side counters): it travels to the
    backend's device and the result comes back on `t`'s device and dtype (a new tensor)."""
    if _group_size(group) == 1:
        return t.clone()
    work = t.to(backend_device(group), copy=True)
    dist.all_reduce(work, op=_OPS[op], group=group)
    return work.to(t.device)


def rank_env() -> dict[str, str]:
    """RANK/WORLD_SIZE/LOCAL_RANK/MASTER_ADDR/MASTER_PORT from torchrun, else derived from SLURM
    (so `srun python -m pkm pretrain ...` works), else a single local process."""
    env = os.environ
    if "RANK" in env and "WORLD_SIZE" in env:
        return {k: env[k] for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT") if k in env}
    if "SLURM_PROCID" in env and "SLURM_NTASKS" in env:
        nodelist = env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST", "localhost")
        return {
            "RANK": env["SLURM_PROCID"],
            "WORLD_SIZE": env["SLURM_NTASKS"],
            "LOCAL_RANK": env.get("SLURM_LOCALID", "0"),
            "MASTER_ADDR": env.get("MASTER_ADDR") or _first_slurm_host(nodelist),
            "MASTER_PORT": env.get("MASTER_PORT") or str(29500 + int(env.get("SLURM_JOB_ID", "0")) % 1000),
        }
    return {
        "RANK": "0",
        "WORLD_SIZE": "1",
        "LOCAL_RANK": "0",
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": env.get("MASTER_PORT") or str(_free_port()),
    }


def _first_slurm_host(nodelist: str) -> str:
    """The address of the job's first node as SLURM reaches it (its NodeAddr, which may differ from
    the node name, e.g. when names do not resolve), for the rendezvous."""
    import subprocess

    def scontrol(*args: str) -> str:
        return subprocess.run(["scontrol", *args], capture_output=True, text=True, check=True, timeout=30).stdout

    try:
        host = scontrol("show", "hostnames", nodelist).split()[0]
    except (OSError, subprocess.SubprocessError, IndexError):
        return nodelist.split(",")[0].split("[")[0]
    try:
        for field in scontrol("show", "node", host, "-o").split():
            if field.startswith("NodeAddr="):
                return field.split("=", 1)[1]
    except (OSError, subprocess.SubprocessError):
        pass
    return host


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class _Started:
    """What one init_distributed call started (it was not running) and its shutdown() ends, so a
    caller's own process group (a test fixture's world of one) outlives a run."""

    process_group: bool = False
    model_parallel: bool = False
    environ: list[str] = field(default_factory=list)  # variables added to os.environ


_started: list[_Started] = []  # one per init_distributed not yet shut down; shutdown() ends the last


def init_distributed(parallel: ParallelConfig, timeout_minutes: int = 30) -> DistEnv:
    """Start the process group (gloo on CPU, NCCL on GPU), megatron's parallel state and the
    memory-parallel groups. Works in one process too (megatron needs its state anyway).

    The rendezvous is given explicitly (`tcp://`, rank, world size from `rank_env()`), not through
    os.environ: a process that trains in-process (tests, benchmarks/kim_jung.py) must not hand its
    MASTER_PORT to the commands it starts next. Only LOCAL_RANK, which DeepSpeed reads from os.environ
    and nowhere else, is set when missing; shutdown() takes it back."""
    cpu_shim.apply()
    started = _Started()
    _started.append(started)  # before anything can fail: the caller's shutdown() ends what did start
    ranks = rank_env()
    rank, world = int(ranks["RANK"]), int(ranks["WORLD_SIZE"])
    local_rank = int(ranks.get("LOCAL_RANK", "0"))
    tp = parallel.tensor_parallel
    if tp < 1 or world % tp:
        raise PretrainError(
            f"parallel.tensor_parallel={tp} does not divide the world size {world} "
            f"(TP x DP must equal the number of processes)"
        )
    if "LOCAL_RANK" not in os.environ:
        os.environ["LOCAL_RANK"] = str(local_rank)
        started.environ.append("LOCAL_RANK")
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.set_device(local_rank)
    if not dist.is_initialized():
        addr = ranks["MASTER_ADDR"]
        host = f"[{addr}]" if ":" in addr else addr  # an IPv6 address
        dist.init_process_group(
            "nccl" if cuda else "gloo",
            init_method=f"tcp://{host}:{ranks['MASTER_PORT']}",
            rank=rank,
            world_size=world,
            timeout=datetime.timedelta(minutes=timeout_minutes),
        )
        started.process_group = True
    from megatron.core import parallel_state as ps

    if not ps.model_parallel_is_initialized():
        ps.initialize_model_parallel(tensor_model_parallel_size=tp)
        started.model_parallel = True
    tp_size, tp_rank = ps.get_tensor_model_parallel_world_size(), ps.get_tensor_model_parallel_rank()
    dp_size, dp_rank = ps.get_data_parallel_world_size(), ps.get_data_parallel_rank()
    tp_group, dp_group = ps.get_tensor_model_parallel_group(), ps.get_data_parallel_group()
    mode = parallel.memory_parallel
    over_tp = mode in ("tp", "all") and tp_size > 1
    over_dp = mode in ("dp", "all") and dp_size > 1
    memory_parallel = MemoryParallel(
        tp_group=tp_group if over_tp else None,
        tp_size=tp_size if over_tp else 1,
        tp_rank=tp_rank if over_tp else 0,
        dp_group=dp_group if over_dp else None,
        dp_size=dp_size if over_dp else 1,
        dp_rank=dp_rank if over_dp else 0,
        replica_group=dp_group if (dp_size > 1 and not over_dp) else None,
        replica_size=dp_size if not over_dp else 1,
        grad_scale=1.0 / dp_size,
        replica_id=(0 if over_tp else tp_rank, 0 if over_dp else dp_rank),
    )
    return DistEnv(
        rank=dist.get_rank(),
        world_size=world,
        local_rank=local_rank,
        tp_size=tp_size,
        tp_rank=tp_rank,
        dp_size=dp_size,
        dp_rank=dp_rank,
        device=torch.device("cuda", local_rank) if cuda else torch.device("cpu"),
        memory_parallel=memory_parallel,
        stats_group=dp_group if dp_size > 1 else None,
    )


def shutdown() -> None:
    """End what the last init_distributed started: megatron's parallel state, the process group (through
    DeepSpeed when it holds it, so its cached groups go too), the variables it added to os.environ."""
    if not _started:
        return
    started = _started.pop()
    from megatron.core import parallel_state as ps

    if started.model_parallel and ps.model_parallel_is_initialized():
        ps.destroy_model_parallel()
    if started.process_group and dist.is_initialized():
        ds_comm = sys.modules.get("deepspeed.comm.comm")
        if ds_comm is not None and ds_comm.cdb is not None:
            ds_comm.destroy_process_group()  # also drops deepspeed.utils.groups' references to its groups
        else:
            dist.destroy_process_group()
    for name in started.environ:
        os.environ.pop(name, None)


class MegatronMPU:
    """What DeepSpeed's `mpu=` asks for, answered by megatron-core's parallel state (DeepSpeed calls
    the tensor-parallel group the 'model parallel' group)."""

    # DeepSpeed's name -> megatron-core's parallel_state function
    _ANSWERS = {
        "get_model_parallel_rank": "get_tensor_model_parallel_rank",
        "get_model_parallel_world_size": "get_tensor_model_parallel_world_size",
        "get_model_parallel_group": "get_tensor_model_parallel_group",
        "get_tensor_model_parallel_rank": "get_tensor_model_parallel_rank",
        "get_tensor_model_parallel_world_size": "get_tensor_model_parallel_world_size",
        "get_tensor_model_parallel_group": "get_tensor_model_parallel_group",
        "get_tensor_model_parallel_src_rank": "get_tensor_model_parallel_src_rank",
        "get_data_parallel_rank": "get_data_parallel_rank",
        "get_data_parallel_world_size": "get_data_parallel_world_size",
        "get_data_parallel_group": "get_data_parallel_group",
    }

    def __getattr__(self, name: str):
        if name not in self._ANSWERS:
            raise AttributeError(name)  # DeepSpeed probes optional methods with hasattr
        from megatron.core import parallel_state as ps

        return getattr(ps, self._ANSWERS[name])
