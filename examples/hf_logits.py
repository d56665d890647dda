"""What the HuggingFace examples share: a logits-only wrapper and the seeded build."""

import torch
from torch import nn


class LogitsOnly(nn.Module):
    """Wraps an HF causal LM: forward(input_ids) -> logits [batch, seq, vocab]."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        # Without a KV cache the output is just logits; unwrapping the ModelOutput keeps
        # the captured graph to a single tensor output.
        return self.model(input_ids=input_ids, use_cache=False).logits


def build_causal_lm(model_class, config, *, batch: int, seq: int, device: str,
                    dtype: torch.dtype) -> tuple[LogitsOnly, dict[str, torch.Tensor]]:
    """`model_class(config)` with seeded random weights on `device`, wrapped, in eval mode,
    with random example `input_ids` [batch, seq] (meta tensors when device="meta")."""
    torch.manual_seed(0)
    with torch.device(device):
        model = LogitsOnly(model_class(config).to(dtype))
        input_ids = torch.randint(0, config.vocab_size, (batch, seq))
    return model.eval(), {"input_ids": input_ids}
