"""A small LLaMA-style decoder in plain PyTorch (no transformers needed).

Pre-norm blocks with RMSNorm, rotary position embeddings, grouped-query causal attention
and a SwiGLU MLP; a final RMSNorm and an untied linear head. The rotary cos/sin tables are
computed once by a `rotary` module and passed to every block, so a cut between blocks
passes them along with the residual stream. The forward takes `input_ids` [batch, seq]
and returns logits [batch, seq, vocab].

The same family of ops as HF LLaMA (examples/llama_hf.py), written independently: the
latency predictor's bench trains on it and tests on HF's model.
"""

# No `from __future__ import annotations` here (see examples/gpt.py).
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from torch import nn


@dataclass(frozen=True)
class LlamaStyleConfig:
    """Model shape; the defaults keep a forward pass in the millisecond range on CPU."""

    vocab: int = 512
    d_model: int = 128
    n_head: int = 4
    n_kv_head: int = 2
    n_layer: int = 4
    mlp_hidden: int = 352
    rope_base: float = 10000.0


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps))


class Rotary(nn.Module):
    """cos and sin of every position's rotation angles, [seq, head_dim] each."""

    def __init__(self, head_dim: int, base: float):
        super().__init__()
        self.register_buffer("inv_freq", 1.0 / base ** (torch.arange(0, head_dim, 2).float() / head_dim),
                             persistent=False)

    def forward(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        angles = positions[:, None].float() * self.inv_freq[None, :]
        angles = torch.cat([angles, angles], dim=-1)
        return angles.cos(), angles.sin()


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    first, second = x.chunk(2, dim=-1)
    return x * cos + torch.cat([-second, first], dim=-1) * sin


class Attention(nn.Module):
    """Causal attention with n_kv_head key/value heads shared by groups of query heads."""

    def __init__(self, cfg: LlamaStyleConfig):
        super().__init__()
        if cfg.d_model % cfg.n_head or cfg.n_head % cfg.n_kv_head:
            raise ValueError(f"d_model {cfg.d_model}, n_head {cfg.n_head} and n_kv_head "
                             f"{cfg.n_kv_head} must divide each other")
        self.n_head, self.n_kv_head = cfg.n_head, cfg.n_kv_head
        self.head_dim = cfg.d_model // cfg.n_head
        kv_dim = cfg.n_kv_head * self.head_dim
        self.q_proj = nn.Linear(cfg.d_model, cfg.d_model, bias=False)
        self.k_proj = nn.Linear(cfg.d_model, kv_dim, bias=False)
        self.v_proj = nn.Linear(cfg.d_model, kv_dim, bias=False)
        self.o_proj = nn.Linear(cfg.d_model, cfg.d_model, bias=False)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        batch, seq, width = x.shape
        q = self.q_proj(x).view(batch, seq, self.n_head, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(batch, seq, self.n_kv_head, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(batch, seq, self.n_kv_head, self.head_dim).transpose(1, 2)
        q, k = rotate(q, cos, sin), rotate(k, cos, sin)
        groups = self.n_head // self.n_kv_head
        k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.o_proj(out.transpose(1, 2).reshape(batch, seq, width))


class Block(nn.Module):
    def __init__(self, cfg: LlamaStyleConfig):
        super().__init__()
        self.attn_norm = RMSNorm(cfg.d_model)
        self.attn = Attention(cfg)
        self.mlp_norm = RMSNorm(cfg.d_model)
        self.gate = nn.Linear(cfg.d_model, cfg.mlp_hidden, bias=False)
        self.up = nn.Linear(cfg.d_model, cfg.mlp_hidden, bias=False)
        self.down = nn.Linear(cfg.mlp_hidden, cfg.d_model, bias=False)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.attn_norm(x), cos, sin)
        h = self.mlp_norm(x)
        return x + self.down(F.silu(self.gate(h)) * self.up(h))


class LlamaStyle(nn.Module):
    """Decoder-only transformer: input_ids [batch, seq] -> logits [batch, seq, vocab]."""

    def __init__(self, cfg: LlamaStyleConfig):
        super().__init__()
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab, cfg.d_model)
        self.rotary = Rotary(cfg.d_model // cfg.n_head, cfg.rope_base)
        self.layers = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer))
        self.norm = RMSNorm(cfg.d_model)
        self.lm_head = nn.Linear(cfg.d_model, cfg.vocab, bias=False)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        x = self.embed(input_ids)
        cos, sin = self.rotary(torch.arange(input_ids.shape[1], device=input_ids.device))
        for layer in self.layers:
            x = layer(x, cos, sin)
        return self.lm_head(self.norm(x))


def build(
    *, batch: int = 2, seq: int = 32, device: str = "cpu", **config_overrides
) -> tuple[LlamaStyle, dict[str, torch.Tensor]]:
    """A LlamaStyle model in eval mode with seeded random weights and example `input_ids`.

    Keyword overrides: any LlamaStyleConfig field, plus batch, seq and device ("cpu" or
    "meta"). The RMSNorm weights are drawn around 1 so that they are not all ones.
    """
    cfg = replace(LlamaStyleConfig(), **config_overrides)
    torch.manual_seed(0)
    with torch.device(device):
        model = LlamaStyle(cfg)
        if device != "meta":
            with torch.no_grad():
                for module in model.modules():
                    if isinstance(module, RMSNorm):
                        module.weight.uniform_(0.8, 1.2)
        input_ids = torch.randint(0, cfg.vocab, (batch, seq))
    return model.eval(), {"input_ids": input_ids}


if __name__ == "__main__":
    model, inputs = build()
    n_params = sum(p.numel() for p in model.parameters())
    with torch.no_grad():
        logits = model(**inputs)
    print(f"LlamaStyle {model.cfg}: {n_params:,} parameters, logits {tuple(logits.shape)}")
