"""The pyo3 binding ``depprune._core``: every malformed input, and properties.

Malformed input must raise the matching ``depprune`` error class with a
message naming the bad row and value; nothing may crash the interpreter or
let a Rust panic (``pyo3_runtime.PanicException``) reach Python.

Tests marked ``xfail(strict=True, reason="BUG: ...")`` pin down library bugs
found while writing this suite: they fail today and will turn into an
XPASS failure (prompting removal of the marker) once the bug is fixed.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import depprune
from depprune import _core
from depprune.equations import EQUAL, PRODUCT, SUM, AxisEquations
from depprune.errors import DeppruneError, InternalError, InvalidEquationsError, InvalidPlanError

ARG_NAMES = (
    "axis_sizes",
    "eq_kinds",
    "eq_left",
    "eq_right_offsets",
    "eq_right",
    "frozen_axes",
    "row_params",
    "row_dims",
    "row_axes",
)

# -- helpers ---------------------------------------------------------------------


def i64(*values: int) -> np.ndarray:
    return np.asarray(values, dtype=np.int64)


def base_arrays() -> dict[str, np.ndarray]:
    """A small valid set: hidden (6) = product(heads 2, head_dim 3); a 2-d weight."""
    return {
        "axis_sizes": i64(6, 2, 3, 4),
        "eq_kinds": i64(PRODUCT),
        "eq_left": i64(0),
        "eq_right_offsets": i64(0, 2),
        "eq_right": i64(1, 2),
        "frozen_axes": i64(3),
        "row_params": i64(0, 0),
        "row_dims": i64(0, 1),
        "row_axes": i64(0, 3),
    }


def analyze(**overrides: object) -> _core.Analysis:
    """``_core.analyze`` on the base set with some arrays replaced (lists -> int64)."""
    arrays = base_arrays()
    for name, value in overrides.items():
        assert name in arrays, name
        arrays[name] = value if isinstance(value, np.ndarray) else i64(*value)
    return _core.analyze(**arrays)


def equations_error(message: str, **overrides: object) -> None:
    """Assert analyze(**overrides) raises InvalidEquationsError containing ``message``."""
    with pytest.raises(InvalidEquationsError) as info:
        analyze(**overrides)
    assert message in str(info.value), str(info.value)


def csr_rows(offsets: np.ndarray, values: np.ndarray) -> list[list[int]]:
    return [values[offsets[k] : offsets[k + 1]].tolist() for k in range(len(offsets) - 1)]


def all_ones(analysis: _core.Analysis) -> np.ndarray:
    return np.ones(analysis.num_units, dtype=np.uint8)


# -- error classes -----------------------------------------------------------------


def test_error_classes_form_the_documented_hierarchy():
    assert issubclass(InvalidEquationsError, ValueError)
    assert issubclass(InvalidEquationsError, DeppruneError)
    assert issubclass(InvalidPlanError, ValueError)
    assert issubclass(InvalidPlanError, DeppruneError)
    assert issubclass(InternalError, DeppruneError)
    assert depprune.InvalidEquationsError is InvalidEquationsError
    assert depprune.InvalidPlanError is InvalidPlanError


def test_base_set_is_valid_and_analysed():
    a = analyze()
    assert a.num_groups == 2
    assert a.group_sizes().tolist() == [2, 3]
    assert a.num_units == 5
    assert a.describe_axis(0) == "product(g0[2], g1[3])"
    assert a.describe_axis(3) == "frozen[4]"


# -- malformed equations -------------------------------------------------------------


def test_negative_axis_size_names_the_axis():
    equations_error("axis 2 has size -3; sizes must be >= 0", axis_sizes=[6, 2, -3, 4])


def test_eq_left_length_mismatch():
    equations_error("eq_left has 2 entries but 1 were expected", eq_left=[0, 0])


def test_eq_kinds_longer_than_eq_left():
    equations_error("eq_left has 1 entries but 2 were expected", eq_kinds=[PRODUCT, EQUAL])


def test_eq_right_offsets_wrong_length():
    equations_error(
        "eq_right_offsets has 3 entries but 2 were expected", eq_right_offsets=[0, 1, 2]
    )
    equations_error("eq_right_offsets has 0 entries but 2 were expected", eq_right_offsets=[])


def test_eq_right_offsets_not_starting_at_zero():
    equations_error(
        "eq_right_offsets must start at 0, never decrease and end at len(eq_right) = 2; "
        "entry 0 is 1",
        eq_right_offsets=[1, 2],
    )
    equations_error("entry 0 is -1", eq_right_offsets=[-1, 2])


def test_eq_right_offsets_decreasing():
    equations_error(
        "entry 2 is 1",
        eq_kinds=[PRODUCT, EQUAL],
        eq_left=[0, 1],
        eq_right_offsets=[0, 2, 1],
        eq_right=[1, 2],
    )


def test_eq_right_offsets_not_ending_at_len_eq_right():
    equations_error("end at len(eq_right) = 2; entry 1 is 3", eq_right_offsets=[0, 3])
    equations_error("end at len(eq_right) = 3; entry 1 is 2", eq_right=[1, 2, 2])


def test_unknown_equation_kind():
    equations_error(
        "equation 0 has kind 7; kinds are 0 (equal), 1 (sum), 2 (product)", eq_kinds=[7]
    )
    equations_error("equation 0 has kind -1", eq_kinds=[-1])


def test_axis_out_of_range_names_equation_and_axis():
    # 300 axes, 17 valid equations, then equation 17 refers to axis 912.
    n = 300
    kinds = [EQUAL] * 18
    lefts = [*range(17), 912]
    rights = list(range(1, 19))
    with pytest.raises(InvalidEquationsError) as info:
        _core.analyze(
            axis_sizes=np.ones(n, dtype=np.int64),
            eq_kinds=i64(*kinds),
            eq_left=i64(*lefts),
            eq_right_offsets=np.arange(19, dtype=np.int64),
            eq_right=i64(*rights),
            frozen_axes=i64(),
            row_params=i64(),
            row_dims=i64(),
            row_axes=i64(),
        )
    assert str(info.value) == "equation 17 refers to axis 912 but there are 300 axes"


@pytest.mark.parametrize("bad", [-1, 4, 2**40, -(2**63)])
def test_left_axis_out_of_range(bad):
    equations_error(f"equation 0 refers to axis {bad} but there are 4 axes", eq_left=[bad])


@pytest.mark.parametrize("bad", [-1, 4, 2**63 - 1])
def test_right_axis_out_of_range(bad):
    equations_error(f"equation 0 refers to axis {bad} but there are 4 axes", eq_right=[1, bad])


def test_equal_needs_exactly_one_right_axis():
    equations_error(
        "equation 0 (equal) has 2 right-hand axes; it needs exactly 1",
        axis_sizes=[3, 3, 3, 4],
        eq_kinds=[EQUAL],
    )
    equations_error(
        "equation 0 (equal) has 0 right-hand axes; it needs exactly 1",
        eq_kinds=[EQUAL],
        eq_right_offsets=[0, 0],
        eq_right=[],
    )


@pytest.mark.parametrize("kind, name", [(SUM, "sum"), (PRODUCT, "product")])
def test_sum_and_product_need_a_right_axis(kind, name):
    equations_error(
        f"equation 0 ({name}) has 0 right-hand axes; it needs at least 1",
        eq_kinds=[kind],
        eq_right_offsets=[0, 0],
        eq_right=[],
    )


def test_sum_size_mismatch():
    equations_error(
        "equation 0 (sum) is inconsistent: left axis 0 has size 6 "
        "but the right-hand side has size 5",
        eq_kinds=[SUM],
    )


def test_product_size_mismatch():
    equations_error(
        "equation 0 (product) is inconsistent: left axis 0 has size 7 "
        "but the right-hand side has size 6",
        axis_sizes=[7, 2, 3, 4],
    )


def test_equal_size_mismatch():
    equations_error(
        "equation 0 (equal) is inconsistent: left axis 0 has size 6 "
        "but the right-hand side has size 2",
        eq_kinds=[EQUAL],
        eq_right_offsets=[0, 1],
        eq_right=[1],
    )


def test_product_overflowing_64_bits():
    equations_error(
        "equation 0: the product of the right-hand sizes overflows 64 bits",
        axis_sizes=[6, 2**32, 2**32, 4],
    )


def _sum_of_2_to_the_24_max_size_axes() -> _core.Analysis:
    # Axis sizes are capped at 2**40, so a 64-bit sum overflow takes 2**24 parts.
    parts = 2**24
    return analyze(
        axis_sizes=[6, _core.MAX_AXIS_SIZE],
        eq_kinds=[SUM],
        eq_right_offsets=[0, parts],
        eq_right=np.ones(parts, dtype=np.int64),
        frozen_axes=[],
        row_params=[],
        row_dims=[],
        row_axes=[],
    )


def test_sum_overflowing_64_bits_is_an_error_not_a_wrap():
    with pytest.raises(InvalidEquationsError, match="equation 0"):
        _sum_of_2_to_the_24_max_size_axes()


def test_sum_overflow_message_says_sum():
    with pytest.raises(InvalidEquationsError) as info:
        _sum_of_2_to_the_24_max_size_axes()
    assert str(info.value) == (
        "equation 0: the sum of the right-hand sizes overflows 64 bits; "
        "check the sizes of its right-hand axes"
    )


@pytest.mark.parametrize("bad", [-1, 4])
def test_frozen_axis_out_of_range(bad):
    equations_error(f"frozen_axes[1] is axis {bad} but there are 4 axes", frozen_axes=[3, bad])


# -- malformed parameter rows ---------------------------------------------------------


def test_row_params_length_mismatch():
    equations_error("row_params has 3 entries but 2 were expected", row_params=[0, 0, 1])


def test_row_dims_length_mismatch():
    equations_error("row_dims has 1 entries but 2 were expected", row_dims=[0])


def test_row_axes_shorter_than_the_other_row_arrays():
    equations_error("row_params has 2 entries but 1 were expected", row_axes=[0])


def test_negative_param_and_dim():
    equations_error("parameter row 1 has param -1; it must be >= 0", row_params=[0, -1])
    equations_error("parameter row 0 has dim -2; it must be >= 0", row_dims=[-2, 1])


@pytest.mark.parametrize("bad", [-1, 4, 912])
def test_row_axis_out_of_range(bad):
    equations_error(f"parameter row 1 refers to axis {bad} but there are 4 axes", row_axes=[0, bad])


def test_duplicate_param_dim_row():
    equations_error(
        "parameter rows 0 and 2 both describe dim 0 of parameter 5",
        row_params=[5, 5, 5],
        row_dims=[0, 1, 0],
        row_axes=[0, 3, 0],
    )


# -- array types ------------------------------------------------------------------------


@pytest.mark.parametrize("name", ARG_NAMES)
def test_float_array_names_the_argument(name):
    arrays = base_arrays()
    arrays[name] = arrays[name].astype(np.float64)
    with pytest.raises(
        InvalidEquationsError,
        match=rf"argument '{name}' must be a 1-d int64 numpy array .*got a 1-d float64 array",
    ):
        _core.analyze(**arrays)


@pytest.mark.parametrize("dtype", [np.int32, np.uint64, np.bool_])
def test_other_integer_dtypes_are_refused(dtype):
    arrays = base_arrays()
    arrays["row_axes"] = arrays["row_axes"].astype(dtype)
    with pytest.raises(InvalidEquationsError, match=rf"'row_axes' .*got a 1-d {np.dtype(dtype)}"):
        _core.analyze(**arrays)


def test_list_and_2d_arrays_are_refused():
    arrays = base_arrays()
    with pytest.raises(InvalidEquationsError, match=r"'axis_sizes' .*got list"):
        _core.analyze(**{**arrays, "axis_sizes": [6, 2, 3, 4]})
    with pytest.raises(InvalidEquationsError, match=r"'axis_sizes' .*got a 2-d int64 array"):
        _core.analyze(**{**arrays, "axis_sizes": arrays["axis_sizes"].reshape(2, 2)})


@pytest.mark.parametrize("name", ARG_NAMES)
def test_non_contiguous_array_is_copied(name):
    # Two equations, two frozen axes, three rows: every array has >= 2 entries.
    arrays = {
        "axis_sizes": i64(6, 2, 3, 4, 4),
        "eq_kinds": i64(PRODUCT, EQUAL),
        "eq_left": i64(0, 3),
        "eq_right_offsets": i64(0, 2, 3),
        "eq_right": i64(1, 2, 4),
        "frozen_axes": i64(3, 4),
        "row_params": i64(0, 0, 1),
        "row_dims": i64(0, 1, 0),
        "row_axes": i64(0, 3, 0),
    }
    expected = _core.analyze(**arrays)
    arrays[name] = np.repeat(arrays[name], 2)[::2]
    assert not arrays[name].flags.c_contiguous
    a = _core.analyze(**arrays)
    for method in ("group_sizes", "unit_offsets", "member_offsets", "member_rows", "conflicts"):
        assert getattr(a, method)().tolist() == getattr(expected, method)().tolist(), method


def test_non_contiguous_keep_and_groups_are_copied():
    a = analyze()
    keep = np.asarray([1, 1, 0, 0, 1, 1, 1, 1, 0, 0], dtype=np.uint8)
    contiguous = np.ascontiguousarray(keep[::2])
    for x, y in zip(a.kept_indices(keep[::2]), a.kept_indices(contiguous), strict=True):
        assert x.tolist() == y.tolist()
    assert a.kept_mask_of_axis(0, keep[::2]).tolist() == a.kept_mask_of_axis(0, contiguous).tolist()
    for x, y in zip(a.unit_maps(i64(0, 0, 1, 1)[::2]), a.unit_maps(i64(0, 1)), strict=True):
        assert x.tolist() == y.tolist()


def test_non_contiguous_array_is_not_reported_as_internal_error():
    arrays = base_arrays()
    arrays["axis_sizes"] = np.repeat(arrays["axis_sizes"], 2)[::2]
    try:
        analysis = _core.analyze(**arrays)
    except InternalError:
        raise
    except (TypeError, ValueError):  # ValueError: also the DeppruneError argument errors
        return
    assert analysis.group_sizes().tolist() == [2, 3]


# -- malformed plans and queries ----------------------------------------------------------


@pytest.mark.parametrize("length", [0, 4, 6, 100])
def test_keep_mask_of_wrong_length(length):
    a = analyze()
    message = f"the keep mask has {length} entries but the groups have 5 units in all"
    keep = np.ones(length, dtype=np.uint8)
    with pytest.raises(InvalidPlanError) as info:
        a.kept_indices(keep)
    assert str(info.value) == message
    with pytest.raises(InvalidPlanError) as info:
        a.kept_mask_of_axis(0, keep)
    assert str(info.value) == message


def test_keep_mask_length_is_checked_without_rows():
    a = analyze(row_params=[], row_dims=[], row_axes=[])
    assert a.num_units == 0
    with pytest.raises(InvalidPlanError, match="the keep mask has 3 entries"):
        a.kept_indices(np.ones(3, dtype=np.uint8))
    with pytest.raises(InvalidPlanError, match="the keep mask has 3 entries"):
        a.kept_mask_of_axis(0, np.ones(3, dtype=np.uint8))
    offsets, indices = a.kept_indices(np.ones(0, dtype=np.uint8))
    assert offsets.tolist() == [0] and indices.tolist() == []


def test_keep_mask_must_be_uint8():
    a = analyze()
    with pytest.raises(InvalidPlanError, match=r"'keep' must be a 1-d uint8 .*got a 1-d int64"):
        a.kept_indices(np.ones(5, dtype=np.int64))
    with pytest.raises(InvalidPlanError, match=r"'keep' must be a 1-d uint8 .*got a 1-d bool"):
        a.kept_indices(np.ones(5, dtype=bool))


@pytest.mark.parametrize("bad", [2, 17, -1, -(2**63)])
def test_unit_maps_group_out_of_range(bad):
    a = analyze()
    with pytest.raises(InvalidPlanError) as info:
        a.unit_maps(i64(0, bad))
    assert str(info.value) == f"group {bad} does not exist; there are 2 groups"


@pytest.mark.parametrize("bad", [4, 912, -1, -5])
def test_describe_axis_out_of_range(bad):
    a = analyze()
    with pytest.raises(InvalidPlanError) as info:
        a.describe_axis(bad)
    assert str(info.value) == f"axis {bad} does not exist; there are 4 axes"


@pytest.mark.parametrize("bad", [4, 912])
def test_kept_mask_of_axis_out_of_range(bad):
    a = analyze()
    with pytest.raises(InvalidPlanError) as info:
        a.kept_mask_of_axis(bad, all_ones(a))
    assert str(info.value) == f"axis {bad} does not exist; there are 4 axes"


@pytest.mark.parametrize("bad", [-1, -5, -(2**63)])
def test_kept_mask_of_negative_axis_names_the_axis(bad):
    a = analyze()
    with pytest.raises(InvalidPlanError) as info:
        a.kept_mask_of_axis(bad, all_ones(a))
    assert str(info.value) == f"axis {bad} does not exist; there are 4 axes"


def test_kept_mask_of_negative_axis_is_an_invalid_plan_error():
    a = analyze()
    with pytest.raises(InvalidPlanError, match="does not exist; there are 4 axes"):
        a.kept_mask_of_axis(-5, all_ones(a))


def test_axis_beyond_int64_is_an_overflow_error():
    a = analyze()
    with pytest.raises(OverflowError):
        a.describe_axis(2**70)
    with pytest.raises(OverflowError):
        a.kept_mask_of_axis(2**70, all_ones(a))


# -- huge sizes: errors, never panics or aborts ----------------------------------------------


def test_total_units_overflowing_int64_is_rejected():
    big = 2**62
    try:
        a = analyze(
            axis_sizes=[big, big, big],
            eq_kinds=[],
            eq_left=[],
            eq_right_offsets=[0],
            eq_right=[],
            frozen_axes=[],
            row_params=[0, 1, 2],
            row_dims=[0, 0, 0],
            row_axes=[0, 1, 2],
        )
    except InvalidEquationsError:
        return
    assert a.num_units == int(a.group_sizes().sum()) >= 0


def _huge_group(size: int = 2**62) -> _core.Analysis:
    return analyze(
        axis_sizes=[size],
        eq_kinds=[],
        eq_left=[],
        eq_right_offsets=[0],
        eq_right=[],
        frozen_axes=[],
        row_params=[0],
        row_dims=[0],
        row_axes=[0],
    )


def test_axis_size_limit_is_exported():
    assert _core.MAX_AXIS_SIZE == 2**40


@pytest.mark.parametrize("size", [2**40 + 1, 2**62, 2**63 - 1])
def test_axis_larger_than_the_limit_is_rejected(size):
    with pytest.raises(InvalidEquationsError) as info:
        analyze(axis_sizes=[6, 2, 3, size])
    assert str(info.value) == (
        f"axis 3 has size {size}, more than the limit of {2**40} elements per axis; "
        "no tensor dim is that large, so check the size given for this axis"
    )


def test_huge_group_is_described_without_materialising_it():
    a = _huge_group(_core.MAX_AXIS_SIZE)
    assert a.group_sizes().tolist() == [2**40]
    assert a.num_units == 2**40
    assert a.describe_axis(0) == f"g0[{2**40}]"


def test_unit_maps_of_huge_group_does_not_panic():
    try:
        a = _huge_group()
        a.unit_maps(i64(0))
    except (DeppruneError, MemoryError):
        return
    except BaseException as err:  # PanicException derives from BaseException
        pytest.fail(f"{type(err).__module__}.{type(err).__name__}: {err}")
    pytest.fail("unit_maps of 2**62 units returned")


def test_kept_indices_of_huge_frozen_axis_does_not_abort():
    code = textwrap.dedent(
        """
        import numpy as np
        from depprune import _core
        a = np.asarray
        try:
            x = _core.analyze(a([2**62]), a([], 'i8'), a([], 'i8'), a([0]), a([], 'i8'),
                              a([0]), a([0]), a([0]), a([0]))
            x.kept_indices(np.ones(0, np.uint8))
        except BaseException as e:
            print(type(e).__name__)
        """
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr[-300:]
    assert proc.stdout.strip() in {"ResourceError", "InvalidEquationsError", "InvalidPlanError"}


@pytest.mark.skipif(sys.platform != "linux", reason="address-space limit via /proc and RLIMIT_AS")
def test_materialising_max_size_axes_is_a_memory_error_not_an_abort():
    # Axes of the largest valid size cannot be materialised; under an address-space
    # limit every allocation fails, so each query must raise ResourceError (a
    # MemoryError), not abort.
    code = textwrap.dedent(
        """
        import resource
        import numpy as np
        from depprune import _core
        big = _core.MAX_AXIS_SIZE
        a = lambda *v: np.asarray(v, dtype=np.int64)
        group = _core.analyze(a(big), a(), a(), a(0), a(), a(), a(0), a(0), a(0))
        frozen = _core.analyze(a(big), a(), a(), a(0), a(), a(0), a(0), a(0), a(0))
        with open("/proc/self/status") as status:
            vm_kb = next(int(l.split()[1]) for l in status if l.startswith("VmSize:"))
        limit = vm_kb * 1024 + (1 << 30)
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
        for call in (
            lambda: group.unit_maps(a(0)),
            lambda: frozen.kept_indices(np.ones(0, np.uint8)),
            lambda: frozen.kept_mask_of_axis(0, np.ones(0, np.uint8)),
        ):
            try:
                call()
                print("returned")
            except MemoryError as e:
                print(type(e).__name__, e)
        """
    )
    env = {**os.environ, "OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, env=env
    )
    assert proc.returncode == 0, proc.stderr[-300:]
    lines = proc.stdout.strip().splitlines()
    assert [line.split()[0] for line in lines] == ["ResourceError"] * 3, lines
    assert lines[0].startswith(f"ResourceError unit_maps needs {2**40} values at once")
    assert lines[1].startswith(f"ResourceError kept_indices needs {2**40} values at once")
    assert "too large to materialise on this machine" in lines[2]


# -- correct results on hand-checked inputs ----------------------------------------------------


def test_empty_input_is_valid_and_empty():
    a = analyze(
        axis_sizes=[],
        eq_kinds=[],
        eq_left=[],
        eq_right_offsets=[0],
        eq_right=[],
        frozen_axes=[],
        row_params=[],
        row_dims=[],
        row_axes=[],
    )
    assert a.num_groups == 0
    assert a.num_units == 0
    assert a.unit_offsets().tolist() == [0]
    assert a.member_offsets().tolist() == [0]
    offsets, indices = a.kept_indices(np.zeros(0, dtype=np.uint8))
    assert offsets.tolist() == [0]
    assert indices.tolist() == []


def test_base_set_unit_maps_and_kept_indices():
    a = analyze()
    offsets, values = a.unit_maps(i64(0, 1))
    assert csr_rows(offsets, values) == [[0, 0, 0, 1, 1, 1], [0, 1, 2, 0, 1, 2]]
    keep = np.asarray([1, 0, 1, 0, 1], dtype=np.uint8)  # drop head 1, head_dim 1
    offsets, indices = a.kept_indices(keep)
    assert csr_rows(offsets, indices) == [[0, 2], [0, 1, 2, 3]]
    assert a.kept_mask_of_axis(0, keep).tolist() == [1, 0, 1, 0, 0, 0]
    assert a.kept_mask_of_axis(3, keep).tolist() == [1, 1, 1, 1]
    assert a.kept_mask_of_axis(0, keep).dtype == np.uint8


def test_any_nonzero_keep_byte_keeps():
    a = analyze()
    plain = a.kept_indices(np.asarray([1, 0, 1, 1, 1], dtype=np.uint8))
    loud = a.kept_indices(np.asarray([255, 0, 7, 2, 1], dtype=np.uint8))
    assert all(np.array_equal(x, y) for x, y in zip(plain, loud, strict=True))


def test_outputs_are_int64_arrays():
    a = analyze()
    for array in (
        a.group_sizes(),
        a.unit_offsets(),
        a.member_offsets(),
        a.member_rows(),
        a.conflicts(),
        *a.unit_maps(i64(0)),
        *a.kept_indices(all_ones(a)),
    ):
        assert isinstance(array, np.ndarray)
        assert array.dtype == np.int64
        assert array.ndim == 1


def test_conflict_is_reported_by_equation_index():
    # x (24) = product(6, 4) = product(4, 6): no common mixed radix.
    a = analyze(
        axis_sizes=[24, 6, 4, 4, 6],
        eq_kinds=[PRODUCT, PRODUCT],
        eq_left=[0, 0],
        eq_right_offsets=[0, 2, 4],
        eq_right=[1, 2, 3, 4],
        frozen_axes=[],
        row_params=[0],
        row_dims=[0],
        row_axes=[0],
    )
    assert a.conflicts().tolist() == [1]
    assert a.num_groups == 0


def test_release_the_gil_and_still_give_the_same_result_from_threads():
    from concurrent.futures import ThreadPoolExecutor

    a = analyze()
    keep = np.asarray([1, 0, 1, 0, 1], dtype=np.uint8)
    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(lambda _: a.kept_indices(keep)[1].tolist(), range(16)))
    assert results == [[0, 2, 0, 1, 2, 3]] * 16


# -- hypothesis: random valid equation sets ------------------------------------------------------

LEAF_SIZES = [1, 2, 2, 3, 4]


def _size(expr, leaves):
    if expr[0] == "leaf":
        return leaves[expr[1]]
    sizes = [_size(c, leaves) for c in expr[1]]
    return sum(sizes) if expr[0] == "sum" else int(np.prod(sizes))


def _exprs(num_leaves: int) -> st.SearchStrategy:
    leaf = st.tuples(st.just("leaf"), st.integers(0, num_leaves - 1))
    return st.recursive(
        leaf,
        lambda children: st.tuples(
            st.sampled_from(["sum", "product"]), st.lists(children, min_size=2, max_size=3)
        ),
        max_leaves=6,
    )


@st.composite
def valid_equations(draw) -> AxisEquations:
    """Random structures over ground-truth leaves, emitted with aliasing and
    regrouping (like the Rust oracle test), plus noise equalities, cuts,
    factorisations and freezes; every axis is a parameter row (or a random subset)."""
    eqs = AxisEquations()
    leaves = draw(st.lists(st.sampled_from(LEAF_SIZES), min_size=1, max_size=4))
    leaf_axes = [eqs.axis(s) for s in leaves]

    def emit(expr) -> int:
        if expr[0] == "leaf":
            axis = leaf_axes[expr[1]]
            if draw(st.booleans()):
                return axis
            alias = eqs.axis(leaves[expr[1]])
            if draw(st.booleans()):
                eqs.equal(alias, axis)
            else:
                eqs.equal(axis, alias)
            return alias
        kind, children = expr
        axes = [emit(c) for c in children]
        sizes = [_size(c, leaves) for c in children]
        combine = sum if kind == "sum" else (lambda s: int(np.prod(s)))
        if len(axes) >= 3 and draw(st.booleans()):
            start = draw(st.integers(0, len(axes) - 2))
            stop = draw(st.integers(start + 2, len(axes)))
            mid = eqs.axis(combine(sizes[start:stop]))
            (eqs.sum if kind == "sum" else eqs.product)(mid, axes[start:stop])
            axes[start:stop] = [mid]
        top = eqs.axis(_size(expr, leaves))
        (eqs.sum if kind == "sum" else eqs.product)(top, axes)
        return top

    for _ in range(draw(st.integers(1, 3))):
        expr = draw(_exprs(len(leaves)).filter(lambda e: _size(e, leaves) <= 24))
        top = emit(expr)
        if draw(st.booleans()):
            eqs.equal(top, emit(expr))
    for _ in range(draw(st.integers(0, 3))):
        x = draw(st.integers(0, eqs.num_axes - 1))
        y = draw(st.integers(0, eqs.num_axes - 1))
        if eqs.axis_sizes[x] == eqs.axis_sizes[y]:
            eqs.equal(x, y)
    for _ in range(draw(st.integers(0, 2))):
        x = draw(st.integers(0, eqs.num_axes - 1))
        n = eqs.axis_sizes[x]
        if n < 2:
            continue
        if draw(st.booleans()):
            cut = draw(st.integers(1, n - 1))
            eqs.sum(x, [eqs.axis(cut), eqs.axis(n - cut)])
        else:
            divisors = [f for f in range(2, n) if n % f == 0]
            if divisors:
                f = draw(st.sampled_from(divisors))
                eqs.product(x, [eqs.axis(f), eqs.axis(n // f)])
    for axis in draw(st.lists(st.integers(0, eqs.num_axes - 1), max_size=2)):
        eqs.freeze(axis)
    every_axis = draw(st.booleans())
    for axis in range(eqs.num_axes):
        if every_axis or draw(st.booleans()):
            eqs.param(f"p{axis}", 0, axis)
    return eqs


def _keep_masks(data, num_units: int) -> list[np.ndarray]:
    masks = [np.ones(num_units, dtype=np.uint8), np.zeros(num_units, dtype=np.uint8)]
    for _ in range(3):
        bits = data.draw(st.lists(st.booleans(), min_size=num_units, max_size=num_units))
        masks.append(np.asarray(bits, dtype=np.uint8))
    return masks


def _groups(a: _core.Analysis) -> list[tuple[int, list[int]]]:
    sizes = a.group_sizes().tolist()
    rows = csr_rows(a.member_offsets(), a.member_rows())
    return list(zip(sizes, rows, strict=True))


PROPERTY_SETTINGS = settings(
    max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)


@PROPERTY_SETTINGS
@given(eqs=valid_equations(), data=st.data())
def test_valid_sets_satisfy_the_analysis_invariants(eqs, data):
    arrays = eqs.arrays()
    a = _core.analyze(**arrays)
    sizes = a.group_sizes()
    num_rows = len(eqs.row_axes)

    # Group sizes, unit offsets and member offsets are consistent CSR.
    assert a.num_groups == len(sizes)
    assert (sizes > 0).all()
    assert a.num_units == int(sizes.sum())
    assert a.unit_offsets().tolist() == [0, *np.cumsum(sizes).tolist()]
    member_offsets = a.member_offsets()
    assert member_offsets[0] == 0 and (np.diff(member_offsets) >= 1).all()
    assert member_offsets[-1] == len(a.member_rows())
    for _, rows in _groups(a):
        assert len(rows) == len(set(rows)), "a row is listed twice in one group"
        assert all(0 <= r < num_rows for r in rows)
    conflicts = a.conflicts().tolist()
    assert conflicts == sorted(set(conflicts))
    assert all(-1 <= c < eqs.num_equations for c in conflicts)

    # Unit maps: one map per member, of the member's axis size, covering every unit.
    groups = _groups(a)
    maps: dict[int, list[tuple[int, np.ndarray]]] = {r: [] for r in range(num_rows)}
    offsets, values = a.unit_maps(np.arange(a.num_groups, dtype=np.int64))
    k = 0
    for g, (size, rows) in enumerate(groups):
        for row in rows:
            unit_map = values[offsets[k] : offsets[k + 1]]
            k += 1
            assert len(unit_map) == eqs.axis_sizes[eqs.row_axes[row]]
            assert set(unit_map[unit_map >= 0].tolist()) == set(range(size))
            assert (unit_map >= -1).all()
            maps[row].append((g, unit_map))
    assert k == len(offsets) - 1

    unit_offsets = a.unit_offsets()
    for keep in _keep_masks(data, a.num_units):
        row_offsets, indices = a.kept_indices(keep)
        assert len(row_offsets) == num_rows + 1
        for row in range(num_rows):
            size = eqs.axis_sizes[eqs.row_axes[row]]
            got = indices[row_offsets[row] : row_offsets[row + 1]]
            # Sorted, unique, in range.
            assert (np.diff(got) > 0).all()
            assert got.size == 0 or (0 <= got[0] and got[-1] < size)
            # Exactly the indices whose every unit (over all groups) is kept.
            expected = np.ones(size, dtype=bool)
            for g, unit_map in maps[row]:
                on = unit_map >= 0
                expected[on] &= keep[unit_offsets[g] + unit_map[on]] != 0
            assert got.tolist() == np.flatnonzero(expected).tolist()
            # kept_mask_of_axis agrees with kept_indices on the row's axis.
            mask = a.kept_mask_of_axis(eqs.row_axes[row], keep)
            assert np.flatnonzero(mask).tolist() == got.tolist()
        if keep.all():
            for row in range(num_rows):
                size = eqs.axis_sizes[eqs.row_axes[row]]
                got = indices[row_offsets[row] : row_offsets[row + 1]]
                assert got.tolist() == list(range(size))


@PROPERTY_SETTINGS
@given(eqs=valid_equations(), data=st.data())
def test_any_keep_mask_respects_every_equation_and_freeze(eqs, data):
    """Soundness: the element keep flags of every axis satisfy the equations."""
    a = _core.analyze(**eqs.arrays())
    for keep in _keep_masks(data, a.num_units):
        masks = [a.kept_mask_of_axis(x, keep).astype(bool) for x in range(eqs.num_axes)]
        for x in eqs.frozen_axes:
            assert masks[x].all(), f"frozen axis {x} lost elements"
        for e, kind in enumerate(eqs.kinds):
            left = masks[eqs.lefts[e]]
            rights = [masks[r] for r in eqs.rights[eqs.right_offsets[e] : eqs.right_offsets[e + 1]]]
            if kind in (EQUAL, SUM):
                assert left.tolist() == np.concatenate(rights).tolist(), f"equation {e}"
            else:
                grid = rights[0]
                for r in rights[1:]:
                    grid = np.logical_and.outer(grid, r).reshape(-1)
                assert left.tolist() == grid.tolist(), f"equation {e}"
                for r, mask in zip(
                    eqs.rights[eqs.right_offsets[e] : eqs.right_offsets[e + 1]],
                    rights,
                    strict=True,
                ):
                    if eqs.axis_sizes[r] == 1:
                        assert mask.all(), f"size-1 factor {r} of equation {e} removed"


@settings(max_examples=100, deadline=None)
@given(eqs=valid_equations(), data=st.data())
def test_analysis_is_deterministic(eqs, data):
    first = _core.analyze(**eqs.arrays())
    second = _core.analyze(**eqs.arrays())
    for method in ("group_sizes", "unit_offsets", "member_offsets", "member_rows", "conflicts"):
        assert np.array_equal(getattr(first, method)(), getattr(second, method)()), method
    groups = np.arange(first.num_groups, dtype=np.int64)
    for x, y in zip(first.unit_maps(groups), second.unit_maps(groups), strict=True):
        assert np.array_equal(x, y)
    for keep in _keep_masks(data, first.num_units):
        for x, y in zip(first.kept_indices(keep), second.kept_indices(keep), strict=True):
            assert np.array_equal(x, y)
    for axis in range(eqs.num_axes):
        assert first.describe_axis(axis) == second.describe_axis(axis)


# -- hypothesis: random malformed arrays never crash -----------------------------------------------

small_ints = st.integers(-3, 9)


def _exercise(a: _core.Analysis, num_axes: int) -> None:
    """Call every method of a successful analysis; all must work on valid arguments."""
    keep = np.ones(a.num_units, dtype=np.uint8)
    keep[::2] = 0
    a.kept_indices(keep)
    a.unit_maps(np.arange(a.num_groups, dtype=np.int64))
    for axis in range(num_axes):
        a.describe_axis(axis)
        a.kept_mask_of_axis(axis, keep)


@settings(max_examples=500, deadline=None)
@given(arrays=st.fixed_dictionaries({name: st.lists(small_ints, max_size=6) for name in ARG_NAMES}))
def test_random_arrays_raise_input_errors_or_succeed(arrays):
    arrays = {name: i64(*values) for name, values in arrays.items()}
    try:
        a = _core.analyze(**arrays)
    except InvalidEquationsError:
        return
    _exercise(a, len(arrays["axis_sizes"]))


@st.composite
def mutated_equations(draw):
    """A valid set with one array entry changed, appended or removed."""
    arrays = {k: v.tolist() for k, v in draw(valid_equations()).arrays().items()}
    name = draw(st.sampled_from(ARG_NAMES))
    values = arrays[name]
    action = draw(st.sampled_from(["set", "append", "pop"]))
    if action == "set" and values:
        values[draw(st.integers(0, len(values) - 1))] = draw(
            st.integers(-3, 30) | st.sampled_from([2**31, 2**62, 2**63 - 1, -(2**63)])
        )
    elif action == "append":
        values.append(draw(st.integers(-3, 30)))
    elif values:
        values.pop(draw(st.integers(0, len(values) - 1)))
    return {k: i64(*v) for k, v in arrays.items()}


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(arrays=mutated_equations())
def test_mutated_valid_sets_raise_input_errors_or_succeed(arrays):
    try:
        a = _core.analyze(**arrays)
    except InvalidEquationsError as err:
        assert str(err), "error without a message"
        return
    if a.num_units > 10_000 or any(s > 10_000 for s in arrays["axis_sizes"].tolist()):
        return  # a size like 2**31 is valid but too large to materialise here
    _exercise(a, len(arrays["axis_sizes"]))


@settings(max_examples=200, deadline=None)
@given(eqs=valid_equations(), data=st.data())
def test_random_plans_raise_plan_errors_or_succeed(eqs, data):
    a = _core.analyze(**eqs.arrays())
    length = data.draw(st.integers(0, a.num_units + 3))
    keep = np.ones(length, dtype=np.uint8)
    groups = i64(*data.draw(st.lists(st.integers(-3, a.num_groups + 3), max_size=4)))
    axis = data.draw(st.integers(-3, eqs.num_axes + 3))
    for call in (
        lambda: a.kept_indices(keep),
        lambda: a.kept_mask_of_axis(axis, keep),
        lambda: a.unit_maps(groups),
        lambda: a.describe_axis(axis),
    ):
        try:
            call()
        except InvalidPlanError as err:
            assert "does not exist" in str(err) or "keep mask has" in str(err)
    if length != a.num_units:
        with pytest.raises(InvalidPlanError):
            a.kept_indices(keep)
    if not 0 <= axis < eqs.num_axes:
        with pytest.raises(InvalidPlanError):
            a.describe_axis(axis)
