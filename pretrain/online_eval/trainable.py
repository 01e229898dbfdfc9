"""What adapts during dynamic evaluation: all weights, the MLPs, LoRA adapters (peft), or PKM value rows.

`Adaptation` sets a model up for one choice (requires_grad flags, LoRA injection, sparse value-table
gradients), keeps a bit-exact copy of the initial trainable weights (per-document resets, and the
anchor that Krause's decay pulls back to), and undoes everything in `close()`.

PKM value tables are found by contract, not by import: every module whose class is named
`ProductKeyMemory` contributes its `values` (an `nn.EmbeddingBag(mode="sum")` in exported models,
switched to sparse gradients here, or a module with a row-indexed 2-D `weight` that already gets
sparse gradients, like our native `ValueTable`), and so does any `nn.EmbeddingBag` named `*values`.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass

import torch
from torch import nn

from pretrain.errors import PretrainError
from pretrain.online_eval.config import OnlineEvalConfig

log = logging.getLogger("pkm.online_eval")

MLP_NAMES = ("mlp", "feed_forward", "ffn")  # a parameter adapts under `mlp` if a path component is one of these
_LAYER = re.compile(r"(?:^|\.)(?:layers|layer|h|blocks)\.(\d+)\.")  # transformer block index in a weight name
_TOP = ("lm_head", "final_layernorm", "model.norm.", "ln_f", "final_layer_norm")  # above every block


@dataclass
class Trainable:
    name: str
    tensor: torch.Tensor  # a leaf tensor that requires grad (a Parameter, or a PKM value-table buffer)
    rows: bool = False  # a PKM value table: only the rows read in a chunk get a gradient and change
    matmul: bool = True  # used as a matmul weight (for the FLOP estimate)


@dataclass
class ValueTable:
    name: str
    weight: torch.Tensor
    bag: nn.EmbeddingBag | None  # the EmbeddingBag to switch to sparse gradients, if it is one


def find_value_tables(model: nn.Module) -> list[ValueTable]:
    tables: dict[int, ValueTable] = {}
    for name, module in model.named_modules():
        values = None
        if type(module).__name__ == "ProductKeyMemory":
            values, vname = getattr(module, "values", None), f"{name}.values"
        elif isinstance(module, nn.EmbeddingBag) and name.split(".")[-1].endswith("values"):
            values, vname = module, name
        if values is None:
            continue
        weight = getattr(values, "weight", None)
        if not isinstance(weight, torch.Tensor) or weight.dim() != 2:
            raise PretrainError(f"{vname}: a PKM value table must have a 2-D `weight` (found {type(values).__name__})")
        bag = values if isinstance(values, nn.EmbeddingBag) else None
        tables.setdefault(id(weight), ValueTable(vname, weight, bag))
    return list(tables.values())


def _is_mlp(name: str) -> bool:
    return any(part in MLP_NAMES for part in name.split("."))


def _matmul_weight_ids(model: nn.Module) -> set[int]:
    ids = {id(m.weight) for m in model.modules() if isinstance(m, nn.Linear) or type(m).__name__ == "Conv1D"}
    output = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if output is None and hasattr(model, "get_input_embeddings"):  # head = F.linear(h, tied input embedding)
        ids.add(id(model.get_input_embeddings().weight))
    return ids


class Adaptation:
    """Prepare `model` for `cfg.adapt` (static runs: nothing trains). `self.model` is what to call."""

    def __init__(self, model: nn.Module, cfg: OnlineEvalConfig):
        self.cfg = cfg
        self.base = model
        self.model = model
        self._peft = False
        self.trainables: list[Trainable] = []
        self._flags: dict = {}
        self._bag_sparse: list = []
        self._tables = find_value_tables(model)
        if cfg.mode == "static":  # runs under no_grad: the model is left untouched (and can be shared)
            self.initial = []
            return
        self._flags = {id(p): (p, p.requires_grad) for p in model.parameters()}
        for t in self._tables:  # value-table buffers require grad by default; freeze like everything else
            self._flags.setdefault(id(t.weight), (t.weight, t.weight.requires_grad))
        self._bag_sparse = [(t.bag, t.bag.sparse) for t in self._tables if t.bag is not None]
        for tensor, _ in self._flags.values():
            tensor.requires_grad_(False)
        if cfg.mode == "dynamic":
            self.trainables = self._select(model, cfg)
            bags = {id(t.weight): t.bag for t in self._tables if t.bag is not None}
            for t in self.trainables:
                t.tensor.requires_grad_(True)
                if id(t.tensor) in bags:  # gradients of the rows read only, so updates touch only those
                    bags[id(t.tensor)].sparse = True
        self.initial = [t.tensor.detach().clone() for t in self.trainables]

    # -- choices -------------------------------------------------------------------------------
    def _select(self, model: nn.Module, cfg: OnlineEvalConfig) -> list[Trainable]:
        mm = _matmul_weight_ids(model)
        table_ids = {id(t.weight) for t in self._tables}
        if cfg.adapt == "all":
            out = [
                Trainable(n, p, rows=id(p) in table_ids, matmul=id(p) in mm and id(p) not in table_ids)
                for n, p in model.named_parameters()
            ]
            seen = {id(t.tensor) for t in out}
            out += [self._table_trainable(t) for t in self._tables if id(t.weight) not in seen]
            return out
        if cfg.adapt == "mlp":
            out = [
                Trainable(n, p, rows=id(p) in table_ids, matmul=id(p) in mm and id(p) not in table_ids)
                for n, p in model.named_parameters()
                if _is_mlp(n)
            ]
            if not out:
                raise PretrainError(
                    f"adapt=mlp: no parameter of {type(model).__name__} lives under a module "
                    f"named {'/'.join(MLP_NAMES)}"
                )
            return out
        if cfg.adapt == "pkm-values":
            if not self._tables:
                raise PretrainError(
                    f"adapt=pkm-values: {type(model).__name__} has no PKM value table (no "
                    "ProductKeyMemory module, no EmbeddingBag named *values)"
                )
            return [self._table_trainable(t) for t in self._tables]
        return self._lora(model, cfg)

    def _table_trainable(self, t: ValueTable) -> Trainable:
        return Trainable(t.name, t.weight, rows=True, matmul=False)

    def _lora(self, model: nn.Module, cfg: OnlineEvalConfig) -> list[Trainable]:
        from peft import LoraConfig, get_peft_model

        def wrap(targets):
            lcfg = LoraConfig(
                r=cfg.lora_rank, lora_alpha=cfg.lora_alpha, lora_dropout=0.0, target_modules=targets, bias="none"
            )
            return get_peft_model(model, lcfg)

        torch.manual_seed(cfg.seed)  # LoRA A matrices are random: the same for every run of this config
        try:
            self.model = wrap(cfg.lora_targets)
        except ValueError as e:
            if cfg.lora_targets is not None:
                raise PretrainError(f"adapt=lora: {e}") from None
            # peft knows no default targets for this architecture (e.g. our remote-code PKM-GPT)
            log.info("peft has no default LoRA targets for %s: adapting all linear layers", type(model).__name__)
            self.model = wrap("all-linear")
        self._peft = True
        self.model.eval()
        return [Trainable(n, p) for n, p in self.model.named_parameters() if p.requires_grad]

    # -- state -----------------------------------------------------------------------------------
    @torch.no_grad()
    def restore_initial(self) -> None:
        """Put every trainable tensor back to its initial value, bit for bit."""
        for t, init in zip(self.trainables, self.initial):
            t.tensor.copy_(init)

    def trainable_elements(self) -> int:
        return sum(t.tensor.numel() for t in self.trainables)

    def trainable_matmul(self) -> int:
        """Weights whose gradient is a full matmul per token (PKM rows are counted per read instead)."""
        return sum(t.tensor.numel() for t in self.trainables if t.matmul and not t.rows)

    def depth_fraction(self, n_layers: int) -> float:
        """Fraction of the layers a backward must cross: from the lowest layer with a trainable weight
        up (embeddings or anything outside the layers: all of them; the head or final norm: none)."""
        if not self.trainables or n_layers <= 0:
            return 1.0
        lowest = n_layers
        for t in self.trainables:
            m = _LAYER.search(t.name)
            if m:
                lowest = min(lowest, int(m.group(1)))
            elif not any(k in t.name for k in _TOP):
                return 1.0
        return (n_layers - lowest) / n_layers

    def state_bytes(self) -> int:
        """Extra memory this choice holds: the initial copy of the trainable tensors and their gradients
        (dense ones; a value table's gradient holds only the rows read in one chunk)."""
        return sum((1 if t.rows else 2) * t.tensor.numel() * t.tensor.element_size() for t in self.trainables)

    def close(self) -> None:
        """Undo: remove LoRA layers, restore sparse flags and requires_grad flags."""
        self.restore_initial()
        if self._peft:
            self.model.unload()  # removes the LoRA layers (not merged): the base modules come back
            self.model = self.base
            self._peft = False
        for bag, sparse in self._bag_sparse:
            bag.sparse = sparse
        for tensor, flag in self._flags.values():
            tensor.requires_grad_(flag)
            tensor.grad = None
