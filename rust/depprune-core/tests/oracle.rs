//! Property tests: on thousands of random small equation sets, the core's
//! groups describe exactly the consistent prunings an element-level brute
//! force finds (sound always; complete whenever the core reports no freeze
//! it had to make), and unit maps agree with kept indices.

mod common;
use common::*;
use proptest::prelude::*;
use std::collections::HashSet;

/// splitmix64: a tiny deterministic generator driven by proptest's seed.
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E3779B97F4A7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58476D1CE4E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D049BB133111EB);
        z ^ (z >> 31)
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
    fn chance(&mut self, p: f64) -> bool {
        (self.next() as f64 / u64::MAX as f64) < p
    }
}

#[derive(Debug, Clone)]
enum Expr {
    Leaf(usize),
    Sum(Vec<Expr>),
    Product(Vec<Expr>),
}

fn size_of(e: &Expr, leaves: &[i64]) -> i64 {
    match e {
        Expr::Leaf(l) => leaves[*l],
        Expr::Sum(c) => c.iter().map(|x| size_of(x, leaves)).sum(),
        Expr::Product(c) => c.iter().map(|x| size_of(x, leaves)).product(),
    }
}

fn random_expr(rng: &mut Rng, leaves: &[i64], depth: usize) -> Expr {
    if depth == 0 || rng.chance(0.35) {
        return Expr::Leaf(rng.below(leaves.len()));
    }
    let n = 2 + rng.below(2);
    let children = (0..n)
        .map(|_| random_expr(rng, leaves, depth - 1))
        .collect();
    if rng.chance(0.5) {
        Expr::Sum(children)
    } else {
        Expr::Product(children)
    }
}

/// Emit axes and equations for `e`, with random regrouping and aliasing so
/// the core has to rediscover the structure.
fn emit(rng: &mut Rng, b: &mut Builder, e: &Expr, leaves: &[i64], leaf_axes: &[i64]) -> i64 {
    match e {
        Expr::Leaf(l) => {
            if rng.chance(0.5) {
                leaf_axes[*l]
            } else {
                let a = b.axis(leaves[*l]);
                if rng.chance(0.5) {
                    b.equal(a, leaf_axes[*l]);
                } else {
                    b.equal(leaf_axes[*l], a);
                }
                a
            }
        }
        Expr::Sum(c) | Expr::Product(c) => {
            let is_sum = matches!(e, Expr::Sum(_));
            let mut axes: Vec<i64> = c
                .iter()
                .map(|x| emit(rng, b, x, leaves, leaf_axes))
                .collect();
            let sizes: Vec<i64> = c.iter().map(|x| size_of(x, leaves)).collect();
            let combine = |s: &[i64]| -> i64 {
                if is_sum {
                    s.iter().sum()
                } else {
                    s.iter().product()
                }
            };
            if axes.len() >= 3 && rng.chance(0.4) {
                let k = 1 + rng.below(axes.len() - 1);
                let start = if rng.chance(0.5) {
                    0
                } else {
                    axes.len() - k - usize::from(k == axes.len())
                };
                let span = start..(start + k).min(axes.len());
                if span.len() >= 2 {
                    let mid = b.axis(combine(&sizes[span.clone()]));
                    if is_sum {
                        b.sum(mid, &axes[span.clone()])
                    } else {
                        b.product(mid, &axes[span.clone()])
                    }
                    axes.splice(span, [mid]);
                }
            }
            let a = b.axis(size_of(e, leaves));
            if is_sum {
                b.sum(a, &axes)
            } else {
                b.product(a, &axes)
            }
            a
        }
    }
}

fn random_instance(seed: u64) -> Builder {
    let mut rng = Rng(seed);
    let mut b = Builder::new();
    let leaves: Vec<i64> = (0..1 + rng.below(4))
        .map(|_| [1, 2, 2, 3, 4][rng.below(5)])
        .collect();
    let leaf_axes: Vec<i64> = leaves.iter().map(|&s| b.axis(s)).collect();
    for _ in 0..1 + rng.below(3) {
        let e = loop {
            let e = random_expr(&mut rng, &leaves, 3);
            if size_of(&e, &leaves) <= 16 {
                break e;
            }
        };
        let a = emit(&mut rng, &mut b, &e, &leaves, &leaf_axes);
        if rng.chance(0.4) {
            let again = emit(&mut rng, &mut b, &e, &leaves, &leaf_axes);
            b.equal(a, again);
        }
    }
    // Noise: equalities the ground truth does not imply, and freezes.
    for _ in 0..rng.below(4) {
        let (x, y) = (rng.below(b.sizes.len()), rng.below(b.sizes.len()));
        if b.sizes[x] == b.sizes[y] {
            b.equal(x as i64, y as i64);
        }
    }
    // Noise: a random cut or factorisation of an existing axis, so that
    // structures meet in every combination (aligned or not).
    for _ in 0..rng.below(3) {
        let x = rng.below(b.sizes.len());
        let n = b.sizes[x];
        if n < 2 {
            continue;
        }
        if rng.chance(0.5) {
            let cut = 1 + rng.below(n as usize - 1) as i64;
            let (p, q) = (b.axis(cut), b.axis(n - cut));
            b.sum(x as i64, &[p, q]);
        } else if let Some(f) = (2..n).find(|f| n % f == 0 && rng.chance(0.6)) {
            let (p, q) = (b.axis(f), b.axis(n / f));
            b.product(x as i64, &[p, q]);
        }
    }
    if rng.chance(0.15) {
        let x = rng.below(b.sizes.len()) as i64;
        b.freeze(x);
    }
    // Every axis is a parameter row, so every leaf is some group or frozen.
    for axis in 0..b.sizes.len() as i64 {
        b.row(axis, 0, axis);
    }
    b
}

/// Returns whether the instance was checked (false: too large to enumerate).
fn check_against_oracle(b: &Builder) -> bool {
    let a = b.solve();
    let units = a.num_units() as usize;
    if units > 12 {
        return false;
    }
    let oracle = Oracle::new(b);
    let Some(solutions) = oracle.count_solutions(2_000_000) else {
        return false;
    };
    let groups = groups(&a);
    let maps: Vec<Vec<(usize, Vec<i64>)>> = (0..groups.len())
        .map(|g| {
            groups[g]
                .1
                .iter()
                .map(|&row| (row as usize, unit_map(&a, g, row as usize)))
                .collect()
        })
        .collect();
    let mut images = HashSet::new();
    for config in 0..(1u32 << units) {
        let keep: Vec<u8> = (0..units).map(|u| ((config >> u) & 1) as u8).collect();
        let (offsets, indices) = a.kept_indices(&keep).unwrap();
        let mut kept = vec![false; oracle.num_vars];
        for (row, &axis) in b.row_axes.iter().enumerate() {
            for &i in &indices[offsets[row] as usize..offsets[row + 1] as usize] {
                kept[oracle.axis_base[axis as usize] + i as usize] = true;
            }
        }
        assert!(
            oracle.satisfied(&kept),
            "unsound: config {config:#b} breaks an equation"
        );
        // Unit maps: an index is kept iff every unit it lies on is kept.
        for row in 0..b.row_axes.len() {
            let size = b.sizes[b.row_axes[row] as usize] as usize;
            let mut expected = vec![true; size];
            for (g, members) in maps.iter().enumerate() {
                for (_, map) in members.iter().filter(|(r, _)| *r == row) {
                    for (i, &u) in map.iter().enumerate() {
                        if u >= 0 && keep[(a.unit_offsets()[g] + u) as usize] == 0 {
                            expected[i] = false;
                        }
                    }
                }
            }
            let got: Vec<i64> = indices[offsets[row] as usize..offsets[row + 1] as usize].to_vec();
            let want: Vec<i64> = (0..size as i64).filter(|&i| expected[i as usize]).collect();
            assert_eq!(
                got, want,
                "unit maps disagree with kept indices on row {row}"
            );
        }
        if oracle.no_axis_emptied(&kept) {
            images.insert(kept);
        }
    }
    if a.conflicts().is_empty() {
        assert_eq!(
            images.len(),
            solutions,
            "incomplete: the groups miss consistent prunings"
        );
    } else {
        assert!(images.len() <= solutions);
    }
    true
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 3000, ..ProptestConfig::default() })]

    #[test]
    fn groups_match_the_element_level_oracle(seed in any::<u64>()) {
        let b = random_instance(seed);
        prop_assume!(check_against_oracle(&b));
    }
}

#[test]
fn most_random_instances_are_checked_and_conflict_free() {
    let (mut checked, mut exact) = (0, 0);
    for seed in 0..400 {
        let b = random_instance(seed);
        if check_against_oracle(&b) {
            checked += 1;
            exact += usize::from(b.solve().conflicts().is_empty());
        }
    }
    eprintln!("checked {checked}, exact {exact}");
    assert!(
        checked > 300,
        "only {checked} of 400 instances were small enough"
    );
    assert!(exact > checked / 2, "only {exact} of {checked} were exact");
}
