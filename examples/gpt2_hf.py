"""HuggingFace GPT-2 (`GPT2LMHeadModel`) with random weights, wrapped to return logits.

Built from a small `GPT2Config` (no download). `LogitsOnly` makes the forward take
`input_ids` only and return the logits tensor. The HF module paths stay intact under the
wrapper's `model` attribute: `model.transformer.wte`, `model.transformer.wpe`,
`model.transformer.h.N`, `model.transformer.ln_f`, `model.lm_head` (tied to `wte`).
"""

from __future__ import annotations

import os

# Never reach the Hub: everything here is built from a config.
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
from hf_logits import LogitsOnly, build_causal_lm  # noqa: E402  (the file next to this one)
from transformers import GPT2Config, GPT2LMHeadModel  # noqa: E402

SMALL_CONFIG = dict(n_embd=128, n_layer=4, n_head=4, vocab_size=512, n_positions=128)


def build(
    *,
    batch: int = 2,
    seq: int = 32,
    device: str = "cpu",
    dtype: torch.dtype = torch.float32,
    attn_implementation: str = "sdpa",
    **config_overrides,
) -> tuple[LogitsOnly, dict[str, torch.Tensor]]:
    """A small GPT-2 in eval mode with seeded random weights and example `input_ids`.

    Keyword overrides: any GPT2Config field (e.g. n_layer=2), plus batch, seq, device
    ("cpu" or "meta"), dtype and attn_implementation.
    """
    settings = {**SMALL_CONFIG, **config_overrides}
    # GPT2Config's default bos/eos id (50256) lies outside a small vocab; transformers
    # warns about it, so point both at the last token unless the caller chose.
    settings.setdefault("bos_token_id", settings["vocab_size"] - 1)
    settings.setdefault("eos_token_id", settings["vocab_size"] - 1)
    config = GPT2Config(
        **settings,
        use_cache=False,
        attn_implementation=attn_implementation,
    )
    return build_causal_lm(GPT2LMHeadModel, config, batch=batch, seq=seq, device=device, dtype=dtype)


if __name__ == "__main__":
    model, inputs = build()
    n_params = sum(p.numel() for p in model.parameters())
    with torch.no_grad():
        logits = model(**inputs)
    print(f"GPT-2 (small): {n_params:,} parameters, logits {tuple(logits.shape)}")
