"""Tokenizers, corpus readers, preprocessing into indexed .bin/.idx files, and training samplers."""
