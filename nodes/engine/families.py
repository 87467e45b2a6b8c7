"""The model families our runner serves, each a short table of what differs from Llama.

Every family is the same layer (llama.py):

    x += post_attn_norm( o( attention( rope( qk_norm( qkv( attn_norm(x) ) ) ) ) ) )
    x += post_mlp_norm( down( act(gate) * up ) ),   gate|up = gate_up( mlp_norm(x) )

with the parts a family lacks left out, and what it changes said here:

    llama, mistral   the layer as it stands (SwiGLU, no q/k norms, no post norms)
    qwen2            biases on q, k and v
    qwen3            a per-head RMSNorm of queries and keys before rope
    gemma2           GeGLU (gelu, tanh approximation); norms after attention and after the MLP;
                     embeddings times sqrt(hidden); norm weights stored as w - 1 by Hugging
                     Face (llama.cpp's files have the 1 added); local sliding-window layers
                     beside global ones; soft-capped attention scores and logits
    gemma3           gemma2 without the soft caps, with q/k norms, and the local layers' own
                     rotary base
    phi3             q|k|v and gate|up each one fused matrix (weights.py reads either way);
                     LongRoPE; Phi-4-mini turns only part of each head (partial rotary)
Per-model values (sliding windows and which layers have them, each layer type's rotary
frequencies, the attention scale) come from the config, in `Shape.of` (llama.py).

Adding a family: a row here, and its tensor names in weights.py if they differ; a test builds a
tiny random model of it from its transformers config and checks our logits against
transformers' (tests/test_families.py).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Family:
    act: str = "silu"           # the gate's activation: silu, or gelu_tanh (GeGLU)
    qkv_bias: bool = False      # biases on the q, k, v projections
    qk_norm: bool = False       # a per-head RMSNorm of queries and keys
    post_norms: bool = False    # norms of the attention and MLP outputs (before the residual)
    embed_scale: bool = False   # embeddings times sqrt(hidden)
    norm_shift: float = 0.0     # added to Hugging Face's norm weights (Gemma's 1 + w)
    softcaps: bool = False      # the config's attention and final logit soft caps apply


GEMMA2 = Family(act="gelu_tanh", post_norms=True, embed_scale=True, norm_shift=1.0,
                softcaps=True)

FAMILIES = {
    "llama": Family(),
    "mistral": Family(),
    "qwen2": Family(qkv_bias=True),
    "qwen3": Family(qk_norm=True),
    "gemma2": GEMMA2,
    "gemma3_text": Family(act="gelu_tanh", qk_norm=True, post_norms=True, embed_scale=True,
                          norm_shift=1.0),
    "phi3": Family(),
}

# each family's architecture as llama.cpp's files name it (general.architecture)
GGUF_ARCH = {"llama": "llama", "mistral": "llama", "qwen2": "qwen2", "qwen3": "qwen3",
             "gemma2": "gemma2", "gemma3_text": "gemma3", "phi3": "phi3"}


def text_config(config):
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def of(config) -> Family | None:
    return FAMILIES.get(text_config(config).model_type)


def unsupported(config) -> str | None:
    """None if our runner serves this config, else why not (the engine then falls back to
    transformers' own forward, and says so)."""
    c = text_config(config)
    if c.model_type not in FAMILIES:
        return f"the architecture '{c.model_type}' is not one of our runner's " \
               f"({', '.join(sorted(FAMILIES))})"
    act = getattr(c, "hidden_act", None) or getattr(c, "hidden_activation", None) or "silu"
    if act not in ("silu", "gelu_pytorch_tanh", "gelu_tanh"):
        return f"the activation '{act}'"
    for params in rope_parameters(c).values():
        kind = params.get("rope_type", params.get("type", "default"))
        if kind not in ("default", "llama3", "linear", "yarn", "longrope", "dynamic"):
            return f"the rope type '{kind}'"
    return None


def rope_parameters(c) -> dict[str, dict]:
    """Each layer type's rotary parameters: {'full_attention': {...}, ...}, or {None: {...}}
    when every layer shares one (transformers keeps them either way)."""
    rope = getattr(c, "rope_parameters", None) or getattr(c, "rope_scaling", None) or {}
    if rope and all(isinstance(v, dict) for v in rope.values()):
        return rope
    if "rope_theta" not in rope and hasattr(c, "rope_theta"):
        rope = {**rope, "rope_theta": c.rope_theta}
    return {None: rope}
