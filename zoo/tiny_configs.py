"""Tiny configs for every causal-LM type of the installed transformers whose config carries a tp_plan (no download).

Each size a config has is set small enough to run in a second on CPU and large enough that tp 2 and 4 divide
every head count and feature dim (8 heads of 8, 4 key/value heads, 4 experts of which 2 per token, 2 layers).
"""

from __future__ import annotations

import warnings

SIZES = {
    "vocab_size": 96, "hidden_size": 64, "n_embd": 64, "d_model": 64, "intermediate_size": 128, "ffn_hidden_size": 128,
    "num_hidden_layers": 2, "n_layer": 2, "num_layers": 2, "num_attention_heads": 8, "n_head": 8,
    "num_key_value_heads": 4, "head_dim": 8, "max_position_embeddings": 64, "n_positions": 64, "n_ctx": 64,
    "moe_intermediate_size": 32, "shared_expert_intermediate_size": 32, "moe_shared_expert_intermediate_size": 32,
    "shared_experts_intermediate_size": 32, "shared_intermediate_size": 32, "expert_ffn_hidden_size": 32,
    "dense_intermediate_size": 128, "intermediate_size_mlp": 128,
    "num_experts": 4, "num_local_experts": 4, "n_routed_experts": 4, "moe_num_experts": 4, "num_experts_per_tok": 2,
    "moe_topk": 2, "moe_k": 2, "num_experts_per_token": 2, "n_group": 1, "topk_group": 1, "first_k_dense_replace": 1, "moe_layer_freq": 1,
    "decoder_sparse_step": 1, "n_shared_experts": 1,
    "kv_lora_rank": 16, "q_lora_rank": 16, "qk_rope_head_dim": 8, "qk_nope_head_dim": 8, "v_head_dim": 8,
    "qk_head_dim": 16, "sliding_window": 16, "sliding_window_size": 16, "attention_chunk_size": 16,
    "linear_num_key_heads": 4, "linear_num_value_heads": 8, "linear_key_head_dim": 8, "linear_value_head_dim": 8,
    "linear_num_heads": 8, "linear_head_dim": 8, "linear_conv_kernel_dim": 4,
    "mamba_n_heads": 8, "mamba_num_heads": 8, "mamba_head_dim": 16, "mamba_d_head": 16, "mamba_d_state": 8,
    "mamba_d_ssm": 128, "ssm_state_size": 8, "mamba_chunk_size": 16, "chunk_size": 16,
    "index_n_heads": 4, "index_head_dim": 8, "index_topk": 8, "rotary_dim": 4,
    "vocab_size_per_layer_input": 96, "hidden_size_per_layer_input": 8, "ple_embed_dim": 8,
}
DERIVED = ("head_dim", "num_key_value_heads")  # None by default in some configs (derived later): set them anyway
TOKEN_IDS = ("pad_token_id", "bos_token_id", "eos_token_id")
# layer kinds a hybrid's default pattern leaves out (GraniteMoeHybrid's default is all Mamba, which its cache refuses)
EXTRA_LAYER_KINDS = {"granitemoehybrid": {"layer_types": ["attention"]}}


def causal_lm_types() -> list:
    """[(model_type, config class, causal-LM class name)] for every causal-LM type whose config has a tp_plan."""
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    found = []
    for model_type, class_name in sorted(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.items()):
        try:
            config_class = CONFIG_MAPPING[model_type]
        except (KeyError, ImportError):
            continue
        if getattr(config_class, "base_model_tp_plan", None):
            found.append((model_type, config_class, class_name))
    return found


def tiny_config(config_class, **overrides):
    """config_class with every size it has made tiny (SIZES), token ids inside the vocabulary, then overrides."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        defaults = config_class().to_dict()
    sizes = {k: v for k, v in SIZES.items() if k in defaults and (defaults[k] is not None or k in DERIVED)}
    if "kv_lora_rank" in sizes:  # MLA: the rotary part is the head_dim that rope sees
        sizes["head_dim"] = sizes["qk_rope_head_dim"] if "head_dim" in sizes else sizes.pop("head_dim", None)
        sizes = {k: v for k, v in sizes.items() if v is not None}
        sizes["num_key_value_heads"] = sizes.get("num_attention_heads", 8)  # MLA has no grouped key/value heads
    if "num_experts_per_tok" in defaults and {"num_experts", "num_local_experts", "n_routed_experts"} & set(sizes):
        sizes["num_experts_per_tok"] = 2  # DeepSeek-V2's default is None
    if {"n_group", "num_expert_group", "topk_group"} & set(defaults):  # grouped routing: one group of all experts
        sizes.update({k: 1 for k in ("n_group", "num_expert_group", "topk_group") if k in defaults})
    if "q_lora_rank" in sizes and defaults.get("q_lora_rank") is None:
        sizes.pop("q_lora_rank")
    for key in TOKEN_IDS:
        if isinstance(defaults.get(key), int) and defaults[key] >= sizes.get("vocab_size", 10**9):
            sizes[key] = TOKEN_IDS.index(key)
    patterns = {k: v for k, v in defaults.items() if k.endswith("layer_types") and isinstance(v, list) and v}
    for key, kinds in EXTRA_LAYER_KINDS.get(getattr(config_class, "model_type", None), {}).items():
        patterns[key] = patterns.get(key, []) + kinds
    if patterns and "num_hidden_layers" in sizes:  # hybrids: 4 layers with every kind of layer each pattern has
        layers = max(4, *(len(dict.fromkeys(v)) for v in patterns.values()))
        sizes["num_hidden_layers"] = layers
        for key, kinds in patterns.items():
            sizes[key] = (list(dict.fromkeys(kinds)) * layers)[:layers]
    if "attn_layer_indices" in defaults:  # Bamba: attention at layer 1 of 4
        sizes["attn_layer_indices"], sizes["num_hidden_layers"] = [1], 4
    for key in ("attn_layer_period", "expert_layer_period"):  # Jamba: attention and experts every other layer
        if key in defaults:
            sizes.update({key: 2, key.replace("period", "offset"): 1})
    sizes.update(overrides)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return config_class(**sizes)
