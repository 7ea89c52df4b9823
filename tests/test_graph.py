"""The graph object: ``AxisEquations`` -> ``solve()`` -> ``DependencyGraph``.

Each architecture case mirrors a row of rust/depprune-core/tests/design_table.rs,
written through the Python builder with named parameters, and checks groups
(sizes and ``(name, dim)`` members), unit maps and kept indices.
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from depprune import (
    AxisEquations,
    DependencyGraph,
    DeppruneError,
    Group,
    InvalidEquationsError,
    InvalidPlanError,
)

# -- helpers ---------------------------------------------------------------------


def sizes_and_members(graph: DependencyGraph) -> list[tuple[int, list[tuple[str, int]]]]:
    return [(g.size, list(g.members)) for g in graph.groups]


def kept(graph: DependencyGraph, removed, name: str, dim: int) -> list[int]:
    return graph.kept_indices(removed)[(name, dim)].tolist()


def the_group(graph: DependencyGraph, size: int, members: list[tuple[str, int]]) -> Group:
    found = [g for g in graph.groups if g.size == size and list(g.members) == members]
    assert len(found) == 1, sizes_and_members(graph)
    return found[0]


# -- architectures ------------------------------------------------------------------


def mlp() -> DependencyGraph:
    eqs = AxisEquations()
    inp, hidden, out = eqs.axis(3), eqs.axis(4), eqs.axis(2)
    eqs.param("fc1.weight", 0, hidden)
    eqs.param("fc1.weight", 1, inp)
    eqs.param("fc1.bias", 0, hidden)
    eqs.param("fc2.weight", 0, out)
    eqs.param("fc2.weight", 1, hidden)
    eqs.param("fc2.bias", 0, out)
    eqs.freeze(inp)
    eqs.freeze(out)
    return eqs.solve()


def test_tiny_mlp_has_one_group_of_hidden_neurons():
    graph = mlp()
    assert sizes_and_members(graph) == [
        (4, [("fc1.weight", 0), ("fc1.bias", 0), ("fc2.weight", 1)])
    ]
    assert graph.num_units == 4
    assert len(graph) == 1
    assert graph.conflicts == ()
    assert graph.param_names == ("fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias")
    result = graph.kept_indices({0: [1, 3]})
    assert {key: value.tolist() for key, value in result.items()} == {
        ("fc1.weight", 0): [0, 2],
        ("fc1.weight", 1): [0, 1, 2],
        ("fc1.bias", 0): [0, 2],
        ("fc2.weight", 0): [0, 1],
        ("fc2.weight", 1): [0, 2],
        ("fc2.bias", 0): [0, 1],
    }
    assert graph.describe("fc1.weight", 1) == "frozen[3]"
    assert graph.describe("fc2.weight", 1) == "g0[4]"


def test_residual_stream_is_one_group():
    c = 6
    eqs = AxisEquations()
    vocab, emb = eqs.axis(10), eqs.axis(c)
    eqs.param("emb.weight", 0, vocab)
    eqs.param("emb.weight", 1, emb)
    stream = emb
    for i in range(2):
        norm = eqs.axis(c)
        eqs.param(f"blocks.{i}.norm.weight", 0, norm)
        eqs.equal(norm, stream)
        fc1_out, fc1_in = eqs.axis(12), eqs.axis(c)
        eqs.param(f"blocks.{i}.fc1.weight", 0, fc1_out)
        eqs.param(f"blocks.{i}.fc1.weight", 1, fc1_in)
        eqs.equal(fc1_in, stream)
        fc2_out, fc2_in = eqs.axis(c), eqs.axis(12)
        eqs.param(f"blocks.{i}.fc2.weight", 0, fc2_out)
        eqs.param(f"blocks.{i}.fc2.weight", 1, fc2_in)
        eqs.equal(fc2_in, fc1_out)
        out = eqs.axis(c)
        eqs.equal(out, stream)
        eqs.equal(out, fc2_out)
        stream = out
    eqs.freeze(vocab)
    graph = eqs.solve()
    assert sizes_and_members(graph) == [
        (
            c,
            [
                ("emb.weight", 1),
                ("blocks.0.norm.weight", 0),
                ("blocks.0.fc1.weight", 1),
                ("blocks.0.fc2.weight", 0),
                ("blocks.1.norm.weight", 0),
                ("blocks.1.fc1.weight", 1),
                ("blocks.1.fc2.weight", 0),
            ],
        ),
        (12, [("blocks.0.fc1.weight", 0), ("blocks.0.fc2.weight", 1)]),
        (12, [("blocks.1.fc1.weight", 0), ("blocks.1.fc2.weight", 1)]),
    ]
    # Removing hidden channel 2 cuts it from every block and the embedding.
    result = graph.kept_indices({0: [2]})
    for key in [("emb.weight", 1), ("blocks.1.norm.weight", 0), ("blocks.0.fc1.weight", 1)]:
        assert result[key].tolist() == [0, 1, 3, 4, 5], key
    assert result[("emb.weight", 0)].tolist() == list(range(10))
    assert result[("blocks.1.fc1.weight", 0)].tolist() == list(range(12))


def qkv_attention(h: int = 2, d: int = 3) -> DependencyGraph:
    eqs = AxisEquations()
    qkv_out, e_in = eqs.axis(3 * h * d), eqs.axis(h * d)
    eqs.param("qkv.weight", 0, qkv_out)
    eqs.param("qkv.weight", 1, e_in)
    q, k, v = eqs.axis(h * d), eqs.axis(h * d), eqs.axis(h * d)
    eqs.sum(qkv_out, [q, k, v])
    heads = [(eqs.axis(h), eqs.axis(d)) for _ in range(3)]
    for x, (hx, dx) in zip([q, k, v], heads, strict=True):
        eqs.product(x, [hx, dx])
    eqs.equal(heads[0][0], heads[1][0])  # batched over heads
    eqs.equal(heads[1][0], heads[2][0])
    eqs.equal(heads[0][1], heads[1][1])  # q . k over head_dim
    merged = eqs.axis(h * d)
    eqs.product(merged, [heads[2][0], heads[2][1]])
    o_out, o_in = eqs.axis(h * d), eqs.axis(h * d)
    eqs.param("o.weight", 0, o_out)
    eqs.param("o.weight", 1, o_in)
    eqs.equal(o_in, merged)
    eqs.equal(o_out, e_in)  # residual
    return eqs.solve()


def test_fused_qkv_split_into_heads():
    h, d = 2, 3
    graph = qkv_attention(h, d)
    assert sizes_and_members(graph) == [
        (h, [("qkv.weight", 0), ("o.weight", 1)]),
        (d, [("qkv.weight", 0)]),
        (d, [("qkv.weight", 0), ("o.weight", 1)]),
        (h * d, [("qkv.weight", 1), ("o.weight", 0)]),
    ]
    heads = graph.unit_maps(0)
    assert list(heads) == [("qkv.weight", 0), ("o.weight", 1)]
    assert heads[("qkv.weight", 0)].tolist() == [0, 0, 0, 1, 1, 1] * 3
    assert heads[("o.weight", 1)].tolist() == [0, 0, 0, 1, 1, 1]
    # The q/k head_dim group does not reach the v block.
    assert graph.unit_maps(graph.groups[1])[("qkv.weight", 0)].tolist() == (
        [0, 1, 2] * 4 + [-1] * 6
    )
    # Removing head 1: its rows in q, k and v, and its columns in o.
    assert kept(graph, {0: [1]}, "qkv.weight", 0) == [0, 1, 2, 6, 7, 8, 12, 13, 14]
    assert kept(graph, {0: [1]}, "o.weight", 1) == [0, 1, 2]
    assert kept(graph, {0: [1]}, "qkv.weight", 1) == list(range(h * d))
    assert graph.describe("o.weight", 1) == "product(g0[2], g2[3])"


def test_gqa_query_heads_are_kv_groups_times_repeats():
    kv, rep, d = 2, 3, 2
    eqs = AxisEquations()
    hidden = eqs.axis(8)
    q_out, k_out, v_out = eqs.axis(kv * rep * d), eqs.axis(kv * d), eqs.axis(kv * d)
    for name, axis in [("q", q_out), ("k", k_out), ("v", v_out)]:
        eqs.param(f"{name}_proj.weight", 0, axis)
        eqs.param(f"{name}_proj.weight", 1, hidden)
    qh, qd = eqs.axis(kv * rep), eqs.axis(d)
    eqs.product(q_out, [qh, qd])
    kh, kd, vh, vd = eqs.axis(kv), eqs.axis(d), eqs.axis(kv), eqs.axis(d)
    eqs.product(k_out, [kh, kd])
    eqs.product(v_out, [vh, vd])
    k_rep, v_rep = eqs.axis(rep), eqs.axis(rep)
    k_heads, v_heads = eqs.axis(kv * rep), eqs.axis(kv * rep)
    eqs.product(k_heads, [kh, k_rep])  # repeat_kv: expand + reshape
    eqs.product(v_heads, [vh, v_rep])
    eqs.equal(qh, k_heads)
    eqs.equal(k_heads, v_heads)
    eqs.equal(qd, kd)
    merged = eqs.axis(kv * rep * d)
    eqs.product(merged, [v_heads, vd])
    o_in = eqs.axis(kv * rep * d)
    eqs.param("o_proj.weight", 0, hidden)
    eqs.param("o_proj.weight", 1, o_in)
    eqs.equal(o_in, merged)
    graph = eqs.solve()

    kv_group = the_group(
        graph,
        kv,
        [("q_proj.weight", 0), ("k_proj.weight", 0), ("v_proj.weight", 0), ("o_proj.weight", 1)],
    )
    slot = the_group(graph, rep, [("q_proj.weight", 0), ("o_proj.weight", 1)])
    the_group(graph, d, [("q_proj.weight", 0), ("k_proj.weight", 0)])
    the_group(graph, d, [("v_proj.weight", 0), ("o_proj.weight", 1)])
    the_group(
        graph,
        8,
        [("q_proj.weight", 1), ("k_proj.weight", 1), ("v_proj.weight", 1), ("o_proj.weight", 0)],
    )
    # q heads = product(KV, REP): KV group 0 owns query heads 0..REP.
    assert graph.unit_maps(kv_group)[("q_proj.weight", 0)].tolist() == [0] * 6 + [1] * 6
    assert kept(graph, {kv_group: [0]}, "q_proj.weight", 0) == list(range(6, 12))
    assert kept(graph, {kv_group: [0]}, "k_proj.weight", 0) == [2, 3]
    # Query slot 1 of every KV group: q heads 1 and 4; k and v untouched.
    assert kept(graph, {slot: [1]}, "q_proj.weight", 0) == [0, 1, 4, 5, 6, 7, 10, 11]
    assert kept(graph, {slot: [1]}, "k_proj.weight", 0) == [0, 1, 2, 3]
    assert kept(graph, {slot: [1]}, "o_proj.weight", 1) == [0, 1, 4, 5, 6, 7, 10, 11]


def test_rope_rotate_half_unifies_the_halves():
    h, d = 2, 4
    eqs = AxisEquations()
    q_out = eqs.axis(h * d)
    eqs.param("q.weight", 0, q_out)
    qh, qd = eqs.axis(h), eqs.axis(d)
    eqs.product(q_out, [qh, qd])
    x1, x2 = eqs.axis(d // 2), eqs.axis(d // 2)
    eqs.sum(qd, [x1, x2])
    neg, rot = eqs.axis(d // 2), eqs.axis(d)
    eqs.equal(neg, x2)
    eqs.sum(rot, [neg, x1])  # cat(-x2, x1)
    eqs.equal(rot, qd)
    graph = eqs.solve()
    assert sizes_and_members(graph) == [(h, [("q.weight", 0)]), (d // 2, [("q.weight", 0)])]
    assert graph.describe("q.weight", 0) == "product(g0[2], sum(g1[2], g1[2]))"
    assert graph.unit_maps(1)[("q.weight", 0)].tolist() == [0, 1, 0, 1, 0, 1, 0, 1]
    # Removing rotary pair 0 removes it from both halves of every head.
    assert kept(graph, {1: [0]}, "q.weight", 0) == [1, 3, 5, 7]


def test_grouped_conv_prunes_whole_groups_or_the_same_slot():
    n_groups, cin_g, cout_g = 4, 3, 2
    eqs = AxisEquations()
    x = eqs.axis(n_groups * cin_g)
    eqs.param("prev.weight", 0, x)
    w_out, w_in = eqs.axis(n_groups * cout_g), eqs.axis(cin_g)
    eqs.param("conv.weight", 0, w_out)
    eqs.param("conv.weight", 1, w_in)
    g_axis, per_in, per_out = eqs.axis(n_groups), eqs.axis(cin_g), eqs.axis(cout_g)
    eqs.product(x, [g_axis, per_in])
    eqs.equal(per_in, w_in)
    eqs.product(w_out, [g_axis, per_out])
    graph = eqs.solve()
    assert sizes_and_members(graph) == [
        (n_groups, [("prev.weight", 0), ("conv.weight", 0)]),
        (cin_g, [("prev.weight", 0), ("conv.weight", 1)]),
        (cout_g, [("conv.weight", 0)]),
    ]
    assert kept(graph, {0: [2]}, "conv.weight", 0) == [0, 1, 2, 3, 6, 7]
    assert kept(graph, {0: [2]}, "conv.weight", 1) == [0, 1, 2]
    assert kept(graph, {0: [2]}, "prev.weight", 0) == [0, 1, 2, 3, 4, 5, 9, 10, 11]
    # Input slot 1 of every conv group: prev channels 1, 4, 7, 10 and weight column 1.
    assert kept(graph, {1: [1]}, "prev.weight", 0) == [0, 2, 3, 5, 6, 8, 9, 11]
    assert kept(graph, {1: [1]}, "conv.weight", 1) == [0, 2]


def test_densenet_concat_refines_later_layers():
    c0, growth = 4, 2
    eqs = AxisEquations()
    x0 = eqs.axis(c0)
    eqs.param("stem.weight", 0, x0)
    cat, width = x0, c0
    for i in range(3):
        out, inp = eqs.axis(growth), eqs.axis(width)
        eqs.param(f"layer{i}.weight", 0, out)
        eqs.param(f"layer{i}.weight", 1, inp)
        eqs.equal(inp, cat)
        nxt = eqs.axis(width + growth)
        eqs.sum(nxt, [cat, out])
        cat, width = nxt, width + growth
    head_in = eqs.axis(width)
    eqs.param("head.weight", 0, head_in)
    eqs.equal(head_in, cat)
    graph = eqs.solve()
    assert [g.size for g in graph.groups] == [c0, growth, growth, growth]
    assert graph.groups[0].members == (
        ("stem.weight", 0),
        ("layer0.weight", 1),
        ("layer1.weight", 1),
        ("layer2.weight", 1),
        ("head.weight", 0),
    )
    assert graph.groups[1].members == (
        ("layer0.weight", 0),
        ("layer1.weight", 1),
        ("layer2.weight", 1),
        ("head.weight", 0),
    )
    assert graph.describe("head.weight", 0) == "sum(sum(sum(g0[4], g1[2]), g2[2]), g3[2])"
    # Stem channel 1 and layer-1 channel 0 leave the head's input.
    removed = {0: [1], 2: [0]}
    assert kept(graph, removed, "head.weight", 0) == [0, 2, 3, 4, 5, 7, 8, 9]
    assert kept(graph, removed, "layer2.weight", 1) == [0, 2, 3, 4, 5, 7]
    assert kept(graph, removed, "layer1.weight", 0) == [1]


def test_compatible_products_meet_in_a_mixed_radix():
    eqs = AxisEquations()
    x = eqs.axis(24)
    eqs.param("x.weight", 0, x)
    eqs.product(x, [eqs.axis(2), eqs.axis(12)])
    eqs.product(x, [eqs.axis(4), eqs.axis(6)])
    graph = eqs.solve()
    assert [g.size for g in graph.groups] == [2, 2, 6]
    assert graph.conflicts == ()
    assert graph.describe("x.weight", 0) == "product(g0[2], g1[2], g2[6])"


def test_irreconcilable_products_are_frozen_and_reported():
    # product(6, 4) and product(4, 6) of one axis share no mixed radix.
    eqs = AxisEquations()
    x = eqs.axis(24)
    eqs.param("x.weight", 0, x)
    other = eqs.axis(5)
    eqs.param("other.weight", 0, other)
    a6, a4, c4, c6 = eqs.axis(6), eqs.axis(4), eqs.axis(4), eqs.axis(6)
    eqs.product(x, [a6, a4])
    eqs.product(x, [c4, c6])
    graph = eqs.solve()
    assert graph.conflicts == (1,)
    assert sizes_and_members(graph) == [(5, [("other.weight", 0)])]
    assert graph.describe("x.weight", 0) == "product(frozen[6], frozen[4])"
    assert kept(graph, {0: [0]}, "x.weight", 0) == list(range(24))
    assert "1 conflicts" in repr(graph)


def test_size_one_product_factor_is_frozen_not_a_group():
    # A broadcast slot (size 1) cannot be pruned without emptying the axis.
    eqs = AxisEquations()
    x = eqs.axis(4)
    eqs.param("w", 0, x)
    eqs.product(x, [eqs.axis(1), eqs.axis(4)])
    graph = eqs.solve()
    assert sizes_and_members(graph) == [(4, [("w", 0)])]


# -- keep masks and kept indices ---------------------------------------------------------


def test_keep_mask_is_uint8_with_one_entry_per_unit():
    graph = qkv_attention()
    keep = graph.keep_mask({0: [1], graph.groups[3]: np.asarray([0, 5])})
    assert keep.dtype == np.uint8
    # heads | qk head_dim | v head_dim | embedding
    assert keep.tolist() == [1, 0, *[1, 1, 1], *[1, 1, 1], *[0, 1, 1, 1, 1, 0]]
    assert graph.keep_mask({}).tolist() == [1] * graph.num_units
    assert graph.keep_mask({0: []}).tolist() == [1] * graph.num_units


def test_kept_indices_accepts_a_keep_mask_array():
    graph = qkv_attention()
    removed = {0: [1], 2: [0, 2]}
    by_dict = graph.kept_indices(removed)
    by_mask = graph.kept_indices(graph.keep_mask(removed))
    by_bool = graph.kept_indices(graph.keep_mask(removed).astype(bool))
    assert list(by_dict) == list(by_mask) == list(by_bool)
    for key in by_dict:
        assert by_dict[key].tolist() == by_mask[key].tolist() == by_bool[key].tolist()


def test_kept_indices_with_wrong_length_mask_is_a_plan_error():
    graph = mlp()
    with pytest.raises(InvalidPlanError, match="the keep mask has 3 entries but the groups have 4"):
        graph.kept_indices(np.ones(3, dtype=np.uint8))


@pytest.mark.parametrize("bad", [1, -1, 7, "0", 0.0, None])
def test_unknown_group_is_a_plan_error(bad):
    graph = mlp()
    with pytest.raises(InvalidPlanError) as info:
        graph.unit_maps(bad)
    assert str(info.value) == f"group {bad!r} does not exist; groups are numbered 0..0"
    with pytest.raises(InvalidPlanError, match="does not exist"):
        graph.keep_mask({bad: [0]})
    with pytest.raises(InvalidPlanError, match="does not exist"):
        graph.kept_indices({bad: [0]})


def test_numpy_integer_group_ids_are_accepted():
    graph = qkv_attention()
    assert graph.keep_mask({np.int64(0): [1]}).tolist() == graph.keep_mask({0: [1]}).tolist()


@pytest.mark.parametrize("units", [[4], [-1], [0, 1, 2, 3, 4], np.asarray([[9]])])
def test_out_of_range_units_are_a_plan_error(units):
    graph = mlp()
    with pytest.raises(InvalidPlanError) as info:
        graph.keep_mask({0: units})
    bad = [u for u in np.asarray(units).reshape(-1).tolist() if not 0 <= u < 4]
    assert str(info.value) == f"group 0 has units 0..3; got unit {bad[0]}"


def test_group_of_another_graph_is_checked_by_index():
    graph = mlp()
    foreign = qkv_attention().groups[3]
    with pytest.raises(InvalidPlanError, match="group 3 does not exist"):
        graph.keep_mask({foreign: [0]})


def test_empty_graph():
    graph = AxisEquations().solve()
    assert len(graph) == 0
    assert graph.num_units == 0
    assert graph.keep_mask({}).tolist() == []
    assert graph.kept_indices({}) == {}
    assert repr(graph) == ("DependencyGraph(0 groups, 0 units, 0 parameter dims, 0 conflicts)")
    with pytest.raises(InvalidPlanError) as info:
        graph.unit_maps(0)
    assert str(info.value) == (
        "group 0 does not exist; this graph has no groups (nothing in it can be pruned)"
    )
    assert "-1" not in str(info.value)
    with pytest.raises(InvalidPlanError, match="this graph has no groups"):
        graph.keep_mask({0: []})


@pytest.mark.parametrize("units", [[1.7], [1.0], np.asarray([0.2, 2.9]), [True], [None]])
def test_non_integer_unit_ids_are_a_plan_error(units):
    graph = mlp()
    with pytest.raises(InvalidPlanError) as info:
        graph.keep_mask({0: units})
    message = str(info.value)
    assert message.startswith("group 0: unit ids must be integers; got ")
    assert "np.flatnonzero(mask)" in message
    with pytest.raises(InvalidPlanError, match="unit ids must be integers"):
        graph.kept_indices({0: units})


def test_integer_unit_ids_of_any_integer_dtype_are_accepted():
    graph = mlp()
    expected = graph.keep_mask({0: [1, 3]}).tolist()
    for dtype in (np.int8, np.int32, np.uint8, np.uint64):
        assert graph.keep_mask({0: np.asarray([1, 3], dtype=dtype)}).tolist() == expected


@pytest.mark.parametrize(
    ("mask", "described"),
    [
        (np.ones(4, dtype=np.float64), "1-d float64"),
        (np.ones((2, 2), dtype=np.uint8), "2-d uint8"),
    ],
)
def test_keep_mask_array_must_be_1d_boolean_or_integer(mask, described):
    graph = mlp()
    with pytest.raises(InvalidPlanError) as info:
        graph.kept_indices(mask)
    assert f"a keep mask is a 1-d boolean or integer array (nonzero keeps); got a {described}" in (
        str(info.value)
    )


def test_integer_keep_mask_keeps_every_nonzero_entry():
    graph = mlp()
    # 256 and -1 would become 0 and 255 in a uint8 cast; nonzero means kept.
    by_int = graph.kept_indices(np.asarray([256, 0, -1, 1], dtype=np.int64))
    by_dict = graph.kept_indices({0: [1]})
    assert {k: v.tolist() for k, v in by_int.items()} == {k: v.tolist() for k, v in by_dict.items()}


# -- describe / axis_of --------------------------------------------------------------------


def test_axis_of_returns_the_axis_id():
    eqs = AxisEquations()
    a, b = eqs.axis(2), eqs.axis(3)
    eqs.param("w", 0, b)
    eqs.param("w", 1, a)
    graph = eqs.solve()
    assert graph.axis_of("w", 0) == b
    assert graph.axis_of("w", 1) == a


@pytest.mark.parametrize("key", [("nope.weight", 0), ("fc1.weight", 2), ("fc1.bias", 1)])
def test_unknown_param_dim_is_a_plan_error(key):
    graph = mlp()
    name, dim = key
    for query in (graph.describe, graph.axis_of):
        with pytest.raises(InvalidPlanError) as info:
            query(name, dim)
        message = str(info.value)
        assert message.startswith(f"{name}[{dim}] is not a parameter dim of this graph")
        assert "known parameters: fc1.weight, fc1.bias, fc2.weight, fc2.bias" in message


# -- printing ------------------------------------------------------------------------------


def test_repr_counts_groups_units_dims_and_conflicts():
    assert repr(mlp()) == "DependencyGraph(1 groups, 4 units, 6 parameter dims, 0 conflicts)"
    assert repr(qkv_attention()) == (
        "DependencyGraph(4 groups, 14 units, 4 parameter dims, 0 conflicts)"
    )


def test_str_is_a_table_of_groups_units_and_members():
    text = str(qkv_attention())
    lines = text.splitlines()
    assert lines[0] == repr(qkv_attention())
    assert lines[1].split() == ["group", "units", "members"]
    assert [line.split()[:2] for line in lines[2:]] == [
        ["0", "2"],
        ["1", "3"],
        ["2", "3"],
        ["3", "6"],
    ]
    assert lines[2].endswith("qkv.weight[0], o.weight[1]")
    assert lines[3].endswith("  qkv.weight[0]")
    assert lines[5].endswith("qkv.weight[1], o.weight[0]")


def test_str_truncates_long_member_lists():
    eqs = AxisEquations()
    x = eqs.axis(3)
    for i in range(7):
        eqs.param(f"layer{i}.weight", 0, x)
    graph = eqs.solve()
    row = str(graph).splitlines()[2]
    assert row.endswith(
        "layer0.weight[0], layer1.weight[0], layer2.weight[0], layer3.weight[0], ... (+3 more)"
    )
    assert "layer4" not in row
    assert str(graph.groups[0]) == (
        "group 0: 3 units; layer0.weight[0], layer1.weight[0], layer2.weight[0], "
        "layer3.weight[0], ... (+3 more)"
    )


def test_group_is_an_immutable_record():
    group = mlp().groups[0]
    assert group == Group(
        index=0,
        size=4,
        members=(("fc1.weight", 0), ("fc1.bias", 0), ("fc2.weight", 1)),
        unit_offset=0,
    )
    with pytest.raises(AttributeError):
        group.size = 3  # type: ignore[misc]


# -- malformed equations through the builder ---------------------------------------------


def test_builder_errors_name_the_bad_row():
    eqs = AxisEquations()
    a, b = eqs.axis(4), eqs.axis(5)
    eqs.param("w", 0, a)
    eqs.equal(a, b)
    with pytest.raises(InvalidEquationsError) as info:
        eqs.solve()
    assert str(info.value) == (
        "equation 0 (equal) is inconsistent: left axis 0 has size 4 "
        "but the right-hand side has size 5"
    )
    assert isinstance(info.value, ValueError)
    assert isinstance(info.value, DeppruneError)


def test_builder_negative_dim_and_duplicate_rows():
    eqs = AxisEquations()
    a = eqs.axis(4)
    eqs.param("w", -1, a)
    with pytest.raises(InvalidEquationsError, match="parameter row 0 has dim -1") as info:
        eqs.solve()
    assert str(info.value).endswith("(row 0 is w[-1])")
    eqs = AxisEquations()
    a = eqs.axis(4)
    eqs.param("v", 0, a)
    eqs.param("w", 0, a)
    eqs.param("w", 0, a)
    with pytest.raises(InvalidEquationsError) as info:
        eqs.solve()
    assert str(info.value) == (
        "parameter rows 1 and 2 both describe dim 0 of parameter 1; "
        "give each (parameter, dim) exactly one row (row 2 is w[0])"
    )
    assert info.value.row == 2  # type: ignore[attr-defined]


def test_duplicate_row_from_raw_arrays_names_the_index_and_the_fix():
    from depprune import _core

    arrays = AxisEquations().arrays()
    arrays.update(
        axis_sizes=np.asarray([4], dtype=np.int64),
        row_params=np.asarray([7, 7], dtype=np.int64),
        row_dims=np.asarray([0, 0], dtype=np.int64),
        row_axes=np.asarray([0, 0], dtype=np.int64),
    )
    with pytest.raises(InvalidEquationsError) as info:
        _core.analyze(**arrays)
    assert str(info.value) == (
        "parameter rows 0 and 1 both describe dim 0 of parameter 7; "
        "give each (parameter, dim) exactly one row"
    )
    assert info.value.row == 1  # type: ignore[attr-defined]


def test_builder_axis_too_large():
    eqs = AxisEquations()
    eqs.param("w", 0, eqs.axis(2**50))
    with pytest.raises(
        InvalidEquationsError, match=f"axis 0 has size {2**50}, more than the limit"
    ):
        eqs.solve()


def test_builder_unknown_axis_and_negative_size():
    eqs = AxisEquations()
    a = eqs.axis(4)
    eqs.param("w", 0, a + 3)
    with pytest.raises(
        InvalidEquationsError, match="parameter row 0 refers to axis 3 but there are 1 axes"
    ) as info:
        eqs.solve()
    assert str(info.value).endswith("(row 0 is w[0])")
    eqs = AxisEquations()
    eqs.axis(-2)
    with pytest.raises(InvalidEquationsError, match="axis 0 has size -2"):
        eqs.solve()
    eqs = AxisEquations()
    eqs.freeze(eqs.axis(2) + 1)
    with pytest.raises(InvalidEquationsError, match=r"frozen_axes\[0\] is axis 1"):
        eqs.solve()


# -- property: removals through the graph API ------------------------------------------------


@settings(max_examples=200, deadline=None)
@given(data=st.data())
def test_removing_units_drops_exactly_the_indices_on_them(data):
    graph = qkv_attention(h=2, d=3)
    removed = {
        g.index: data.draw(st.lists(st.integers(0, g.size - 1), unique=True, max_size=g.size))
        for g in graph.groups
        if data.draw(st.booleans())
    }
    result = graph.kept_indices(removed)
    expected: dict[tuple[str, int], np.ndarray] = {}
    for g in graph.groups:
        for member, unit_map in graph.unit_maps(g).items():
            keep = expected.setdefault(member, np.ones(len(unit_map), dtype=bool))
            keep &= ~np.isin(unit_map, removed.get(g.index, []))
    for key, indices in result.items():
        if key in expected:
            assert indices.tolist() == np.flatnonzero(expected[key]).tolist(), key
    # Every unit is on at least one index of every member of its group.
    for g in graph.groups:
        for unit_map in graph.unit_maps(g).values():
            assert set(unit_map[unit_map >= 0].tolist()) == set(range(g.size))
