//! Groups, unit maps and kept indices, read off the unified structures.
//!
//! After unification every axis is a tree (a DAG, since pieces are shared)
//! of sums and products over *leaves*. A leaf that is not frozen and lies
//! under some parameter dim is a *group*: its size is the number of prunable
//! units, and removing unit `u` removes, from every member, the flat indices
//! whose coordinate on that leaf is `u`.

use std::collections::HashMap;
use std::rc::Rc;

use crate::error::CoreError;
use crate::input::{validate, EquationSet, ParamTable};
use crate::structure::{leaves_in_order, post_order, Kind, Structure};
use crate::unify::{unify_all, Store};

/// The result of analysing a set of axis equations: groups of prunable units,
/// their members (parameter rows), and the index arithmetic of every row.
#[derive(Debug, Clone)]
pub struct Analysis {
    num_axes: usize,
    axis_root: Vec<usize>,
    row_root: Vec<usize>,
    structure: Structure,
    frozen: Vec<bool>,
    group_of_node: Vec<i64>,
    group_node: Vec<usize>,
    group_sizes: Vec<i64>,
    unit_offsets: Vec<i64>,
    member_offsets: Vec<i64>,
    member_rows: Vec<i64>,
    conflicts: Vec<i64>,
}

/// Validate the input, unify every equation and read off groups and members.
///
/// ```
/// use depprune_core::{analyze, EquationSet, ParamTable};
/// // hidden (8) = product(heads (2), head_dim (4)); one parameter row on hidden.
/// let eqs = EquationSet {
///     axis_sizes: &[8, 2, 4],
///     kinds: &[2],
///     left: &[0],
///     right_offsets: &[0, 2],
///     right: &[1, 2],
///     frozen_axes: &[],
/// };
/// let params = ParamTable { params: &[0], dims: &[0], axes: &[0] };
/// let analysis = analyze(&eqs, &params).unwrap();
/// assert_eq!(analysis.group_sizes(), &[2, 4]);
/// ```
pub fn analyze(eqs: &EquationSet, params: &ParamTable) -> Result<Analysis, CoreError> {
    let input = validate(eqs, params)?;
    let mut store = unify_all(&input)?;
    Analysis::from_store(&mut store, input.axis_sizes.len(), &input.row_axes)
}

impl Analysis {
    fn from_store(
        store: &mut Store,
        num_axes: usize,
        row_axes: &[usize],
    ) -> Result<Self, CoreError> {
        let structure = Structure::from_store(store);
        let num_nodes = structure.num_nodes();
        let root = |node: usize| structure.root(node);

        // Frozen spreads down: every element of a frozen axis is frozen.
        let mut frozen: Vec<bool> = (0..num_nodes)
            .map(|n| n < structure.num_store_nodes() && root(n) == n && store.is_frozen_root(n))
            .collect();
        let mut spread = vec![false; num_nodes];
        let mut stack: Vec<usize> = (0..num_nodes).filter(|&n| frozen[n]).collect();
        while let Some(node) = stack.pop() {
            if std::mem::replace(&mut spread[node], true) {
                continue;
            }
            frozen[node] = true;
            stack.extend(
                structure
                    .children(node)
                    .iter()
                    .copied()
                    .filter(|&c| !spread[c]),
            );
        }

        let axis_root: Vec<usize> = (0..num_axes).map(root).collect();
        let row_root: Vec<usize> = row_axes.iter().map(|&a| root(a)).collect();
        let mut conflicts: Vec<i64> = store.conflicts.iter().map(|&c| c as i64).collect();

        // A leaf in two factors of one product would give a flat index two
        // units of the same group; no unit map can say that, so freeze it.
        // Only factors of products need their leaf sets: every other node is
        // visited once, so long sums and deep chains of sums stay linear.
        let mut leaves_of: HashMap<usize, Vec<usize>> = HashMap::new();
        let mut ambiguous: Vec<usize> = Vec::new();
        let mut products = Vec::new();
        let mut reached = vec![false; num_nodes];
        let mut stack: Vec<usize> = row_root.clone();
        while let Some(node) = stack.pop() {
            if std::mem::replace(&mut reached[node], true) {
                continue;
            }
            if structure.kind(node) == Kind::Product {
                products.push(node);
            }
            stack.extend(structure.children(node).iter().filter(|&&c| !reached[c]));
        }
        // Sets are kept for products and their factors only; a factor's set is
        // gathered by one walk that stops at kept sets, so a long chain of sums
        // under a product is walked once, not once per link.
        let mut is_factor = vec![false; num_nodes];
        for node in 0..structure.num_store_nodes() {
            if structure.kind(node) == Kind::Product {
                for &f in structure.children(node).iter() {
                    is_factor[f] = true;
                }
            }
        }
        let (mut walk_stamp, mut walk) = (vec![0u32; num_nodes], 0u32);
        for product in products {
            let mut order = Vec::new();
            post_order(
                product,
                |n| structure.children(n),
                |n| leaves_of.contains_key(&n),
                |n| order.push(n),
            );
            for node in order {
                let kind = structure.kind(node);
                let leaves = match kind {
                    _ if !is_factor[node] && kind != Kind::Product => continue,
                    Kind::Leaf => vec![node],
                    Kind::Product => {
                        // Each factor's set is sorted and distinct: a leaf seen
                        // twice in the concatenation lies under two factors.
                        let mut all: Vec<usize> = structure
                            .children(node)
                            .iter()
                            .flat_map(|child| leaves_of[child].iter().copied())
                            .collect();
                        all.sort_unstable();
                        ambiguous.extend(
                            all.windows(2)
                                .filter(|w| w[0] == w[1] && !frozen[w[0]])
                                .map(|w| w[0]),
                        );
                        all.dedup();
                        all
                    }
                    Kind::Sum => {
                        walk += 1;
                        let mut all = Vec::new();
                        let mut stack = structure.children(node).to_vec();
                        while let Some(n) = stack.pop() {
                            if std::mem::replace(&mut walk_stamp[n], walk) == walk {
                                continue;
                            }
                            if let Some(kept) = leaves_of.get(&n) {
                                all.extend_from_slice(kept);
                            } else if structure.kind(n) == Kind::Leaf {
                                all.push(n);
                            } else {
                                stack.extend_from_slice(&structure.children(n));
                            }
                        }
                        all.sort_unstable();
                        all.dedup();
                        all
                    }
                };
                leaves_of.insert(node, leaves);
            }
        }
        if !ambiguous.is_empty() {
            conflicts.push(-1);
            for leaf in ambiguous {
                frozen[leaf] = true;
            }
        }
        conflicts.sort_unstable();
        conflicts.dedup();

        // Groups in order of first appearance: rows in order, leaves left to right.
        // Groups are leaves, and leaves are store nodes.
        let mut group_of_node = vec![-1i64; structure.num_store_nodes()];
        let mut group_node = Vec::new();
        // (group, row) in row order; bucketed by group below, stably.
        let mut pairs: Vec<(usize, i64)> = Vec::new();
        // One stamp per node, renewed per row: no hashing per visited node
        // (rows are far fewer than 2**32: each is three i64 of input).
        let mut stamp = vec![0u32; num_nodes];
        for (row, &root) in row_root.iter().enumerate() {
            let mark = row as u32 + 1;
            let first_visit = |n: usize| std::mem::replace(&mut stamp[n], mark) != mark;
            for leaf in leaves_in_order(&structure, root, first_visit) {
                if frozen[leaf] || structure.size(leaf) == 0 {
                    continue;
                }
                if group_of_node[leaf] < 0 {
                    group_of_node[leaf] = group_node.len() as i64;
                    group_node.push(leaf);
                }
                pairs.push((group_of_node[leaf] as usize, row as i64));
            }
        }
        let group_sizes: Vec<i64> = group_node
            .iter()
            .map(|&n| structure.size(n) as i64)
            .collect();
        let unit_offsets =
            prefix_offsets(group_sizes.iter().copied()).ok_or(CoreError::TotalTooLarge {
                what: "the groups",
                limit: i64::MAX,
            })?;
        let mut counts = vec![0i64; group_node.len()];
        for &(group, _) in &pairs {
            counts[group] += 1;
        }
        let member_offsets = prefix_offsets(counts.into_iter())
            .ok_or_else(|| CoreError::Internal("member counts overflow i64".into()))?;
        let mut next: Vec<usize> = member_offsets.iter().map(|&o| o as usize).collect();
        let mut member_rows = vec![0i64; pairs.len()];
        for (group, row) in pairs {
            member_rows[next[group]] = row;
            next[group] += 1;
        }

        Ok(Analysis {
            num_axes,
            axis_root,
            row_root,
            structure,
            frozen,
            group_of_node,
            group_node,
            group_sizes,
            unit_offsets,
            member_offsets,
            member_rows,
            conflicts,
        })
    }

    /// Number of units (prunable elements) of each group.
    pub fn group_sizes(&self) -> &[i64] {
        &self.group_sizes
    }

    /// Where each group's units start in a keep mask (`num_groups + 1` entries).
    pub fn unit_offsets(&self) -> &[i64] {
        &self.unit_offsets
    }

    /// CSR offsets into [`Self::member_rows`] (`num_groups + 1` entries).
    pub fn member_offsets(&self) -> &[i64] {
        &self.member_offsets
    }

    /// Parameter rows that are members of each group, group after group.
    pub fn member_rows(&self) -> &[i64] {
        &self.member_rows
    }

    pub fn num_groups(&self) -> usize {
        self.group_sizes.len()
    }

    pub fn num_units(&self) -> i64 {
        *self.unit_offsets.last().unwrap_or(&0)
    }

    /// Equations whose structures could only be frozen, sorted (`-1`: a leaf
    /// that appears twice in one product was frozen).
    pub fn conflicts(&self) -> &[i64] {
        &self.conflicts
    }

    fn check_group(&self, group: i64) -> Result<usize, CoreError> {
        if group < 0 || group as usize >= self.num_groups() {
            return Err(CoreError::GroupOutOfRange {
                group,
                num_groups: self.num_groups(),
            });
        }
        Ok(group as usize)
    }

    /// The parameter rows that are members of `group` (a checked group id).
    fn members(&self, group: usize) -> &[i64] {
        &self.member_rows
            [self.member_offsets[group] as usize..self.member_offsets[group + 1] as usize]
    }

    /// For each member of each group in `groups`, the unit of every flat index
    /// along that member's dim (or -1 where the index is not on this group).
    /// Returns `(offsets, values)`: member `k` of the listing owns
    /// `values[offsets[k]..offsets[k + 1]]`.
    pub fn unit_maps(&self, groups: &[i64]) -> Result<(Vec<i64>, Vec<i64>), CoreError> {
        let groups = groups
            .iter()
            .map(|&g| self.check_group(g))
            .collect::<Result<Vec<_>, _>>()?;
        const WHAT: &str = "unit_maps";
        // Size the output first: a long list of huge groups must fail cleanly.
        let (mut num_maps, mut num_values) = (1u64, 0u64);
        for &group in &groups {
            for &row in self.members(group) {
                num_maps = num_maps.saturating_add(1);
                num_values =
                    num_values.saturating_add(self.structure.size(self.row_root[row as usize]));
            }
        }
        let mut offsets: Vec<i64> = try_vec(num_maps, WHAT)?;
        let mut values: Vec<i64> = try_vec(num_values, WHAT)?;
        offsets.push(0);
        for group in groups {
            let leaf = self.group_node[group];
            let mut memo = HashMap::new();
            for &row in self.members(group) {
                let map = self.fold(
                    self.row_root[row as usize],
                    &mut memo,
                    &|node| {
                        let size = self.structure.size(node);
                        if node == leaf {
                            let mut units = try_vec(size, WHAT)?;
                            units.extend(0..size as i64);
                            Ok(units)
                        } else {
                            try_filled(size, -1, WHAT)
                        }
                    },
                    i64::max,
                    WHAT,
                )?;
                values.extend_from_slice(&map);
                offsets.push(values.len() as i64);
            }
        }
        Ok((offsets, values))
    }

    /// Given a keep mask over all units (group after group, see
    /// [`Self::unit_offsets`]; nonzero keeps), the flat indices that remain
    /// along every parameter row. Returns `(offsets, indices)` per row.
    pub fn kept_indices(&self, keep: &[u8]) -> Result<(Vec<i64>, Vec<i64>), CoreError> {
        const WHAT: &str = "kept_indices";
        self.check_keep(keep)?;
        let mut offsets = try_vec(self.row_root.len() as u64 + 1, WHAT)?;
        offsets.push(0i64);
        let mut indices = Vec::new();
        let mut memo = HashMap::new();
        for row in 0..self.row_root.len() {
            let kept = self.kept_mask_of(self.row_root[row], keep, &mut memo, WHAT)?;
            let count = kept.iter().filter(|&&k| k != 0).count();
            indices
                .try_reserve(count)
                .map_err(|_| CoreError::OutOfMemory {
                    what: WHAT,
                    elements: (indices.len() + count) as u64,
                })?;
            indices.extend(
                kept.iter()
                    .enumerate()
                    .filter(|(_, &k)| k != 0)
                    .map(|(i, _)| i as i64),
            );
            offsets.push(indices.len() as i64);
        }
        Ok((offsets, indices))
    }

    /// The keep flag (0/1) of every flat index of `axis` under a keep mask.
    pub fn kept_mask_of_axis(&self, axis: i64, keep: &[u8]) -> Result<Vec<u8>, CoreError> {
        const WHAT: &str = "kept_mask_of_axis";
        let axis = self.check_axis(axis)?;
        self.check_keep(keep)?;
        let mut memo = HashMap::new();
        let mask = self.kept_mask_of(self.axis_root[axis], keep, &mut memo, WHAT)?;
        drop(memo);
        match Rc::try_unwrap(mask) {
            Ok(mask) => Ok(mask),
            Err(shared) => {
                let mut mask = try_vec(shared.len() as u64, WHAT)?;
                mask.extend_from_slice(&shared);
                Ok(mask)
            }
        }
    }

    /// The number of flat indices every axis keeps under a keep mask: the
    /// size each traced tensor dim has once the plan is applied. Leaves keep
    /// their kept units (frozen ones all), sums add, products multiply; linear
    /// in the structure, no per-index work.
    ///
    /// ```
    /// use depprune_core::{analyze, EquationSet, ParamTable};
    /// // hidden (8) = product(heads (2), head_dim (4)).
    /// let eqs = EquationSet {
    ///     axis_sizes: &[8, 2, 4],
    ///     kinds: &[2],
    ///     left: &[0],
    ///     right_offsets: &[0, 2],
    ///     right: &[1, 2],
    ///     frozen_axes: &[],
    /// };
    /// let params = ParamTable { params: &[0], dims: &[0], axes: &[0] };
    /// let analysis = analyze(&eqs, &params).unwrap();
    /// // Drop one head: 4 of 8 indices remain.
    /// assert_eq!(analysis.kept_sizes(&[1, 0, 1, 1, 1, 1]).unwrap(), vec![4, 1, 4]);
    /// ```
    pub fn kept_sizes(&self, keep: &[u8]) -> Result<Vec<i64>, CoreError> {
        const WHAT: &str = "kept_sizes";
        self.check_keep(keep)?;
        let mut count: Vec<i64> = try_filled(self.structure.num_nodes() as u64, -1, WHAT)?;
        let mut order = Vec::new();
        for axis in 0..self.num_axes {
            let root = self.axis_root[axis];
            if count[root] >= 0 {
                continue;
            }
            order.clear();
            post_order(
                root,
                |n| self.structure.children(n),
                |n| count[n] >= 0,
                |n| order.push(n),
            );
            for &node in &order {
                let children = self.structure.children(node);
                count[node] = match self.structure.kind(node) {
                    Kind::Leaf => match self.group_of_node[node] {
                        g if g >= 0 => {
                            let start = self.unit_offsets[g as usize] as usize;
                            let units = &keep[start..start + self.structure.size(node) as usize];
                            units.iter().filter(|&&k| k != 0).count() as i64
                        }
                        _ => self.structure.size(node) as i64,
                    },
                    Kind::Sum => children.iter().map(|&child| count[child]).sum(),
                    // Sizes are capped and products checked at validation: no overflow.
                    Kind::Product => children.iter().map(|&child| count[child]).product(),
                };
            }
        }
        let mut sizes = try_vec(self.num_axes as u64, WHAT)?;
        sizes.extend((0..self.num_axes).map(|axis| count[self.axis_root[axis]]));
        Ok(sizes)
    }

    /// The distinct groups under each of `axes` (those whose units index it),
    /// in order of first appearance: `(offsets, groups)`, CSR per queried axis.
    ///
    /// ```
    /// use depprune_core::{analyze, EquationSet, ParamTable};
    /// let eqs = EquationSet {
    ///     axis_sizes: &[8, 2, 4],
    ///     kinds: &[2],
    ///     left: &[0],
    ///     right_offsets: &[0, 2],
    ///     right: &[1, 2],
    ///     frozen_axes: &[],
    /// };
    /// let params = ParamTable { params: &[0], dims: &[0], axes: &[0] };
    /// let analysis = analyze(&eqs, &params).unwrap();
    /// assert_eq!(analysis.groups_of_axes(&[0, 2]).unwrap(), (vec![0, 2, 3], vec![0, 1, 1]));
    /// ```
    pub fn groups_of_axes(&self, axes: &[i64]) -> Result<(Vec<i64>, Vec<i64>), CoreError> {
        const WHAT: &str = "groups_of_axes";
        let mut roots = try_vec(axes.len() as u64, WHAT)?;
        for &axis in axes {
            roots.push(self.axis_root[self.check_axis(axis)?]);
        }
        let mut offsets = try_vec(axes.len() as u64 + 1, WHAT)?;
        offsets.push(0i64);
        let mut groups = Vec::new();
        for root in roots {
            let mut seen = std::collections::HashSet::new();
            for leaf in leaves_in_order(&self.structure, root, |n| seen.insert(n)) {
                let g = self.group_of_node[leaf];
                if g >= 0 {
                    groups.push(g);
                }
            }
            offsets.push(groups.len() as i64);
        }
        Ok((offsets, groups))
    }

    /// A keep mask must have one entry per unit, checked before any work.
    fn check_keep(&self, keep: &[u8]) -> Result<(), CoreError> {
        let expected = self.num_units() as usize;
        if keep.len() != expected {
            return Err(CoreError::KeepMaskLength {
                got: keep.len(),
                expected,
            });
        }
        Ok(())
    }

    fn check_axis(&self, axis: i64) -> Result<usize, CoreError> {
        match usize::try_from(axis) {
            Ok(index) if index < self.num_axes => Ok(index),
            _ => Err(CoreError::QueryAxisOutOfRange {
                axis,
                num_axes: self.num_axes,
            }),
        }
    }

    /// The keep flags of every flat index under `root`; `keep` has been checked.
    fn kept_mask_of(
        &self,
        root: usize,
        keep: &[u8],
        memo: &mut HashMap<usize, Rc<Vec<u8>>>,
        what: &'static str,
    ) -> Result<Rc<Vec<u8>>, CoreError> {
        self.fold(
            root,
            memo,
            &|node| match self.group_of_node[node] {
                g if g >= 0 => {
                    let start = self.unit_offsets[g as usize] as usize;
                    let units = &keep[start..start + self.structure.size(node) as usize];
                    let mut flags = try_vec(units.len() as u64, what)?;
                    flags.extend(units.iter().map(|&k| u8::from(k != 0)));
                    Ok(flags)
                }
                // Frozen leaves and leaves outside every parameter are kept whole.
                _ => try_filled(self.structure.size(node), 1, what),
            },
            u8::min,
            what,
        )
    }

    /// Evaluate a per-index vector over a structure: leaves from `leaf`, sums
    /// concatenate, products combine their factors' entries with `combine`.
    /// Every allocation is fallible (`what` names the query in the error).
    fn fold<T: Copy>(
        &self,
        root: usize,
        memo: &mut HashMap<usize, Rc<Vec<T>>>,
        leaf: &dyn Fn(usize) -> Result<Vec<T>, CoreError>,
        combine: fn(T, T) -> T,
        what: &'static str,
    ) -> Result<Rc<Vec<T>>, CoreError> {
        let computed = |node: usize, memo: &mut HashMap<usize, Rc<Vec<T>>>| {
            let parts = self.structure.parts(node);
            let value = match self.structure.kind(node) {
                Kind::Leaf => leaf(node)?,
                Kind::Sum => {
                    let c = &parts;
                    let len = c.iter().map(|child| memo[child].len() as u64).sum();
                    let mut all = try_vec(len, what)?;
                    for child in c.iter() {
                        all.extend_from_slice(&memo[child]);
                    }
                    all
                }
                Kind::Product => {
                    let c = &parts;
                    let first = &memo[&c[0]];
                    let mut acc: Vec<T> = try_vec(first.len() as u64, what)?;
                    acc.extend_from_slice(first);
                    for child in &c[1..] {
                        let factor = &memo[child];
                        let len = (acc.len() as u64).saturating_mul(factor.len() as u64);
                        let mut next = try_vec(len, what)?;
                        for &a in &acc {
                            next.extend(factor.iter().map(|&f| combine(a, f)));
                        }
                        acc = next;
                    }
                    acc
                }
            };
            memo.insert(node, Rc::new(value));
            Ok::<(), CoreError>(())
        };
        // Sums list their pieces through their ropes: no vector per rope node.
        let mut order = Vec::new();
        post_order(
            root,
            |n| self.structure.parts(n),
            |n| memo.contains_key(&n),
            |n| order.push(n),
        );
        for node in order {
            computed(node, memo)?;
        }
        Ok(memo[&root].clone())
    }

    /// A readable structure of `axis`, e.g. `product(g0[2], sum(g1[2], g1[2]))`.
    pub fn describe_axis(&self, axis: i64) -> Result<String, CoreError> {
        let axis = self.check_axis(axis)?;
        enum Item {
            Node(usize),
            Text(&'static str),
        }
        let mut out = String::new();
        let mut stack = vec![Item::Node(self.axis_root[axis])];
        while let Some(item) = stack.pop() {
            let node = match item {
                Item::Text(t) => {
                    out.push_str(t);
                    continue;
                }
                Item::Node(n) => n,
            };
            let (name, c) = match self.structure.kind(node) {
                Kind::Leaf => {
                    let size = self.structure.size(node);
                    match self.group_of_node[node] {
                        g if g >= 0 => out.push_str(&format!("g{g}[{size}]")),
                        _ if self.frozen[node] => out.push_str(&format!("frozen[{size}]")),
                        _ => out.push_str(&format!("free[{size}]")),
                    }
                    continue;
                }
                Kind::Sum => ("sum(", self.structure.parts(node)),
                Kind::Product => ("product(", self.structure.parts(node)),
            };
            out.push_str(name);
            stack.push(Item::Text(")"));
            for (i, &child) in c.iter().enumerate().rev() {
                stack.push(Item::Node(child));
                if i > 0 {
                    stack.push(Item::Text(", "));
                }
            }
        }
        Ok(out)
    }
}

/// `[0, c0, c0 + c1, ...]`, or `None` when the total overflows `i64`.
fn prefix_offsets(counts: impl Iterator<Item = i64>) -> Option<Vec<i64>> {
    let mut offsets = vec![0];
    let mut total = 0i64;
    for c in counts {
        total = total.checked_add(c)?;
        offsets.push(total);
    }
    Some(offsets)
}

/// An empty vector with room for `len` values: a failed allocation becomes an
/// error instead of aborting the process (sizes up to `MAX_AXIS_SIZE` are valid
/// but may not fit in memory).
fn try_vec<T>(len: u64, what: &'static str) -> Result<Vec<T>, CoreError> {
    let out_of_memory = || CoreError::OutOfMemory {
        what,
        elements: len,
    };
    let len = usize::try_from(len).map_err(|_| out_of_memory())?;
    let mut values = Vec::new();
    values.try_reserve_exact(len).map_err(|_| out_of_memory())?;
    Ok(values)
}

/// `len` copies of `value`, allocated fallibly.
fn try_filled<T: Copy>(len: u64, value: T, what: &'static str) -> Result<Vec<T>, CoreError> {
    let mut values = try_vec(len, what)?;
    values.resize(len as usize, value);
    Ok(values)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn failed_allocation_is_an_error_not_an_abort() {
        // More bytes than any address space: the reservation fails deterministically.
        let err = try_vec::<u64>(u64::MAX / 2, "unit_maps").unwrap_err();
        assert_eq!(
            err,
            CoreError::OutOfMemory {
                what: "unit_maps",
                elements: u64::MAX / 2
            }
        );
        assert!(err.to_string().starts_with(&format!(
            "unit_maps needs {} values at once and they could not be allocated",
            u64::MAX / 2
        )));
        assert_eq!(try_filled(3, 7u8, "kept_indices").unwrap(), vec![7, 7, 7]);
    }

    #[test]
    fn prefix_offsets_report_overflow() {
        assert_eq!(prefix_offsets([2, 3].into_iter()), Some(vec![0, 2, 5]));
        assert_eq!(prefix_offsets([i64::MAX, 1].into_iter()), None);
    }
}
