//! The `depprune._core` extension: thin wrappers over `depprune-core`.
//!
//! Flat numpy arrays in, flat numpy arrays out; the GIL is released for all
//! core work; every core error becomes the matching `depprune.errors` class
//! (a failed allocation becomes `ResourceError`, a `MemoryError`), and a panic in the core
//! becomes `InternalError` rather than reaching Python.

use std::borrow::Cow;
use std::panic::{catch_unwind, AssertUnwindSafe};

use depprune_core::{Bf16, CoreError, EquationSet, ParamTable, Power};
use numpy::{IntoPyArray, PyArray1, PyArrayMethods, PyReadonlyArray1};
use pyo3::exceptions::PyRuntimeError;
use pyo3::prelude::*;

/// A core error on its way to Python, raised as the `depprune.errors` class
/// that fits (input errors subclass `ValueError` there).
struct DeppruneErr(CoreError);

impl From<CoreError> for DeppruneErr {
    fn from(err: CoreError) -> Self {
        DeppruneErr(err)
    }
}

impl From<DeppruneErr> for PyErr {
    fn from(err: DeppruneErr) -> PyErr {
        let class = match err.0 {
            CoreError::KeepMaskLength { .. }
            | CoreError::GroupOutOfRange { .. }
            | CoreError::QueryAxisOutOfRange { .. } => "InvalidPlanError",
            CoreError::OutOfMemory { .. } => "ResourceError",
            CoreError::Internal(_) => "InternalError",
            _ => "InvalidEquationsError",
        };
        // The bad parameter row, so the Python side can name the parameter.
        let row = match err.0 {
            CoreError::RowAxisOutOfRange { row, .. } | CoreError::NegativeRowField { row, .. } => {
                Some(row)
            }
            CoreError::DuplicateRow { second, .. } => Some(second),
            _ => None,
        };
        let message = err.0.to_string();
        Python::attach(|py| {
            let raised = depprune_error(py, class, message);
            if let Some(row) = row {
                // Best effort: the message already names the row.
                let _ = raised.value(py).setattr("row", row);
            }
            raised
        })
    }
}

/// An exception of class `class` from `depprune.errors` (RuntimeError if that fails).
fn depprune_error(py: Python<'_>, class: &str, message: String) -> PyErr {
    py.import("depprune.errors")
        .and_then(|module| module.getattr(class))
        .and_then(|cls| Ok(cls.cast_into()?))
        .map(|cls| PyErr::from_type(cls, message.clone()))
        .unwrap_or_else(|_| PyRuntimeError::new_err(message))
}

/// Argument `name` as a 1-d numpy array of `T`, or `class` (a `depprune.errors`
/// name) saying which argument was wrong and what it was, never a bare TypeError.
fn array_arg<'py, T: numpy::Element>(
    value: &Bound<'py, PyAny>,
    name: &str,
    class: &str,
) -> PyResult<PyReadonlyArray1<'py, T>> {
    if let Ok(array) = value.cast::<PyArray1<T>>() {
        if let Ok(readonly) = array.try_readonly() {
            return Ok(readonly);
        }
    }
    let py = value.py();
    let got = match (value.getattr("ndim"), value.getattr("dtype")) {
        (Ok(ndim), Ok(dtype)) => format!("a {ndim}-d {dtype} array"),
        _ => format!("{}", value.get_type().name()?),
    };
    let wanted = T::get_dtype(py).to_string();
    Err(depprune_error(
        py,
        class,
        format!(
            "argument '{name}' must be a 1-d {wanted} numpy array \
             (np.ascontiguousarray(x, dtype=np.{wanted})); got {got}"
        ),
    ))
}

/// A numpy argument as a slice: borrowed when contiguous, else copied.
fn slice<'a, T: numpy::Element + Clone>(array: &'a PyReadonlyArray1<'_, T>) -> Cow<'a, [T]> {
    match array.as_slice() {
        Ok(values) => Cow::Borrowed(values),
        Err(_) => Cow::Owned(array.as_array().to_vec()),
    }
}

/// Run core work without the GIL; a panic (a bug in the core) becomes
/// `InternalError` instead of a `PanicException` in the user's code.
fn run_core<T: Send>(
    py: Python<'_>,
    work: impl FnOnce() -> Result<T, CoreError> + Send,
) -> PyResult<T> {
    py.detach(|| {
        catch_unwind(AssertUnwindSafe(work)).unwrap_or_else(|payload| {
            let reason = payload
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| payload.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "unknown panic".into());
            Err(CoreError::Internal(format!("panic: {reason}")))
        })
    })
    .map_err(|err| DeppruneErr(err).into())
}

type Csr<'py> = (Bound<'py, PyArray1<i64>>, Bound<'py, PyArray1<i64>>);
type Sums<'py> = (Bound<'py, PyArray1<f64>>, Bound<'py, PyArray1<f64>>);

#[pymodule]
mod _core {
    use super::*;

    /// The largest axis size `analyze` accepts.
    #[pymodule_export]
    const MAX_AXIS_SIZE: i64 = depprune_core::MAX_AXIS_SIZE;

    /// The analysed equations: groups, members, unit maps and kept indices.
    #[pyclass(frozen, module = "depprune._core")]
    pub struct Analysis {
        inner: depprune_core::Analysis,
    }

    #[pymethods]
    impl Analysis {
        /// Number of groups.
        #[getter]
        fn num_groups(&self) -> usize {
            self.inner.num_groups()
        }

        /// Total number of units over all groups (the length of a keep mask).
        #[getter]
        fn num_units(&self) -> i64 {
            self.inner.num_units()
        }

        /// Units per group.
        fn group_sizes<'py>(&self, py: Python<'py>) -> Bound<'py, PyArray1<i64>> {
            self.inner.group_sizes().to_vec().into_pyarray(py)
        }

        /// Where each group's units start in a keep mask (num_groups + 1 entries).
        fn unit_offsets<'py>(&self, py: Python<'py>) -> Bound<'py, PyArray1<i64>> {
            self.inner.unit_offsets().to_vec().into_pyarray(py)
        }

        /// CSR offsets of each group's members (num_groups + 1 entries).
        fn member_offsets<'py>(&self, py: Python<'py>) -> Bound<'py, PyArray1<i64>> {
            self.inner.member_offsets().to_vec().into_pyarray(py)
        }

        /// Parameter rows of every group's members, group after group.
        fn member_rows<'py>(&self, py: Python<'py>) -> Bound<'py, PyArray1<i64>> {
            self.inner.member_rows().to_vec().into_pyarray(py)
        }

        /// Equations whose structures had to be frozen (-1: a leaf repeated in a product).
        fn conflicts<'py>(&self, py: Python<'py>) -> Bound<'py, PyArray1<i64>> {
            self.inner.conflicts().to_vec().into_pyarray(py)
        }

        /// Unit maps of every member of the given groups: (offsets, values).
        fn unit_maps<'py>(
            &self,
            py: Python<'py>,
            groups: &Bound<'py, PyAny>,
        ) -> PyResult<Csr<'py>> {
            let groups = array_arg::<i64>(groups, "groups", "InvalidPlanError")?;
            let groups = slice(&groups);
            let (offsets, values) = run_core(py, || self.inner.unit_maps(&groups))?;
            Ok((offsets.into_pyarray(py), values.into_pyarray(py)))
        }

        /// Kept flat indices of every parameter row under a keep mask: (offsets, indices).
        fn kept_indices<'py>(
            &self,
            py: Python<'py>,
            keep: &Bound<'py, PyAny>,
        ) -> PyResult<Csr<'py>> {
            let keep = array_arg::<u8>(keep, "keep", "InvalidPlanError")?;
            let keep = slice(&keep);
            let (offsets, indices) = run_core(py, || self.inner.kept_indices(&keep))?;
            Ok((offsets.into_pyarray(py), indices.into_pyarray(py)))
        }

        /// Keep flags (0/1) of every element of one axis under a keep mask.
        fn kept_mask_of_axis<'py>(
            &self,
            py: Python<'py>,
            axis: i64,
            keep: &Bound<'py, PyAny>,
        ) -> PyResult<Bound<'py, PyArray1<u8>>> {
            let keep = array_arg::<u8>(keep, "keep", "InvalidPlanError")?;
            let keep = slice(&keep);
            let mask = run_core(py, || self.inner.kept_mask_of_axis(axis, &keep))?;
            Ok(mask.into_pyarray(py))
        }

        /// Kept size of every axis under a keep mask (the shapes a plan predicts).
        fn kept_sizes<'py>(
            &self,
            py: Python<'py>,
            keep: &Bound<'py, PyAny>,
        ) -> PyResult<Bound<'py, PyArray1<i64>>> {
            let keep = array_arg::<u8>(keep, "keep", "InvalidPlanError")?;
            let keep = slice(&keep);
            let sizes = run_core(py, || self.inner.kept_sizes(&keep))?;
            Ok(sizes.into_pyarray(py))
        }

        /// Groups whose units index each of the given axes: (offsets, groups).
        fn groups_of_axes<'py>(
            &self,
            py: Python<'py>,
            axes: &Bound<'py, PyAny>,
        ) -> PyResult<Csr<'py>> {
            let axes = array_arg::<i64>(axes, "axes", "InvalidPlanError")?;
            let axes = slice(&axes);
            let (offsets, groups) = run_core(py, || self.inner.groups_of_axes(&axes))?;
            Ok((offsets.into_pyarray(py), groups.into_pyarray(py)))
        }

        /// The structure of an axis, e.g. "product(g0[2], sum(g1[2], g1[2]))".
        fn describe_axis(&self, py: Python<'_>, axis: i64) -> PyResult<String> {
            run_core(py, || self.inner.describe_axis(axis))
        }
    }

    /// Sums of `|x|` (`power=1`) or `x^2` (`power=2`) over every row and every column of
    /// `data`, a row-major `rows x cols` matrix given flat as float32 or as the bits of
    /// bfloat16 (uint16); float64 results. Read once, without the GIL, on `threads`.
    #[pyfunction]
    fn power_sums<'py>(
        py: Python<'py>,
        data: &Bound<'py, PyAny>,
        rows: usize,
        cols: usize,
        power: u8,
        threads: usize,
    ) -> PyResult<Sums<'py>> {
        let power = match power {
            1 => Power::Abs,
            2 => Power::Square,
            _ => {
                let message =
                    format!("power_sums sums |x| (power=1) or x^2 (power=2), not {power}");
                return Err(depprune_error(py, "ImportanceError", message));
            }
        };
        let (row_sums, col_sums) = if let Ok(bits) = data.cast::<PyArray1<u16>>() {
            let bits = bits.try_readonly()?;
            let values = slice(&bits);
            check_len(py, values.len(), rows, cols)?;
            // SAFETY: Bf16 is a repr(transparent) u16, so the slice is read in place.
            let halves: &[Bf16] =
                unsafe { std::slice::from_raw_parts(values.as_ptr().cast::<Bf16>(), values.len()) };
            run_core(py, || {
                Ok(depprune_core::power_sums(
                    halves, rows, cols, power, threads,
                ))
            })?
        } else {
            let floats = array_arg::<f32>(data, "data", "ImportanceError")?;
            let values = slice(&floats);
            check_len(py, values.len(), rows, cols)?;
            run_core(py, || {
                Ok(depprune_core::power_sums(
                    &values, rows, cols, power, threads,
                ))
            })?
        };
        Ok((row_sums.into_pyarray(py), col_sums.into_pyarray(py)))
    }

    /// `out = source[rows][:, cols]` over a row-major tensor flattened to 1-d (`cols_total`
    /// columns of `inner` elements; `rows=None` keeps every row), `source` and `out` of
    /// one integer dtype of the element's size (uint8, int16, int32, int64). Without the
    /// GIL, on `threads`.
    #[pyfunction]
    #[pyo3(signature = (source, cols_total, inner, rows, cols, out, threads))]
    #[allow(clippy::too_many_arguments)]
    fn take_rows_columns<'py>(
        py: Python<'py>,
        source: &Bound<'py, PyAny>,
        cols_total: usize,
        inner: usize,
        rows: Option<&Bound<'py, PyAny>>,
        cols: &Bound<'py, PyAny>,
        out: &Bound<'py, PyAny>,
        threads: usize,
    ) -> PyResult<()> {
        let rows = rows
            .map(|r| array_arg::<i64>(r, "rows", "InvalidPlanError"))
            .transpose()?;
        let rows = rows.as_ref().map(slice);
        let cols = array_arg::<i64>(cols, "cols", "InvalidPlanError")?;
        let cols = slice(&cols);
        macro_rules! take {
            ($t:ty) => {
                if let (Ok(src), Ok(dst)) =
                    (source.cast::<PyArray1<$t>>(), out.cast::<PyArray1<$t>>())
                {
                    let src = src.try_readonly()?;
                    let mut dst = dst.try_readwrite()?;
                    let src = src.as_slice()?;
                    let dst = dst.as_slice_mut()?;
                    let rows = rows.as_deref();
                    return run_core(py, || {
                        depprune_core::take_rows_columns(
                            src, cols_total, inner, rows, &cols, dst, threads,
                        )
                    });
                }
            };
        }
        take!(u8);
        take!(i16);
        take!(i32);
        take!(i64);
        Err(depprune_error(
            py,
            "InvalidPlanError",
            "take_rows_columns needs contiguous 1-d source and out arrays of one dtype: \
             uint8, int16, int32 or int64"
                .to_string(),
        ))
    }

    fn check_len(py: Python<'_>, len: usize, rows: usize, cols: usize) -> PyResult<()> {
        if rows.checked_mul(cols) == Some(len) {
            return Ok(());
        }
        let message = format!("power_sums got {len} values for a {rows} x {cols} matrix");
        Err(depprune_error(py, "ImportanceError", message))
    }

    /// Validate and unify axis equations; returns the Analysis.
    #[pyfunction]
    #[allow(clippy::too_many_arguments)]
    fn analyze<'py>(
        py: Python<'py>,
        axis_sizes: &Bound<'py, PyAny>,
        eq_kinds: &Bound<'py, PyAny>,
        eq_left: &Bound<'py, PyAny>,
        eq_right_offsets: &Bound<'py, PyAny>,
        eq_right: &Bound<'py, PyAny>,
        frozen_axes: &Bound<'py, PyAny>,
        row_params: &Bound<'py, PyAny>,
        row_dims: &Bound<'py, PyAny>,
        row_axes: &Bound<'py, PyAny>,
    ) -> PyResult<Analysis> {
        let arg = |value, name| array_arg::<i64>(value, name, "InvalidEquationsError");
        let (axis_sizes, eq_kinds, eq_left) = (
            arg(axis_sizes, "axis_sizes")?,
            arg(eq_kinds, "eq_kinds")?,
            arg(eq_left, "eq_left")?,
        );
        let (eq_right_offsets, eq_right, frozen_axes) = (
            arg(eq_right_offsets, "eq_right_offsets")?,
            arg(eq_right, "eq_right")?,
            arg(frozen_axes, "frozen_axes")?,
        );
        let (row_params, row_dims, row_axes) = (
            arg(row_params, "row_params")?,
            arg(row_dims, "row_dims")?,
            arg(row_axes, "row_axes")?,
        );
        let (axis_sizes, eq_kinds, eq_left) =
            (slice(&axis_sizes), slice(&eq_kinds), slice(&eq_left));
        let (eq_right_offsets, eq_right, frozen_axes) = (
            slice(&eq_right_offsets),
            slice(&eq_right),
            slice(&frozen_axes),
        );
        let (row_params, row_dims, row_axes) =
            (slice(&row_params), slice(&row_dims), slice(&row_axes));
        let equations = EquationSet {
            axis_sizes: &axis_sizes,
            kinds: &eq_kinds,
            left: &eq_left,
            right_offsets: &eq_right_offsets,
            right: &eq_right,
            frozen_axes: &frozen_axes,
        };
        let params = ParamTable {
            params: &row_params,
            dims: &row_dims,
            axes: &row_axes,
        };
        let inner = run_core(py, || depprune_core::analyze(&equations, &params))?;
        Ok(Analysis { inner })
    }
}
