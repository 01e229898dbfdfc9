"""Hugging Face interop: initialise megatron-core models from HF BERT / GPT-2 / Llama checkpoints
(`init_from`), export trained PKM models as self-contained HF repositories (`export`), push them to the
Hub (`hub`). `modeling/` holds the exported modeling code (torch + transformers only).

Importing this package imports neither torch nor transformers.
"""
