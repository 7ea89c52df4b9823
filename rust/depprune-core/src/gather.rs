//! Cutting a row-major tensor: the kept rows and the kept columns of each, in one pass.
//!
//! A tensor of shape `(rows, cols, inner...)` is viewed as `rows x cols` cells of
//! `inner` elements (a conv kernel's spatial taps); the cut keeps some rows (or all)
//! and some columns, in the order given, into a new row-major buffer. Only bytes move,
//! so any element type of the right size works (bfloat16 as `u16`).
//!
//! ```
//! use depprune_core::take_rows_columns;
//! let src: Vec<u16> = (0..12).collect(); // 3 x 4
//! let mut out = vec![0u16; 4];
//! take_rows_columns(&src, 4, 1, Some(&[2, 0]), &[1, 3], &mut out, 1).unwrap();
//! assert_eq!(out, vec![9, 11, 1, 3]);
//! ```

use crate::CoreError;

/// `out = src[rows][:, cols]` over cells of `inner` elements; `src` has `cols_total`
/// columns and `rows = None` keeps every row. Indices are checked (an error names the
/// first one out of range); the work is split by output rows over up to `threads`.
pub fn take_rows_columns<T: Copy + Send + Sync>(
    src: &[T],
    cols_total: usize,
    inner: usize,
    rows: Option<&[i64]>,
    cols: &[i64],
    out: &mut [T],
    threads: usize,
) -> Result<(), CoreError> {
    let row_len = cols_total * inner;
    let rows_total = src.len().checked_div(row_len).unwrap_or(0);
    if row_len * rows_total != src.len() {
        return Err(CoreError::Internal(format!(
            "{} elements are not rows of {cols_total} x {inner}",
            src.len()
        )));
    }
    let kept_rows = rows.map_or(rows_total, <[i64]>::len);
    let out_len = cols.len() * inner;
    if out.len() != kept_rows * out_len {
        return Err(CoreError::Internal(format!(
            "the output holds {} elements, not {kept_rows} x {} x {inner}",
            out.len(),
            cols.len()
        )));
    }
    let in_range = |index: &i64, limit: usize| usize::try_from(*index).is_ok_and(|i| i < limit);
    if let Some(bad) = cols.iter().find(|c| !in_range(c, cols_total)) {
        return Err(CoreError::Internal(format!("column {bad} of {cols_total}")));
    }
    if let Some(bad) = rows.and_then(|r| r.iter().find(|r| !in_range(r, rows_total))) {
        return Err(CoreError::Internal(format!("row {bad} of {rows_total}")));
    }
    if kept_rows == 0 || out_len == 0 {
        return Ok(());
    }
    let cols: Vec<usize> = cols.iter().map(|&c| c as usize * inner).collect();
    let useful = (kept_rows * out_len).div_ceil(1 << 20).max(1);
    let per_thread = kept_rows.div_ceil(threads.clamp(1, useful.min(kept_rows)));
    std::thread::scope(|scope| {
        for (part, chunk) in out.chunks_mut(per_thread * out_len).enumerate() {
            let cols = &cols;
            scope.spawn(move || {
                let first = part * per_thread;
                for (k, target) in chunk.chunks_exact_mut(out_len).enumerate() {
                    let row = rows.map_or(first + k, |r| r[first + k] as usize);
                    let source = &src[row * row_len..(row + 1) * row_len];
                    if inner == 1 {
                        for (cell, &c) in target.iter_mut().zip(cols) {
                            // SAFETY: every column was checked below cols_total, the
                            // length of `source` (one row) when `inner` is 1.
                            *cell = unsafe { *source.get_unchecked(c) };
                        }
                    } else {
                        for (cell, &c) in target.chunks_exact_mut(inner).zip(cols) {
                            cell.copy_from_slice(&source[c..c + inner]);
                        }
                    }
                }
            });
        }
    });
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reference(
        src: &[u32],
        cols_total: usize,
        inner: usize,
        rows: &[i64],
        cols: &[i64],
    ) -> Vec<u32> {
        let row_len = cols_total * inner;
        let mut out = Vec::new();
        for &r in rows {
            for &c in cols {
                let start = r as usize * row_len + c as usize * inner;
                out.extend_from_slice(&src[start..start + inner]);
            }
        }
        out
    }

    #[test]
    fn matches_an_index_by_index_cut() {
        for &(rows_total, cols_total, inner) in &[(5, 7, 1), (40, 3, 9), (1, 1, 1), (300, 64, 1)] {
            let src: Vec<u32> = (0..(rows_total * cols_total * inner) as u32).collect();
            let rows: Vec<i64> = (0..rows_total as i64).rev().step_by(2).collect();
            let cols: Vec<i64> = (0..cols_total as i64).filter(|c| c % 3 != 1).collect();
            for threads in [1, 2, 5] {
                let mut out = vec![0u32; rows.len() * cols.len() * inner];
                take_rows_columns(
                    &src,
                    cols_total,
                    inner,
                    Some(&rows),
                    &cols,
                    &mut out,
                    threads,
                )
                .unwrap();
                assert_eq!(out, reference(&src, cols_total, inner, &rows, &cols));
                let all: Vec<i64> = (0..rows_total as i64).collect();
                let mut every = vec![0u32; rows_total * cols.len() * inner];
                take_rows_columns(&src, cols_total, inner, None, &cols, &mut every, threads)
                    .unwrap();
                assert_eq!(every, reference(&src, cols_total, inner, &all, &cols));
            }
        }
    }

    #[test]
    fn indices_out_of_range_and_wrong_sizes_are_errors() {
        let src = [0u8; 6];
        let mut out = [0u8; 2];
        assert!(take_rows_columns(&src, 3, 1, Some(&[2]), &[0, 1], &mut out, 1).is_err());
        assert!(take_rows_columns(&src, 3, 1, Some(&[0]), &[0, -1], &mut out, 1).is_err());
        assert!(take_rows_columns(&src, 3, 1, Some(&[0]), &[0, 3], &mut out, 1).is_err());
        assert!(take_rows_columns(&src, 3, 1, None, &[0, 1], &mut out, 1).is_err());
        assert!(take_rows_columns(&src, 4, 1, None, &[0], &mut out, 1).is_err());
        assert!(take_rows_columns(&src, 3, 1, Some(&[1]), &[2, 0], &mut out, 1).is_ok());
    }
}
