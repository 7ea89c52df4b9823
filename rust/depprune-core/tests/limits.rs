//! Sizes at and beyond the limits: errors that name the axis, row or query,
//! never a wrap, a panic or an aborted allocation.

mod common;
use common::*;

use depprune_core::{CoreError, MAX_AXIS_SIZE};

#[test]
fn axis_beyond_the_limit_is_rejected() {
    for size in [MAX_AXIS_SIZE + 1, 1 << 62, i64::MAX] {
        let mut b = Builder::new();
        b.axis(4);
        let big = b.axis(size);
        b.param(&[big]);
        let err = b.analyze().unwrap_err();
        assert_eq!(
            err,
            CoreError::AxisTooLarge {
                axis: 1,
                size,
                limit: MAX_AXIS_SIZE
            }
        );
        assert_eq!(
            err.to_string(),
            format!(
                "axis 1 has size {size}, more than the limit of {MAX_AXIS_SIZE} elements per \
                 axis; no tensor dim is that large, so check the size given for this axis"
            )
        );
    }
}

#[test]
fn axis_at_the_limit_is_analysed_without_materialising_it() {
    let mut b = Builder::new();
    let big = b.axis(MAX_AXIS_SIZE);
    b.param(&[big]);
    let a = b.solve();
    assert_eq!(a.group_sizes(), &[MAX_AXIS_SIZE]);
    assert_eq!(a.num_units(), MAX_AXIS_SIZE);
    assert_eq!(a.describe_axis(0).unwrap(), format!("g0[{MAX_AXIS_SIZE}]"));
}

#[test]
fn sum_overflow_names_the_sum() {
    // With sizes capped at 2**40 a 64-bit overflow takes 2**24 parts.
    let mut b = Builder::new();
    let left = b.axis(6);
    let part = b.axis(MAX_AXIS_SIZE);
    b.sum(left, &vec![part; 1 << 24]);
    let err = b.analyze().unwrap_err();
    assert_eq!(
        err,
        CoreError::SizeOverflow {
            equation: 0,
            kind: "sum"
        }
    );
    assert_eq!(
        err.to_string(),
        "equation 0: the sum of the right-hand sizes overflows 64 bits; \
         check the sizes of its right-hand axes"
    );
}

#[test]
fn product_overflow_names_the_product() {
    let mut b = Builder::new();
    let left = b.axis(6);
    let factor = b.axis(1 << 32);
    b.product(left, &[factor, factor]);
    let err = b.analyze().unwrap_err();
    assert!(
        err.to_string()
            .starts_with("equation 0: the product of the right-hand sizes overflows 64 bits"),
        "{err}"
    );
}

#[test]
fn keep_mask_length_is_checked_without_rows() {
    let mut b = Builder::new();
    b.axis(3);
    let a = b.solve();
    assert_eq!(a.num_units(), 0);
    let wrong = CoreError::KeepMaskLength {
        got: 2,
        expected: 0,
    };
    assert_eq!(a.kept_indices(&[1, 1]).unwrap_err(), wrong);
    assert_eq!(a.kept_mask_of_axis(0, &[1, 1]).unwrap_err(), wrong);
    assert_eq!(a.kept_indices(&[]).unwrap(), (vec![0], vec![]));
    assert_eq!(a.kept_mask_of_axis(0, &[]).unwrap(), vec![1, 1, 1]);
}

#[test]
fn negative_query_axis_is_quoted_as_given() {
    let mut b = Builder::new();
    b.axis(3);
    let a = b.solve();
    for axis in [-1, -5, i64::MIN, 1, 7] {
        let wrong = CoreError::QueryAxisOutOfRange { axis, num_axes: 1 };
        assert_eq!(a.kept_mask_of_axis(axis, &[]).unwrap_err(), wrong);
        assert_eq!(a.describe_axis(axis).unwrap_err(), wrong);
    }
    assert_eq!(
        a.kept_mask_of_axis(-5, &[]).unwrap_err().to_string(),
        "axis -5 does not exist; there are 1 axes"
    );
}

#[test]
fn duplicate_row_message_gives_the_fix() {
    let mut b = Builder::new();
    let x = b.axis(4);
    b.row(3, 1, x);
    b.row(3, 1, x);
    assert_eq!(
        b.analyze().unwrap_err().to_string(),
        "parameter rows 0 and 1 both describe dim 1 of parameter 3; \
         give each (parameter, dim) exactly one row"
    );
}
