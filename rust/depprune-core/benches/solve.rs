//! Criterion benchmarks of the core on synthetic equation sets shaped like
//! what the tracer emits for a Llama-style decoder (GQA, RoPE, SwiGLU MLP),
//! at 80 layers (the Llama-3-70B depth) and at 1M+ equations.
//!
//! Run: `cargo bench -p depprune-core --bench solve`; the `sum_parts`,
//! `cut_points`, `sum_chain`, `cut_points_shuffled`, `product_cuts` and
//! `parts_then_cuts` groups grow by 10x per case.

use criterion::{black_box, criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use depprune_core::EquationBuilder;

/// Llama-shaped equation sets, written op by op the way the tracer does.
struct Equations(EquationBuilder);

impl std::ops::Deref for Equations {
    type Target = EquationBuilder;
    fn deref(&self) -> &EquationBuilder {
        &self.0
    }
}

impl std::ops::DerefMut for Equations {
    fn deref_mut(&mut self) -> &mut EquationBuilder {
        &mut self.0
    }
}

impl Equations {
    fn eq(&mut self, kind: i64, left: i64, right: &[i64]) {
        match kind {
            0 => self.0.equal(left, right[0]),
            1 => self.0.sum(left, right),
            _ => self.0.product(left, right),
        }
    }
    /// A new axis equal to `of` (an elementwise op's output, a transpose's rename).
    fn same(&mut self, of: i64) -> i64 {
        let size = self.sizes[of as usize];
        let a = self.axis(size);
        self.eq(0, a, &[of]);
        a
    }
    /// A linear layer reading `input`: returns its output axis.
    fn linear(&mut self, input: i64, out: i64) -> i64 {
        let in_size = self.sizes[input as usize];
        let (w_out, w_in) = (self.axis(out), self.axis(in_size));
        self.0.param(&[w_out, w_in]);
        self.eq(0, w_in, &[input]);
        self.same(w_out)
    }
    /// RMSNorm as it decomposes: pow, mean, add eps, rsqrt, mul, mul weight.
    fn rms_norm(&mut self, x: i64) -> i64 {
        // x.pow(2).mean(-1) reduces the hidden axis away: no equation for it.
        let normed = self.same(x);
        let size = self.sizes[x as usize];
        let w = self.axis(size);
        self.0.param(&[w]);
        let out = self.same(normed);
        self.eq(0, out, &[w]);
        out
    }
    /// q or k after view to heads, transpose and rotary embedding: (heads, head_dim).
    fn heads_with_rope(&mut self, projected: i64, heads: i64, head_dim: i64) -> (i64, i64) {
        let (h, d) = (self.axis(heads), self.axis(head_dim));
        self.eq(2, projected, &[h, d]);
        let (h, d) = (self.same(h), self.same(d)); // transpose
        let (x1, x2) = (self.axis(head_dim / 2), self.axis(head_dim / 2));
        self.eq(1, d, &[x1, x2]);
        let neg = self.same(x2);
        let rotated = self.axis(head_dim);
        self.eq(1, rotated, &[neg, x1]);
        let with_cos = self.same(d);
        let with_sin = self.same(rotated);
        let out = self.same(with_cos);
        self.eq(0, out, &[with_sin]);
        (h, out)
    }

    fn llama(layers: usize, hidden: i64, heads: i64, kv_heads: i64, intermediate: i64) -> Self {
        let mut e = Equations(EquationBuilder::new());
        let head_dim = hidden / heads;
        let (vocab, emb) = (e.axis(1000), e.axis(hidden));
        e.0.param(&[vocab, emb]);
        e.freeze(vocab);
        let mut x = e.same(emb);
        for _ in 0..layers {
            let normed = e.rms_norm(x);
            let q = e.linear(normed, heads * head_dim);
            let k = e.linear(normed, kv_heads * head_dim);
            let v = e.linear(normed, kv_heads * head_dim);
            let (qh, qd) = e.heads_with_rope(q, heads, head_dim);
            let (kh, kd) = e.heads_with_rope(k, kv_heads, head_dim);
            let (vh, vd) = (e.axis(kv_heads), e.axis(head_dim));
            e.eq(2, v, &[vh, vd]);
            // repeat_kv: expand a fresh axis, reshape to heads.
            let (k_rep, v_rep) = (e.axis(heads / kv_heads), e.axis(heads / kv_heads));
            let (k_all, v_all) = (e.axis(heads), e.axis(heads));
            e.eq(2, k_all, &[kh, k_rep]);
            e.eq(2, v_all, &[vh, v_rep]);
            // sdpa: batched over heads, q.d == k.d, output head_dim from v.
            e.eq(0, qh, &[k_all]);
            e.eq(0, k_all, &[v_all]);
            e.eq(0, qd, &[kd]);
            let (oh, od) = (e.same(v_all), e.same(vd));
            let merged = e.axis(heads * head_dim);
            e.eq(2, merged, &[oh, od]);
            let attn = e.linear(merged, hidden);
            let after_attn = e.same(x);
            e.eq(0, after_attn, &[attn]);
            let normed = e.rms_norm(after_attn);
            let gate = e.linear(normed, intermediate);
            let up = e.linear(normed, intermediate);
            let act = e.same(gate);
            let prod = e.same(act);
            e.eq(0, prod, &[up]);
            let down = e.linear(prod, hidden);
            x = e.same(after_attn);
            e.eq(0, x, &[down]);
        }
        let normed = e.rms_norm(x);
        let logits = e.linear(normed, 1000);
        e.freeze(logits);
        e
    }
}

fn bench_llama(c: &mut Criterion) {
    let mut group = c.benchmark_group("analyze_llama");
    group.sample_size(10);
    // (name, layers): the 70B depth, then enough layers for over a million equations.
    for (name, layers) in [
        ("80_layers_70b_shape", 80),
        ("20000_layers_1m_equations", 20_000),
    ] {
        let e = Equations::llama(layers, 8192, 64, 8, 28672);
        let analysis = e.analyze().expect("valid");
        assert_eq!(analysis.conflicts(), &[] as &[i64]);
        // hidden, then per layer: KV heads, query slots, rotary half head_dim, v head_dim, MLP.
        assert_eq!(analysis.num_groups(), 1 + 5 * layers);
        group.throughput(Throughput::Elements(e.num_equations() as u64));
        group.bench_with_input(BenchmarkId::new(name, e.num_equations()), &e, |b, e| {
            b.iter(|| black_box(e).analyze().expect("valid"))
        });
    }
    group.finish();
}

fn bench_kept_indices(c: &mut Criterion) {
    let analysis = Equations::llama(80, 8192, 64, 8, 28672)
        .analyze()
        .expect("valid");
    // Remove every other unit of every group: the 50% plan of the 70B shape.
    let keep: Vec<u8> = (0..analysis.num_units()).map(|u| (u % 2) as u8).collect();
    let mut group = c.benchmark_group("kept_indices_llama");
    group.sample_size(10);
    group.bench_function("80_layers_70b_shape", |b| {
        b.iter(|| analysis.kept_indices(black_box(&keep)).expect("valid"))
    });
    group.finish();
}

/// One axis cut into `k` parts by a single `sum` equation (a wide concat).
fn sum_parts(k: usize) -> EquationBuilder {
    let mut b = EquationBuilder::new();
    let x = b.axis(2 * k as i64);
    let parts: Vec<i64> = (0..k).map(|_| b.axis(2)).collect();
    b.sum(x, &parts);
    b.param(&[x]);
    b
}

/// One axis given `k` distinct cut points by `k` two-part `sum` equations.
fn cut_points(k: usize) -> EquationBuilder {
    let mut b = EquationBuilder::new();
    let n = k as i64 + 1;
    let x = b.axis(n);
    for i in 1..n {
        let (head, tail) = (b.axis(i), b.axis(n - i));
        b.sum(x, &[head, tail]);
    }
    b.param(&[x]);
    b
}

/// The positions `1..=k` in a fixed pseudo-random order (splitmix64 keys).
fn shuffled(k: usize) -> Vec<i64> {
    let key = |i: i64| {
        let mut z = (i as u64).wrapping_mul(0x9E3779B97F4A7C15);
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58476D1CE4E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D049BB133111EB);
        z ^ (z >> 31)
    };
    let mut positions: Vec<i64> = (1..=k as i64).collect();
    positions.sort_by_key(|&i| key(i));
    positions
}

/// `cut_points` with the cuts arriving in a shuffled order, not left to right.
fn cut_points_shuffled(k: usize) -> EquationBuilder {
    let mut b = EquationBuilder::new();
    let n = k as i64 + 1;
    let x = b.axis(n);
    for i in shuffled(k) {
        let (head, tail) = (b.axis(i), b.axis(n - i));
        b.sum(x, &[head, tail]);
    }
    b.param(&[x]);
    b
}

/// Cuts through a product: `x = product(outer, inner)`, `k` rows of `k / 2 +
/// 1`; then, interleaved and in shuffled orders, cuts of `x` after every
/// other row (each cuts the outer factor, into pieces of 2 rows) and cuts of
/// the inner factor at every position: about `k` cuts, `k + 1` groups.
fn product_cuts(k: usize) -> EquationBuilder {
    let mut b = EquationBuilder::new();
    let m = (k / 2) as i64;
    let (outer, inner) = (b.axis(2 * m), b.axis(m + 1));
    let x = b.axis(2 * m * (m + 1));
    b.product(x, &[outer, inner]);
    let mut rows = shuffled(m as usize - 1).into_iter();
    for j in shuffled(m as usize) {
        if let Some(r) = rows.next() {
            let (head, tail) = (b.axis(2 * r * (m + 1)), b.axis(2 * (m - r) * (m + 1)));
            b.sum(x, &[head, tail]);
        }
        let (head, tail) = (b.axis(j), b.axis(m + 1 - j));
        b.sum(inner, &[head, tail]);
    }
    b.param(&[x]);
    b
}

/// One `sum` of `k / 2` parts of 2, then a cut in the middle of each part,
/// in a shuffled order (a wide concat whose parts are then split).
fn parts_then_cuts(k: usize) -> EquationBuilder {
    let mut b = EquationBuilder::new();
    let n = k as i64;
    let x = b.axis(n);
    let parts: Vec<i64> = (0..k / 2).map(|_| b.axis(2)).collect();
    b.sum(x, &parts);
    for i in shuffled(k / 2) {
        let (head, tail) = (b.axis(2 * i - 1), b.axis(n - 2 * i + 1));
        b.sum(x, &[head, tail]);
    }
    b.param(&[x]);
    b
}

/// An axis split off one element at a time, `k` sums deep, then merged with
/// another axis by a product (so the chain lies under a product's factor).
fn sum_chain(k: usize) -> EquationBuilder {
    let mut b = EquationBuilder::new();
    let n = k as i64 + 1;
    let top = b.axis(n);
    let mut x = top;
    for i in 0..k as i64 {
        let (inner, one) = (b.axis(n - 1 - i), b.axis(1));
        b.sum(x, &[inner, one]);
        x = inner;
    }
    let (merged, two) = (b.axis(2 * n), b.axis(2));
    b.product(merged, &[top, two]);
    b.param(&[top]);
    b.param(&[merged]);
    b
}

/// A named family of equation sets and the sizes it is benchmarked at.
type Case = (&'static str, fn(usize) -> EquationBuilder, [usize; 3]);

/// Cases that grow by 10x: the time should grow about as fast.
fn bench_scaling(c: &mut Criterion) {
    let cases: [Case; 6] = [
        ("sum_parts", sum_parts, [2_000, 20_000, 200_000]),
        ("cut_points", cut_points, [30, 300, 3_000]),
        ("sum_chain", sum_chain, [1_000, 10_000, 100_000]),
        ("cut_points_shuffled", cut_points_shuffled, [30, 300, 3_000]),
        ("product_cuts", product_cuts, [30, 300, 3_000]),
        ("parts_then_cuts", parts_then_cuts, [300, 3_000, 30_000]),
    ];
    for (name, make, sizes) in cases {
        let mut group = c.benchmark_group(name);
        group.sample_size(10);
        for k in sizes {
            let e = make(k);
            let groups = e.analyze().expect("valid").num_groups();
            assert!((k..=k + 2).contains(&groups), "{name}/{k}: {groups} groups");
            group.bench_with_input(BenchmarkId::from_parameter(k), &e, |b, e| {
                b.iter(|| black_box(e).analyze().expect("valid"))
            });
        }
        group.finish();
    }
}

criterion_group!(benches, bench_llama, bench_kept_indices, bench_scaling);
criterion_main!(benches);
