"""ProductKeyMemory: query network -> product-key top-k -> softmax -> weighted sum of value rows.

Follows Lample et al. 2019 and XLM's `HashingMemory`: a Linear query (with bias) per head, optional
BatchNorm/LayerNorm on the query, keys of shape (heads, 2, n_keys, k_dim/2) ~ U(±1/sqrt(k_dim/2)),
top-knn per half then top-knn of the knn**2 sums, softmax in fp32, one shared value table read by all
heads with EmbeddingBag(mode="sum", per_sample_weights), and input/query/value dropouts.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from model.config import PKMConfig
from model.errors import ModelError
from model.pkm.product_keys import product_key_topk
from model.pkm.value_table import MemoryParallel, ValueTable
from model.precision import TABLE_DTYPE, compute_dtype, keep_at_least_fp32


@dataclass
class PKMLookup:
    """What one forward read: the usage metrics consume this."""

    indices: torch.Tensor  # [N, heads * knn] slot ids
    weights: torch.Tensor  # [N, heads * knn] softmax weights (each head's knn sum to 1)
    keep: torch.Tensor | None  # [N] True for real (non-padding) tokens; None = all real


class _SumOverGroup(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        x = x.clone()
        dist.all_reduce(x, group=group)
        return x

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous()
        dist.all_reduce(grad, group=ctx.group)
        return grad, None


class MaskedBatchNorm(nn.Module):
    """BatchNorm1d whose batch statistics come from real tokens only (padding never enters them),
    optionally summed over a process group so data-parallel ranks normalise with the statistics of
    the whole global micro-batch, exactly as a single process would."""

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: float = 0.1, group=None):
        super().__init__()
        self.eps, self.momentum, self.group = eps, momentum, group
        self.weight = nn.Parameter(torch.ones(num_features))
        self.bias = nn.Parameter(torch.zeros(num_features))
        self.register_buffer("running_mean", torch.zeros(num_features))
        self.register_buffer("running_var", torch.ones(num_features))

    def _apply(self, fn, recurse=True):
        # the running statistics stay at least fp32 when the module is cast (model/precision.py)
        stats = {k: self._buffers.pop(k) for k in ("running_mean", "running_var")}
        super()._apply(fn, recurse)
        self._buffers.update({k: keep_at_least_fp32(fn, t) for k, t in stats.items()})
        return self

    def forward(self, x: torch.Tensor, keep: torch.Tensor | None = None) -> torch.Tensor:
        # statistics and the normalisation in fp32 at least (bf16 activations come back bf16)
        dtype = compute_dtype(x.dtype, self.running_mean.dtype)
        weight, bias = self.weight.to(dtype), self.bias.to(dtype)
        if keep is None and (not self.training or (self.group is None and x.shape[0] > 1)):
            # Nothing to mask or sum over ranks: the fused kernel does the same (batch statistics,
            # unbiased running variance, momentum) in two passes instead of ~15 elementwise ones.
            return F.batch_norm(
                x.to(dtype), self.running_mean, self.running_var, weight, bias, self.training, self.momentum, self.eps
            ).to(x.dtype)
        if not self.training:
            mean, var = self.running_mean, self.running_var
        else:
            xs = x if keep is None else x[keep]
            xs = xs.to(dtype)
            stats = torch.cat([xs.sum(0), (xs * xs).sum(0), xs.new_tensor([xs.shape[0]])])
            if self.group is not None:
                stats = _SumOverGroup.apply(stats, self.group)
            f = x.shape[1]
            count = stats[-1].clamp_min(1.0)
            mean = stats[:f] / count
            var = (stats[f : 2 * f] / count - mean * mean).clamp_min(0.0)
            with torch.no_grad():
                unbiased = var * (count / (count - 1).clamp_min(1.0))
                self.running_mean.lerp_(mean.to(self.running_mean.dtype), self.momentum)
                self.running_var.lerp_(unbiased.to(self.running_var.dtype), self.momentum)
        y = (x.to(dtype) - mean.to(dtype)) * torch.rsqrt(var.to(dtype) + self.eps) * weight + bias
        if keep is not None:
            y = y * keep.unsqueeze(1).to(y.dtype)  # padded queries are zero: they read nothing useful
        return y.to(x.dtype)


class ProductKeyMemory(nn.Module):
    """A PKM layer mapping [..., dim] -> [..., dim]. `padding_mask` ([...], True = padding) keeps
    padded tokens out of the query BatchNorm statistics and out of the usage metrics."""

    def __init__(
        self,
        dim: int,
        cfg: PKMConfig,
        parallel: MemoryParallel = MemoryParallel(),
        init_seed: int = 0,
        stats_group=None,
    ):
        super().__init__()
        if cfg.k_dim < 2 or cfg.k_dim % 2:
            raise ModelError(f"PKM k_dim must be even and >= 2, got {cfg.k_dim}")
        if not 1 <= cfg.knn <= cfg.n_keys or cfg.heads < 1:
            raise ModelError(
                f"PKM needs 1 <= knn <= n_keys and heads >= 1, got knn={cfg.knn}, "
                f"n_keys={cfg.n_keys}, heads={cfg.heads}"
            )
        self.cfg, self.dim = cfg, dim
        h, k, half = cfg.heads, cfg.k_dim, cfg.k_dim // 2
        self.query_proj = nn.Linear(dim, h * k, bias=True)
        self.query_batchnorm = MaskedBatchNorm(h * k, group=stats_group) if cfg.query_batchnorm else None
        self.query_layernorm = nn.LayerNorm(k) if cfg.query_layernorm else None
        bound = 1.0 / math.sqrt(half)
        self.keys = nn.Parameter(torch.empty(h, 2, cfg.n_keys, half).uniform_(-bound, bound))
        self.values = ValueTable(
            cfg.n_keys**2,
            dim,
            parallel,
            init_seed=init_seed,
            dtype=torch.bfloat16 if cfg.value_dtype == "bf16" else TABLE_DTYPE,
        )
        self.record_lookups = False
        self.last_lookup: PKMLookup | None = None

    def lookup(self, x: torch.Tensor, keep: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """x: [N, dim] -> (slot indices [N, heads*knn], softmax weights [N, heads*knn])."""
        cfg = self.cfg
        x = F.dropout(x, cfg.input_dropout, self.training)
        q = self.query_proj(x)
        if self.query_batchnorm is not None:
            q = self.query_batchnorm(q, keep)
        q = q.view(x.shape[0], cfg.heads, cfg.k_dim)
        if self.query_layernorm is not None:
            q = self.query_layernorm(q)
        q = F.dropout(q, cfg.query_dropout, self.training)
        # scores, top-k and softmax in fp32 at least; the weights in the table's dtype (fp32 sums)
        dtype = compute_dtype(q.dtype)
        scores, indices = product_key_topk(q.to(dtype), self.keys.to(dtype), cfg.knn)
        weights = F.softmax(scores, dim=-1).to(self.values.weight.dtype)
        n = x.shape[0]
        return indices.reshape(n, -1), weights.reshape(n, -1)

    def forward(self, x: torch.Tensor, padding_mask: torch.Tensor | None = None) -> torch.Tensor:
        shape = x.shape
        x = x.reshape(-1, self.dim)
        keep = None if padding_mask is None else ~padding_mask.reshape(-1).to(torch.bool)
        indices, weights = self.lookup(x, keep)
        out = self.values(indices, weights)
        out = F.dropout(out.to(x.dtype), self.cfg.value_dropout, self.training)
        if self.record_lookups:
            self.last_lookup = PKMLookup(indices.detach(), weights.detach(), keep)
        return out.view(shape)
