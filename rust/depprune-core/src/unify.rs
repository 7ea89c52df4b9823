//! Unification of axis structures: union-find over atoms with refinement.
//!
//! Every axis starts as one *node*. Nodes are merged with union-find; a class
//! (the root of a set) may carry a *definition*: a sum of smaller nodes
//! (concatenation) or a product of smaller nodes (row-major merge, every
//! factor of size >= 2). When two classes with definitions merge, the
//! definitions are reconciled into their common refinement: sums merge their
//! cut points, products their mixed radices, and a sum meets a product by
//! cutting the product's outermost factor. A sum's pieces are a view of a
//! persistent rope (see `rope.rs`), so a sum with few pieces merges into one
//! with many in O(few · log many), and a child that covers many pieces is
//! given a view of them in O(1); every definition stays the snapshot it was
//! when made, as if each were its own list. Children always have a strictly
//! smaller size than their parent, so definitions never form cycles.
//! Structures that cannot be reconciled are frozen and the equation that
//! caused it is recorded: conservative, never a guess.

use crate::error::CoreError;
use crate::input::{EquationKind, Validated};
use crate::rope::{Ropes, View};

/// The definition of a class in terms of smaller nodes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Def {
    /// The pieces, left to right: a view of a rope, sharing its nodes.
    Sum(View),
    Product(Vec<usize>),
}

/// The factors of one side of a product reconciliation, each with the range
/// of refined factors it covers.
type Side<'a> = (&'a [usize], &'a [(usize, usize)]);

/// The union-find store of nodes with their sizes, definitions and freezes.
#[derive(Debug, Default)]
pub(crate) struct Store {
    parent: Vec<usize>,
    rank: Vec<u8>,
    size: Vec<u64>,
    /// Meaningful on roots only.
    def: Vec<Option<Def>>,
    /// Meaningful on roots only; merged with OR.
    frozen: Vec<bool>,
    pending: Vec<(usize, usize)>,
    /// The ropes of every sum (inner nodes and runs).
    ropes: Ropes,
    /// Reused by every merge of two sums.
    scratch: Scratch,
    /// Equations whose structures could only be handled by freezing.
    pub conflicts: Vec<usize>,
    current_equation: usize,
}

impl Store {
    fn with_axes(sizes: &[u64]) -> Self {
        let n = sizes.len();
        Store {
            parent: (0..n).collect(),
            rank: vec![0; n],
            size: sizes.to_vec(),
            def: vec![None; n],
            frozen: vec![false; n],
            ..Default::default()
        }
    }

    pub fn num_nodes(&self) -> usize {
        self.parent.len()
    }

    pub fn size(&self, node: usize) -> u64 {
        self.size[node]
    }

    pub fn find(&mut self, mut node: usize) -> usize {
        while self.parent[node] != node {
            let grandparent = self.parent[self.parent[node]];
            self.parent[node] = grandparent;
            node = grandparent;
        }
        node
    }

    pub fn is_frozen_root(&self, root: usize) -> bool {
        self.frozen[root]
    }

    pub fn def_of_root(&self, root: usize) -> Option<&Def> {
        self.def[root].as_ref()
    }

    /// The ropes of every sum, leaving none here.
    pub fn take_ropes(&mut self) -> Ropes {
        std::mem::take(&mut self.ropes)
    }

    /// A sum of `nodes` (at least one), in order.
    fn sum_of(&mut self, nodes: &[usize]) -> Def {
        let rope = self.ropes.rope_over(nodes, &self.size);
        Def::Sum(self.ropes.whole(rope))
    }

    fn children_of(&self, def: &Def) -> Vec<usize> {
        match def {
            Def::Sum(view) => self
                .ropes
                .pieces_in(*view)
                .into_iter()
                .map(|(n, _)| n)
                .collect(),
            Def::Product(factors) => factors.clone(),
        }
    }

    fn new_node(&mut self, size: u64, def: Option<Def>) -> usize {
        let id = self.parent.len();
        self.parent.push(id);
        self.rank.push(0);
        self.size.push(size);
        self.def.push(def);
        self.frozen.push(false);
        id
    }

    fn freeze(&mut self, node: usize) {
        let root = self.find(node);
        self.frozen[root] = true;
    }

    fn conflict(&mut self) {
        if self.conflicts.last() != Some(&self.current_equation) {
            self.conflicts.push(self.current_equation);
        }
    }

    /// Merge the classes of `a` and `b`, reconciling their definitions.
    fn unify(&mut self, a: usize, b: usize) -> Result<(), CoreError> {
        self.pending.push((a, b));
        while let Some((a, b)) = self.pending.pop() {
            let (x, y) = (self.find(a), self.find(b));
            if x == y {
                continue;
            }
            if self.size[x] != self.size[y] {
                return Err(CoreError::Internal(format!(
                    "unifying nodes of sizes {} and {} while processing equation {}",
                    self.size[x], self.size[y], self.current_equation
                )));
            }
            let (def_x, def_y) = (self.def[x].take(), self.def[y].take());
            let frozen = self.frozen[x] || self.frozen[y];
            let (root, child) = if self.rank[x] >= self.rank[y] {
                (x, y)
            } else {
                (y, x)
            };
            self.parent[child] = root;
            if self.rank[root] == self.rank[child] {
                self.rank[root] += 1;
            }
            self.frozen[root] = frozen;
            let def = match (def_x, def_y) {
                (None, d) | (d, None) => d,
                (Some(d1), Some(d2)) => Some(self.reconcile(root, d1, d2)),
            };
            self.def[root] = def;
        }
        Ok(())
    }

    fn sizes_of(&mut self, nodes: &[usize]) -> Vec<u64> {
        nodes.iter().map(|&n| self.size[n]).collect()
    }

    fn reconcile(&mut self, root: usize, d1: Def, d2: Def) -> Def {
        let merged = match (&d1, &d2) {
            (Def::Sum(a), Def::Sum(b)) => Some(Def::Sum(self.sum_with_sum(*a, *b))),
            (Def::Product(a), Def::Product(b)) => self.product_with_product(a, b),
            (Def::Sum(s), Def::Product(p)) | (Def::Product(p), Def::Sum(s)) => {
                self.sum_with_product(*s, p)
            }
        };
        merged.unwrap_or_else(|| {
            // Irreconcilable: freeze every element of both structures.
            self.conflict();
            self.frozen[root] = true;
            for c in self.children_of(&d2) {
                self.freeze(c);
            }
            d1
        })
    }

    /// Nodes for the factors of a common mixed radix, reusing an existing node
    /// where one side already has exactly that factor, then queue each old
    /// factor to equal the product of the factors it covers.
    fn refine_sides(&mut self, piece_sizes: &[u64], sides: [Side; 2]) -> Vec<usize> {
        let mut pieces: Vec<Option<usize>> = vec![None; piece_sizes.len()];
        for (children, cover) in sides {
            for (&child, &(start, end)) in children.iter().zip(cover) {
                if end - start == 1 && pieces[start].is_none() {
                    pieces[start] = Some(child);
                }
            }
        }
        let pieces: Vec<usize> = pieces
            .into_iter()
            .zip(piece_sizes)
            .map(|(p, &size)| p.unwrap_or_else(|| self.new_node(size, None)))
            .collect();
        for (children, cover) in sides {
            for (&child, &(start, end)) in children.iter().zip(cover) {
                let target = if end - start == 1 {
                    pieces[start]
                } else {
                    let size = self.size[child];
                    self.new_node(size, Some(Def::Product(pieces[start..end].to_vec())))
                };
                self.pending.push((child, target));
            }
        }
        pieces
    }

    /// Two concatenations of the same axis: merge their cut points.
    ///
    /// The side with fewer pieces is merged into the other: each of its cuts
    /// is located in O(log n), a piece it falls inside is replaced by its
    /// parts (copying one path) and queued to equal their sum, and each of
    /// its own pieces is queued to equal the piece, or a view of the pieces,
    /// it covers. The common refinement, the node chosen for each piece and
    /// the order of the queue are those of a flat merge of both piece lists
    /// (the first side's node where both have a piece, the first side's
    /// equalities first), at O(few · log many) instead of O(few + many).
    fn sum_with_sum(&mut self, a: View, b: View) -> View {
        let mut sc = std::mem::take(&mut self.scratch);
        sc.clear();
        let small_is_a = self.ropes.count_in(a) < self.ropes.count_in(b);
        let (small, large) = if small_is_a { (a, b) } else { (b, a) };
        self.ropes.pieces_into(small, &mut sc.small);
        let count = sc.small.len();
        // The large side as a rope of its own, edited below without changing
        // any other definition: ropes are never changed once made.
        let mut refined = if large == self.ropes.whole(large.rope) {
            large.rope
        } else {
            self.ropes.range(large.rope, large.start, large.end)
        };
        let mut offset = 0;
        for &(_, size) in &sc.small {
            sc.bounds.push(offset);
            offset += size;
        }
        sc.bounds.push(offset);

        // For each small cut, the large piece that holds it (piece, start,
        // end); and the large pieces that a small cut falls inside, with the
        // range of `bounds` inside each.
        for t in 1..count {
            let cut = sc.bounds[t];
            if let Some(last) = sc.inside.last_mut().filter(|last| cut < last.2) {
                last.3.end = t + 1;
                sc.holders.push((last.0, last.1, last.2));
                continue;
            }
            let (piece, start) = self.ropes.locate(refined, cut);
            let end = start + self.size[piece];
            sc.holders.push((piece, start, end));
            if start < cut {
                sc.inside.push((piece, start, end, t..t + 1));
            }
        }

        // Split those pieces; a part that the small side has exactly is its node.
        sc.is_part.resize(count, false);
        for i in 0..sc.inside.len() {
            let (piece, start, end, ref cuts) = sc.inside[i];
            sc.parts.clear();
            let mut lo = start;
            for hi in sc.bounds[cuts.clone()].iter().copied().chain([end]) {
                let node = match sc.exact(lo, hi) {
                    Some(t) => {
                        sc.is_part[t] = true;
                        sc.small[t].0
                    }
                    None => self.new_node(hi - lo, None),
                };
                sc.parts.push(node);
                lo = hi;
            }
            // A tree of single pieces: the cuts between them need no aligning.
            let parts = self.ropes.tree_of(&sc.parts, &self.size);
            refined = self.ropes.replace(refined, start, end, parts);
            let target = self.new_node(end - start, Some(Def::Sum(self.ropes.whole(parts))));
            sc.large_queue.push((start, piece, target));
        }

        // Each small piece equals the piece, or a view of the pieces, it covers;
        // the large pieces holding its ends decide which, mostly without a search.
        for t in 0..count {
            let child = sc.small[t].0;
            if sc.is_part[t] {
                // One of the parts above: itself, in the refinement.
                continue;
            }
            let (lo, hi) = (sc.bounds[t], sc.bounds[t + 1]);
            let one_piece = match (sc.holder(t), sc.holder(t + 1)) {
                // Starting inside a split piece and not one of its parts, or
                // ending inside a piece that starts after it does: several.
                (Some((_, start, _)), _) if start < lo => None,
                (_, Some((_, start, _))) if lo < start && start < hi => None,
                // Starting where an unsplit large piece does: that piece, if it fits.
                (Some((piece, _, end)), _) => (end == hi).then_some(piece),
                _ => {
                    let (piece, _) = self.ropes.locate(refined, lo);
                    (lo + self.size[piece] == hi).then_some(piece)
                }
            };
            match one_piece {
                None => sc.small_queue.push((child, Target::View(lo, hi))),
                Some(piece) if piece == child => {}
                Some(piece) if small_is_a => {
                    // Both sides have this piece: the first side's node is kept.
                    let keep = self.ropes.piece(child, hi - lo);
                    refined = self.ropes.replace(refined, lo, hi, keep);
                    sc.large_queue.push((lo, piece, child));
                }
                Some(piece) => sc.small_queue.push((child, Target::Node(piece))),
            }
        }
        // Views end where no run straddles them, so each is a few whole nodes.
        // Cuts made above fall between single pieces; older ones may not.
        for &(_, target) in &sc.small_queue {
            if let Target::View(start, end) = target {
                sc.ends.extend([start, end]);
            }
        }
        sc.ends.sort_unstable();
        sc.ends.dedup();
        for i in 0..sc.ends.len() {
            if !sc.made_here(sc.ends[i]) {
                refined = self.ropes.align(refined, sc.ends[i]);
            }
        }

        // The first side's equalities are queued first, each side left to
        // right; views are of the finished refinement.
        sc.large_queue.sort_by_key(|&(offset, _, _)| offset);
        let large_queue = sc.large_queue.iter().map(|&(_, old, target)| (old, target));
        if !small_is_a {
            self.pending.extend(large_queue.clone());
        }
        for &(child, target) in &sc.small_queue {
            let target = match target {
                Target::Node(node) => node,
                Target::View(start, end) => {
                    let view = View {
                        rope: refined,
                        start,
                        end,
                    };
                    self.new_node(end - start, Some(Def::Sum(view)))
                }
            };
            self.pending.push((child, target));
        }
        if small_is_a {
            self.pending.extend(large_queue);
        }
        self.scratch = sc;
        self.ropes.whole(refined)
    }

    /// Two row-major merges of the same axis: common mixed-radix refinement,
    /// which exists when the prefix products of both form one divisibility chain.
    fn product_with_product(&mut self, a: &[usize], b: &[usize]) -> Option<Def> {
        // Prefix products never exceed the (validated) size of the class; an
        // overflow would be a broken invariant, handled by freezing.
        let prefixes = |sizes: &[u64]| -> Option<Vec<u64>> {
            let mut acc = 1u64;
            sizes
                .iter()
                .map(|&s| {
                    acc = acc.checked_mul(s)?;
                    Some(acc)
                })
                .collect()
        };
        let (pa, pb) = (prefixes(&self.sizes_of(a))?, prefixes(&self.sizes_of(b))?);
        let mut chain: Vec<u64> = pa.iter().chain(&pb).copied().collect();
        chain.sort_unstable();
        chain.dedup();
        let mut radices = Vec::with_capacity(chain.len());
        let mut previous = 1u64;
        for &p in &chain {
            if p % previous != 0 {
                return None;
            }
            radices.push(p / previous);
            previous = p;
        }
        let cover = |prefix: &[u64]| -> Vec<(usize, usize)> {
            let mut start = 0;
            prefix
                .iter()
                .map(|p| {
                    let end = chain.partition_point(|c| c <= p);
                    let span = (start, end);
                    start = end;
                    span
                })
                .collect()
        };
        let (cover_a, cover_b) = (cover(&pa), cover(&pb));
        let pieces = self.refine_sides(&radices, [(a, &cover_a), (b, &cover_b)]);
        Some(Def::Product(pieces))
    }

    /// A concatenation meets a row-major merge: possible when every cut falls
    /// on a multiple of the outer factor's stride; the outer factor is then cut
    /// and each piece is the product of its slice of the outer factor and the
    /// inner factors (which are shared).
    fn sum_with_product(&mut self, s: View, p: &[usize]) -> Option<Def> {
        let outer = p[0];
        let inner = &p[1..];
        let stride = inner
            .iter()
            .try_fold(1u64, |acc, &f| acc.checked_mul(self.size[f]))?;
        let pieces = self.ropes.pieces_in(s);
        if pieces.iter().any(|(_, size)| size % stride != 0) {
            return None;
        }
        let slices: Vec<usize> = pieces
            .iter()
            .map(|(_, size)| self.new_node(size / stride, None))
            .collect();
        let outer_size = self.size[outer];
        let outer_pieces = self.sum_of(&slices);
        let cut_outer = self.new_node(outer_size, Some(outer_pieces));
        self.pending.push((outer, cut_outer));
        for (&(piece, _), &slice) in pieces.iter().zip(&slices) {
            let mut factors = Vec::with_capacity(p.len());
            if self.size[slice] == 1 {
                // A size-1 factor cannot be removed without emptying the piece.
                self.conflict();
                self.frozen[slice] = true;
            } else {
                factors.push(slice);
            }
            factors.extend_from_slice(inner);
            let target = if factors.len() == 1 {
                factors[0]
            } else {
                let size = self.size[piece];
                self.new_node(size, Some(Def::Product(factors)))
            };
            self.pending.push((piece, target));
        }
        Some(Def::Product(p.to_vec()))
    }

    /// Apply one validated equation.
    fn apply_equation(
        &mut self,
        index: usize,
        kind: EquationKind,
        left: usize,
        right: &[usize],
    ) -> Result<(), CoreError> {
        self.current_equation = index;
        match kind {
            EquationKind::Equal => self.unify(left, right[0]),
            EquationKind::Sum => {
                let parts: Vec<usize> = right
                    .iter()
                    .copied()
                    .filter(|&r| self.size[r] > 0)
                    .collect();
                match parts.len() {
                    0 => Ok(()),
                    1 => self.unify(left, parts[0]),
                    _ => {
                        let pieces = self.sum_of(&parts);
                        let node = self.new_node(self.size[left], Some(pieces));
                        self.unify(left, node)
                    }
                }
            }
            EquationKind::Product => {
                if self.size[left] == 0 {
                    return Ok(());
                }
                // Size-1 factors are broadcast slots: removing one would empty the axis.
                let mut factors = Vec::with_capacity(right.len());
                for &r in right {
                    if self.size[r] == 1 {
                        self.freeze(r);
                    } else {
                        factors.push(r);
                    }
                }
                match factors.len() {
                    0 => {
                        self.freeze(left);
                        Ok(())
                    }
                    1 => self.unify(left, factors[0]),
                    _ => {
                        let node = self.new_node(self.size[left], Some(Def::Product(factors)));
                        self.unify(left, node)
                    }
                }
            }
        }
    }
}

/// What a piece of the smaller side of a merge of sums is queued to equal.
#[derive(Debug, Clone, Copy)]
enum Target {
    /// One piece of the refinement.
    Node(usize),
    /// The pieces of the finished refinement in `[start, end)`.
    View(u64, u64),
}

/// The buffers of one [`Store::sum_with_sum`], kept to be reused by the next.
#[derive(Debug, Default)]
struct Scratch {
    /// The small side's pieces, `(node, size)`, and where each starts (then
    /// where the last ends), as offsets in the large side.
    small: Vec<(usize, u64)>,
    bounds: Vec<u64>,
    /// For each small cut (`bounds[1..]`), the large piece holding it:
    /// `(piece, start, end)`.
    holders: Vec<(usize, u64, u64)>,
    /// Large pieces that small cuts fall inside, with those cuts' indices.
    inside: Vec<(usize, u64, u64, std::ops::Range<usize>)>,
    /// Small pieces that are parts of a split piece.
    is_part: Vec<bool>,
    parts: Vec<usize>,
    /// `(offset, old node, its target)` for the large side.
    large_queue: Vec<(u64, usize, usize)>,
    /// `(child, what it equals)` for the small side.
    small_queue: Vec<(usize, Target)>,
    /// Where views end.
    ends: Vec<u64>,
}

impl Scratch {
    fn clear(&mut self) {
        self.small.clear();
        self.bounds.clear();
        self.holders.clear();
        self.inside.clear();
        self.is_part.clear();
        self.parts.clear();
        self.large_queue.clear();
        self.small_queue.clear();
        self.ends.clear();
    }

    /// The large piece holding small cut `t` (`bounds[t]`, `0 < t < pieces`).
    fn holder(&self, t: usize) -> Option<(usize, u64, u64)> {
        self.holders.get(t.checked_sub(1)?).copied()
    }

    /// The small piece with exactly these bounds, if any.
    fn exact(&self, lo: u64, hi: u64) -> Option<usize> {
        let t = self.bounds.binary_search(&lo).ok()?;
        (self.bounds.get(t + 1) == Some(&hi)).then_some(t)
    }

    /// Whether offset `at` is a small cut that fell inside a large piece, and
    /// so now lies between two single pieces.
    fn made_here(&self, at: u64) -> bool {
        let t = self.bounds.binary_search(&at).ok();
        t.and_then(|t| self.holder(t))
            .is_some_and(|(_, start, _)| start < at)
    }
}

/// Build the store from validated input: apply every equation, then freezes.
pub(crate) fn unify_all(input: &Validated) -> Result<Store, CoreError> {
    let mut store = Store::with_axes(&input.axis_sizes);
    for (index, eq) in input.equations.iter().enumerate() {
        store.apply_equation(index, eq.kind, eq.left, &eq.right)?;
    }
    for &axis in &input.frozen_axes {
        store.freeze(axis);
    }
    Ok(store)
}
