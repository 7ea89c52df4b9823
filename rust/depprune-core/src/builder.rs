//! An owned, growable equation set: the Rust counterpart of Python's
//! `AxisEquations`, for tests, benchmarks and Rust callers.

use crate::analysis::{analyze, Analysis};
use crate::error::CoreError;
use crate::input::{EquationSet, ParamTable};

/// Axes, equations, freezes and parameter rows in the flat layout the core takes.
///
/// ```
/// use depprune_core::EquationBuilder;
/// let mut b = EquationBuilder::new();
/// let (hidden, heads, head_dim) = (b.axis(8), b.axis(2), b.axis(4));
/// b.product(hidden, &[heads, head_dim]);
/// b.param(&[hidden]);
/// assert_eq!(b.analyze().unwrap().group_sizes(), &[2, 4]);
/// ```
#[derive(Debug, Clone)]
pub struct EquationBuilder {
    pub sizes: Vec<i64>,
    pub kinds: Vec<i64>,
    pub left: Vec<i64>,
    pub offsets: Vec<i64>,
    pub right: Vec<i64>,
    pub frozen: Vec<i64>,
    pub row_params: Vec<i64>,
    pub row_dims: Vec<i64>,
    pub row_axes: Vec<i64>,
    /// `(rows scanned, the largest param among them)`: [`Self::param`] reads
    /// only rows added since, so building n params stays linear.
    params_seen: (usize, Option<i64>),
}

impl Default for EquationBuilder {
    fn default() -> Self {
        Self::new()
    }
}

impl EquationBuilder {
    pub fn new() -> Self {
        EquationBuilder {
            sizes: Vec::new(),
            kinds: Vec::new(),
            left: Vec::new(),
            offsets: vec![0],
            right: Vec::new(),
            frozen: Vec::new(),
            row_params: Vec::new(),
            row_dims: Vec::new(),
            row_axes: Vec::new(),
            params_seen: (0, None),
        }
    }

    /// A new axis of `size` elements; returns its id.
    pub fn axis(&mut self, size: i64) -> i64 {
        self.sizes.push(size);
        self.sizes.len() as i64 - 1
    }

    fn equation(&mut self, kind: i64, left: i64, right: &[i64]) {
        self.kinds.push(kind);
        self.left.push(left);
        self.right.extend_from_slice(right);
        self.offsets.push(self.right.len() as i64);
    }

    pub fn equal(&mut self, a: i64, b: i64) {
        self.equation(0, a, &[b]);
    }

    pub fn sum(&mut self, left: i64, parts: &[i64]) {
        self.equation(1, left, parts);
    }

    pub fn product(&mut self, left: i64, factors: &[i64]) {
        self.equation(2, left, factors);
    }

    pub fn freeze(&mut self, axis: i64) {
        self.frozen.push(axis);
    }

    /// One parameter row: dim `dim` of parameter `param` lies on `axis`.
    pub fn row(&mut self, param: i64, dim: i64, axis: i64) -> usize {
        self.row_params.push(param);
        self.row_dims.push(dim);
        self.row_axes.push(axis);
        self.row_axes.len() - 1
    }

    /// A new parameter whose dims lie on `axes`; returns its rows.
    pub fn param(&mut self, axes: &[i64]) -> Vec<usize> {
        let (mut scanned, mut largest) = self.params_seen;
        if scanned > self.row_params.len() {
            (scanned, largest) = (0, None);
        }
        largest = self.row_params[scanned..]
            .iter()
            .copied()
            .chain(largest)
            .max();
        self.params_seen = (self.row_params.len(), largest);
        let param = largest.map_or(0, |p| p + 1);
        axes.iter()
            .enumerate()
            .map(|(dim, &axis)| self.row(param, dim as i64, axis))
            .collect()
    }

    pub fn num_equations(&self) -> usize {
        self.kinds.len()
    }

    pub fn equation_set(&self) -> EquationSet<'_> {
        EquationSet {
            axis_sizes: &self.sizes,
            kinds: &self.kinds,
            left: &self.left,
            right_offsets: &self.offsets,
            right: &self.right,
            frozen_axes: &self.frozen,
        }
    }

    pub fn param_table(&self) -> ParamTable<'_> {
        ParamTable {
            params: &self.row_params,
            dims: &self.row_dims,
            axes: &self.row_axes,
        }
    }

    pub fn analyze(&self) -> Result<Analysis, CoreError> {
        analyze(&self.equation_set(), &self.param_table())
    }
}
