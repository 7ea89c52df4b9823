//! The flat input arrays and their validation into typed equations.

use crate::error::CoreError;

/// The largest size an axis may have (2**40, about 10**12). Far beyond any real
/// tensor dim, and small enough that sums and products of sizes stay exact in
/// 64 bits and every unit id and flat index fits an `i64`.
pub const MAX_AXIS_SIZE: i64 = 1 << 40;

/// How the right-hand axes of an equation make up its left axis.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EquationKind {
    /// Same elements in the same order (exactly one right-hand axis).
    Equal,
    /// Concatenation: the left axis is the right-hand axes one after another.
    Sum,
    /// Row-major merge: element `(i, j)` of `product(A, B)` is at `i * |B| + j`.
    Product,
}

impl EquationKind {
    pub fn from_code(code: i64) -> Option<Self> {
        match code {
            0 => Some(Self::Equal),
            1 => Some(Self::Sum),
            2 => Some(Self::Product),
            _ => None,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Self::Equal => "equal",
            Self::Sum => "sum",
            Self::Product => "product",
        }
    }
}

/// Axes, equations between them and frozen axes, as flat arrays (CSR for the
/// right-hand sides): the form the Python side hands over without copying.
#[derive(Debug, Clone, Copy, Default)]
pub struct EquationSet<'a> {
    pub axis_sizes: &'a [i64],
    pub kinds: &'a [i64],
    pub left: &'a [i64],
    pub right_offsets: &'a [i64],
    pub right: &'a [i64],
    pub frozen_axes: &'a [i64],
}

/// Which axis each (parameter, dim) lies on; one row per parameter dim.
#[derive(Debug, Clone, Copy, Default)]
pub struct ParamTable<'a> {
    pub params: &'a [i64],
    pub dims: &'a [i64],
    pub axes: &'a [i64],
}

/// A validated equation: indices are in range and sizes agree.
#[derive(Debug, Clone)]
pub(crate) struct Equation {
    pub kind: EquationKind,
    pub left: usize,
    pub right: Vec<usize>,
}

/// Validated input: sizes as `u64`, equations typed, rows as axis ids.
#[derive(Debug, Clone)]
pub(crate) struct Validated {
    pub axis_sizes: Vec<u64>,
    pub equations: Vec<Equation>,
    pub frozen_axes: Vec<usize>,
    pub row_axes: Vec<usize>,
}

fn check_len(what: &'static str, got: usize, expected: usize) -> Result<(), CoreError> {
    if got == expected {
        Ok(())
    } else {
        Err(CoreError::LengthMismatch {
            what,
            got,
            expected,
        })
    }
}

/// Check every array and every row; the first problem found is returned.
pub(crate) fn validate(eqs: &EquationSet, params: &ParamTable) -> Result<Validated, CoreError> {
    let num_axes = eqs.axis_sizes.len();
    let mut axis_sizes = Vec::with_capacity(num_axes);
    for (axis, &size) in eqs.axis_sizes.iter().enumerate() {
        if size < 0 {
            return Err(CoreError::NegativeAxisSize { axis, size });
        }
        if size > MAX_AXIS_SIZE {
            return Err(CoreError::AxisTooLarge {
                axis,
                size,
                limit: MAX_AXIS_SIZE,
            });
        }
        axis_sizes.push(size as u64);
    }

    let num_equations = eqs.kinds.len();
    check_len("eq_left", eqs.left.len(), num_equations)?;
    check_len(
        "eq_right_offsets",
        eqs.right_offsets.len(),
        num_equations + 1,
    )?;
    let total_right = eqs.right.len();
    for (index, pair) in eqs.right_offsets.windows(2).enumerate() {
        if pair[1] < pair[0] {
            return Err(CoreError::BadOffsets {
                index: index + 1,
                value: pair[1],
                len: total_right,
            });
        }
    }
    if eqs.right_offsets[0] != 0 {
        return Err(CoreError::BadOffsets {
            index: 0,
            value: eqs.right_offsets[0],
            len: total_right,
        });
    }
    let last = eqs.right_offsets[num_equations];
    if last != total_right as i64 {
        return Err(CoreError::BadOffsets {
            index: num_equations,
            value: last,
            len: total_right,
        });
    }

    let axis_id = |equation: usize, axis: i64| -> Result<usize, CoreError> {
        if axis < 0 || axis as usize >= num_axes {
            Err(CoreError::AxisOutOfRange {
                equation,
                axis,
                num_axes,
            })
        } else {
            Ok(axis as usize)
        }
    };

    let mut equations = Vec::with_capacity(num_equations);
    for equation in 0..num_equations {
        let code = eqs.kinds[equation];
        let kind = EquationKind::from_code(code).ok_or(CoreError::UnknownEquationKind {
            equation,
            kind: code,
        })?;
        let left = axis_id(equation, eqs.left[equation])?;
        let span = eqs.right_offsets[equation] as usize..eqs.right_offsets[equation + 1] as usize;
        let right = eqs.right[span]
            .iter()
            .map(|&axis| axis_id(equation, axis))
            .collect::<Result<Vec<_>, _>>()?;
        let arity_ok = match kind {
            EquationKind::Equal => right.len() == 1,
            EquationKind::Sum | EquationKind::Product => !right.is_empty(),
        };
        if !arity_ok {
            return Err(CoreError::WrongArity {
                equation,
                kind: kind.name(),
                got: right.len(),
                needed: if kind == EquationKind::Equal {
                    "exactly 1"
                } else {
                    "at least 1"
                },
            });
        }
        let right_size = match kind {
            EquationKind::Equal => axis_sizes[right[0]],
            EquationKind::Sum => right
                .iter()
                .try_fold(0u64, |acc, &r| acc.checked_add(axis_sizes[r]))
                .ok_or(CoreError::SizeOverflow {
                    equation,
                    kind: kind.name(),
                })?,
            EquationKind::Product => right
                .iter()
                .try_fold(1u64, |acc, &r| acc.checked_mul(axis_sizes[r]))
                .ok_or(CoreError::SizeOverflow {
                    equation,
                    kind: kind.name(),
                })?,
        };
        if right_size != axis_sizes[left] {
            return Err(CoreError::SizeMismatch {
                equation,
                kind: kind.name(),
                left,
                left_size: axis_sizes[left],
                right_size,
            });
        }
        equations.push(Equation { kind, left, right });
    }

    let mut frozen_axes = Vec::with_capacity(eqs.frozen_axes.len());
    for (index, &axis) in eqs.frozen_axes.iter().enumerate() {
        if axis < 0 || axis as usize >= num_axes {
            return Err(CoreError::FrozenAxisOutOfRange {
                index,
                axis,
                num_axes,
            });
        }
        frozen_axes.push(axis as usize);
    }

    let num_rows = params.axes.len();
    check_len("row_params", params.params.len(), num_rows)?;
    check_len("row_dims", params.dims.len(), num_rows)?;
    let mut row_axes = Vec::with_capacity(num_rows);
    let mut seen = std::collections::HashMap::with_capacity(num_rows);
    // Kept indices and unit maps hold one value per element of every row.
    let mut row_elements = 0i64;
    for row in 0..num_rows {
        let (param, dim, axis) = (params.params[row], params.dims[row], params.axes[row]);
        if param < 0 {
            return Err(CoreError::NegativeRowField {
                row,
                what: "param",
                value: param,
            });
        }
        if dim < 0 {
            return Err(CoreError::NegativeRowField {
                row,
                what: "dim",
                value: dim,
            });
        }
        if axis < 0 || axis as usize >= num_axes {
            return Err(CoreError::RowAxisOutOfRange {
                row,
                axis,
                num_axes,
            });
        }
        if let Some(first) = seen.insert((param, dim), row) {
            return Err(CoreError::DuplicateRow {
                first,
                second: row,
                param,
                dim,
            });
        }
        row_elements = row_elements
            .checked_add(eqs.axis_sizes[axis as usize])
            .ok_or(CoreError::TotalTooLarge {
                what: "the parameter dims",
                limit: i64::MAX,
            })?;
        row_axes.push(axis as usize);
    }

    Ok(Validated {
        axis_sizes,
        equations,
        frozen_axes,
        row_axes,
    })
}
