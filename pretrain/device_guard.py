"""A test guard for device discipline: every tensor handed to a `torch.distributed` collective must be
on the device the group's backend needs (CUDA for NCCL), or a GPU run stops at its first collective.

    with DeviceGuard():                    # real check: NCCL groups need CUDA tensors
    with DeviceGuard(required="cuda"):     # CPU run (gloo underneath) checked as if it were NCCL

Real check. The collectives of `torch.distributed` (all_reduce, all_gather, all_to_all_single,
broadcast, reduce_scatter, ...) are wrapped; a tensor whose device type is not the backend's
(`cuda` for NCCL; gloo takes any) raises `DeviceGuardError` naming the collective and the tensor.

Emulated check (`required="cuda"` on a CPU run). Every tensor is on the CPU there, so devices cannot
tell a correctly placed tensor from one built without `device=`. The guard therefore tracks, next to
the real device, where each tensor *would* live on a GPU run, with a TorchFunctionMode over every torch
call made inside it:
  - a factory (`torch.tensor`, `zeros`, `ones`, `empty`, `full`, `arange`, `as_tensor`, ...) called
    without a `device=` is marked *host* (on a GPU run it lands on the CPU), and so is
    `torch.from_numpy` (patched while the guard is on: modes do not see it);
  - `.cpu()` and `.pin_memory()` are host; `.to(<device>)`, `.cuda()` and
    factories with an explicit `device=` (e.g. `device=env.device`, which is CUDA on a GPU run) are not;
  - any other op's outputs are host when a host tensor takes part and no non-scalar device tensor
    does (CUDA ops mix in CPU *scalars* only), as devices propagate on a GPU.
A collective then fails on a host tensor. Tensors made before the guard started count as placed.
Limits: `.to(device)` of a tensor already there returns the tensor itself, which then counts as
placed (on a GPU the copy would be); a literal `device="cpu"` counts as intended. Both can only hide
a mistake, never report a correct tensor. The mode costs a Python call per torch op (tests only).
"""

from __future__ import annotations

import functools

import torch
import torch.distributed as dist
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_flatten

COLLECTIVES = (
    "all_reduce",
    "all_gather",
    "all_gather_into_tensor",
    "all_to_all",
    "all_to_all_single",
    "broadcast",
    "reduce",
    "reduce_scatter",
    "reduce_scatter_tensor",
    "gather",
    "scatter",
    "send",
    "recv",
    "isend",
    "irecv",
)
_FACTORIES = {
    torch.tensor,
    torch.as_tensor,
    torch.zeros,
    torch.ones,
    torch.empty,
    torch.full,
    torch.arange,
    torch.linspace,
    torch.eye,
    torch.rand,
    torch.randn,
    torch.randint,
    torch.randperm,
    torch.scalar_tensor,
    torch.empty_strided,
}
_TO_HOST = {torch.Tensor.cpu, torch.Tensor.pin_memory}
_TO_DEVICE = {torch.Tensor.cuda}
_HOST = "_pkm_host"  # attribute marking a tensor that a GPU run would hold on the CPU


class DeviceGuardError(RuntimeError):
    pass


def _tensors(x) -> list[torch.Tensor]:
    return [t for t in tree_flatten(x)[0] if isinstance(t, torch.Tensor)]


def _is_host(t: torch.Tensor) -> bool:
    return getattr(t, _HOST, False)


def _mark(x, host: bool) -> None:
    for t in _tensors(x):
        try:
            setattr(t, _HOST, host)
        except (AttributeError, RuntimeError):  # e.g. tensors that refuse attributes
            pass


def _to_names_device(args, kwargs) -> bool:
    """Whether a `.to(...)` call names a device (or a tensor whose device it takes)."""
    if kwargs.get("device") is not None:
        return True
    return any(isinstance(a, (torch.device, str, int)) or isinstance(a, torch.Tensor) for a in args[1:])


class _Placement(TorchFunctionMode):
    """Tracks where each tensor would live on a GPU run (see the module docstring)."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if func in _FACTORIES:
            _mark(out, kwargs.get("device") is None)
        elif kwargs.get("device") is not None:  # e.g. zeros_like(x, device=...), x.new_zeros(n, device=...)
            _mark(out, False)
        elif func in _TO_HOST:
            _mark(out, True)
        elif func in _TO_DEVICE or (func is torch.Tensor.to and _to_names_device(args, kwargs)):
            _mark(out, False)
        else:
            ins = _tensors((args, kwargs))
            if any(_is_host(t) for t in ins) and not any(not _is_host(t) and t.dim() > 0 for t in ins):
                outs = [t for t in _tensors(out) if all(t is not i for i in ins)]  # not in-place results
                _mark(outs, True)
        return out


class DeviceGuard:
    """Context manager: collectives fail on a tensor off the device their backend needs.

    required: None = the backend's own need (NCCL: cuda); "cuda" = check as if every group were NCCL
    (on a CPU run this emulates placement, see the module docstring)."""

    def __init__(self, required: str | None = None):
        self.required = required
        self.checked = 0  # tensors checked (tests assert the guard saw collectives at all)
        self._saved: dict[str, object] = {}
        self._mode: _Placement | None = None

    def _needed(self, group) -> str | None:
        if self.required is not None:
            return self.required
        return "cuda" if dist.is_initialized() and dist.get_backend(group) == "nccl" else None

    def _check(self, name: str, args, kwargs) -> None:
        group = kwargs.get("group")
        needed = self._needed(group)
        if needed is None:
            return
        for i, t in enumerate(_tensors((args, {k: v for k, v in kwargs.items() if k != "group"}))):
            self.checked += 1
            if t.device.type == needed:
                continue
            emulated = self._mode is not None and t.device.type == "cpu"
            if not emulated or _is_host(t):
                where = "built without device= (host)" if emulated else f"on {t.device}"
                raise DeviceGuardError(
                    f"torch.distributed.{name}: tensor {i} {tuple(t.shape)} {t.dtype} is "
                    f"{where}; the backend needs {needed}"
                )

    def _wrap(self, name: str, fn):
        @functools.wraps(fn)
        def checked(*args, **kwargs):
            self._check(name, args, kwargs)
            return fn(*args, **kwargs)

        return checked

    def __enter__(self) -> DeviceGuard:
        for name in COLLECTIVES:
            fn = getattr(dist, name, None)
            if fn is not None:
                self._saved[name] = fn
                setattr(dist, name, self._wrap(name, fn))
        if self.required is not None and not torch.cuda.is_available():
            self._mode = _Placement()
            self._mode.__enter__()
            self._from_numpy = torch.from_numpy  # not dispatched to torch-function modes

            def from_numpy(array):
                out = self._from_numpy(array)
                _mark(out, True)
                return out

            torch.from_numpy = from_numpy
        return self

    def __exit__(self, *exc) -> None:
        if self._mode is not None:
            self._mode.__exit__(*exc)
            self._mode = None
            torch.from_numpy = self._from_numpy
        for name, fn in self._saved.items():
            setattr(dist, name, fn)
        self._saved.clear()
