"""PKM layer speed on CPU, side by side in one run (issue #3).

Figures (fp32, torch threads = 2, medians of interleaved repetitions A B C A B C ...):
  pkm_vs_ffn          our ProductKeyMemory forward+backward / a dense FFN of the same width
  lucidrains_vs_ffn   lucidrains' product-key-memory 0.3.0 PKM / the same FFN (null if not installed)
  step_pkm_vs_dense   one training step of a 6-layer d=512 megatron-core GPT with a PKM added at layer 3
                      (forward, backward, AdamW on the parameters + the trainer's lazy row-sparse Adam,
                      pretrain.optim.SparseValueOptimizer, on the value table) / the same GPT without
                      memory (AdamW only)
  step_rowwise_vs_adam  the PKM GPT step with model.pkm.value_optimizer=rowwise_adagrad / with adam
  bytes_per_value_param_adam, _rowwise_adagrad, _rowwise_adagrad_bf16   storage bytes of the live value
                      table and value-optimizer state tensors per value parameter, after 3 real steps of
                      the layer's reads (issue #15 goals: rowwise_adagrad <= 4.1, its bf16 <= 2.1)
  step_dense_values_vs_dense   the same PKM GPT with the value table a dense-gradient Parameter inside
                      one torch AdamW (the "inside the DeepSpeed engine" alternative) / the dense GPT
  fbgemm_vs_ours      the value path alone (fbgemm_vs_ours()): fbgemm's table-batched embedding bags with
                      their fused row-wise Adagrad / our weighted_bag + the same row-wise Adagrad, same
                      ids, weights and table (null-valued keys and a note when fbgemm-gpu-cpu is absent);
                      also vs our lazy-Adam path, CPU-time ratio, and the output/gradient/update agreement
Sizes: dim 512, n_keys 512 (262,144 slots), heads 4, knn 32, k_dim 256 (lucidrains dim_head 128: the
same 128-wide half keys), batch 8 x 128 tokens; FFN dim -> 4 dim -> dim with GELU.

    python benchmarks/pkm_layer.py [--quick] [--json] [--profile]

`--quick` runs fewer repetitions (never smaller sizes); `--json` prints one JSON object as the last
line; `--profile` adds a torch.profiler table of our layer and per-phase timers of the PKM step.
`--alloc pkm` (default) runs under the malloc settings `pkm pretrain` applies on CPU
(pretrain/cpu_alloc.py: glibc keeps freed memory); `--alloc default` under glibc's defaults.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import socket
import statistics
import sys
import time
import types
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import emit, log  # noqa: E402

# THP is read at process start: --alloc thp re-executes this script with it.
ALLOC_ENV = {"thp": {"THP_MEM_ALLOC_ENABLE": "1"}}  # torch backs large tensors with 2 MB pages
ALLOC_HELP = (
    "pkm: what `pkm pretrain` does on CPU (train.cpu_keep_freed_memory: glibc keeps freed memory, "
    "pretrain/cpu_alloc.py); default: glibc's defaults; thp: THP_MEM_ALLOC_ENABLE=1"
)
_mode = next((a.split("=", 1)[1] for a in sys.argv if a.startswith("--alloc=")), None)
if "--alloc" in sys.argv[:-1]:
    _mode = sys.argv[sys.argv.index("--alloc") + 1]
if _mode in ALLOC_ENV and os.environ.get("PKM_BENCH_ALLOC") is None:
    os.execve(
        sys.executable,
        [sys.executable] + sys.argv,
        {**os.environ, **ALLOC_ENV.get(_mode, {}), "PKM_BENCH_ALLOC": _mode},
    )

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402

DIM, N_KEYS, HEADS, KNN, K_DIM = 512, 512, 4, 32, 256
BATCH, SEQ = 8, 128
GPT = dict(num_layers=6, hidden_size=512, num_attention_heads=8, seq_length=SEQ)
VOCAB, PKM_LAYER, VALUE_LR = 8192, 3, 1e-3


def interleaved(variants: dict, reps: int, warmup: int = 1) -> tuple[dict, dict]:
    """Time each zero-argument callable `reps` times, A B C A B C ..., after `warmup` untimed rounds.
    Returns wall-clock and process CPU ms per variant (CPU time is the steadier figure when the
    machine is shared: it does not count the time other processes hold the cores)."""
    wall = {k: [] for k in variants}
    cpu = {k: [] for k in variants}
    for r in range(warmup + reps):
        for name, fn in variants.items():
            t0, c0 = time.perf_counter(), time.process_time()
            fn()
            dt, dc = time.perf_counter() - t0, time.process_time() - c0
            if r >= warmup:
                wall[name].append(dt * 1e3)
                cpu[name].append(dc * 1e3)
        if r >= warmup:
            log(f"  rep {r - warmup + 1}/{reps}: " + "  ".join(f"{k} {v[-1]:.0f} ms" for k, v in wall.items()))
    return wall, cpu


def median(xs: list[float]) -> float:
    return round(statistics.median(xs), 1)


# ---------------------------------------------------------------------------------------------
# Layer: ours vs FFN vs lucidrains


ROOT = Path(__file__).resolve().parents[1]


def layer_before(commit: str):
    """Our layer as of `commit`: its product_keys.py (loaded from git) and the value read through
    `F.embedding_bag(sparse=True)` as ValueTable does: the "before" of the optimisation."""
    import subprocess

    import model.pkm.memory as memory
    from model.config import PKMConfig

    src = subprocess.run(
        ["git", "-C", str(ROOT), "show", f"{commit}:model/pkm/product_keys.py"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    ns: dict = {}
    exec(compile(src, f"{commit}:model/pkm/product_keys.py", "exec"), ns)
    layer = memory.ProductKeyMemory(DIM, PKMConfig(n_keys=N_KEYS, heads=HEADS, knn=KNN, k_dim=K_DIM))

    def forward(self, x, padding_mask=None):
        current, memory.product_key_topk = memory.product_key_topk, ns["product_key_topk"]
        try:
            indices, weights = self.lookup(x.reshape(-1, self.dim))
        finally:
            memory.product_key_topk = current
        out = F.embedding_bag(indices, self.values.weight, per_sample_weights=weights, mode="sum", sparse=True)
        return out.view(x.shape)

    layer.forward = types.MethodType(forward, layer)
    return layer


def layer_variants(before: str | None = None) -> tuple[dict, dict]:
    from model.config import PKMConfig
    from model.pkm.memory import ProductKeyMemory

    torch.manual_seed(0)
    x = torch.randn(BATCH, SEQ, DIM, requires_grad=True)
    g = torch.randn(BATCH, SEQ, DIM)
    modules = {
        "pkm": ProductKeyMemory(DIM, PKMConfig(n_keys=N_KEYS, heads=HEADS, knn=KNN, k_dim=K_DIM)),
        "ffn": nn.Sequential(nn.Linear(DIM, 4 * DIM), nn.GELU(), nn.Linear(4 * DIM, DIM)),
    }
    notes = {}
    try:
        import importlib.metadata as md

        from product_key_memory import PKM

        modules["lucidrains"] = PKM(DIM, heads=HEADS, num_keys=N_KEYS, topk=KNN, dim_head=K_DIM // 2)
        notes["lucidrains"] = f"product-key-memory {md.version('product-key-memory')}"
    except ImportError as e:
        notes["lucidrains"] = f"skipped: product-key-memory not installed ({e})"
        log(f"NOTE: lucidrains PKM {notes['lucidrains']}; `pip install product-key-memory==0.3.0` to compare")
    if before:
        modules["pkm_before"] = layer_before(before)

    def step(m):
        def run():
            out = m(x)
            (out * g).sum().backward()
            for t in list(m.parameters()) + [b for b in m.buffers() if b.requires_grad]:
                t.grad = None
            x.grad = None

        return run

    return {k: step(m) for k, m in modules.items()}, notes


# Where our layer's time goes: profiler ops grouped by the stage they belong to.
STAGES = {  # torch.profiler op -> stage; a custom autograd Function's self time is its numba kernel
    "query network (Linear, BatchNorm)": (
        "aten::addmm",
        "aten::mm",
        "aten::sum",
        "aten::mul",
        "aten::add",
        "aten::sub",
        "aten::rsqrt",
        "aten::cat",
        "aten::pow",
        "aten::div",
    ),
    "sub-key scoring (bmm)": ("aten::bmm",),
    "top-k of halves and pairs (numba kernel)": ("_ProductKeyTopK",),
    "top-k (torch ops)": ("aten::topk", "aten::gather", "aten::index_select", "aten::index", "aten::stack"),
    "softmax": ("aten::_softmax", "aten::_softmax_backward_data"),
    "value backward: weight grads + table rows (numba kernel)": ("_WeightedBagBackward",),
    "value backward: weight grads (torch)": ("aten::_embedding_bag_per_sample_weights_backward",),
    "EmbeddingBags: value read, query/key grads": (
        "aten::_embedding_bag",
        "aten::_embedding_bag_forward_only",
        "aten::embedding_dense_backward",
        "aten::_embedding_bag_backward",
        "aten::_embedding_bag_sparse_backward",
    ),
    "sort / unique (grouping reads)": (
        "aten::sort",
        "aten::unique_consecutive",
        "aten::bincount",
        "aten::cumsum",
        "aten::floor_divide",
        "aten::index_copy_",
    ),
    "copies / fills": ("aten::copy_", "aten::fill_", "aten::zero_", "aten::clone", "aten::empty"),
}


def profile_layer(iters: int = 3) -> str:
    """torch.profiler over `iters` forward+backward passes of our layer, grouped by stage."""
    from torch.profiler import ProfilerActivity, profile

    runs, _ = layer_variants()
    runs["pkm"]()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(iters):
            runs["pkm"]()
    events = prof.key_averages()
    total = sum(e.self_cpu_time_total for e in events) / 1e3 / iters
    stage_of = {op: stage for stage, ops in STAGES.items() for op in ops}
    per_stage: dict[str, float] = {}
    for e in events:
        stage = stage_of.get(e.key, "other")
        per_stage[stage] = per_stage.get(stage, 0.0) + e.self_cpu_time_total / 1e3 / iters
    lines = [f"our layer, profiler, per forward+backward ({iters} passes): {total:.0f} ms"]
    for stage, t in sorted(per_stage.items(), key=lambda kv: -kv[1]):
        lines.append(f"  {stage:45s} {t:7.1f} ms  {100 * t / total:4.1f}%")
    lines.append(events.table(sort_by="self_cpu_time_total", row_limit=15))
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# Value path: fbgemm's table-batched embedding bags vs ours (issue #15)


def rowwise_adagrad_(table: torch.Tensor, state: torch.Tensor, grad: torch.Tensor, lr: float, eps: float) -> None:
    """fbgemm's EXACT_ROWWISE_ADAGRAD on a coalesced sparse gradient, in torch ops: per row r read,
    state[r] += mean(g_r ** 2); table[r] -= lr * g_r / (sqrt(state[r]) + eps)."""
    rows, g = grad._indices()[0], grad._values()
    state.index_add_(0, rows, g.pow(2).mean(1))
    table.index_add_(0, rows, g / (state[rows].sqrt() + eps).unsqueeze(1), alpha=-lr)


def fbgemm_vs_ours(reps: int) -> dict:
    """The value read of the layer above (N_KEYS**2 x DIM table, BATCH*SEQ tokens x HEADS*KNN reads, ids
    and softmax weights from our layer's own lookup), forward + backward + one update, interleaved:
      ours            weighted_bag (model/pkm/value_table.py, every memory-parallel size) + row-wise
                      Adagrad in torch ops on its coalesced gradient (rowwise_adagrad_)
      ours_lazy_adam  weighted_bag + the trainer's SparseValueOptimizer (lazy row Adam: two full-width moments)
      fbgemm          SplitTableBatchedEmbeddingBagsCodegen (HOST, CPU) with its fused EXACT_ROWWISE_ADAGRAD
    fbgemm-gpu-cpu cannot hand a table gradient back (OptimType.NONE needs EmbeddingLocation.DEVICE):
    its kernel is only usable, and measurable, with its update fused into the backward.
    Agreement, one step from the same table: output, per-read weight gradient, updated table and
    row statistic of fbgemm vs `ours` (max absolute differences)."""
    try:
        import importlib.metadata as md

        from fbgemm_gpu.split_table_batched_embeddings_ops_common import EmbeddingLocation, PoolingMode
        from fbgemm_gpu.split_table_batched_embeddings_ops_training import (
            ComputeDevice,
            OptimType,
            SplitTableBatchedEmbeddingBagsCodegen,
        )
    except ImportError as e:
        log(f"NOTE: fbgemm_vs_ours skipped: fbgemm-gpu-cpu not installed ({e})")
        return {
            "fbgemm_vs_ours": None,
            "fbgemm_vs_ours_lazy_adam": None,
            "fbgemm_vs_ours_cpu": None,
            "fbgemm": f"skipped: fbgemm-gpu-cpu not installed ({e})",
        }
    from model.config import PKMConfig
    from model.pkm.memory import ProductKeyMemory
    from model.pkm.value_table import weighted_bag
    from pretrain.optim import SparseValueOptimizer

    lr, eps = VALUE_LR, 1e-8
    torch.manual_seed(0)
    layer = ProductKeyMemory(DIM, PKMConfig(n_keys=N_KEYS, heads=HEADS, knn=KNN, k_dim=K_DIM))
    with torch.no_grad():
        indices, weights = layer.lookup(torch.randn(BATCH * SEQ, DIM))
    g = torch.randn(BATCH * SEQ, DIM)
    n, k = indices.shape
    table = layer.values.weight  # ours: the layer's own table (a leaf that requires grad)
    state = torch.zeros(table.shape[0])
    host_table = [(table.shape[0], DIM, EmbeddingLocation.HOST, ComputeDevice.CPU)]
    fb = SplitTableBatchedEmbeddingBagsCodegen(
        host_table, optimizer=OptimType.EXACT_ROWWISE_ADAGRAD, learning_rate=lr, eps=eps, pooling_mode=PoolingMode.SUM
    )
    with torch.no_grad():
        fb.weights_host.copy_(table.reshape(-1))
    flat, offsets = indices.reshape(-1), torch.arange(0, n * k + 1, k)

    def run_fbgemm():
        w = weights.clone().requires_grad_(True)
        out = fb(flat, offsets, per_sample_weights=w.reshape(-1))
        out.backward(g)  # the update happens here
        return out, w.grad

    def run_ours(update):
        def run():
            w = weights.clone().requires_grad_(True)
            out = weighted_bag(indices, w, table)
            out.backward(g)
            with torch.no_grad():
                update()
            table.grad = None
            return out, w.grad

        return run

    lazy_adam = SparseValueOptimizer([layer.values], lr=lr, betas=(0.9, 0.98))
    variants = {
        "ours": run_ours(lambda: rowwise_adagrad_(table, state, table.grad, lr, eps)),
        "ours_lazy_adam": run_ours(lazy_adam.step),
        "fbgemm": run_fbgemm,
    }
    out_f, wg_f = variants["fbgemm"]()
    out_o, wg_o = variants["ours"]()
    agreement = {
        "output": (out_f - out_o).abs().max().item(),
        "weight_grad": (wg_f - wg_o).abs().max().item(),
        "updated_table": (fb.weights_host.view_as(table) - table).abs().max().item(),
        "row_statistic": (fb.momentum1_host - state).abs().max().item(),
    }
    log(
        f"value path: table {tuple(table.shape)}, {n} tokens x {k} reads; fbgemm vs ours after one step: "
        + ", ".join(f"{key} {v:.1e}" for key, v in agreement.items())
        + f"; {reps} interleaved reps"
    )
    wall, cpu = interleaved({key: (lambda f=f: f()) for key, f in variants.items()}, reps)
    ms = {key: median(v) for key, v in wall.items()}
    return {
        "fbgemm_vs_ours": round(ms["fbgemm"] / ms["ours"], 3),
        "fbgemm_vs_ours_lazy_adam": round(ms["fbgemm"] / ms["ours_lazy_adam"], 3),
        "fbgemm_vs_ours_cpu": round(median(cpu["fbgemm"]) / median(cpu["ours"]), 3),
        "value_path_ms": ms,
        "value_path_cpu_ms": {key: median(v) for key, v in cpu.items()},
        "fbgemm_agreement_max_abs": {key: float(f"{v:.2e}") for key, v in agreement.items()},
        "fbgemm": f"fbgemm-gpu-cpu {md.version('fbgemm-gpu-cpu')}",
    }


# ---------------------------------------------------------------------------------------------
# Training step: GPT with PKM at layer 3 vs GPT without memory


def init_megatron() -> None:
    import torch.distributed as dist
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

    from model import cpu_shim

    if not dist.is_initialized():
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        dist.init_process_group("gloo", world_size=1, rank=0, init_method=f"tcp://127.0.0.1:{port}")
    cpu_shim.apply()
    if not parallel_state.model_parallel_is_initialized():
        parallel_state.initialize_model_parallel(1)
    model_parallel_cuda_manual_seed(0)


def gpt(pkm: bool):
    from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

    from model.build import build_model
    from model.config import ModelConfig, PKMConfig

    torch.manual_seed(0)
    model_parallel_cuda_manual_seed(0)
    layers = [PKM_LAYER] if pkm else []
    cfg = ModelConfig(
        family="gpt",
        **GPT,
        pkm=PKMConfig(layers=layers, placement="add", n_keys=N_KEYS, heads=HEADS, knn=KNN, k_dim=K_DIM),
    )
    return build_model(cfg, VOCAB)


def dense_values(model) -> list[nn.Parameter]:
    """Turn each PKM value table into a Parameter read with a dense-gradient EmbeddingBag."""
    from model.specs import memory_layers

    params = []
    for _, mem in memory_layers(model):
        table = nn.Parameter(mem.values.weight.detach().clone())
        params.append(table)

        def forward(self, x, padding_mask=None, table=table):
            shape = x.shape
            x = x.reshape(-1, self.dim)
            keep = None if padding_mask is None else ~padding_mask.reshape(-1).to(torch.bool)
            indices, weights = self.lookup(x, keep)
            return F.embedding_bag(indices, table, per_sample_weights=weights, mode="sum").view(shape)

        mem.forward = types.MethodType(forward, mem)
    return params


def step_variants(timers: dict | None = None, torch_sparse_adam: bool = False) -> dict:
    from model.build import lm_forward, masked_mean
    from model.specs import memory_layers
    from pretrain.optim import SparseValueOptimizer

    gen = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, VOCAB, (BATCH, SEQ + 1), generator=gen)
    batch = {"tokens": tokens[:, :-1], "labels": tokens[:, 1:], "loss_mask": torch.ones(BATCH, SEQ)}

    def make(model, dense_opt, sparse_opt=None, name=""):
        def run():
            t = [time.perf_counter()]
            loss = masked_mean(lm_forward(model, "gpt", batch), batch["loss_mask"])
            t.append(time.perf_counter())
            loss.backward()
            t.append(time.perf_counter())
            dense_opt.step()
            t.append(time.perf_counter())
            if sparse_opt is not None:
                sparse_opt.step()
            t.append(time.perf_counter())
            dense_opt.zero_grad(set_to_none=True)
            if sparse_opt is not None:
                sparse_opt.zero_grad()
            if timers is not None:
                for phase, a, b in zip(("forward", "backward", "adamw", "value_adam"), t, t[1:]):
                    timers.setdefault(name, {}).setdefault(phase, []).append((b - a) * 1e3)

        return run

    dense = gpt(pkm=False)
    pkm = gpt(pkm=True)
    tables = [m.values for _, m in memory_layers(pkm)]
    assert len(tables) == 1
    pkm_dense = gpt(pkm=True)
    values = dense_values(pkm_dense)  # Parameters, but not registered in the model: a group of their own
    value_group = {"params": values, "lr": VALUE_LR, "weight_decay": 0.0, "betas": (0.9, 0.98)}
    variants = {
        "dense": make(dense, torch.optim.AdamW(dense.parameters(), lr=1e-4), name="dense"),
        "pkm_sparse": make(
            pkm,
            torch.optim.AdamW(pkm.parameters(), lr=1e-4),
            SparseValueOptimizer(tables, lr=VALUE_LR, betas=(0.9, 0.98)),
            name="pkm_sparse",
        ),
        "pkm_dense_values": make(
            pkm_dense,
            torch.optim.AdamW([{"params": list(pkm_dense.parameters())}, value_group], lr=1e-4),
            name="pkm_dense_values",
        ),
    }
    pkm_rowwise = gpt(pkm=True)
    variants["pkm_rowwise_adagrad"] = make(
        pkm_rowwise,
        torch.optim.AdamW(pkm_rowwise.parameters(), lr=1e-4),
        SparseValueOptimizer([m.values for _, m in memory_layers(pkm_rowwise)], lr=VALUE_LR, kind="rowwise_adagrad"),
        name="pkm_rowwise_adagrad",
    )
    if torch_sparse_adam:  # what the trainer used before pretrain.optim.LazyRowAdam
        pkm_torch = gpt(pkm=True)
        variants["pkm_torch_sparse_adam"] = make(
            pkm_torch,
            torch.optim.AdamW(pkm_torch.parameters(), lr=1e-4),
            torch.optim.SparseAdam(
                [m.values.weight for _, m in memory_layers(pkm_torch)], lr=VALUE_LR, betas=(0.9, 0.98)
            ),
            name="pkm_torch_sparse_adam",
        )
    return variants


def value_bytes_per_param(steps: int = 3) -> dict:
    """Bytes per value parameter of the table and its optimizer state, read from the live tensors'
    storages after `steps` real sparse steps (the layer's sizes and reads) of each value optimizer."""
    from model.pkm.value_table import ValueTable
    from pretrain.optim import SparseValueOptimizer

    out = {}
    gen = torch.Generator().manual_seed(0)
    for name, kind, dtype in (
        ("adam", "adam", torch.float32),
        ("rowwise_adagrad", "rowwise_adagrad", torch.float32),
        ("rowwise_adagrad_bf16", "rowwise_adagrad", torch.bfloat16),
    ):
        table = ValueTable(N_KEYS**2, DIM, init_seed=1, dtype=dtype)
        opt = SparseValueOptimizer([table], lr=VALUE_LR, betas=(0.9, 0.98), kind=kind)
        for _ in range(steps):
            ids = torch.randint(0, N_KEYS**2, (BATCH * SEQ, HEADS * KNN), generator=gen)
            weights = torch.rand(BATCH * SEQ, HEADS * KNN, generator=gen).softmax(-1)
            (table(ids, weights) ** 2).sum().backward()
            opt.step()
        live = table.weight.untyped_storage().nbytes() + opt.state_bytes()
        out[f"bytes_per_value_param_{name}"] = round(live / table.weight.numel(), 4)
        log(f"{name}: table {table.weight.dtype} + state = {live / 2**20:.1f} MiB for {table.weight.numel():,} values")
        del table, opt
    return out


# ---------------------------------------------------------------------------------------------


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="fewer repetitions (same sizes); <= 60 s on 2 cores")
    ap.add_argument("--json", action="store_true", help="last line: one JSON object of the figures")
    ap.add_argument("--profile", action="store_true", help="profile our layer and the PKM step phases")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--alloc", choices=["pkm", "default", *ALLOC_ENV], default="pkm", help=ALLOC_HELP)
    ap.add_argument(
        "--before", metavar="COMMIT", help="also time our layer as of git COMMIT side by side (e.g. e079137)"
    )
    ap.add_argument("--skip-step", action="store_true", help="layer figures only")
    ap.add_argument("--layer-reps", type=int, default=None)
    ap.add_argument("--step-reps", type=int, default=None)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.alloc == "pkm":
        from pretrain.cpu_alloc import keep_freed_memory

        if not keep_freed_memory():
            log("--alloc pkm: not glibc, running under the default allocator")
    layer_reps = args.layer_reps or (3 if args.quick else 15)
    step_reps = args.step_reps or (2 if args.quick else 8)
    t_start = time.perf_counter()

    log(
        f"layer: dim {DIM}, n_keys {N_KEYS}, heads {HEADS}, knn {KNN}, k_dim {K_DIM}, {BATCH}x{SEQ} tokens, "
        f"fwd+bwd, {layer_reps} interleaved reps"
    )
    runs, notes = layer_variants(args.before)
    load_start = os.getloadavg()[0]
    lt, lc = interleaved(runs, layer_reps)
    ms = {k: median(v) for k, v in lt.items()}
    cpu_ms = {k: median(v) for k, v in lc.items()}
    del runs

    value_path = fbgemm_vs_ours(layer_reps)

    step_ms, step_cpu, timers, torch_sparse_adam = {}, {}, None, False
    value_bytes = {} if args.skip_step else value_bytes_per_param()  # before the step's models: less at once
    if not args.skip_step:
        log(f"step: GPT {GPT}, vocab {VOCAB}, PKM at layer {PKM_LAYER} (add), {step_reps} interleaved reps")
        init_megatron()
        timers = {} if args.profile else None
        torch_sparse_adam = not args.quick  # the extra variant costs ~25% more time
        steps = step_variants(timers, torch_sparse_adam)
        st, sc = interleaved(steps, step_reps)
        step_ms = {k: median(v) for k, v in st.items()}
        step_cpu = {k: median(v) for k, v in sc.items()}
        del steps

    def ratio(table, a, b):
        return round(table[a] / table[b], 3) if a in table and b in table else None

    result = {
        "pkm_vs_ffn": ratio(ms, "pkm", "ffn"),
        "lucidrains_vs_ffn": ratio(ms, "lucidrains", "ffn"),
        "step_pkm_vs_dense": ratio(step_ms, "pkm_sparse", "dense"),
        "step_dense_values_vs_dense": ratio(step_ms, "pkm_dense_values", "dense"),
        "step_torch_sparse_adam_vs_dense": ratio(step_ms, "pkm_torch_sparse_adam", "dense"),
        "pkm_ms": ms["pkm"],
        "ffn_ms": ms["ffn"],
        "lucidrains_ms": ms.get("lucidrains"),
        "step_dense_ms": step_ms.get("dense"),
        "step_pkm_ms": step_ms.get("pkm_sparse"),
        "step_dense_values_ms": step_ms.get("pkm_dense_values"),
        "step_torch_sparse_adam_ms": step_ms.get("pkm_torch_sparse_adam"),
        "cpu_ms": {**{f"layer_{k}": v for k, v in cpu_ms.items()}, **{f"step_{k}": v for k, v in step_cpu.items()}},
        "pkm_vs_ffn_cpu": ratio(cpu_ms, "pkm", "ffn"),
        "step_pkm_vs_dense_cpu": ratio(step_cpu, "pkm_sparse", "dense"),
        "alloc": args.alloc,
        "loadavg_1min": [round(load_start, 1), round(os.getloadavg()[0], 1)],
        "layer_reps": layer_reps,
        "step_reps": None if args.skip_step else step_reps,
        "threads": args.threads,
        "k_dim": K_DIM,
        "lucidrains": notes["lucidrains"],
        "torch": torch.__version__,
        "date": datetime.date.today().isoformat(),
        "machine": f"{platform.machine()} {os.cpu_count()} cpus",
    }
    result.update(value_path)
    result["step_rowwise_vs_adam"] = ratio(step_ms, "pkm_rowwise_adagrad", "pkm_sparse")
    result["step_rowwise_adagrad_ms"] = step_ms.get("pkm_rowwise_adagrad")
    result.update(value_bytes)
    if args.before:
        result.update(
            before=args.before,
            pkm_before_ms=ms["pkm_before"],
            pkm_before_vs_ffn=ratio(ms, "pkm_before", "ffn"),
            pkm_before_vs_ffn_cpu=ratio(cpu_ms, "pkm_before", "ffn"),
        )
    if timers:
        result["step_phases_ms"] = {k: {p: median(v[-step_reps:]) for p, v in ph.items()} for k, ph in timers.items()}

    print(
        f"layer fwd+bwd   ours {ms['pkm']:.0f} ms | FFN {ms['ffn']:.0f} ms | lucidrains "
        f"{ms.get('lucidrains', float('nan')):.0f} ms"
        + (f" | ours as of {args.before} {ms['pkm_before']:.0f} ms" if args.before else "")
    )
    print(
        f"pkm_vs_ffn {result['pkm_vs_ffn']} (goal <= 1.5) | lucidrains_vs_ffn {result['lucidrains_vs_ffn']} | "
        f"CPU time: ours {cpu_ms['pkm']:.0f} ms, FFN {cpu_ms['ffn']:.0f} ms -> {result['pkm_vs_ffn_cpu']}"
    )
    if value_path["fbgemm_vs_ours"] is not None:
        vp = value_path["value_path_ms"]
        print(
            f"value path      ours {vp['ours']:.0f} ms | ours with lazy row Adam {vp['ours_lazy_adam']:.0f} ms | "
            f"fbgemm {vp['fbgemm']:.0f} ms -> fbgemm_vs_ours {value_path['fbgemm_vs_ours']} "
            f"(agreement, max abs: {value_path['fbgemm_agreement_max_abs']})"
        )
    if step_ms:
        print(
            f"train step      dense {step_ms['dense']:.0f} ms | +PKM lazy row Adam {step_ms['pkm_sparse']:.0f} ms | "
            f"+PKM dense values {step_ms['pkm_dense_values']:.0f} ms"
        )
        print(
            f"step_pkm_vs_dense {result['step_pkm_vs_dense']} (goal <= 1.25; CPU time "
            f"{result['step_pkm_vs_dense_cpu']}) | step_dense_values_vs_dense {result['step_dense_values_vs_dense']}"
        )
    if torch_sparse_adam:
        print(
            f"step_torch_sparse_adam_vs_dense {result['step_torch_sparse_adam_vs_dense']} "
            f"({step_ms['pkm_torch_sparse_adam']:.0f} ms: the PKM step with torch.optim.SparseAdam instead)"
        )
    if timers:
        for k, ph in result["step_phases_ms"].items():
            print(f"  {k:18s} " + "  ".join(f"{p} {v:.0f} ms" for p, v in ph.items()))
    if args.profile:
        print(profile_layer())
    result["wall_s"] = round(time.perf_counter() - t_start, 1)
    print(
        f"wall {result['wall_s']} s, load average {result['loadavg_1min']} (1 min, start/end), allocator {args.alloc}"
    )
    return emit(result, args.json)


if __name__ == "__main__":
    main()
