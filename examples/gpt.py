"""A small GPT-style decoder-only transformer in plain PyTorch.

Pre-LN blocks (LayerNorm -> causal self-attention -> residual, LayerNorm -> GELU MLP ->
residual), learned token and position embeddings, a final LayerNorm and an untied
linear head. The forward takes `input_ids` [batch, seq] and returns logits
[batch, seq, vocab].

`build(device="meta")` constructs the same model on the meta device, so large configs
can be captured (shapes only) without allocating weights.
"""

# No `from __future__ import annotations` here: with string annotations @dataclass looks
# the module up in sys.modules, which fails when the file is loaded by path
# (importlib spec_from_file_location without registering it, as `edgeplan compile` does).
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from torch import nn


@dataclass(frozen=True)
class GPTConfig:
    """Model shape; the defaults keep a forward pass in the millisecond range on CPU."""

    vocab: int = 512
    d_model: int = 128
    n_head: int = 4
    n_layer: int = 6
    max_seq: int = 128
    mlp_ratio: int = 4


class CausalSelfAttention(nn.Module):
    """Multi-head causal self-attention with a fused qkv projection."""

    def __init__(self, d_model: int, n_head: int):
        super().__init__()
        if d_model % n_head:
            raise ValueError(f"d_model {d_model} is not divisible by n_head {n_head}")
        self.n_head = n_head
        self.head_dim = d_model // n_head
        self.qkv = nn.Linear(d_model, 3 * d_model)
        self.proj = nn.Linear(d_model, d_model)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, seq, d_model = x.shape
        q, k, v = self.qkv(x).split(d_model, dim=-1)
        # [batch, seq, d_model] -> [batch, n_head, seq, head_dim], the layout SDPA expects.
        q, k, v = (
            t.view(batch, seq, self.n_head, self.head_dim).transpose(1, 2) for t in (q, k, v)
        )
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        y = y.transpose(1, 2).reshape(batch, seq, d_model)
        return self.proj(y)


class MLP(nn.Module):
    """Position-wise feed-forward network: Linear -> GELU -> Linear."""

    def __init__(self, d_model: int, ratio: int):
        super().__init__()
        self.fc = nn.Linear(d_model, ratio * d_model)
        self.act = nn.GELU()
        self.proj = nn.Linear(ratio * d_model, d_model)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(self.act(self.fc(x)))


class Block(nn.Module):
    """One pre-LN transformer block."""

    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.ln_1 = nn.LayerNorm(cfg.d_model)
        self.attn = CausalSelfAttention(cfg.d_model, cfg.n_head)
        self.ln_2 = nn.LayerNorm(cfg.d_model)
        self.mlp = MLP(cfg.d_model, cfg.mlp_ratio)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class GPT(nn.Module):
    """Decoder-only transformer: input_ids [batch, seq] -> logits [batch, seq, vocab]."""

    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.cfg = cfg
        self.tok_emb = nn.Embedding(cfg.vocab, cfg.d_model)
        self.pos_emb = nn.Embedding(cfg.max_seq, cfg.d_model)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer))
        self.ln_f = nn.LayerNorm(cfg.d_model)
        self.head = nn.Linear(cfg.d_model, cfg.vocab, bias=False)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        seq = input_ids.shape[1]
        # Positions are made in-graph from the sequence length, so the captured graph has
        # no position input and works for any seq <= max_seq.
        positions = torch.arange(seq, device=input_ids.device)
        x = self.tok_emb(input_ids) + self.pos_emb(positions)
        for block in self.blocks:
            x = block(x)
        return self.head(self.ln_f(x))


def build(
    *, batch: int = 2, seq: int = 32, device: str = "cpu", **config_overrides
) -> tuple[GPT, dict[str, torch.Tensor]]:
    """A GPT in eval mode with seeded random weights and example `input_ids`.

    Keyword overrides: any GPTConfig field (vocab, d_model, n_head, n_layer, max_seq,
    mlp_ratio), plus batch, seq and device ("cpu" or "meta"). max_seq grows to seq if
    needed. With device="meta" neither weights nor inputs are allocated.
    """
    cfg = replace(GPTConfig(), **config_overrides)
    if seq > cfg.max_seq:
        cfg = replace(cfg, max_seq=seq)
    torch.manual_seed(0)
    with torch.device(device):
        model = GPT(cfg)
        # randint on meta only records shape/dtype, so the seed call above stays harmless.
        input_ids = torch.randint(0, cfg.vocab, (batch, seq))
    return model.eval(), {"input_ids": input_ids}


if __name__ == "__main__":
    model, inputs = build()
    n_params = sum(p.numel() for p in model.parameters())
    with torch.no_grad():
        logits = model(**inputs)
    print(f"GPT {model.cfg}: {n_params:,} parameters, logits {tuple(logits.shape)}")
