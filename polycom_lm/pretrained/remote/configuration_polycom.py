"""Configuration of `PolycomForCausalLM`, the transformers architecture that `polycom-lm export` writes for
models whose FFN activation has no transformers counterpart (PolyNorm, PolyReLU, ReLU, GELU, ...).

This file is copied into every exported folder and loaded by `AutoConfig.from_pretrained(DIR,
trust_remote_code=True)`: it imports only transformers, never polycom_lm.
"""

from transformers import PretrainedConfig


class PolycomConfig(PretrainedConfig):
    """A Llama-style decoder (RMSNorm, RoPE in the rotate-half layout, grouped-query attention, no biases)
    whose FFN (dense, or OLMoE-style dropless mixture of experts when `num_experts > 0`) uses `hidden_act`.

    - `hidden_act`: relu, gelu, squared_relu, swiglu, geglu, polyrelu, polynorm or poly. `intermediate_size`
      is the width of the activation's output (a gated activation's input is twice as wide).
    - `activation_order`, `polynorm_eps`: r and eps of the PolyCom activations; `gelu_approximate`: "none"
      (erf) or "tanh".
    - `qk_norm`: None, "head" (RMSNorm over each head) or "full" (over the whole q / k projection, OLMoE's).
    - MoE: `num_experts`, `num_experts_per_tok`, `norm_topk_prob`, `per_expert_coefficients` (one set of
      PolyCom coefficients per expert instead of one per layer).
    """

    model_type = "polycom"
    keys_to_ignore_at_inference = ["past_key_values", "cache"]

    def __init__(
        self,
        vocab_size=32000,
        hidden_size=512,
        intermediate_size=2064,
        num_hidden_layers=8,
        num_attention_heads=8,
        num_key_value_heads=None,
        head_dim=None,
        hidden_act="polynorm",
        activation_order=3,
        polynorm_eps=1e-6,
        gelu_approximate="none",
        max_position_embeddings=2048,
        rope_theta=10000.0,
        rms_norm_eps=1e-5,
        qk_norm=None,
        num_experts=0,
        num_experts_per_tok=1,
        norm_topk_prob=False,
        per_expert_coefficients=False,
        initializer_range=0.02,
        use_cache=True,
        tie_word_embeddings=False,
        bos_token_id=None,
        eos_token_id=None,
        pad_token_id=None,
        **kwargs,
    ):
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.intermediate_size = intermediate_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.num_key_value_heads = num_key_value_heads if num_key_value_heads is not None else num_attention_heads
        self.head_dim = head_dim if head_dim is not None else hidden_size // num_attention_heads
        self.hidden_act = hidden_act
        self.activation_order = activation_order
        self.polynorm_eps = polynorm_eps
        self.gelu_approximate = gelu_approximate
        self.max_position_embeddings = max_position_embeddings
        self.rope_theta = rope_theta
        self.rms_norm_eps = rms_norm_eps
        self.qk_norm = qk_norm
        self.num_experts = num_experts
        self.num_experts_per_tok = num_experts_per_tok
        self.norm_topk_prob = norm_topk_prob
        self.per_expert_coefficients = per_expert_coefficients
        self.initializer_range = initializer_range
        self.use_cache = use_cache
        super().__init__(
            tie_word_embeddings=tie_word_embeddings,
            bos_token_id=bos_token_id,
            eos_token_id=eos_token_id,
            pad_token_id=pad_token_id,
            **kwargs,
        )
