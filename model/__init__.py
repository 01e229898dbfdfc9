"""PKM layers, value tables and megatron-core GPT/BERT builders.

Importing this package does not import torch; the submodules that need it do.
"""
