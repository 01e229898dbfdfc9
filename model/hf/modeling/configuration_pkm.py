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
}


class _PKMConfig(PretrainedConfig):
    def __init__(
        self,
        vocab_size=32000,
        hidden_size=256,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=None,
        intermediate_size=None,
        max_position_embeddings=512,
        normalization="LayerNorm",
        layer_norm_eps=1e-5,
        activation="gelu",
        position_embedding="learned_absolute",
        rope_theta=10000.0,
        add_bias_linear=True,
        qkv_bias=None,
        tie_embeddings=True,
        norm_position="pre",
        type_vocab_size=2,
        has_pooler=False,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        classifier_dropout=0.1,
        initializer_range=0.02,
        pkm=None,
        use_cache=True,
        **kwargs,
    ):
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.num_key_value_heads = num_key_value_heads or num_attention_heads
        self.intermediate_size = intermediate_size or 4 * hidden_size
        self.max_position_embeddings = max_position_embeddings
        self.normalization = normalization
        self.layer_norm_eps = layer_norm_eps
        self.activation = activation
        self.position_embedding = position_embedding
        self.rope_theta = rope_theta
        self.add_bias_linear = add_bias_linear
        self.qkv_bias = add_bias_linear if qkv_bias is None else qkv_bias
        self.tie_embeddings = tie_embeddings
        self.norm_position = norm_position
        self.type_vocab_size = type_vocab_size
        self.has_pooler = has_pooler
        self.hidden_dropout = hidden_dropout
        self.attention_dropout = attention_dropout
        self.classifier_dropout = classifier_dropout
        self.initializer_range = initializer_range
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
