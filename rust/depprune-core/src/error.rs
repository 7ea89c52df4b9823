//! Errors of the core: each names the bad row so a user can find it.

use thiserror::Error;

/// Everything that can go wrong in the core. Input errors name the row of the
/// array that is wrong; `Internal` means a bug in depprune, never bad input.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum CoreError {
    #[error("axis {axis} has size {size}; sizes must be >= 0")]
    NegativeAxisSize { axis: usize, size: i64 },

    #[error(
        "axis {axis} has size {size}, more than the limit of {limit} elements per axis; \
         no tensor dim is that large, so check the size given for this axis"
    )]
    AxisTooLarge { axis: usize, size: i64, limit: i64 },

    #[error(
        "{what} have more than {limit} elements in all; \
         check the axis sizes given for them"
    )]
    TotalTooLarge { what: &'static str, limit: i64 },

    #[error("{what} has {got} entries but {expected} were expected")]
    LengthMismatch {
        what: &'static str,
        got: usize,
        expected: usize,
    },

    #[error("equation {equation} has kind {kind}; kinds are 0 (equal), 1 (sum), 2 (product)")]
    UnknownEquationKind { equation: usize, kind: i64 },

    #[error(
        "eq_right_offsets must start at 0, never decrease and end at len(eq_right) = {len}; \
         entry {index} is {value}"
    )]
    BadOffsets {
        index: usize,
        value: i64,
        len: usize,
    },

    #[error("equation {equation} refers to axis {axis} but there are {num_axes} axes")]
    AxisOutOfRange {
        equation: usize,
        axis: i64,
        num_axes: usize,
    },

    #[error("equation {equation} ({kind}) has {got} right-hand axes; it needs {needed}")]
    WrongArity {
        equation: usize,
        kind: &'static str,
        got: usize,
        needed: &'static str,
    },

    #[error(
        "equation {equation} ({kind}) is inconsistent: left axis {left} has size {left_size} \
         but the right-hand side has size {right_size}"
    )]
    SizeMismatch {
        equation: usize,
        kind: &'static str,
        left: usize,
        left_size: u64,
        right_size: u64,
    },

    #[error(
        "equation {equation}: the {kind} of the right-hand sizes overflows 64 bits; \
         check the sizes of its right-hand axes"
    )]
    SizeOverflow { equation: usize, kind: &'static str },

    #[error("frozen_axes[{index}] is axis {axis} but there are {num_axes} axes")]
    FrozenAxisOutOfRange {
        index: usize,
        axis: i64,
        num_axes: usize,
    },

    #[error("parameter row {row} refers to axis {axis} but there are {num_axes} axes")]
    RowAxisOutOfRange {
        row: usize,
        axis: i64,
        num_axes: usize,
    },

    #[error("parameter row {row} has {what} {value}; it must be >= 0")]
    NegativeRowField {
        row: usize,
        what: &'static str,
        value: i64,
    },

    #[error(
        "parameter rows {first} and {second} both describe dim {dim} of parameter {param}; \
         give each (parameter, dim) exactly one row"
    )]
    DuplicateRow {
        first: usize,
        second: usize,
        param: i64,
        dim: i64,
    },

    #[error("the keep mask has {got} entries but the groups have {expected} units in all")]
    KeepMaskLength { got: usize, expected: usize },

    #[error("group {group} does not exist; there are {num_groups} groups")]
    GroupOutOfRange { group: i64, num_groups: usize },

    #[error("axis {axis} does not exist; there are {num_axes} axes")]
    QueryAxisOutOfRange { axis: i64, num_axes: usize },

    #[error(
        "{what} needs {elements} values at once and they could not be allocated; \
         the axes involved are too large to materialise on this machine"
    )]
    OutOfMemory { what: &'static str, elements: u64 },

    #[error("internal error in depprune-core (please report): {0}")]
    Internal(String),
}
