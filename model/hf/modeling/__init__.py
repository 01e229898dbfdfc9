"""The modeling code copied into every exported model (configuration_pkm.py, modeling_pkm.py).
These files import only torch and transformers: they travel alone."""
