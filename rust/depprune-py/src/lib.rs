//! The `depprune._core` extension: thin wrappers over `depprune-core`.
//!
//! Flat numpy arrays in, flat numpy arrays out; the GIL is released for all
//! core work; every core error becomes the matching `depprune.errors` class.

use depprune_core::{CoreError, EquationSet, ParamTable};
use numpy::{IntoPyArray, PyArray1, PyReadonlyArray1};
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
            CoreError::Internal(_) => "InternalError",
            _ => "InvalidEquationsError",
        };
        let message = err.0.to_string();
        Python::attach(|py| {
            py.import("depprune.errors")
                .and_then(|module| module.getattr(class))
                .map(|cls| {
                    PyErr::from_type(cls.cast_into().expect("exception class"), message.clone())
                })
                .unwrap_or_else(|_| PyRuntimeError::new_err(message))
        })
    }
}

/// A numpy argument as a contiguous slice, or an error naming the argument.
fn slice<'a, T: numpy::Element>(
    array: &'a PyReadonlyArray1<'_, T>,
    name: &str,
) -> PyResult<&'a [T]> {
    array.as_slice().map_err(|_| {
        PyErr::from(DeppruneErr(CoreError::Internal(format!(
            "{name} must be a contiguous 1-d array (use numpy.ascontiguousarray)"
        ))))
    })
}

type Csr<'py> = (Bound<'py, PyArray1<i64>>, Bound<'py, PyArray1<i64>>);

#[pymodule]
mod _core {
    use super::*;

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
            groups: PyReadonlyArray1<'py, i64>,
        ) -> PyResult<Csr<'py>> {
            let groups = slice(&groups, "groups")?;
            let (offsets, values) = py
                .detach(|| self.inner.unit_maps(groups))
                .map_err(DeppruneErr)?;
            Ok((offsets.into_pyarray(py), values.into_pyarray(py)))
        }

        /// Kept flat indices of every parameter row under a keep mask: (offsets, indices).
        fn kept_indices<'py>(
            &self,
            py: Python<'py>,
            keep: PyReadonlyArray1<'py, u8>,
        ) -> PyResult<Csr<'py>> {
            let keep = slice(&keep, "keep")?;
            let (offsets, indices) = py
                .detach(|| self.inner.kept_indices(keep))
                .map_err(DeppruneErr)?;
            Ok((offsets.into_pyarray(py), indices.into_pyarray(py)))
        }

        /// Keep flags (0/1) of every element of one axis under a keep mask.
        fn kept_mask_of_axis<'py>(
            &self,
            py: Python<'py>,
            axis: i64,
            keep: PyReadonlyArray1<'py, u8>,
        ) -> PyResult<Bound<'py, PyArray1<u8>>> {
            let keep = slice(&keep, "keep")?;
            let axis = usize::try_from(axis).unwrap_or(usize::MAX);
            let mask = py
                .detach(|| self.inner.kept_mask_of_axis(axis, keep))
                .map_err(DeppruneErr)?;
            Ok(mask.into_pyarray(py))
        }

        /// The structure of an axis, e.g. "product(g0[2], sum(g1[2], g1[2]))".
        fn describe_axis(&self, axis: i64) -> PyResult<String> {
            Ok(self.inner.describe_axis(axis).map_err(DeppruneErr)?)
        }
    }

    /// Validate and unify axis equations; returns the Analysis.
    #[pyfunction]
    #[allow(clippy::too_many_arguments)]
    fn analyze<'py>(
        py: Python<'py>,
        axis_sizes: PyReadonlyArray1<'py, i64>,
        eq_kinds: PyReadonlyArray1<'py, i64>,
        eq_left: PyReadonlyArray1<'py, i64>,
        eq_right_offsets: PyReadonlyArray1<'py, i64>,
        eq_right: PyReadonlyArray1<'py, i64>,
        frozen_axes: PyReadonlyArray1<'py, i64>,
        row_params: PyReadonlyArray1<'py, i64>,
        row_dims: PyReadonlyArray1<'py, i64>,
        row_axes: PyReadonlyArray1<'py, i64>,
    ) -> PyResult<Analysis> {
        let equations = EquationSet {
            axis_sizes: slice(&axis_sizes, "axis_sizes")?,
            kinds: slice(&eq_kinds, "eq_kinds")?,
            left: slice(&eq_left, "eq_left")?,
            right_offsets: slice(&eq_right_offsets, "eq_right_offsets")?,
            right: slice(&eq_right, "eq_right")?,
            frozen_axes: slice(&frozen_axes, "frozen_axes")?,
        };
        let params = ParamTable {
            params: slice(&row_params, "row_params")?,
            dims: slice(&row_dims, "row_dims")?,
            axes: slice(&row_axes, "row_axes")?,
        };
        let inner = py
            .detach(|| depprune_core::analyze(&equations, &params))
            .map_err(DeppruneErr)?;
        Ok(Analysis { inner })
    }
}
