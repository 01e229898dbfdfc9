"""The precision policy, in one place (the README's "Running on GPUs" repeats it).

`train.precision=bf16` (the default on GPUs, `auto`):
- Dense weights and activations are bf16 under DeepSpeed's bf16 mode, which keeps fp32 master weights
  and fp32 Adam moments inside its optimizer (ZeRO or not).
- PKM value tables are stored in fp32 (`TABLE_DTYPE`) by default, with an fp32 value-optimizer state
  (lazy Adam's two moments, or the row-wise optimizers' per-row scalars: pretrain/optim.py). A table
  read is summed in fp32 (the softmax weights are fp32) and handed back to the layer in the
  activations' dtype.
- `model.pkm.value_dtype=bf16` (issue #15, with a row-wise value optimizer) stores the tables in bf16:
  2 bytes per value instead of 4. The update is computed in fp32 on the touched rows (gathered and
  widened) and rounded back *stochastically* (up or down with probability given by the distance,
  unbiased), as fbgemm does for its fp16/bf16 tables. Round to nearest would stall the table: an
  update of lr 1e-3 times a shrinking Adagrad factor on a value of ~dim^-0.5 is mostly below half a
  bf16 step (8 bits of mantissa), and rows are updated rarely. The rounding bits are a hash of
  (seed, step, row, global column), so every TP/DP layout rounds the same element the same way and a
  resume continues exactly. A bf16 table is read in bf16 (the read weights are cast to bf16, the
  output widened back), so its reads are rounded more coarsely than fp32 ones; checkpoints hold the
  table in bf16 (half the bytes); the Hugging Face export writes it in the model's dtype (fp32).
  bf16 tables with `adam` are refused: Adam's 8 bytes of moments would dwarf the 2 bytes saved.
- fp32 stays fp32 for what is statistics rather than weights: the query BatchNorm's batch and running
  statistics (and the normalisation itself), the query-key scores and their softmax (top-k ties and
  the softmax's exponent need the mantissa), and the loss sums (fp32 on the device, fp64 across ranks).
- Modules keep these tensors at least fp32 when cast (`module.bfloat16()`, `.half()`): they follow
  the cast's device and any widening (`.double()` in tests), never a narrowing (`keep_at_least_fp32`).
  DeepSpeed casts parameters only; `check_policy` asserts after `deepspeed.initialize` that nothing
  above was narrowed.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

TABLE_DTYPE = torch.float32
STATS_DTYPE = torch.float32


def compute_dtype(*dtypes: torch.dtype) -> torch.dtype:
    """The dtype statistics are computed in: fp32, or wider when an input is wider (fp64 tests)."""
    out = STATS_DTYPE
    for d in dtypes:
        out = torch.promote_types(out, d)
    return out


def keep_at_least_fp32(fn: Callable[[torch.Tensor], torch.Tensor], t: torch.Tensor) -> torch.Tensor:
    """`t` moved by a Module._apply function `fn` (to(), cuda(), bfloat16(), double(), ...) to `fn`'s
    device, and to its dtype only if that is not narrower than fp32 (no lossy round trip: `fn` is only
    tried on an empty probe)."""
    probe = fn(torch.empty(0, dtype=t.dtype, device=t.device))
    dtype = probe.dtype if torch.promote_types(probe.dtype, STATS_DTYPE) == probe.dtype else t.dtype
    return t.to(device=probe.device, dtype=dtype)


def check_policy(model: torch.nn.Module) -> None:
    """Raise if a value table or a BatchNorm statistic of `model` is narrower than fp32."""
    from model.pkm.memory import MaskedBatchNorm
    from model.pkm.value_table import ValueTable

    for name, m in model.named_modules():
        if isinstance(m, ValueTable) and m.storage_dtype == torch.bfloat16:
            if m.weight.dtype != torch.bfloat16:
                raise AssertionError(f"precision policy: {name}.weight is {m.weight.dtype}, configured bf16")
            continue
        tensors = (
            {"weight": m.weight}
            if isinstance(m, ValueTable)
            else (
                {"running_mean": m.running_mean, "running_var": m.running_var} if isinstance(m, MaskedBatchNorm) else {}
            )
        )
        for key, t in tensors.items():
            if compute_dtype(t.dtype) != t.dtype:
                raise AssertionError(f"precision policy: {name}.{key} is {t.dtype}, must be at least fp32")
