"""HuggingFace LLaMA (`LlamaForCausalLM`) with random weights, wrapped to return logits.

Built from a `LlamaConfig` (no download, no tokenizer). `LogitsOnly` makes the forward
take `input_ids` only and return the logits tensor instead of a ModelOutput. The HF
module paths stay intact under the wrapper's `model` attribute:
`model.model.embed_tokens`, `model.model.layers.N`, `model.model.norm`, `model.lm_head`.

`build_7b()` gives LLaMA-7B shapes on the meta device: it can be captured and planned
without allocating its ~27 GB of float32 weights.
"""

from __future__ import annotations

import os

# Never reach the Hub: everything here is built from a config.
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
from hf_logits import LogitsOnly, build_causal_lm  # noqa: E402  (the file next to this one)
from transformers import LlamaConfig, LlamaForCausalLM  # noqa: E402

SMALL_CONFIG = dict(
    vocab_size=512,
    hidden_size=128,
    intermediate_size=344,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=128,
)

LLAMA_7B_CONFIG = dict(
    vocab_size=32000,
    hidden_size=4096,
    intermediate_size=11008,
    num_hidden_layers=32,
    num_attention_heads=32,
    num_key_value_heads=32,
    max_position_embeddings=2048,
    rms_norm_eps=1e-6,
)


def build(
    *,
    batch: int = 2,
    seq: int = 32,
    device: str = "cpu",
    dtype: torch.dtype = torch.float32,
    attn_implementation: str = "sdpa",
    **config_overrides,
) -> tuple[LogitsOnly, dict[str, torch.Tensor]]:
    """A small LLaMA in eval mode with seeded random weights and example `input_ids`.

    Keyword overrides: any LlamaConfig field (e.g. num_hidden_layers=2), plus batch, seq,
    device ("cpu" or "meta"), dtype and attn_implementation.
    """
    config = LlamaConfig(
        **{**SMALL_CONFIG, **config_overrides},
        use_cache=False,
        attn_implementation=attn_implementation,
    )
    return build_causal_lm(LlamaForCausalLM, config, batch=batch, seq=seq, device=device, dtype=dtype)


def build_7b(
    *, device: str = "meta", batch: int = 1, seq: int = 128, dtype: torch.dtype = torch.float32
) -> tuple[LogitsOnly, dict[str, torch.Tensor]]:
    """LLaMA-7B shapes (32 layers, hidden 4096, MLP 11008, 32 heads, vocab 32000).

    Meta by default: a real-weight 7B model needs ~27 GB (float32) of memory.
    """
    return build(batch=batch, seq=seq, device=device, dtype=dtype, **LLAMA_7B_CONFIG)


if __name__ == "__main__":
    model, inputs = build()
    n_params = sum(p.numel() for p in model.parameters())
    with torch.no_grad():
        logits = model(**inputs)
    print(f"LLaMA (small): {n_params:,} parameters, logits {tuple(logits.shape)}")
    big, big_inputs = build_7b()
    n_big = sum(p.numel() for p in big.parameters())
    ids_shape = tuple(big_inputs["input_ids"].shape)
    print(f"LLaMA-7B shapes on meta: {n_big:,} parameters, input_ids {ids_shape}")
