"""Product Key Memory (Lample et al. 2019) as a megatron-core MLP submodule (Kim & Jung 2020 placement)."""

from model.pkm.memory import PKMLookup, ProductKeyMemory
from model.pkm.product_keys import product_key_topk
from model.pkm.value_table import ValueTable

__all__ = ["PKMLookup", "ProductKeyMemory", "ValueTable", "product_key_topk"]
