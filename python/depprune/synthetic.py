"""Synthetic equation sets shaped like a traced Llama-style decoder.

:func:`llama_equations` writes, without torch, the equations a trace of a
decoder with grouped-query attention, rotary embeddings and a SwiGLU MLP
gives: a core workload of any size for benchmarks and tests.

>>> graph = llama_equations(layers=1).solve()
>>> [g.size for g in graph.groups]
[64, 2, 2, 8, 16, 128]
"""

from __future__ import annotations

from depprune.equations import AxisEquations

__all__ = ["llama_equations"]


class _Writer:
    """Emits equations op by op, the way the tracer will."""

    def __init__(self) -> None:
        self.eqs = AxisEquations()

    def same(self, of: int) -> int:
        # An elementwise op's output or a transpose's renamed axis.
        axis = self.eqs.axis(self.eqs.axis_sizes[of])
        self.eqs.equal(axis, of)
        return axis

    def linear(self, name: str, x: int, out_features: int) -> int:
        w_out, w_in = self.eqs.axis(out_features), self.eqs.axis(self.eqs.axis_sizes[x])
        self.eqs.param(f"{name}.weight", 0, w_out)
        self.eqs.param(f"{name}.weight", 1, w_in)
        self.eqs.equal(w_in, x)
        return self.same(w_out)

    def rms_norm(self, name: str, x: int) -> int:
        weight = self.eqs.axis(self.eqs.axis_sizes[x])
        self.eqs.param(f"{name}.weight", 0, weight)
        out = self.same(x)
        self.eqs.equal(out, weight)
        return out

    def heads_with_rope(self, x: int, heads: int, head_dim: int) -> tuple[int, int]:
        eqs = self.eqs
        h, d = eqs.axis(heads), eqs.axis(head_dim)
        eqs.product(x, [h, d])
        first, second = eqs.axis(head_dim // 2), eqs.axis(head_dim // 2)
        eqs.sum(d, [first, second])
        rotated = eqs.axis(head_dim)
        eqs.sum(rotated, [self.same(second), first])  # cat(-x2, x1)
        out = self.same(d)
        eqs.equal(out, rotated)  # x * cos + rotate_half(x) * sin
        return h, out


def llama_equations(
    layers: int = 2,
    hidden: int = 64,
    heads: int = 4,
    kv_heads: int = 2,
    intermediate: int = 128,
    vocab: int = 100,
) -> AxisEquations:
    """Axis equations of a Llama-style decoder, as a trace would write them.

    >>> eqs = llama_equations(layers=2)
    >>> eqs.num_equations > 50
    True
    """
    w = _Writer()
    eqs = w.eqs
    head_dim = hidden // heads
    vocab_axis, emb = eqs.axis(vocab), eqs.axis(hidden)
    eqs.param("embed_tokens.weight", 0, vocab_axis)
    eqs.param("embed_tokens.weight", 1, emb)
    eqs.freeze(vocab_axis)
    x = w.same(emb)
    for i in range(layers):
        p = f"layers.{i}"
        normed = w.rms_norm(f"{p}.input_layernorm", x)
        q = w.linear(f"{p}.self_attn.q_proj", normed, heads * head_dim)
        k = w.linear(f"{p}.self_attn.k_proj", normed, kv_heads * head_dim)
        v = w.linear(f"{p}.self_attn.v_proj", normed, kv_heads * head_dim)
        q_heads, q_dim = w.heads_with_rope(q, heads, head_dim)
        k_heads, k_dim = w.heads_with_rope(k, kv_heads, head_dim)
        v_heads, v_dim = eqs.axis(kv_heads), eqs.axis(head_dim)
        eqs.product(v, [v_heads, v_dim])
        # repeat_kv: expand a fresh size-REP axis, then reshape to all heads.
        repeated = []
        for kv in (k_heads, v_heads):
            all_heads = eqs.axis(heads)
            eqs.product(all_heads, [kv, eqs.axis(heads // kv_heads)])
            repeated.append(all_heads)
        eqs.equal(q_heads, repeated[0])
        eqs.equal(repeated[0], repeated[1])
        eqs.equal(q_dim, k_dim)
        merged = eqs.axis(heads * head_dim)
        eqs.product(merged, [w.same(repeated[1]), w.same(v_dim)])
        attn = w.linear(f"{p}.self_attn.o_proj", merged, hidden)
        x = w.same(x)
        eqs.equal(x, attn)
        normed = w.rms_norm(f"{p}.post_attention_layernorm", x)
        gate = w.linear(f"{p}.mlp.gate_proj", normed, intermediate)
        up = w.linear(f"{p}.mlp.up_proj", normed, intermediate)
        act = w.same(gate)
        eqs.equal(act, up)
        down = w.linear(f"{p}.mlp.down_proj", act, hidden)
        x = w.same(x)
        eqs.equal(x, down)
    normed = w.rms_norm("norm", x)
    logits = w.linear("lm_head", normed, vocab)
    eqs.freeze(logits)
    return eqs
