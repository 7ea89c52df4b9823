"""Tiny models and configs shared by the tests: small enough to keep the suite fast."""

from __future__ import annotations

import torch
from torch import nn

#: A 2-layer decoder: 4 query heads in 2 KV groups, hidden 32, MLP 64 (head_dim 8).
TINY_DECODER = dict(
    vocab_size=100,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=64,
)


def tokens(seed: int, batch: int = 2, length: int = 7) -> torch.Tensor:
    """Token ids for the tiny decoders' vocabulary."""
    return torch.randint(0, 100, (batch, length), generator=torch.Generator().manual_seed(seed))


class LSTMClassifier(nn.Module):
    """Embedding, LSTM, MLP head: recurrent parameters are frozen, the head is pruned."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(20, 8)
        self.lstm = nn.LSTM(8, 12, batch_first=True)
        self.head = nn.Sequential(nn.Linear(12, 16), nn.ReLU(), nn.Linear(16, 3))

    def forward(self, tokens):
        out, _ = self.lstm(self.embed(tokens))
        return self.head(out[:, -1])
