"""torchrun worker for the device-guard tests: builds and trains the real Trainer (checkpoint save,
evaluation and resume included) under `DeviceGuard`: on a CPU run told "cuda", so every collective must get tensors
placed on the backend's device as if the gloo run underneath were NCCL; on a GPU, NCCL's real need.

usage: torchrun --nproc_per_node N tests/workers/guarded_train.py CONFIG [overrides...]
"""

from __future__ import annotations

import sys

import torch


def main() -> int:
    from pretrain.config import load_config
    from pretrain.device_guard import DeviceGuard
    from pretrain.distributed import shutdown
    from pretrain.trainer import Trainer

    cfg = load_config(sys.argv[1], sys.argv[2:])
    # On a GPU the backends' own needs are checked (NCCL groups: CUDA tensors; megatron's gloo groups
    # take CPU ones); on a CPU run the guard emulates NCCL on every group.
    with DeviceGuard(required=None if torch.cuda.is_available() else "cuda") as guard:
        tr = Trainer(cfg)
        code = tr.train().exit_code
    print(f"rank {tr.env.rank}: device guard checked {guard.checked} tensors", flush=True)
    shutdown()
    return code


if __name__ == "__main__":
    sys.exit(main())
