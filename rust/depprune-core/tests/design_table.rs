//! One hand-written case per row of the table in DESIGN.md, written directly
//! as equations the way the tracer emits them.

mod common;
use common::*;

#[test]
fn residual_stream_is_one_group() {
    // embedding -> x0; two blocks each add fc2(act(fc1(norm(x)))) back to x.
    let mut b = Builder::new();
    let c = 6;
    let vocab = b.axis(10);
    let emb_c = b.axis(c);
    b.param(&[vocab, emb_c]); // rows 0, 1
    let mut stream = emb_c;
    for _ in 0..2 {
        let norm_w = b.axis(c);
        b.param(&[norm_w]);
        b.equal(norm_w, stream);
        let (fc1_out, fc1_in) = (b.axis(12), b.axis(c));
        b.param(&[fc1_out, fc1_in]);
        b.equal(fc1_in, stream);
        let (fc2_out, fc2_in) = (b.axis(c), b.axis(12));
        b.param(&[fc2_out, fc2_in]);
        b.equal(fc2_in, fc1_out);
        let out = b.axis(c);
        b.equal(out, stream);
        b.equal(out, fc2_out);
        stream = out;
    }
    b.freeze(vocab);
    let a = b.solve();
    let g = groups(&a);
    assert_eq!(g.len(), 3, "hidden plus one neuron group per block: {g:?}");
    assert_eq!(g[0], (c, vec![1, 2, 4, 5, 7, 9, 10]));
    assert_eq!(g[1], (12, vec![3, 6]));
    assert_eq!(g[2], (12, vec![8, 11]));
    assert!(a.conflicts().is_empty());
}

#[test]
fn fused_qkv_split_into_heads() {
    // qkv = Linear(E, 3E); q, k, v = split; each viewed (H, D); scores
    // contract q.D with k.D; output heads merged into o_proj's input.
    let (h, d) = (2, 3);
    let mut b = Builder::new();
    let (qkv_out, e_in) = (b.axis(3 * h * d), b.axis(h * d));
    let qkv = b.param(&[qkv_out, e_in]);
    let (q, k, v) = (b.axis(h * d), b.axis(h * d), b.axis(h * d));
    b.sum(qkv_out, &[q, k, v]);
    let heads: Vec<(i64, i64)> = (0..3).map(|_| (b.axis(h), b.axis(d))).collect();
    for (&x, &(hx, dx)) in [q, k, v].iter().zip(&heads) {
        b.product(x, &[hx, dx]);
    }
    b.equal(heads[0].0, heads[1].0); // batched over heads
    b.equal(heads[1].0, heads[2].0);
    b.equal(heads[0].1, heads[1].1); // q . k over head_dim
    let merged = b.axis(h * d);
    b.product(merged, &[heads[2].0, heads[2].1]); // attn @ v, heads merged
    let (o_out, o_in) = (b.axis(h * d), b.axis(h * d));
    let o = b.param(&[o_out, o_in]);
    b.equal(o_in, merged);
    b.equal(o_out, e_in); // residual
    let a = b.solve();
    let g = groups(&a);
    assert_eq!(
        g,
        vec![
            (h, vec![qkv[0] as i64, o[1] as i64]),
            (d, vec![qkv[0] as i64]),
            (d, vec![qkv[0] as i64, o[1] as i64]),
            (h * d, vec![qkv[1] as i64, o[0] as i64]),
        ]
    );
    // Head unit of every qkv output row: q block, k block, v block.
    assert_eq!(
        unit_map(&a, 0, qkv[0]),
        vec![0, 0, 0, 1, 1, 1, 0, 0, 0, 1, 1, 1, 0, 0, 0, 1, 1, 1]
    );
    // q/k head_dim is -1 on the v block.
    assert_eq!(
        unit_map(&a, 1, qkv[0]),
        vec![0, 1, 2, 0, 1, 2, 0, 1, 2, 0, 1, 2, -1, -1, -1, -1, -1, -1]
    );
    // Removing head 1 removes its rows from q, k and v, and its columns from o_proj.
    let keep = keep_without(&a, &[(0, 1)]);
    assert_eq!(
        kept_of_row(&a, &keep, qkv[0]),
        vec![0, 1, 2, 6, 7, 8, 12, 13, 14]
    );
    assert_eq!(kept_of_row(&a, &keep, o[1]), vec![0, 1, 2]);
}

#[test]
fn gqa_repeat_kv_couples_query_heads_to_kv_groups() {
    // q: (H = KV * REP, D); k, v: (KV, D); repeat_kv = expand (fresh REP) + reshape.
    let (kv, rep, d) = (2, 3, 2);
    let mut b = Builder::new();
    let hidden = b.axis(8);
    let (q_out, k_out, v_out) = (b.axis(kv * rep * d), b.axis(kv * d), b.axis(kv * d));
    let q_rows = b.param(&[q_out, hidden]);
    let k_rows = b.param(&[k_out, hidden]);
    let v_rows = b.param(&[v_out, hidden]);
    let (qh, qd) = (b.axis(kv * rep), b.axis(d));
    b.product(q_out, &[qh, qd]);
    let (kh, kd, vh, vd) = (b.axis(kv), b.axis(d), b.axis(kv), b.axis(d));
    b.product(k_out, &[kh, kd]);
    b.product(v_out, &[vh, vd]);
    // repeat_kv(k): [B, KV, 1, S, D] -> expand [B, KV, REP, S, D] -> reshape [B, KV*REP, S, D]
    let (k_rep, v_rep) = (b.axis(rep), b.axis(rep));
    let (k_heads, v_heads) = (b.axis(kv * rep), b.axis(kv * rep));
    b.product(k_heads, &[kh, k_rep]);
    b.product(v_heads, &[vh, v_rep]);
    b.equal(qh, k_heads); // q @ k^T batched over heads
    b.equal(k_heads, v_heads); // attn @ v
    b.equal(qd, kd);
    let merged = b.axis(kv * rep * d);
    b.product(merged, &[v_heads, vd]);
    let o_in = b.axis(kv * rep * d);
    let o_rows = b.param(&[hidden, o_in]);
    b.equal(o_in, merged);
    let a = b.solve();
    let row = |r: &[usize], i: usize| r[i] as i64;
    let g = groups(&a);
    // KV groups (each with its query heads), query slot in every group, qk head_dim, v head_dim.
    assert!(g.contains(&(
        kv,
        vec![
            row(&q_rows, 0),
            row(&k_rows, 0),
            row(&v_rows, 0),
            row(&o_rows, 1)
        ]
    )));
    assert!(g.contains(&(rep, vec![row(&q_rows, 0), row(&o_rows, 1)])));
    assert!(g.contains(&(d, vec![row(&q_rows, 0), row(&k_rows, 0)])));
    assert!(g.contains(&(d, vec![row(&v_rows, 0), row(&o_rows, 1)])));
    // Removing KV group 0 removes query heads 0..REP (rows 0..REP*D of q_proj).
    let kv_group = g.iter().position(|x| x.0 == kv && x.1.len() == 4).unwrap();
    let keep = keep_without(&a, &[(kv_group, 0)]);
    assert_eq!(
        kept_of_row(&a, &keep, q_rows[0]),
        ((rep * d)..(kv * rep * d)).collect::<Vec<_>>()
    );
    assert_eq!(kept_of_row(&a, &keep, k_rows[0]), vec![2, 3]);
    // Removing query slot 1 removes head 1 of every KV group: q heads 1 and 4.
    let slot = g.iter().position(|x| x.0 == rep).unwrap();
    let keep = keep_without(&a, &[(slot, 1)]);
    assert_eq!(
        kept_of_row(&a, &keep, q_rows[0]),
        vec![0, 1, 4, 5, 6, 7, 10, 11]
    );
    assert_eq!(kept_of_row(&a, &keep, k_rows[0]), vec![0, 1, 2, 3]);
}

#[test]
fn rope_rotate_half_keeps_halves_together() {
    // q viewed (H, D); rotate_half: x1, x2 = halves; cat(-x2, x1); q*cos + rot*sin.
    let (h, d) = (2, 4);
    let mut b = Builder::new();
    let q_out = b.axis(h * d);
    let q_rows = b.param(&[q_out]);
    let (qh, qd) = (b.axis(h), b.axis(d));
    b.product(q_out, &[qh, qd]);
    let (x1, x2) = (b.axis(d / 2), b.axis(d / 2));
    b.sum(qd, &[x1, x2]);
    let (neg, rot) = (b.axis(d / 2), b.axis(d));
    b.equal(neg, x2);
    b.sum(rot, &[neg, x1]);
    b.equal(rot, qd); // q * cos + rotate_half(q) * sin
    let a = b.solve();
    let g = groups(&a);
    assert_eq!(g, vec![(h, vec![0]), (d / 2, vec![0])]);
    assert_eq!(unit_map(&a, 1, q_rows[0]), vec![0, 1, 0, 1, 0, 1, 0, 1]);
    let keep = keep_without(&a, &[(1, 0)]);
    assert_eq!(kept_of_row(&a, &keep, q_rows[0]), vec![1, 3, 5, 7]);
}

#[test]
fn densenet_concat_refines_later_convs() {
    // x0 (C0); layer i: conv_i(cat_{i-1}) -> k_i; cat_i = cat(cat_{i-1}, k_i).
    let (c0, growth) = (4, 2);
    let mut b = Builder::new();
    let x0 = b.axis(c0);
    b.param(&[x0]); // stem conv output: row 0
    let mut cat = x0;
    let mut width = c0;
    let mut conv_in_rows = Vec::new();
    for _ in 0..3 {
        let (out, input) = (b.axis(growth), b.axis(width));
        let rows = b.param(&[out, input]);
        conv_in_rows.push(rows[1]);
        b.equal(input, cat);
        let next = b.axis(width + growth);
        b.sum(next, &[cat, out]);
        cat = next;
        width += growth;
    }
    let head_in = b.axis(width);
    let head = b.param(&[head_in]);
    b.equal(head_in, cat);
    let a = b.solve();
    let g = groups(&a);
    assert_eq!(g.len(), 4, "stem channels plus one group per layer: {g:?}");
    assert_eq!(g[0].1, vec![0, 2, 4, 6, head[0] as i64]);
    // The last layer's input columns: stem channels, then each earlier layer's.
    let units: Vec<i64> = (0..3)
        .map(|gi| unit_map(&a, gi, conv_in_rows[2]))
        .map(|m| m.iter().filter(|&&u| u >= 0).count() as i64)
        .collect();
    assert_eq!(units, vec![c0, growth, growth]);
    let keep = keep_without(&a, &[(0, 1), (2, 0)]);
    assert_eq!(
        kept_of_row(&a, &keep, head[0]),
        vec![0, 2, 3, 4, 5, 7, 8, 9]
    );
}

#[test]
fn grouped_conv_prunes_whole_groups_or_same_slot() {
    let (groups_n, cin_g, cout_g) = (4, 3, 2);
    let mut b = Builder::new();
    let x = b.axis(groups_n * cin_g);
    let prev = b.param(&[x]);
    let (w_out, w_in) = (b.axis(groups_n * cout_g), b.axis(cin_g));
    let w = b.param(&[w_out, w_in]);
    let (g_axis, per_in, per_out) = (b.axis(groups_n), b.axis(cin_g), b.axis(cout_g));
    b.product(x, &[g_axis, per_in]);
    b.equal(per_in, w_in);
    b.product(w_out, &[g_axis, per_out]);
    let a = b.solve();
    let gs = groups(&a);
    assert_eq!(
        gs,
        vec![
            (groups_n, vec![prev[0] as i64, w[0] as i64]),
            (cin_g, vec![prev[0] as i64, w[1] as i64]),
            (cout_g, vec![w[0] as i64]),
        ]
    );
    let keep = keep_without(&a, &[(0, 2)]);
    assert_eq!(kept_of_row(&a, &keep, w[0]), vec![0, 1, 2, 3, 6, 7]);
    assert_eq!(kept_of_row(&a, &keep, w[1]), vec![0, 1, 2]);
}

#[test]
fn depthwise_conv_ties_input_to_output() {
    let mut b = Builder::new();
    let x = b.axis(5);
    let prev = b.param(&[x]);
    let (w_out, w_in) = (b.axis(5), b.axis(1));
    let w = b.param(&[w_out, w_in]);
    b.equal(w_out, x);
    let a = b.solve();
    assert_eq!(
        groups(&a),
        vec![
            (5, vec![prev[0] as i64, w[0] as i64]),
            (1, vec![w[1] as i64])
        ]
    );
}

#[test]
fn channel_shuffle_is_the_same_atoms_in_another_order() {
    let (g, k) = (2, 3);
    let mut b = Builder::new();
    let x = b.axis(g * k);
    let prev = b.param(&[x]);
    let (ga, ka) = (b.axis(g), b.axis(k));
    b.product(x, &[ga, ka]);
    let y = b.axis(g * k);
    b.product(y, &[ka, ga]); // view (G, K), transpose, flatten
    let next_in = b.axis(g * k);
    let next = b.param(&[next_in]);
    b.equal(next_in, y);
    let a = b.solve();
    assert_eq!(
        groups(&a),
        vec![
            (g, vec![prev[0] as i64, next[0] as i64]),
            (k, vec![prev[0] as i64, next[0] as i64])
        ]
    );
    assert_eq!(unit_map(&a, 0, next[0]), vec![0, 1, 0, 1, 0, 1]);
    let keep = keep_without(&a, &[(0, 0)]);
    assert_eq!(kept_of_row(&a, &keep, prev[0]), vec![3, 4, 5]);
    assert_eq!(kept_of_row(&a, &keep, next[0]), vec![1, 3, 5]);
}

#[test]
fn frozen_inputs_outputs_and_unknown_ops_are_never_pruned() {
    let mut b = Builder::new();
    let (x_in, hidden, out) = (b.axis(3), b.axis(4), b.axis(2));
    b.param(&[hidden, x_in]);
    b.param(&[out, hidden]);
    b.freeze(x_in);
    b.freeze(out);
    let a = b.solve();
    assert_eq!(groups(&a), vec![(4, vec![0, 3])]);
    let (offsets, indices) = a.kept_indices(&keep_without(&a, &[(0, 3)])).unwrap();
    assert_eq!(offsets, vec![0, 3, 6, 8, 11]);
    assert_eq!(indices, vec![0, 1, 2, 0, 1, 2, 0, 1, 0, 1, 2]);
}

#[test]
fn compatible_products_meet_in_a_mixed_radix() {
    // (2, 12) and (4, 6) of one axis refine to (2, 2, 6).
    let mut b = Builder::new();
    let x = b.axis(24);
    b.param(&[x]);
    let (a2, a12, c4, c6) = (b.axis(2), b.axis(12), b.axis(4), b.axis(6));
    b.product(x, &[a2, a12]);
    b.product(x, &[c4, c6]);
    let a = b.solve();
    assert_eq!(
        groups(&a).iter().map(|g| g.0).collect::<Vec<_>>(),
        vec![2, 2, 6]
    );
    assert!(a.conflicts().is_empty());
    assert_eq!(a.describe_axis(x).unwrap(), "product(g0[2], g1[2], g2[6])");
}

#[test]
fn irreconcilable_structures_are_frozen_and_reported() {
    // (6, 4) and (4, 6) of one axis share no mixed radix.
    let mut b = Builder::new();
    let x = b.axis(24);
    b.param(&[x]);
    let other = b.axis(5);
    b.param(&[other]);
    let (a6, a4, c4, c6) = (b.axis(6), b.axis(4), b.axis(4), b.axis(6));
    b.product(x, &[a6, a4]);
    b.product(x, &[c4, c6]);
    let a = b.solve();
    assert_eq!(groups(&a), vec![(5, vec![1])]);
    assert_eq!(a.conflicts(), &[1]);
}

#[test]
fn a_sum_meets_a_product_by_cutting_the_outer_factor() {
    // Fused q (3 heads) and kv (1 head each) viewed as 5 heads of 2.
    let mut b = Builder::new();
    let x = b.axis(10);
    b.param(&[x]);
    let (q, k, v) = (b.axis(6), b.axis(2), b.axis(2));
    b.sum(x, &[q, k, v]);
    let (heads, dim) = (b.axis(5), b.axis(2));
    b.product(x, &[heads, dim]);
    let a = b.solve();
    // The single k and v heads are frozen (removing one empties k or v).
    assert_eq!(
        a.describe_axis(x).unwrap(),
        "product(sum(g0[3], frozen[1], frozen[1]), g1[2])"
    );
    assert_eq!(a.describe_axis(k).unwrap(), "g1[2]");
}

#[test]
fn a_leaf_under_two_factors_of_one_product_is_frozen() {
    // x (4) = product(a, a); y (12) = product(sum(a, c), a) with s = sum(a, c)
    // reached through a chain of sums; z (6) = product(a, b) stays prunable.
    let mut b = Builder::new();
    let (x, a) = (b.axis(4), b.axis(2));
    b.product(x, &[a, a]);
    let (y, s, c, t) = (b.axis(12), b.axis(6), b.axis(4), b.axis(6));
    b.sum(s, &[a, c]);
    b.equal(t, s);
    b.product(y, &[t, a]);
    let (z, w, d) = (b.axis(6), b.axis(3), b.axis(2));
    b.product(z, &[w, d]);
    b.param(&[x]);
    b.param(&[y]);
    b.param(&[z, c]);
    let a_ = b.solve();
    assert_eq!(a_.conflicts(), &[-1]);
    assert_eq!(
        a_.describe_axis(x).unwrap(),
        "product(frozen[2], frozen[2])"
    );
    assert_eq!(
        a_.describe_axis(y).unwrap(),
        "product(sum(frozen[2], g0[4]), frozen[2])"
    );
    assert_eq!(a_.describe_axis(z).unwrap(), "product(g1[3], g2[2])");
    assert_eq!(
        groups(&a_),
        vec![(4, vec![1, 3]), (3, vec![2]), (2, vec![2])]
    );
}
