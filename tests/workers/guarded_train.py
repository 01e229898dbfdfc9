"""torchrun worker for the device-guard tests: builds and trains the real Trainer (checkpoint save,
evaluation and resume included) under `DeviceGuard(required="cuda")`, so every collective must get
tensors placed on the backend's device as if the gloo run underneath were NCCL.

usage: torchrun --nproc_per_node N tests/workers/guarded_train.py CONFIG [overrides...]
"""
from __future__ import annotations

import sys


def main() -> int:
    from pretrain.config import load_config
    from pretrain.device_guard import DeviceGuard
    from pretrain.distributed import shutdown
    from pretrain.trainer import Trainer

    cfg = load_config(sys.argv[1], sys.argv[2:])
    with DeviceGuard(required="cuda") as guard:
        tr = Trainer(cfg)
        code = tr.train()
    print(f"rank {tr.env.rank}: device guard checked {guard.checked} tensors", flush=True)
    shutdown()
    return code


if __name__ == "__main__":
    sys.exit(main())
