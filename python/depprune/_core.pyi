"""Type stubs of the Rust extension (rust/depprune-py); checked by mypy.stubtest."""

from typing import final

import numpy as np
import numpy.typing as npt

__all__ = ["MAX_AXIS_SIZE", "Analysis", "analyze", "power_sums", "take_rows_columns"]

_I64 = npt.NDArray[np.int64]

MAX_AXIS_SIZE: int

@final
class Analysis:
    @property
    def num_groups(self) -> int: ...
    @property
    def num_units(self) -> int: ...
    def group_sizes(self) -> _I64: ...
    def unit_offsets(self) -> _I64: ...
    def member_offsets(self) -> _I64: ...
    def member_rows(self) -> _I64: ...
    def conflicts(self) -> _I64: ...
    def unit_maps(self, groups: _I64) -> tuple[_I64, _I64]: ...
    def kept_indices(self, keep: npt.NDArray[np.uint8]) -> tuple[_I64, _I64]: ...
    def kept_mask_of_axis(
        self, axis: int, keep: npt.NDArray[np.uint8]
    ) -> npt.NDArray[np.uint8]: ...
    def kept_sizes(self, keep: npt.NDArray[np.uint8]) -> _I64: ...
    def groups_of_axes(self, axes: _I64) -> tuple[_I64, _I64]: ...
    def describe_axis(self, axis: int) -> str: ...

def analyze(
    axis_sizes: _I64,
    eq_kinds: _I64,
    eq_left: _I64,
    eq_right_offsets: _I64,
    eq_right: _I64,
    frozen_axes: _I64,
    row_params: _I64,
    row_dims: _I64,
    row_axes: _I64,
) -> Analysis: ...
def power_sums(
    data: npt.NDArray[np.uint16] | npt.NDArray[np.float32],
    rows: int,
    cols: int,
    power: int,
    threads: int,
) -> tuple[npt.NDArray[np.float64], npt.NDArray[np.float64]]: ...
def take_rows_columns(
    source: npt.NDArray[np.integer],
    cols_total: int,
    inner: int,
    rows: _I64 | None,
    cols: _I64,
    out: npt.NDArray[np.integer],
    threads: int,
) -> None: ...
