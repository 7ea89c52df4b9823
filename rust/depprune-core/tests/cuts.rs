//! Many cuts on one axis, in random orders, against what they must give:
//! the pieces between all the cuts, as groups left to right, with the members
//! and kept indices a flat list of pieces implies. These exercise the rope
//! behind sums (runs split by later cuts, views of ranges, path copies).

mod common;
use common::*;

/// splitmix64: a fixed-seed generator.
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
    /// `count` distinct cut offsets strictly inside `0..n`, sorted.
    fn cuts(&mut self, n: i64, count: usize) -> Vec<i64> {
        let mut cuts: Vec<i64> = (0..count)
            .map(|_| 1 + self.below(n as usize - 1) as i64)
            .collect();
        cuts.sort_unstable();
        cuts.dedup();
        cuts
    }
    fn shuffle<T>(&mut self, items: &mut [T]) {
        for i in (1..items.len()).rev() {
            items.swap(i, self.below(i + 1));
        }
    }
}

/// `sum(g0[s0], g1[s1], ...)` for consecutive groups from `first`, or the one
/// group alone.
fn described(first: usize, sizes: &[i64]) -> String {
    let leaves: Vec<String> = (0..sizes.len())
        .map(|g| format!("g{}[{}]", first + g, sizes[g]))
        .collect();
    match &leaves[..] {
        [one] => one.clone(),
        _ => format!("sum({})", leaves.join(", ")),
    }
}

/// The gaps between `0`, the cuts and `n`.
fn gaps(n: i64, cuts: &[i64]) -> Vec<i64> {
    let mut edges = vec![0];
    edges.extend_from_slice(cuts);
    edges.push(n);
    edges.windows(2).map(|w| w[1] - w[0]).collect()
}

#[test]
fn cuts_in_any_order_leave_the_pieces_between_them() {
    let mut rng = Rng(7);
    for _ in 0..400 {
        let n = 2 + rng.below(60) as i64;
        let mut b = Builder::new();
        let x = b.axis(n);
        b.row(0, 0, x);
        // Sums of x: (cut offsets, part axes); sometimes one wide one first,
        // which the rope keeps as one run until cuts split it.
        let mut sums: Vec<Vec<i64>> = Vec::new();
        if n >= 9 && rng.chance(0.4) {
            let wide = 8 + rng.below((n as usize - 8).min(40));
            sums.push(rng.cuts(n, wide));
        }
        let mut later: Vec<Vec<i64>> = (0..1 + rng.below(12))
            .map(|_| {
                let parts = if rng.chance(0.2) { 8 } else { 1 + rng.below(3) };
                rng.cuts(n, parts)
            })
            .collect();
        rng.shuffle(&mut later);
        sums.extend(later);
        // Rows on some parts: (row, start, end).
        let mut part_rows: Vec<(usize, i64, i64)> = Vec::new();
        let mut all_cuts: Vec<i64> = Vec::new();
        for cuts in &sums {
            let mut parts = Vec::new();
            let mut start = 0;
            for &end in cuts.iter().chain([&n]) {
                let part = b.axis(end - start);
                parts.push(part);
                if rng.chance(0.3) {
                    let row = b.row(part, 0, part);
                    part_rows.push((row, start, end));
                }
                start = end;
            }
            b.sum(x, &parts);
            all_cuts.extend_from_slice(cuts);
        }
        all_cuts.sort_unstable();
        all_cuts.dedup();
        let pieces = gaps(n, &all_cuts);

        let a = b.solve();
        assert!(a.conflicts().is_empty());
        // The pieces of x are the groups, left to right (x is row 0).
        let expected_sizes: Vec<i64> = pieces.clone();
        assert_eq!(a.group_sizes(), &expected_sizes[..]);
        assert_eq!(a.describe_axis(x).unwrap(), described(0, &pieces));
        // A group's members: x and every part row whose range holds it.
        let starts: Vec<i64> = std::iter::once(0).chain(all_cuts.iter().copied()).collect();
        for (g, (_, members)) in groups(&a).iter().enumerate() {
            let mut want = vec![0i64];
            for &(row, start, end) in &part_rows {
                if start <= starts[g] && starts[g] < end {
                    want.push(row as i64);
                }
            }
            assert_eq!(members, &want, "group {g}");
        }
        // Element i of x is unit i: kept indices follow the mask directly.
        let keep: Vec<u8> = (0..n).map(|_| u8::from(rng.chance(0.6))).collect();
        let kept: Vec<i64> = (0..n).filter(|&i| keep[i as usize] != 0).collect();
        assert_eq!(kept_of_row(&a, &keep, 0), kept);
        for &(row, start, end) in &part_rows {
            let want: Vec<i64> = (start..end)
                .filter(|&i| keep[i as usize] != 0)
                .map(|i| i - start)
                .collect();
            assert_eq!(kept_of_row(&a, &keep, row), want);
        }
        let sizes = a.kept_sizes(&keep).unwrap();
        assert_eq!(sizes[x as usize], kept.len() as i64);
    }
}

#[test]
fn cuts_through_a_product_cut_its_outer_factor() {
    let mut rng = Rng(11);
    for _ in 0..300 {
        // x = product(outer, inner); cuts of x on whole pairs of rows cut
        // the outer factor (into slices of at least 2), cuts of inner cut it.
        let (rows, width) = (2 * (1 + rng.below(8)) as i64, 2 + rng.below(5) as i64);
        let mut b = Builder::new();
        let x = b.axis(rows * width);
        b.row(0, 0, x);
        let (outer, inner) = (b.axis(rows), b.axis(width));
        let mut equations: Vec<(bool, Vec<i64>)> = Vec::new();
        for _ in 0..rng.below(6) {
            let count = 1 + rng.below(2);
            let pairs = rng.cuts(rows / 2 + 1, count);
            let pairs: Vec<i64> = pairs.into_iter().filter(|&p| 2 * p < rows).collect();
            if !pairs.is_empty() {
                equations.push((true, pairs.iter().map(|p| 2 * p).collect()));
            }
        }
        for _ in 0..rng.below(4) {
            let count = 1 + rng.below(2);
            equations.push((false, rng.cuts(width, count)));
        }
        rng.shuffle(&mut equations);
        // The product arrives anywhere among the cuts.
        let product_at = rng.below(equations.len() + 1);
        let (mut outer_cuts, mut inner_cuts) = (Vec::new(), Vec::new());
        for (i, (on_x, cuts)) in equations.iter().enumerate() {
            if i == product_at {
                b.product(x, &[outer, inner]);
            }
            let (axis, n, scale) = if *on_x {
                (x, rows, width)
            } else {
                (inner, width, 1)
            };
            let mut parts = Vec::new();
            let mut start = 0;
            for &end in cuts.iter().chain([&n]) {
                parts.push(b.axis((end - start) * scale));
                start = end;
            }
            b.sum(axis, &parts);
            if *on_x {
                outer_cuts.extend_from_slice(cuts);
            } else {
                inner_cuts.extend_from_slice(cuts);
            }
        }
        if product_at == equations.len() {
            b.product(x, &[outer, inner]);
        }
        for cuts in [&mut outer_cuts, &mut inner_cuts] {
            cuts.sort_unstable();
            cuts.dedup();
        }
        let (outer_pieces, inner_pieces) = (gaps(rows, &outer_cuts), gaps(width, &inner_cuts));

        let a = b.solve();
        assert!(a.conflicts().is_empty());
        // Pre-order of x: the outer pieces, then the inner ones.
        let expected: Vec<i64> = outer_pieces.iter().chain(&inner_pieces).copied().collect();
        assert_eq!(a.group_sizes(), &expected[..]);
        let described_x = format!(
            "product({}, {})",
            described(0, &outer_pieces),
            described(outer_pieces.len(), &inner_pieces)
        );
        assert_eq!(a.describe_axis(x).unwrap(), described_x);
        // Element (o, i) of x is kept iff outer unit o and inner unit i are.
        let keep: Vec<u8> = (0..rows + width)
            .map(|_| u8::from(rng.chance(0.7)))
            .collect();
        let kept: Vec<i64> = (0..rows * width)
            .filter(|f| keep[(f / width) as usize] != 0 && keep[(rows + f % width) as usize] != 0)
            .collect();
        assert_eq!(kept_of_row(&a, &keep, 0), kept);
    }
}
