//! Per-row and per-column sums of `|x|` or `x^2` over a row-major matrix: how scoring
//! reads every weight once, at memory speed, without a float32 copy.
//!
//! A weight of shape `(rows, cols)` (a tensor of more dims flattened after its first)
//! is read once; each row's sum and each column's sum come out together. Rows are
//! split across threads; partial sums are float32 over at most [`BLOCK_ROWS`] rows
//! (columns) or 16 interleaved lanes (rows), then added in float64, so the error stays
//! far below the float32 rounding of a sequential sum over 100,000 rows.
//!
//! ```
//! use depprune_core::{power_sums, Bf16, Power};
//! let data = [1.0f32, -2.0, 3.0, 4.0]; // [[1, -2], [3, 4]]
//! let (rows, cols) = power_sums(&data, 2, 2, Power::Square, 1);
//! assert_eq!((rows, cols), (vec![5.0, 25.0], vec![10.0, 20.0]));
//! let halves: Vec<Bf16> = data.iter().map(|x| Bf16((x.to_bits() >> 16) as u16)).collect();
//! assert_eq!(power_sums(&halves, 2, 2, Power::Abs, 2).1, vec![4.0, 6.0]);
//! ```

/// Rows whose column sums are added in float32 before they go into the float64 totals.
pub const BLOCK_ROWS: usize = 256;
const LANES: usize = 16;

/// What is summed: `|x|` (L1 magnitude) or `x^2` (L2).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Power {
    Abs,
    Square,
}

/// A value the sums can read.
pub trait Element: Copy + Send + Sync {
    fn to_f32(self) -> f32;
}

impl Element for f32 {
    #[inline(always)]
    fn to_f32(self) -> f32 {
        self
    }
}

/// A bfloat16, as its bits: the high half of a float32.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(transparent)]
pub struct Bf16(pub u16);

impl Element for Bf16 {
    #[inline(always)]
    fn to_f32(self) -> f32 {
        f32::from_bits(u32::from(self.0) << 16)
    }
}

#[inline(always)]
fn apply(power: Power, x: f32) -> f32 {
    match power {
        Power::Abs => x.abs(),
        Power::Square => x * x,
    }
}

/// Sums of `power(x)` over each row and each column of `data` (`rows x cols`, row-major),
/// on up to `threads` threads. Panics if `data.len() != rows * cols`.
pub fn power_sums<T: Element>(
    data: &[T],
    rows: usize,
    cols: usize,
    power: Power,
    threads: usize,
) -> (Vec<f64>, Vec<f64>) {
    assert_eq!(data.len(), rows * cols, "data is not rows x cols");
    let mut row_sums = vec![0f64; rows];
    let mut col_sums = vec![0f64; cols];
    if rows == 0 || cols == 0 {
        return (row_sums, col_sums);
    }
    // A thread only where it has a few blocks of work.
    let useful = (rows * cols).div_ceil(1 << 20).max(1);
    let threads = threads.clamp(1, useful.min(rows));
    let per_thread = rows.div_ceil(threads);
    let parts: Vec<Vec<f64>> = std::thread::scope(|scope| {
        let handles: Vec<_> = data
            .chunks(per_thread * cols)
            .zip(row_sums.chunks_mut(per_thread))
            .map(|(part, out)| scope.spawn(move || sum_part(part, cols, power, out)))
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("a sums thread panicked"))
            .collect()
    });
    for part in parts {
        for (total, value) in col_sums.iter_mut().zip(part) {
            *total += value;
        }
    }
    (row_sums, col_sums)
}

/// One thread's rows: their sums into `row_out`, its column sums returned.
fn sum_part<T: Element>(data: &[T], cols: usize, power: Power, row_out: &mut [f64]) -> Vec<f64> {
    let mut block = vec![0f32; cols];
    let mut totals = vec![0f64; cols];
    for (index, (row, out)) in data.chunks_exact(cols).zip(row_out.iter_mut()).enumerate() {
        let mut lanes = [0f32; LANES];
        let mut values = row.chunks_exact(LANES);
        let mut sums = block.chunks_exact_mut(LANES);
        for (chunk, column) in (&mut values).zip(&mut sums) {
            for k in 0..LANES {
                let v = apply(power, chunk[k].to_f32());
                lanes[k] += v;
                column[k] += v;
            }
        }
        let mut rest = 0f64;
        for (x, column) in values.remainder().iter().zip(sums.into_remainder()) {
            let v = apply(power, x.to_f32());
            rest += f64::from(v);
            *column += v;
        }
        *out = lanes.iter().map(|&x| f64::from(x)).sum::<f64>() + rest;
        if (index + 1) % BLOCK_ROWS == 0 {
            flush(&mut block, &mut totals);
        }
    }
    flush(&mut block, &mut totals);
    totals
}

fn flush(block: &mut [f32], totals: &mut [f64]) {
    for (total, value) in totals.iter_mut().zip(block.iter_mut()) {
        *total += f64::from(*value);
        *value = 0.0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reference(data: &[f32], rows: usize, cols: usize, power: Power) -> (Vec<f64>, Vec<f64>) {
        let mut r = vec![0f64; rows];
        let mut c = vec![0f64; cols];
        for i in 0..rows {
            for j in 0..cols {
                let v = f64::from(apply(power, data[i * cols + j]));
                r[i] += v;
                c[j] += v;
            }
        }
        (r, c)
    }

    fn close(a: &[f64], b: &[f64]) -> bool {
        a.iter()
            .zip(b)
            .all(|(x, y)| (x - y).abs() <= 1e-5 * y.abs().max(1.0))
    }

    #[test]
    fn matches_a_float64_reference_at_every_shape_and_thread_count() {
        let mut state = 12345u64;
        for &(rows, cols) in &[(1, 1), (3, 17), (600, 33), (1000, 16), (257, 1), (1, 1000)] {
            let data: Vec<f32> = (0..rows * cols)
                .map(|_| {
                    state = state
                        .wrapping_mul(6364136223846793005)
                        .wrapping_add(1442695040888963407);
                    ((state >> 40) as f32 / (1u64 << 24) as f32) - 0.5
                })
                .collect();
            for power in [Power::Abs, Power::Square] {
                let (want_r, want_c) = reference(&data, rows, cols, power);
                for threads in [1, 2, 7] {
                    let (r, c) = power_sums(&data, rows, cols, power, threads);
                    assert!(close(&r, &want_r), "{rows}x{cols} rows");
                    assert!(close(&c, &want_c), "{rows}x{cols} cols");
                }
            }
        }
    }

    #[test]
    fn reads_bfloat16_as_the_high_half_of_a_float32() {
        let values = [1.5f32, -0.25, 3.0e-3, 65504.0];
        let halves: Vec<Bf16> = values
            .iter()
            .map(|x| Bf16((x.to_bits() >> 16) as u16))
            .collect();
        let (rows, _) = power_sums(&halves, 4, 1, Power::Abs, 1);
        let want: Vec<f64> = values
            .iter()
            .map(|x| f64::from(f32::from_bits(x.to_bits() & 0xffff_0000).abs()))
            .collect();
        assert_eq!(rows, want);
    }

    #[test]
    fn empty_matrices_give_zero_sums() {
        assert_eq!(
            power_sums::<f32>(&[], 0, 3, Power::Square, 2),
            (vec![], vec![0.0; 3])
        );
        assert_eq!(
            power_sums::<f32>(&[], 2, 0, Power::Square, 2),
            (vec![0.0; 2], vec![])
        );
    }
}
