//! Unification of axis structures: union-find over atoms with refinement.
//!
//! Every axis starts as one *node*. Nodes are merged with union-find; a class
//! (the root of a set) may carry a *definition*: a sum of smaller nodes
//! (concatenation) or a product of smaller nodes (row-major merge, every
//! factor of size >= 2). When two classes with definitions merge, the
//! definitions are reconciled into their common refinement: sums merge their
//! cut points, products their mixed radices, and a sum meets a product by
//! cutting the product's outermost factor. Children always have a strictly
//! smaller size than their parent, so definitions never form cycles.
//! Structures that cannot be reconciled are frozen and the equation that
//! caused it is recorded: conservative, never a guess.

use crate::error::CoreError;
use crate::input::{EquationKind, Validated};

/// The definition of a class in terms of smaller nodes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Def {
    Sum(Vec<usize>),
    Product(Vec<usize>),
}

impl Def {
    pub fn children(&self) -> &[usize] {
        match self {
            Def::Sum(c) | Def::Product(c) => c,
        }
    }
}

/// The children of one side of a reconciliation, each with the range of
/// refined pieces it covers.
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
            (Def::Sum(a), Def::Sum(b)) => Some(self.sum_with_sum(a, b)),
            (Def::Product(a), Def::Product(b)) => self.product_with_product(a, b),
            (Def::Sum(s), Def::Product(p)) | (Def::Product(p), Def::Sum(s)) => {
                self.sum_with_product(s, p)
            }
        };
        merged.unwrap_or_else(|| {
            // Irreconcilable: freeze every element of both structures.
            self.conflict();
            self.frozen[root] = true;
            for &c in d2.children() {
                self.freeze(c);
            }
            d1
        })
    }

    /// Nodes for the pieces of a common refinement, reusing an existing node
    /// where one side already has exactly that piece, then queue each old
    /// child to equal the pieces it covers.
    fn refine_sides(
        &mut self,
        piece_sizes: &[u64],
        sides: [Side; 2],
        make: fn(Vec<usize>) -> Def,
    ) -> Vec<usize> {
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
                    self.new_node(size, Some(make(pieces[start..end].to_vec())))
                };
                self.pending.push((child, target));
            }
        }
        pieces
    }

    /// Two concatenations of the same axis: merge their cut points.
    fn sum_with_sum(&mut self, a: &[usize], b: &[usize]) -> Def {
        let (sa, sb) = (self.sizes_of(a), self.sizes_of(b));
        let mut piece_sizes = Vec::with_capacity(a.len() + b.len());
        let (mut cover_a, mut cover_b) = (Vec::with_capacity(a.len()), Vec::with_capacity(b.len()));
        let (mut i, mut j) = (0, 0);
        let (mut left_a, mut left_b) = (sa[0], sb[0]);
        let (mut start_a, mut start_b) = (0, 0);
        while i < sa.len() && j < sb.len() {
            let step = left_a.min(left_b);
            piece_sizes.push(step);
            left_a -= step;
            left_b -= step;
            if left_a == 0 {
                cover_a.push((start_a, piece_sizes.len()));
                start_a = piece_sizes.len();
                i += 1;
                left_a = sa.get(i).copied().unwrap_or(0);
            }
            if left_b == 0 {
                cover_b.push((start_b, piece_sizes.len()));
                start_b = piece_sizes.len();
                j += 1;
                left_b = sb.get(j).copied().unwrap_or(0);
            }
        }
        let pieces = self.refine_sides(&piece_sizes, [(a, &cover_a), (b, &cover_b)], Def::Sum);
        Def::Sum(pieces)
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
        let pieces = self.refine_sides(&radices, [(a, &cover_a), (b, &cover_b)], Def::Product);
        Some(Def::Product(pieces))
    }

    /// A concatenation meets a row-major merge: possible when every cut falls
    /// on a multiple of the outer factor's stride; the outer factor is then cut
    /// and each piece is the product of its slice of the outer factor and the
    /// inner factors (which are shared).
    fn sum_with_product(&mut self, s: &[usize], p: &[usize]) -> Option<Def> {
        let outer = p[0];
        let inner = &p[1..];
        let stride = inner
            .iter()
            .try_fold(1u64, |acc, &f| acc.checked_mul(self.size[f]))?;
        let piece_sizes = self.sizes_of(s);
        if piece_sizes.iter().any(|size| size % stride != 0) {
            return None;
        }
        let slices: Vec<usize> = piece_sizes
            .iter()
            .map(|size| self.new_node(size / stride, None))
            .collect();
        let outer_size = self.size[outer];
        let cut_outer = self.new_node(outer_size, Some(Def::Sum(slices.clone())));
        self.pending.push((outer, cut_outer));
        for (&piece, &slice) in s.iter().zip(&slices) {
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
                        let node = self.new_node(self.size[left], Some(Def::Sum(parts)));
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
