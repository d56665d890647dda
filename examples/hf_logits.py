"""The wrapper the HuggingFace examples share: forward(input_ids) -> logits only."""

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
