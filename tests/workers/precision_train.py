"""Worker for the precision tests: trains the real Trainer and prints one JSON line with the losses and
the dtypes of what the precision policy (model/precision.py) fixes, read after `deepspeed.initialize`
and again after training.

usage: python tests/workers/precision_train.py CONFIG [overrides...]
"""

from __future__ import annotations

import json
import sys


def dtypes(tr) -> dict:
    """dtype name -> what has it, for the tensors the policy names."""
    from model.pkm.memory import MaskedBatchNorm

    out = {
        "value tables": {str(m.values.weight.dtype) for _, m in tr.pkm_layers},
        "batchnorm stats": {
            str(b.dtype)
            for mod in tr.model.modules()
            if isinstance(mod, MaskedBatchNorm)
            for b in (mod.running_mean, mod.running_var)
        },
        "dense params": {str(p.dtype) for p in tr.model.parameters()},
    }
    opt = tr.optimizer  # DeepSpeed's wrapper keeps fp32 masters of bf16 weights (fp32_groups), or is the base
    masters = [p for g in getattr(opt, "fp32_groups", []) for p in g] or [
        p for g in getattr(opt, "optimizer", opt).param_groups for p in g["params"]
    ]
    out["dense master params"] = {str(p.dtype) for p in masters}
    base = getattr(opt, "optimizer", opt)
    out["dense moments"] = {
        str(st[k].dtype) for st in base.state.values() for k in ("exp_avg", "exp_avg_sq") if k in st
    }
    vstate = tr.value_optimizer.optimizer.state
    out["value moments"] = {str(st[k].dtype) for st in vstate.values() for k in ("exp_avg", "exp_avg_sq")}
    return {k: sorted(v) for k, v in out.items()}


def main() -> int:
    from pretrain.config import load_config
    from pretrain.distributed import shutdown
    from pretrain.trainer import Trainer

    tr = Trainer(load_config(sys.argv[1], sys.argv[2:]))
    at_start = dtypes(tr)
    losses = []
    train_step = tr.train_step

    def recording_step(micro_batches):
        result = train_step(micro_batches)
        losses.append(result.loss)
        return result

    tr.train_step = recording_step
    code = tr.train().exit_code
    print(json.dumps({"losses": losses, "at_start": at_start, "at_end": dtypes(tr)}), flush=True)
    shutdown()
    return code


if __name__ == "__main__":
    sys.exit(main())
