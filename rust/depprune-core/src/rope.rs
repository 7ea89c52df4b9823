//! The pieces of a sum as a persistent balanced tree (an AVL rope).
//!
//! A rope's leaves are single pieces or *runs* (pieces listed once, as one
//! slice, the way a sum's parts arrive); its inner nodes cache the size, the
//! number of pieces and the height of what lies below. Finding the piece at
//! an offset and replacing a piece by several are O(log n), and nothing is
//! changed once made: a rope is a snapshot that later cuts leave as it was,
//! and a run is split by making two runs over parts of its slice. A [`View`]
//! names a range of a snapshot in O(1), so a child that covers many pieces
//! is given a view instead of a list of them. This is what keeps many cuts
//! on one axis near-linear: each new cut copies one root-to-piece path, and
//! the part of the axis before the cut is a view.

/// A rope, as a tagged id: one piece (a store node), a run or an inner node.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Rope(u64);

const TAG: u64 = 3 << 62;
const RUN: u64 = 1 << 62;
const JOIN: u64 = 2 << 62;

/// Sums of fewer pieces are trees of single pieces: a run saves memory on
/// long lists, and a short one would only be split again by the next cut.
const RUN_AT_LEAST: usize = 8;

/// What a [`Rope`] id names.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Node {
    Piece(usize),
    Run(usize),
    Join(usize),
}

impl Rope {
    pub fn run(index: usize) -> Self {
        Rope(RUN | index as u64)
    }

    pub fn join(index: usize) -> Self {
        Rope(JOIN | index as u64)
    }

    pub fn node(self) -> Node {
        let index = (self.0 & !TAG) as usize;
        match self.0 & TAG {
            RUN => Node::Run(index),
            JOIN => Node::Join(index),
            _ => Node::Piece(index),
        }
    }
}

/// The pieces of `rope` that cover `[start, end)`, both on piece boundaries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct View {
    pub rope: Rope,
    pub start: u64,
    pub end: u64,
}

#[derive(Debug, Clone, Copy)]
struct Join {
    left: Rope,
    right: Rope,
    size: u64,
    count: u64,
    height: u32,
    /// Whether a run lies below (else every piece boundary is a node boundary).
    has_run: bool,
}

/// `len` pieces of `listed` from `first`; `base` is the offset (in the slice
/// it was cut from) where the first one starts.
#[derive(Debug, Clone, Copy)]
struct Run {
    first: usize,
    len: usize,
    base: u64,
    size: u64,
}

/// The arena that owns every run and inner node made so far.
#[derive(Debug, Clone, Default)]
pub(crate) struct Ropes {
    joins: Vec<Join>,
    runs: Vec<Run>,
    /// `(offset, node)` of the pieces of every run, slice after slice.
    listed: Vec<(u64, usize)>,
    /// The size of each store node that is a piece of some rope.
    piece_size: Vec<u64>,
}

impl Ropes {
    /// Number of inner nodes ever made (ids `0..num_joins`).
    pub fn num_joins(&self) -> usize {
        self.joins.len()
    }

    /// Number of runs ever made (ids `0..num_runs`).
    pub fn num_runs(&self) -> usize {
        self.runs.len()
    }

    /// The two halves of inner node `join`.
    pub fn halves(&self, join: usize) -> (Rope, Rope) {
        let j = &self.joins[join];
        (j.left, j.right)
    }

    /// Where run `run`'s pieces lie in [`Self::listed_nodes`]: runs cut from
    /// one list share it.
    pub fn run_span(&self, run: usize) -> std::ops::Range<usize> {
        let r = self.runs[run];
        r.first..r.first + r.len
    }

    /// The store node of every listed piece, list after list.
    pub fn listed_nodes(&self) -> impl Iterator<Item = usize> + '_ {
        self.listed.iter().map(|&(_, n)| n)
    }

    /// A rope of one piece.
    pub fn piece(&mut self, node: usize, size: u64) -> Rope {
        if self.piece_size.len() <= node {
            self.piece_size.resize(node + 1, 0);
        }
        self.piece_size[node] = size;
        Rope(node as u64)
    }

    pub fn size(&self, rope: Rope) -> u64 {
        match rope.node() {
            Node::Piece(node) => self.piece_size[node],
            Node::Run(run) => self.runs[run].size,
            Node::Join(join) => self.joins[join].size,
        }
    }

    /// Number of pieces.
    pub fn count(&self, rope: Rope) -> usize {
        match rope.node() {
            Node::Piece(_) => 1,
            Node::Run(run) => self.runs[run].len,
            Node::Join(join) => self.joins[join].count as usize,
        }
    }

    fn has_run(&self, rope: Rope) -> bool {
        match rope.node() {
            Node::Piece(_) => false,
            Node::Run(_) => true,
            Node::Join(join) => self.joins[join].has_run,
        }
    }

    fn height(&self, rope: Rope) -> u32 {
        match rope.node() {
            Node::Join(join) => self.joins[join].height,
            _ => 1,
        }
    }

    /// A new inner node over two ropes whose heights differ by at most one.
    fn join(&mut self, left: Rope, right: Rope) -> Rope {
        self.joins.push(Join {
            left,
            right,
            size: self.size(left) + self.size(right),
            count: (self.count(left) + self.count(right)) as u64,
            height: 1 + self.height(left).max(self.height(right)),
            has_run: self.has_run(left) || self.has_run(right),
        });
        Rope::join(self.joins.len() - 1)
    }

    /// Join two ropes whose heights differ by at most two, rotating once or
    /// twice where they differ by two (the AVL rebalancing step).
    fn balance(&mut self, left: Rope, right: Rope) -> Rope {
        let (hl, hr) = (self.height(left), self.height(right));
        if hl > hr + 1 {
            let (a, b) = self.halves_of(left);
            if self.height(a) >= self.height(b) {
                let inner = self.join(b, right);
                self.join(a, inner)
            } else {
                let (b1, b2) = self.halves_of(b);
                let (l, r) = (self.join(a, b1), self.join(b2, right));
                self.join(l, r)
            }
        } else if hr > hl + 1 {
            let (a, b) = self.halves_of(right);
            if self.height(b) >= self.height(a) {
                let inner = self.join(left, a);
                self.join(inner, b)
            } else {
                let (a1, a2) = self.halves_of(a);
                let (l, r) = (self.join(left, a1), self.join(a2, b));
                self.join(l, r)
            }
        } else {
            self.join(left, right)
        }
    }

    /// The halves of a rope known to be an inner node (taller than a leaf).
    fn halves_of(&self, rope: Rope) -> (Rope, Rope) {
        match rope.node() {
            Node::Join(join) => self.halves(join),
            _ => unreachable!("a leaf has height 1 and no halves"),
        }
    }

    /// `left` then `right`: O(difference of their heights + 1).
    pub fn concat(&mut self, left: Rope, right: Rope) -> Rope {
        let (hl, hr) = (self.height(left), self.height(right));
        if hl > hr + 1 {
            let (a, b) = self.halves_of(left);
            let tail = self.concat(b, right);
            self.balance(a, tail)
        } else if hr > hl + 1 {
            let (a, b) = self.halves_of(right);
            let head = self.concat(left, a);
            self.balance(head, b)
        } else {
            self.join(left, right)
        }
    }

    fn concat_parts(&mut self, left: Option<Rope>, right: Option<Rope>) -> Option<Rope> {
        match (left, right) {
            (Some(l), Some(r)) => Some(self.concat(l, r)),
            (l, r) => l.or(r),
        }
    }

    /// A rope over `nodes` (at least one, sized by `sizes[node]`) in order:
    /// one run when there are many, else a balanced tree (whose every piece
    /// boundary is already a node boundary, so views of it need no splitting).
    pub fn rope_over(&mut self, nodes: &[usize], sizes: &[u64]) -> Rope {
        if nodes.len() < RUN_AT_LEAST {
            return self.tree_of(nodes, sizes);
        }
        let first = self.listed.len();
        let mut offset = 0;
        for &node in nodes {
            self.piece(node, sizes[node]);
            self.listed.push((offset, node));
            offset += sizes[node];
        }
        self.runs.push(Run {
            first,
            len: nodes.len(),
            base: 0,
            size: offset,
        });
        Rope::run(self.runs.len() - 1)
    }

    /// A balanced tree over `nodes` (at least one, sized by `sizes[node]`),
    /// no run.
    pub fn tree_of(&mut self, nodes: &[usize], sizes: &[u64]) -> Rope {
        if let &[node] = nodes {
            return self.piece(node, sizes[node]);
        }
        let (l, r) = nodes.split_at(nodes.len() / 2);
        let (l, r) = (self.tree_of(l, sizes), self.tree_of(r, sizes));
        self.join(l, r)
    }

    /// Pieces `i..j` of run `run` as a rope of their own.
    fn sub_run(&mut self, run: usize, i: usize, j: usize) -> Rope {
        let r = self.runs[run];
        if i == 0 && j == r.len {
            return Rope::run(run);
        }
        let (offset, node) = self.listed[r.first + i];
        let end = self
            .listed
            .get(r.first + j)
            .filter(|_| j < r.len)
            .map_or(r.base + r.size, |&(o, _)| o);
        if j - i == 1 {
            return self.piece(node, end - offset);
        }
        self.runs.push(Run {
            first: r.first + i,
            len: j - i,
            base: offset,
            size: end - offset,
        });
        Rope::run(self.runs.len() - 1)
    }

    /// The index in run `run` of the first piece that starts at or after `at`.
    fn run_index(&self, run: usize, at: u64) -> usize {
        let r = self.runs[run];
        let slice = &self.listed[r.first..r.first + r.len];
        slice.partition_point(|&(offset, _)| offset < r.base + at)
    }

    /// Cut `rope` at offset `at`, which must fall on a piece boundary (or at
    /// either end): the pieces before it and the pieces after it.
    pub fn split(&mut self, rope: Rope, at: u64) -> (Option<Rope>, Option<Rope>) {
        if at == 0 {
            return (None, Some(rope));
        }
        if at == self.size(rope) {
            return (Some(rope), None);
        }
        match rope.node() {
            Node::Piece(_) => unreachable!("cut {at} falls inside a piece"),
            Node::Run(run) => {
                let (i, len) = (self.run_index(run, at), self.runs[run].len);
                (
                    Some(self.sub_run(run, 0, i)),
                    Some(self.sub_run(run, i, len)),
                )
            }
            Node::Join(join) => {
                let (left, right) = self.halves(join);
                let left_size = self.size(left);
                if at <= left_size {
                    let (before, after) = self.split(left, at);
                    (before, self.concat_parts(after, Some(right)))
                } else {
                    let (before, after) = self.split(right, at - left_size);
                    (self.concat_parts(Some(left), before), after)
                }
            }
        }
    }

    /// The pieces covering `[start, end)`, both on piece boundaries, start < end.
    pub fn range(&mut self, rope: Rope, start: u64, end: u64) -> Rope {
        let (head, _) = self.split(rope, end);
        let (_, range) = self.split(head.expect("a non-empty range"), start);
        range.expect("a non-empty range")
    }

    /// `rope` with the pieces covering `[start, end)` replaced by `with`:
    /// one path is copied when the range lies in one subtree.
    pub fn replace(&mut self, rope: Rope, start: u64, end: u64, with: Rope) -> Rope {
        if start == 0 && end == self.size(rope) {
            return with;
        }
        if let Node::Join(join) = rope.node() {
            let (left, right) = self.halves(join);
            let left_size = self.size(left);
            if end <= left_size {
                let left = self.replace(left, start, end, with);
                return self.concat(left, right);
            }
            if start >= left_size {
                let right = self.replace(right, start - left_size, end - left_size, with);
                return self.concat(left, right);
            }
        }
        let (before, rest) = self.split(rope, start);
        let (_, after) = self.split(rest.expect("a non-empty range"), end - start);
        let head = self.concat_parts(before, Some(with));
        self.concat_parts(head, after).expect("not empty")
    }

    /// `rope` with no run straddling offset `at` (a piece boundary), so that
    /// views ending there are covered by whole nodes: one path is copied.
    pub fn align(&mut self, rope: Rope, at: u64) -> Rope {
        if at == 0 || at == self.size(rope) || !self.has_run(rope) {
            return rope;
        }
        match rope.node() {
            Node::Piece(_) => rope,
            Node::Run(_) => {
                let (before, after) = self.split(rope, at);
                self.concat(before.expect("inside"), after.expect("inside"))
            }
            Node::Join(join) => {
                let (left, right) = self.halves(join);
                let left_size = self.size(left);
                if at == left_size {
                    return rope;
                }
                let (left, right) = if at < left_size {
                    (self.align(left, at), right)
                } else {
                    (left, self.align(right, at - left_size))
                };
                if (left, right) == self.halves(join) {
                    return rope;
                }
                self.concat(left, right)
            }
        }
    }

    /// The whole of `rope` as a view.
    pub fn whole(&self, rope: Rope) -> View {
        View {
            rope,
            start: 0,
            end: self.size(rope),
        }
    }

    /// The piece holding offset `at` (< size) and the offset where it starts.
    pub fn locate(&self, mut rope: Rope, mut at: u64) -> (usize, u64) {
        let mut start = 0;
        loop {
            match rope.node() {
                Node::Piece(node) => return (node, start),
                Node::Run(run) => {
                    let r = self.runs[run];
                    let slice = &self.listed[r.first..r.first + r.len];
                    let i = slice.partition_point(|&(offset, _)| offset <= r.base + at) - 1;
                    let (offset, node) = slice[i];
                    return (node, start + offset - r.base);
                }
                Node::Join(join) => {
                    let (left, right) = self.halves(join);
                    let left_size = self.size(left);
                    if at < left_size {
                        rope = left;
                    } else {
                        (rope, at, start) = (right, at - left_size, start + left_size);
                    }
                }
            }
        }
    }

    /// The number of pieces that start before offset `at` (a piece boundary).
    fn count_before(&self, mut rope: Rope, mut at: u64) -> usize {
        let mut count = 0;
        loop {
            if at == 0 {
                return count;
            }
            if at == self.size(rope) {
                return count + self.count(rope);
            }
            match rope.node() {
                Node::Piece(_) => unreachable!("offset {at} falls inside a piece"),
                Node::Run(run) => return count + self.run_index(run, at),
                Node::Join(join) => {
                    let (left, right) = self.halves(join);
                    let left_size = self.size(left);
                    if at <= left_size {
                        rope = left;
                    } else {
                        (count, rope, at) = (count + self.count(left), right, at - left_size);
                    }
                }
            }
        }
    }

    /// Number of pieces of a view.
    pub fn count_in(&self, view: View) -> usize {
        self.count_before(view.rope, view.end) - self.count_before(view.rope, view.start)
    }

    /// The fewest nodes that cover a view, left to right: whole subtrees, and
    /// the pieces one by one of a run that a view end falls inside (never
    /// many: views are made on aligned ropes, see [`Self::align`]).
    pub fn cover(&self, view: View) -> Vec<Rope> {
        let mut out = Vec::new();
        self.each_cover(view.rope, 0, view, &mut |rope| out.push(rope));
        out
    }

    /// Call `f` on each node of the cover of `view` below `rope` (at `offset`).
    /// Recursive: a rope is no deeper than its AVL height.
    fn each_cover(&self, rope: Rope, offset: u64, view: View, f: &mut impl FnMut(Rope)) {
        let end = offset + self.size(rope);
        if end <= view.start || offset >= view.end {
            return;
        }
        if view.start <= offset && end <= view.end {
            return f(rope);
        }
        match rope.node() {
            Node::Piece(_) => unreachable!("a view ends on piece boundaries"),
            Node::Run(run) => {
                let r = self.runs[run];
                let i = self.run_index(run, view.start.saturating_sub(offset));
                let j = self.run_index(run, view.end - offset);
                for &(_, node) in &self.listed[r.first + i..r.first + j] {
                    f(Rope(node as u64));
                }
            }
            Node::Join(join) => {
                let (left, right) = self.halves(join);
                self.each_cover(left, offset, view, f);
                self.each_cover(right, offset + self.size(left), view, f);
            }
        }
    }

    /// Call `f` on every piece of `rope`, left to right, as `(node, size)`.
    fn each_piece(&self, rope: Rope, f: &mut impl FnMut(usize, u64)) {
        match rope.node() {
            Node::Piece(node) => f(node, self.piece_size[node]),
            Node::Run(run) => {
                let r = self.runs[run];
                let slice = &self.listed[r.first..r.first + r.len];
                for (i, &(offset, node)) in slice.iter().enumerate() {
                    let end = slice.get(i + 1).map_or(r.base + r.size, |&(o, _)| o);
                    f(node, end - offset);
                }
            }
            Node::Join(join) => {
                let (left, right) = self.halves(join);
                self.each_piece(left, f);
                self.each_piece(right, f);
            }
        }
    }

    /// Every piece of `rope`, left to right, as `(node, size)`.
    #[cfg(test)]
    pub fn pieces(&self, rope: Rope) -> Vec<(usize, u64)> {
        let mut out = Vec::with_capacity(self.count(rope));
        self.each_piece(rope, &mut |node, size| out.push((node, size)));
        out
    }

    /// Append the pieces of a view, `(node, size)`, left to right, to `out`.
    pub fn pieces_into(&self, view: View, out: &mut Vec<(usize, u64)>) {
        let mut push = |node, size| out.push((node, size));
        if view == self.whole(view.rope) {
            return self.each_piece(view.rope, &mut push);
        }
        self.each_cover(view.rope, 0, view, &mut |rope| {
            self.each_piece(rope, &mut push)
        });
    }

    /// The pieces of a view, `(node, size)`, left to right.
    pub fn pieces_in(&self, view: View) -> Vec<(usize, u64)> {
        let mut out = Vec::new();
        self.pieces_into(view, &mut out);
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// splitmix64: a fixed-seed generator, no crate needed.
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
    }

    /// The AVL invariant and every cached field, checked against the leaves.
    fn check(ropes: &Ropes, rope: Rope) -> (u64, usize, u32) {
        match rope.node() {
            Node::Join(j) => {
                let (l, r) = ropes.halves(j);
                let (ls, lc, lh) = check(ropes, l);
                let (rs, rc, rh) = check(ropes, r);
                assert!(lh.abs_diff(rh) <= 1, "unbalanced: heights {lh} and {rh}");
                let got = (ropes.size(rope), ropes.count(rope), ropes.height(rope));
                assert_eq!(got, (ls + rs, lc + rc, 1 + lh.max(rh)));
                got
            }
            _ => {
                let pieces = ropes.pieces(rope);
                assert!(!pieces.is_empty());
                let size = pieces.iter().map(|p| p.1).sum();
                assert_eq!((ropes.size(rope), ropes.count(rope)), (size, pieces.len()));
                (size, pieces.len(), 1)
            }
        }
    }

    fn starts(model: &[(usize, u64)]) -> Vec<u64> {
        let mut acc = 0;
        model
            .iter()
            .map(|&(_, s)| {
                acc += s;
                acc - s
            })
            .collect()
    }

    /// A rope over `(node, size)` pairs; `sizes` learns each node's size.
    fn rope_of(ropes: &mut Ropes, sizes: &mut Vec<u64>, pieces: &[(usize, u64)]) -> Rope {
        for &(node, size) in pieces {
            if sizes.len() <= node {
                sizes.resize(node + 1, 0);
            }
            sizes[node] = size;
        }
        let nodes: Vec<usize> = pieces.iter().map(|&(n, _)| n).collect();
        ropes.rope_over(&nodes, sizes)
    }

    #[test]
    fn random_edits_agree_with_a_flat_list() {
        let mut rng = Rng(12);
        let mut next_node = 0;
        let mut sizes = Vec::new();
        let mut fresh = |rng: &mut Rng, most: usize| -> Vec<(usize, u64)> {
            // Sometimes long enough to be a run.
            let long = rng.below(4) == 0;
            let n = 1 + rng.below(if long { 3 * most } else { most });
            (0..n)
                .map(|_| {
                    next_node += 1;
                    (next_node, 1 + rng.below(4) as u64)
                })
                .collect()
        };
        for _ in 0..300 {
            let mut ropes = Ropes::default();
            let mut model = fresh(&mut rng, 20);
            let mut rope = rope_of(&mut ropes, &mut sizes, &model);
            for _ in 0..40 {
                let offsets = starts(&model);
                let total = ropes.size(rope);
                let (i, j) = (rng.below(model.len()), rng.below(model.len()));
                let (i, j) = (i.min(j), i.max(j) + 1);
                let end = offsets.get(j).copied().unwrap_or(total);
                match rng.below(6) {
                    // Replace a run of pieces by new ones.
                    0 => {
                        let with = fresh(&mut rng, 5);
                        let new = rope_of(&mut ropes, &mut sizes, &with);
                        rope = ropes.replace(rope, offsets[i], end, new);
                        model.splice(i..j, with);
                    }
                    // A range lists its pieces; a view of it counts and covers them.
                    1 => {
                        let range = ropes.range(rope, offsets[i], end);
                        check(&ropes, range);
                        assert_eq!(ropes.pieces(range), model[i..j]);
                        let view = View {
                            rope,
                            start: offsets[i],
                            end,
                        };
                        assert_eq!(ropes.count_in(view), j - i);
                        assert_eq!(ropes.pieces_in(view), model[i..j]);
                    }
                    // Cut at a boundary and join again, in either order.
                    2 => {
                        let at = offsets.get(i).copied().unwrap_or(total);
                        let (before, after) = ropes.split(rope, at);
                        let listed = |r: Option<Rope>| r.map_or(vec![], |r| ropes.pieces(r));
                        assert_eq!(listed(before), model[..i]);
                        assert_eq!(listed(after), model[i..]);
                        if let (Some(b), Some(a)) = (before, after) {
                            rope = ropes.concat(a, b);
                            model.rotate_left(i);
                        }
                    }
                    // Join with a rope of a very different height.
                    3 => {
                        let first = fresh(&mut rng, 3);
                        let mut r = rope_of(&mut ropes, &mut sizes, &first);
                        let mut other = ropes.pieces(r);
                        for _ in 0..rng.below(30) {
                            let more = fresh(&mut rng, 3);
                            let m = rope_of(&mut ropes, &mut sizes, &more);
                            r = ropes.concat(r, m);
                            other.extend(more);
                        }
                        if rng.below(2) == 0 {
                            rope = ropes.concat(rope, r);
                            model.extend(other);
                        } else {
                            rope = ropes.concat(r, rope);
                            model.splice(0..0, other);
                        }
                    }
                    // Aligned at both ends, a view is covered by whole nodes.
                    4 => {
                        rope = ropes.align(rope, offsets[i]);
                        rope = ropes.align(rope, end);
                        let view = View {
                            rope,
                            start: offsets[i],
                            end,
                        };
                        let cover = ropes.cover(view);
                        let listed: Vec<(usize, u64)> =
                            cover.iter().flat_map(|&r| ropes.pieces(r)).collect();
                        assert_eq!(listed, model[i..j]);
                        // O(log n) nodes: at most two per level of the tree.
                        assert!(cover.len() <= 2 * ropes.height(rope) as usize);
                    }
                    // Every offset is located in the piece that holds it.
                    _ => {
                        for at in 0..total {
                            let i = offsets.partition_point(|&o| o <= at) - 1;
                            assert_eq!(ropes.locate(rope, at), (model[i].0, offsets[i]));
                        }
                    }
                }
                check(&ropes, rope);
                assert_eq!(ropes.pieces(rope), model);
                assert_eq!(ropes.count(rope), model.len());
            }
        }
    }

    #[test]
    fn a_rope_stays_logarithmically_shallow() {
        // Pieces added one at a time at either end: height within the AVL bound.
        let mut ropes = Ropes::default();
        let mut rope = ropes.piece(0, 1);
        for node in 1..10_000 {
            let piece = ropes.piece(node, 1);
            rope = if node % 2 == 0 {
                ropes.concat(rope, piece)
            } else {
                ropes.concat(piece, rope)
            };
        }
        check(&ropes, rope);
        // 1.44 log2(n) bounds an AVL tree's height.
        assert!(ropes.height(rope) <= 20, "height {}", ropes.height(rope));
    }
}
