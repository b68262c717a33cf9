"""A tiny GPT (nanoGPT-shaped), its synthetic data, and the parallel layouts the examples use.

Everything is deterministic: the model from a seed, the data from the global sample index, so a
run on any topology with the same global batch sees the same samples in the same order.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F


class Block(nn.Module):
    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.ln1, self.ln2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.q, self.k, self.v = (nn.Linear(dim, dim, bias=False) for _ in range(3))
        self.proj = nn.Linear(dim, dim, bias=False)
        self.up, self.down = nn.Linear(dim, 4 * dim), nn.Linear(4 * dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, _ = x.shape
        h = self.ln1(x)
        # local head count: under tensor parallelism q/k/v hold this rank's heads only
        q, k, v = (m(h).view(b, t, -1, x.shape[-1] // self.heads).transpose(1, 2) for m in (self.q, self.k, self.v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.proj(y.transpose(1, 2).reshape(b, t, -1))
        return x + self.down(F.gelu(self.up(self.ln2(x))))


class GPT(nn.Module):
    def __init__(self, vocab: int = 96, dim: int = 32, heads: int = 4, layers: int = 2, seq: int = 16) -> None:
        super().__init__()
        self.wte = nn.Embedding(vocab, dim)
        self.wpe = nn.Embedding(seq, dim)
        self.layers = nn.ModuleDict({str(i): Block(dim, heads) for i in range(layers)})
        self.ln_f = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, vocab, bias=False)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        x = self.wte(idx) + self.wpe(torch.arange(idx.shape[1]))
        for block in self.layers.values():
            x = block(x)
        return self.head(self.ln_f(x))


def build(seed: int = 0, **kw: int) -> GPT:
    torch.manual_seed(seed)
    return GPT(**kw)


def batch(step: int, first: int, count: int, *, seq: int = 16, vocab: int = 96
          ) -> tuple[torch.Tensor, torch.Tensor]:
    """Samples ``first .. first+count`` of step ``step``'s global batch (inputs, targets).

    Each sample counts from a random start in a random stride (mod vocab): learnable, so the
    loss curve falls and a resumed run visibly continues it.
    """
    rows = []
    for i in range(first, first + count):
        g = torch.Generator().manual_seed(1_000_003 * step + i)
        start, stride = torch.randint(0, vocab, (1,), generator=g), torch.randint(1, 5, (1,), generator=g)
        rows.append((start + stride * torch.arange(seq + 1)) % vocab)
    data = torch.stack(rows)
    return data[:, :-1], data[:, 1:]


def lr_at(step: int, total: int, base: float = 3e-3) -> float:
    return base * 0.5 * (1 + math.cos(math.pi * min(step, total) / total))
