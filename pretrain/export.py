"""Export a `pkm pretrain` checkpoint as a self-contained Hugging Face repository (the function behind
`pkm export hf`, also called by online evaluation on native checkpoints).

The checkpoint may have any TP/DP layout: value tables stream from it block by block of rows
(`CheckpointReader`) and are written as they arrive, so no table is ever whole in memory.
"""

from __future__ import annotations

from pathlib import Path


def export_hf(
    checkpoint: str | Path,
    out_dir: str | Path,
    *,
    tokenizer: str | None = None,
    max_shard_size: str = "2GB",
    overwrite: bool = False,
) -> Path:
    """Write `out_dir` (model.safetensors, config.json with auto_map, the modeling code, the tokenizer,
    a model card) from `checkpoint`: RUN_DIR/checkpoints/step_XXXXXXX, or a checkpoints/ or run
    directory for its latest checkpoint. `tokenizer`: the one to ship (default: the checkpoint's).
    Raises PretrainError / ModelError with a one-line reason; nothing is left half-written."""
    from data_pipeline.outputs import check_writable
    from model.hf.export import export_hf as export_state_dict
    from pretrain.checkpoint import CheckpointReader, checkpoint_tokenizer, resolve_checkpoint

    ckpt = resolve_checkpoint(checkpoint)
    check_writable(str(out_dir))  # before the checkpoint is read
    with CheckpointReader(ckpt) as reader:
        out = export_state_dict(
            reader.state_dict(),
            reader.cfg.model,
            tokenizer or checkpoint_tokenizer(reader.path),
            str(out_dir),
            card_info(reader.cfg, reader.info),
            max_shard_size=max_shard_size,
            overwrite=overwrite,
        )
    return Path(out)


def card_info(run_config, info: dict) -> dict:
    """What the model card says about the run, from the run config and the checkpoint's info."""
    data = run_config.data
    out = {
        "base_model": run_config.checkpoint.init_from,
        "training_data": list(data.paths) or "the bundled Jane Austen demo corpus",
        "train_steps": info.get("step"),
        "tokens_seen": info.get("tokens_seen"),
        "final_loss": info.get("final_loss", info.get("loss")),
        "final_eval_loss": info.get("final_eval_loss", info.get("eval_loss")),
        "memory_usage": info.get("memory_usage") or info.get("usage"),
        "tokenizer_name": (info.get("tokenizer") or {}).get("name"),
    }
    report = info.get("sizes") or info.get("memory_report")  # memory_report: checkpoints before 2026-11-30
    if report and not out["memory_usage"]:
        out["memory_usage"] = {k: v for k, v in report.items()}
    return out
