# Configuration of PKM-GPT and PKM-BERT: transformer language models with Product Key Memory layers
# (Lample et al. 2019) trained with pkm-pretrain. Self-contained: needs only transformers.
from transformers import PretrainedConfig

PKM_DEFAULTS = {
    "layers": [],  # 0-based transformer layers holding a memory
    "placement": "add",  # add: FFN(x) + PKM(x); replace: PKM(x) instead of the FFN
    "n_keys": 512,  # sub-keys per half: the value table has n_keys**2 slots
    "heads": 4,
    "knn": 32,
    "k_dim": 256,
    "query_batchnorm": True,
    "query_layernorm": False,
    "batchnorm_eps": 1e-5,
    "batchnorm_momentum": 0.1,
    "input_dropout": 0.0,
    "query_dropout": 0.0,
    "value_dropout": 0.0,
    "value_dtype": "fp32",  # bf16: the value table is stored (and read) in bf16, as it was trained
}


# The architecture, with its defaults; None: follows from the others (see _PKMConfig.__init__).
ARCHITECTURE_DEFAULTS = {
    "vocab_size": 32000,
    "hidden_size": 256,
    "num_hidden_layers": 4,
    "num_attention_heads": 4,
    "num_key_value_heads": None,  # num_attention_heads: plain multi-head attention
    "intermediate_size": None,  # 4 * hidden_size
    "max_position_embeddings": 512,
    "normalization": "LayerNorm",
    "layer_norm_eps": 1e-5,
    "activation": "gelu",
    "position_embedding": "learned_absolute",
    "rope_theta": 10000.0,
    "add_bias_linear": True,
    "qkv_bias": None,  # add_bias_linear
    "tie_embeddings": True,
    "norm_position": "pre",
    "type_vocab_size": 2,
    "has_pooler": False,
    "hidden_dropout": 0.0,
    "attention_dropout": 0.0,
    "classifier_dropout": 0.1,
    "initializer_range": 0.02,
}


class _PKMConfig(PretrainedConfig):
    def __init__(self, pkm=None, use_cache=True, **kwargs):
        for name, default in ARCHITECTURE_DEFAULTS.items():
            setattr(self, name, kwargs.pop(name, default))
        self.num_key_value_heads = self.num_key_value_heads or self.num_attention_heads
        self.intermediate_size = self.intermediate_size or 4 * self.hidden_size
        if self.qkv_bias is None:
            self.qkv_bias = self.add_bias_linear
        self.pkm = {**PKM_DEFAULTS, **(pkm or {})}
        self.use_cache = use_cache
        # Output embeddings are tied in the modeling code itself (no shared parameters to untangle).
        kwargs["tie_word_embeddings"] = False
        super().__init__(**kwargs)


# Each class defines __init__ itself: transformers >= 5 turns config classes into dataclasses and would
# otherwise generate an __init__ that bypasses _PKMConfig's.
class PKMGPTConfig(_PKMConfig):
    model_type = "pkm_gpt"

    def __init__(self, **kwargs):
        super().__init__(**kwargs)


class PKMBertConfig(_PKMConfig):
    model_type = "pkm_bert"

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
